package main

import (
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/wsrelay/wsrelay/shared/keys"
)

// TestSweepAfterStallKeepsClients: an instance that did not run for
// longer than 2×PING_INTERVAL (frozen by its platform, SIGSTOP, a VM
// stall) sent no ping meanwhile, so its clients had nothing to answer.
// The first sweep after it pings them and does not drop them as "missed
// pong"; one that then stays silent for 2×PING_INTERVAL of running time
// is dropped as before.
func TestSweepAfterStallKeepsClients(t *testing.T) {
	t.Parallel()
	const ping = time.Second // sweeps every 500 ms
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	s := &Server{
		epoch: time.Now().Add(-time.Minute),
		cfg:   Config{SendQueue: 16, WriteTimeout: 10 * time.Second, PingInterval: ping, ShutdownGrace: time.Second},
		log:   log,
		hub:   newHub(log, nil, keys.Scheme{Prefix: "t:"}, "i", 16),
	}
	server, client := tcpPair(t)
	t0 := time.Now()
	c := &conn{s: s, nc: server, id: "c1", done: make(chan struct{}), openedAt: t0}
	c.fr.init(server, 1<<16)
	c.lastData.Store(mono(t0))
	c.lastRead.Store(mono(t0.Add(-time.Second))) // its last pong, a second before
	c.lastPing.Store(mono(t0.Add(-time.Second)))
	t.Cleanup(func() {
		_ = client.Close()
		_ = server.Close()
		c.writers.Wait()
	})
	s.hub.addConn(c)

	s.sweepConns(t0)
	// The next sweep comes 60 s later instead of 500 ms: the process was
	// frozen. The client was silent for 1.5 s of the instance's running
	// time, under 2×PING_INTERVAL.
	thaw := t0.Add(60 * time.Second)
	s.sweepConns(thaw)
	if c.closeStarted.Load() {
		c.mu.Lock()
		code, why := c.closeCode, c.reason
		c.mu.Unlock()
		t.Fatalf("closed %d (%s) by the first sweep after the instance's own stall", code, why)
	}
	if last := c.lastPing.Load(); last != mono(thaw) {
		t.Fatalf("not pinged at the sweep after the stall (last ping %v)", time.Duration(last-mono(t0)))
	}
	// It answers nothing: 2×PING_INTERVAL of sweeps later it is dropped.
	for at := thaw.Add(ping / 2); !c.closeStarted.Load(); at = at.Add(ping / 2) {
		if at.Sub(thaw) > 3*ping {
			t.Fatal("a client silent for 2×PING_INTERVAL after the stall was not dropped")
		}
		s.sweepConns(at)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closeCode != 1006 {
		t.Fatalf("closed %d, want 1006", c.closeCode)
	}
}
