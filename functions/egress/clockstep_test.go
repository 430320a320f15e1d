package main

import (
	"fmt"
	"io"
	"net/url"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/wsrelay/wsrelay/shared/testkit"
)

// TestSweepWallClockStep: the sweep's timers (missed pong, IDLE_TIMEOUT,
// the next ping) count the time the instance ran, not what its wall
// clock says: a clock stepped forward (NTP after a VM's resume, an
// instance started before its clock was set) dropped every socket at the
// next sweep, as "missed pong" or idle, all reconnecting at once, and one
// stepped back stopped the pings (and the drop of dead peers, whose
// records stayed listed) for as long as the step: a client that waits
// 60 s for a frame (the shipped ones) reconnected.
func TestSweepWallClockStep(t *testing.T) {
	t.Parallel()
	const ping = 20 * time.Second // no ping of the egress's own sweep during the test
	for _, tc := range []struct {
		name string
		env  map[string]string
	}{
		{"missed pong", map[string]string{"ALLOW_ANONYMOUS": "true", "PING_INTERVAL": "20s"}},
		{"idle", map[string]string{"ALLOW_ANONYMOUS": "true", "PING_INTERVAL": "20s", "IDLE_TIMEOUT": "30s"}},
	} {
		t.Run(tc.name+", forward", func(t *testing.T) {
			t.Parallel()
			e := startSecEgress(t, tc.env)
			_, c := e.dialConn(t, url.Values{})
			waitWritten(t, c)
			e.s.sweepConns(testkit.WallStep(time.Now(), 5*time.Minute))
			if c.closeStarted.Load() {
				c.mu.Lock()
				code, why := c.closeCode, c.reason
				c.mu.Unlock()
				t.Fatalf("closed %d (%s) by a sweep after the wall clock stepped 5m forward", code, why)
			}
		})
	}
	t.Run("back", func(t *testing.T) {
		t.Parallel()
		e := startSecEgress(t, map[string]string{"ALLOW_ANONYMOUS": "true", "PING_INTERVAL": "20s"})
		ws, c := e.dialConn(t, url.Values{})
		waitWritten(t, c)
		var pings atomic.Int32
		ws.SetPingHandler(func(data string) error {
			pings.Add(1)
			return ws.WriteControl(websocket.PongMessage, []byte(data), time.Now().Add(time.Second))
		})
		go func() {
			for {
				if _, _, err := ws.NextReader(); err != nil {
					return
				}
			}
		}()
		// A PING_INTERVAL after the connection opened, by the clock
		// the instance runs on, with its wall clock an hour behind.
		e.s.sweepConns(testkit.WallStep(time.Now().Add(ping), -time.Hour))
		for deadline := time.Now().Add(10 * time.Second); pings.Load() == 0; time.Sleep(10 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatal("no ping a PING_INTERVAL after the last, the wall clock stepped an hour back")
			}
		}
	})
}

// waitWritten waits until c's writer has ended the write of the welcome,
// which the client may read before it has: until then the sweep counts
// the connection busy (conn.write), neither idle nor silent nor due a
// ping, and a test of what the sweep does would test nothing.
func waitWritten(t *testing.T, c *conn) {
	t.Helper()
	testkit.Eventually(t, 5*time.Second, func() error {
		if c.busyWrite() {
			return fmt.Errorf("the writer is still writing")
		}
		return nil
	})
}

