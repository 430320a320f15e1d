package retry

import (
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
