package main

import (
	"slices"
	"testing"
	"time"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/protocol"
	"github.com/wsrelay/wsrelay/shared/redistest"
)

// TestDrainSpreadsCloses: at shutdown the drain closes its sockets
// DRAIN_RATE a second (each with 1001), not all at once, so that their
// clients do not all reconnect to the other instances in the same
// instant; a socket not closed yet still gets what is published
// meanwhile. With the closes all at once, the last one comes within
// milliseconds of the shutdown.
func TestDrainSpreadsCloses(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	const n, rate = 20, 8
	spread := time.Duration(n-1) * time.Second / rate // 2.375 s, within SHUTDOWN_GRACE/2
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true", "SHUTDOWN_GRACE": "10s", "DRAIN_RATE": "8"})
	type closed struct {
		at   time.Time
		code int
		ids  []string // the messages read before the close
	}
	results := make(chan closed, n)
	for range n {
		ws, _ := subscribedTo(t, e, "spread")
		go func() {
			ids, code := readMessages(ws, 30*time.Second, nil)
			results <- closed{at: time.Now(), code: code, ids: ids}
		}()
	}

	begin := time.Now()
	stopped := make(chan struct{})
	go func() { e.stop(); close(stopped) }()
	first := <-results
	during := appendData(t, rdb, ks, "spread", []byte(`"during"`), 1)[0]
	got := func(r closed) bool { return slices.Contains(r.ids, during) }
	last := first
	reached := 0
	for i := range n {
		r := first
		if i > 0 {
			r = <-results
		}
		if r.code != protocol.CloseGoingAway {
			t.Errorf("socket closed with %d, want %d", r.code, protocol.CloseGoingAway)
		}
		if r.at.After(last.at) {
			last = r
		}
		if got(r) {
			reached++
		}
	}
	<-stopped
	// The last socket is not closed before the spread is over: 19 gaps
	// of 1/8 s from the drain's start, which is after begin.
	if d := last.at.Sub(begin); d < spread-50*time.Millisecond {
		t.Errorf("the last of %d sockets was closed %v after the shutdown began, want about %v (%d a second)", n, d, spread, rate)
	}
	if got(first) {
		t.Error("the first socket closed got the message published after its close")
	}
	if !got(last) {
		t.Errorf("the last socket closed, %v after the shutdown began, did not get the message published after the first close (%d of %d did)", last.at.Sub(begin), reached, n)
	}
	t.Logf("first close %v, last %v after the shutdown began; %d of %d sockets got the message published meanwhile",
		first.at.Sub(begin), last.at.Sub(begin), reached, n)
}

func TestDrainSpread(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		n, rate int
		grace   time.Duration
		want    time.Duration
	}{
		{0, 1000, 10 * time.Second, 0},
		{1, 1000, 10 * time.Second, 0}, // SCF's one socket per instance: closed at once
		{2, 1000, 10 * time.Second, time.Millisecond},
		{1001, 1000, 10 * time.Second, time.Second},
		{100_000, 1000, 10 * time.Second, 5 * time.Second}, // half the grace at most
		{100_000, 0, 10 * time.Second, 0},                  // DRAIN_RATE=0: all at once
		{100, 1000, 0, 0},                                  // SHUTDOWN_GRACE=0: cut at once
		{10_000_001, 1, 24 * time.Hour, 12 * time.Hour},    // the bounds do not overflow
	} {
		if got := drainSpread(c.n, c.rate, c.grace); got != c.want {
			t.Errorf("drainSpread(%d, %d, %v) = %v, want %v", c.n, c.rate, c.grace, got, c.want)
		}
	}
}