// TestWriteDeadlineWallClockStep: a write after the wall clock stepped
// back arms its deadline anew when the last one has passed. The deadline
// kept (armWriteDeadline) was compared by the wall clock, which had it an
// hour ahead, while the socket's own (SetWriteDeadline) runs on the
// monotonic clock and had passed: the write failed at once, and a socket
// that had only been quiet for WRITE_TIMEOUT was dropped (1006, "write
// failed") at its next message.
func TestWriteDeadlineWallClockStep(t *testing.T) {
	t.Parallel()
	const timeout = 200 * time.Millisecond
	s := &Server{cfg: Config{SendQueue: 16, WriteTimeout: timeout}}
	server, client := tcpPair(t)
	go func() { _, _ = io.Copy(io.Discard, client) }()
	c := &conn{s: s, nc: server, done: make(chan struct{})}
	frame := wsFrame(opText, []byte(`{"type":"pong"}`))
	if err := c.write(server, [][]byte{frame}, nil, time.Now()); err != nil {
		t.Fatal(err)
	}
	time.Sleep(timeout + 100*time.Millisecond) // quiet past its deadline
	if err := c.write(server, [][]byte{frame}, nil, testkit.WallStep(time.Now(), -time.Hour)); err != nil {
		t.Fatalf("write after the wall clock stepped an hour back: %v", err)
	}
}

// TestSubscriptionWallClockStep: the repair loop finds a node's Pub/Sub
// connection silent (pinged, then replaced after deadAfter) by the time
// the instance ran, not by its wall clock: a clock stepped forward had
// every node's connection replaced at once ("redis subscription silent,
// reconnecting"), each of its channels subscribed again and caught up
// from its stream, and one stepped back left a dead connection unpinged
// and in place for as long as the step, its channels delivering nothing.
func TestSubscriptionWallClockStep(t *testing.T) {
	t.Parallel()
	s, _, logs := confirmedSubscriber(t, "step")
	var n *nodeSub
	s.mu.Lock()
	for _, each := range s.nodes {
		n = each // the only one
	}
	s.mu.Unlock()
	s.regroup(testkit.WallStep(time.Now(), 5*time.Minute))
	for _, r := range logs.JSONLines(t) {
		if r["msg"] == "redis subscription silent, reconnecting" {
			t.Fatal("a node's connection replaced as silent after the wall clock stepped 5m forward")
		}
	}
	// Past pingEvery after its last read, by the clock the instance
	// runs on, with the wall clock an hour behind: pinged for its
	// silence.
	pinged := n.pingedAt.Load()
	s.regroup(testkit.WallStep(time.Now().Add(pingEvery+time.Second), -time.Hour))
	if n.pingedAt.Load() == pinged {
		t.Fatal("a node silent for pingEvery not pinged after the wall clock stepped an hour back")
	}
}

// TestReadPathSilenceWallClockStep: /readyz and the read path's repair
// (server.maintain) measure how long no probe came back through Pub/Sub
// by the time the instance ran: by the wall clock, a clock stepped
// forward had /readyz answer 503 (load balancers taking every instance
// out at once) and the read path resubscribed, and one stepped back hid
// a dead read path, its channels delivering nothing, for as long as the
// step.
func TestReadPathSilenceWallClockStep(t *testing.T) {
	t.Parallel()
	const probe = 200 * time.Millisecond
	e := startSecEgress(t, map[string]string{"ALLOW_ANONYMOUS": "true", "PROBE_INTERVAL": "200ms"})
	// A probe has come back (readyz's own condition). The step forward
	// is taken from the same reading: from a later one, a test
	// descheduled while no probe came back (Redis or the receive loop
	// slow, a loaded machine) saw the silence grow past 3×PROBE_INTERVAL
	// with no step at all, and failed.
	var at time.Time
	testkit.Eventually(t, 10*time.Second, func() error {
		at = time.Now()
		if q := e.s.hub.readSilence(at); q > probe {
			return fmt.Errorf("no probe back for %v", q)
		}
		return nil
	})
	if q := e.s.hub.readSilence(testkit.WallStep(at, time.Hour)); q > 3*probe {
		t.Fatalf("read path silent for %v after the wall clock stepped an hour forward", q)
	}
	// 10 PROBE_INTERVALs on, by the clock the instance runs on, with the
	// wall clock an hour behind: silent.
	if q := e.s.hub.readSilence(testkit.WallStep(time.Now().Add(10*probe), -time.Hour)); q < 3*probe {
		t.Fatalf("read path silent for %v only, 10 PROBE_INTERVALs after the last probe, the wall clock stepped an hour back", q)
	}
}
