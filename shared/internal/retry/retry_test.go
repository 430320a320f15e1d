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
