package main

import (
	"bytes"
	"context"
	"regexp"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestThirds(t *testing.T) {
	var samples []sample
	for i := range 8 {
		samples = append(samples, sample{at: time.Duration(i) * time.Second, keys: int64(10 * i)})
	}
	samples = append(samples, sample{at: 9 * time.Second, keys: 1000, final: true})
	keys := func(s sample) float64 { return float64(s.keys) }
	// From 2 s on: 20 … 70, six samples; thirds of two each.
	first, last, ok := thirds(samples, 2*time.Second, keys)
	if !ok || first != 25 || last != 65 {
		t.Fatalf("thirds = %v, %v, %v; want 25, 65, true", first, last, ok)
	}
	if _, _, ok := thirds(samples, 7*time.Second, keys); ok {
		t.Fatal("one sample after warm-up gave thirds")
	}
}

// A short soak with everything in it: the real functions and Redis,
// client churn, cuts, a rolling restart; it finishes, samples and passes
// its checks, and leaves no goroutine of its own behind.
func TestSoakShort(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the functions for about 40 s")
	}
	leaks := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, leaks) })
	var out, errOut bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	err := run(ctx, []string{
		"-duration", "16s", "-sample", "3s", "-warmup", "3s",
		"-clients", "8", "-channels", "3", "-rate", "12", "-churn", "2s",
		"-restart-every", "7s", "-registry-ttl", "3s", "-max-lifetime", "4s", "-history-ttl", "30s",
	}, &out, &errOut)
	t.Logf("stdout:\n%s\nstderr:\n%s", out.String(), errOut.String())
	if err != nil {
		t.Fatalf("soak: %v", err)
	}
	rows := regexp.MustCompile(`(?m)^ *(end )?(\d+m)?\d+s │ `).FindAllString(out.String(), -1)
	if len(rows) < 5 { // the start, at least 4 during the run, the end
		t.Errorf("%d sample rows, want the start, one every 3 s and the end", len(rows))
	}
	for _, want := range []string{"ok   delivery:", "ok   keys: no registry key left", "first third", "egress-a goroutines"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("no %q in the report", want)
		}
	}
	if !strings.Contains(errOut.String(), "drained in") {
		t.Error("no rolling restart happened")
	}
}
