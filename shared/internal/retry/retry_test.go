package retry

import (
	"math"
	"testing"
	"time"
)

// TestBackoff: full jitter within [0, min(max, min·2ⁿ)].
func TestBackoff(t *testing.T) {
	for n, ceil := range []time.Duration{100, 200, 400, 800, 1000, 1000} {
		ceil *= time.Millisecond
		for range 200 {
			if d := Backoff(100*time.Millisecond, time.Second, n); d < 0 || d > ceil {
				t.Fatalf("Backoff(%d) = %v, want 0–%v", n, d, ceil)
			}
		}
	}
	if d := Backoff(100*time.Millisecond, time.Second, 1000); d < 0 || d > time.Second {
		t.Fatalf("Backoff(1000) = %v", d)
	}
}

// TestBackoffHugeBounds: bounds no one would choose still give a wait
// within them: minWait·2ⁿ past int64 does not wrap to a short wait, and
// a maxWait of math.MaxInt64 does not panic.
func TestBackoffHugeBounds(t *testing.T) {
	minWait := time.Duration(1<<44 + 1) // ·2²⁰ wraps to 2²⁰ ns
	floor := 0
	for range 200 {
		if d := Backoff(minWait, 1<<62, 20); d > 1<<20 {
			floor++
		}
	}
	if floor == 0 {
		t.Fatalf("Backoff(%v, 2⁶², 20) stayed within 2²⁰ ns in 200 draws: minWait·2²⁰ wrapped", minWait)
	}
	if d := Backoff(1<<44, math.MaxInt64, 20); d < 0 {
		t.Fatalf("Backoff(2⁴⁴, MaxInt64, 20) = %v", d)
	}
}

// TestBackoffSpread: the waits are spread evenly over their range, so
// that clients cut at the same instant (an egress lost, a platform's cut)
// do not come back in step: 10,000 draws of the first wait (0–500 ms)
// fill each tenth of it with 8–12 % of them, and draws repeat rarely.
func TestBackoffSpread(t *testing.T) {
	const n = 10000
	var tenths [10]int
	seen := make(map[time.Duration]bool, n)
	for range n {
		d := Backoff(500*time.Millisecond, 20*time.Second, 0)
		tenths[min(9, int(d/(50*time.Millisecond)))]++
		seen[d] = true
	}
	for i, c := range tenths {
		if c < n*8/100 || c > n*12/100 {
			t.Fatalf("tenth %d of the range holds %d of %d waits: %v", i, c, n, tenths)
		}
	}
	if len(seen) < n*99/100 {
		t.Fatalf("%d distinct waits in %d draws", len(seen), n)
	}
}
