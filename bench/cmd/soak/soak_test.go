package main

import (
	"bytes"
	"context"
	"regexp"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/wsrelay/wsrelay/shared/stream"
)

func id(ms uint64) stream.ID { return stream.ID{MS: ms} }

// published is a channel's log with seq n acknowledged as id 1001+n.
func published(n int) *pubLog {
	p := newPubLog()
	for seq := range n {
		p.acked[seq] = id(uint64(1001 + seq))
	}
	return p
}

func msg(seq int) event { return event{message: true, id: id(uint64(1001 + seq)), seq: seq} }

func subscribed(ms uint64, recovered bool) event {
	return event{id: id(ms), seq: -1, recovered: recovered}
}

// The checker finds a message lost and one delivered twice, and lets
// through only what a resume said it lost (recovered:false), and a
// closed chain's tail.
func TestChainCheck(t *testing.T) {
	p := published(5)
	for _, c := range []struct {
		name   string
		events []event
		closed bool
		want   []string // substrings of the problems, in order
		gaps   int
	}{
		{name: "whole", events: []event{subscribed(1000, true), msg(0), msg(1), msg(2), msg(3), msg(4)}},
		{name: "gap and duplicate",
			events: []event{subscribed(1000, true), msg(0), msg(1), msg(3), msg(3), msg(4)},
			want:   []string{"duplicate or out of order", "seq 3 delivered twice", "1 acknowledged messages of 5 owed not delivered, the first seq 2"}},
		{name: "resumed without its gap",
			events: []event{subscribed(1000, true), msg(0), subscribed(1001, true), msg(1), msg(3), msg(4)},
			want:   []string{"1 acknowledged messages of 5 owed not delivered"}},
		{name: "gap reported recovered:false",
			events: []event{subscribed(1000, true), msg(0), subscribed(1003, false), msg(3), msg(4)},
			gaps:   1},
		{name: "recovered:true that moves the position",
			events: []event{subscribed(1000, true), msg(0), subscribed(1002, true), msg(2), msg(3), msg(4)},
			want:   []string{"recovered:true moved the position", "1 acknowledged messages of 5 owed"}},
		{name: "tail of an open chain", events: []event{subscribed(1000, true), msg(0), msg(1)},
			want: []string{"3 acknowledged messages of 5 owed not delivered"}},
		{name: "tail of a closed chain", events: []event{subscribed(1000, true), msg(0), msg(1)}, closed: true},
		{name: "a hole in a closed chain", events: []event{subscribed(1000, true), msg(0), msg(2)}, closed: true,
			want: []string{"1 acknowledged messages of 3 owed not delivered"}},
		{name: "never published", events: []event{subscribed(1000, true), msg(0), {message: true, id: id(1500), seq: 9}},
			want: []string{"seq 9, which was never published", "4 acknowledged messages of 5 owed"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			ch := &chain{channel: "x", events: c.events, closed: c.closed}
			problems, gaps := ch.check(p, true)
			if len(problems) != len(c.want) {
				t.Fatalf("problems %q, want %d like %q", problems, len(c.want), c.want)
			}
			for i, w := range c.want {
				if !strings.Contains(problems[i], w) {
					t.Errorf("problem %d is %q, want it to say %q", i, problems[i], w)
				}
			}
			if len(gaps) != c.gaps {
				t.Errorf("gaps %q, want %d", gaps, c.gaps)
			}
		})
	}
}

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
