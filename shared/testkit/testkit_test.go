package testkit

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"
)

// recorder is a testing.TB whose Fatalf records instead of stopping.
type recorder struct {
	testing.TB
	failed string
}

func (r *recorder) Helper() {}
func (r *recorder) Fatalf(format string, args ...any) {
	r.failed = fmt.Sprintf(format, args...)
}

func TestEventually(t *testing.T) {
	calls := 0
	Eventually(t, time.Second, func() error {
		if calls++; calls < 3 {
			return errors.New("not yet")
		}
		return nil
	})
	if calls != 3 {
		t.Fatalf("f called %d times, want 3", calls)
	}

	r := &recorder{TB: t}
	start := time.Now()
	Eventually(r, 100*time.Millisecond, func() error { return errors.New("never") })
	if d := time.Since(start); d < 100*time.Millisecond {
		t.Fatalf("gave up after %v, before within", d)
	}
	if r.failed != "after 100ms: never" {
		t.Fatalf("failure = %q", r.failed)
	}
}

func TestSyncBuffer(t *testing.T) {
	var b SyncBuffer
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 100 {
				_, _ = b.Write([]byte("x\n"))
				_ = b.String()
			}
		})
	}
	wg.Wait()
	if n := strings.Count(b.String(), "x\n"); n != 800 {
		t.Fatalf("%d lines, want 800", n)
	}
}

// TestWallStep: WallStep moves the wall clock alone.
func TestWallStep(t *testing.T) {
	t.Parallel()
	now := time.Now()
	for _, d := range []time.Duration{-time.Hour, time.Minute} {
		s := WallStep(now, d)
		if s.Sub(now) != 0 || now.Sub(s) != 0 {
			t.Fatalf("step %v: monotonic difference %v", d, s.Sub(now))
		}
		if got := s.Round(0).Sub(now.Round(0)); got != d {
			t.Fatalf("step %v: wall moved %v", d, got)
		}
	}
}
