package main

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/protocol"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// TestSlowReaderGetsItsClose: a client closed 4002 (slow consumer) that
// goes on reading, slowly, what was already on its way to it, and that
// sends frames meanwhile (as a browser answers pings), reads all of it and
// then the close frame, however long that takes while it keeps taking
// data. The server's wait for its close reply used to end a second after
// the close frame went into the socket's buffer: the socket was closed
// with that megabyte or so still unsent, the client's next frame reached
// a socket closed for good, the kernel answered it with a reset and threw
// away what it had not sent, close frame included, and the client saw a
// lost connection (1006) instead of 4002.
// The wait is bounded all the same: a client that stops taking data is
// let go WRITE_TIMEOUT later, one that takes a little now and then
// lingerMax later, and a drain does not wait for a slow one.
func TestSlowReaderGetsItsClose(t *testing.T) {
	t.Parallel()
	t.Run("reads on", func(t *testing.T) {
		t.Parallel()
		c, _, sc := slowConsumerClosing(t, "30s", nil, nil)
		start := time.Now()
		frames, n := readSlowly(t, c, sc, 50*time.Millisecond, -1)
		if n < 1<<20 {
			t.Fatalf("%d bytes before the close frame, want at least a megabyte: not what this test is about", n)
		}
		// Its close reply ends it.
		c.send(clientFrame(true, opClose, u16(protocol.CloseSlowConsumer)))
		_ = c.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.br.ReadByte(); !errors.Is(err, io.EOF) {
			t.Fatalf("after the close reply: %v, want the end of the stream", err)
		}
		t.Logf("read %d frames (%d bytes) in %v after the close", frames, n, time.Since(start).Round(time.Millisecond))
	})
	t.Run("stops reading", func(t *testing.T) {
		t.Parallel()
		c, e, sc := slowConsumerClosing(t, "5s", nil, nil)
		readSlowly(t, c, sc, 50*time.Millisecond, 5)
		// It takes nothing more: the server lets it go WRITE_TIMEOUT
		// later, not never.
		testkit.Eventually(t, time.Minute, func() error { return openSockets(e.s, 0) })
	})
	t.Run("takes a little now and then", func(t *testing.T) {
		t.Parallel()
		c, e, sc := slowConsumerClosing(t, "30s", nil, func(s *Server) { s.lingerMax = 2 * time.Second })
		readSlowly(t, c, sc, 50*time.Millisecond, 5)
		// A frame a second: the megabyte or more left would take half a
		// minute or more, each second within WRITE_TIMEOUT of the last.
		defer trickle(c)()
		testkit.Eventually(t, 20*time.Second, func() error { return openSockets(e.s, 0) })
	})
	t.Run("drain", func(t *testing.T) {
		t.Parallel()
		logs := &testkit.SyncBuffer{}
		c, e, sc := slowConsumerClosing(t, "30s", logs, nil)
		readSlowly(t, c, sc, 50*time.Millisecond, 5)
		// Still reading, at a frame a second: the whole of it would take
		// far longer than SHUTDOWN_GRACE (5 s).
		defer trickle(c)()
		e.stop()
		if strings.Contains(logs.String(), "drain grace period over") {
			t.Fatalf("the drain waited its whole grace for the slow reader:\n%s", logs)
		}
	})
}

// slowConsumerClosing subscribes a client with a small receive buffer
// to a channel, appends to it, unread, until at least a megabyte waits
// in the server's send buffer and then SEND_QUEUE overflows, and returns
// once the server has begun closing the client 4002 behind what it sent
// (nothing read yet).
func slowConsumerClosing(t *testing.T, writeTimeout string, logs io.Writer, tune func(*Server)) (*rawWS, *secEgress, *conn) {
	t.Helper()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	if logs == nil {
		logs = io.Discard
	}
	e := startEgressTuned(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true", "SEND_QUEUE": "16",
		"WRITE_TIMEOUT": writeTimeout, "SHUTDOWN_GRACE": "5s"}, logs, tune)
	// What is on its way waits in the server's send buffer, not in the
	// client's.
	c := rawDial(t, e, rcvBufDialer(32<<10))
	c.send(clientFrame(true, opText, []byte(`{"type":"subscribe","channel":"slow"}`)))
	if op, p := c.read(); op != opText || !bytes.Contains(p, []byte(`"subscribed"`)) {
		t.Fatalf("op %d %q, want subscribed", op, p)
	}
	// One message at a time, each taken by the writer before the next,
	// until a megabyte waits in the server's send buffer; then a burst
	// that overflows SEND_QUEUE behind it. (A burst at once would overflow
	// the queue before the writer took any: the close would come first.)
	var sc *conn
	for _, x := range e.s.hub.snapshotConns() {
		sc = x
	}
	cs := e.s.hub.state(ks.Notify("slow"))
	data := []byte(`"` + string(bytes.Repeat([]byte("x"), 32<<10)) + `"`)
	for sc.fr.unsent() < 1<<20 {
		hubReaches(t, cs, appendData(t, rdb, ks, "slow", data, 1)[0])
		testkit.Eventually(t, 10*time.Second, func() error {
			if n := queuedFrames(sc); n > 0 && sc.fr.unsent() < 1<<20 {
				return fmt.Errorf("%d frames queued, and %d bytes in the send buffer, not a megabyte", n, sc.fr.unsent())
			}
			return nil
		})
	}
	for i := 0; !sc.closeStarted.Load(); i++ {
		if i == 200 {
			t.Fatalf("%d bursts, and the server has not closed the socket", i)
		}
		hubReaches(t, cs, appendData(t, rdb, ks, "slow", data, 20)[19])
	}
	return c, e, sc
}

// readSlowly reads c's frames, one every pause, a ping every fifth, up to
// the close frame (which must be 4002) or, when max ≥ 0, until the close
// frame has gone into the server's socket and max frames were read.
func readSlowly(t *testing.T, c *rawWS, sc *conn, pause time.Duration, max int) (frames, n int) {
	t.Helper()
	start := time.Now()
	for {
		op, p, err := c.next()
		if err != nil {
			t.Fatalf("after %d frames (%d bytes) in %v: %v, want the close frame", frames, n, time.Since(start).Round(time.Millisecond), err)
		}
		frames++
		n += len(p)
		if op == opClose {
			if code := int(binary.BigEndian.Uint16(p)); code != protocol.CloseSlowConsumer {
				t.Fatalf("close %d, want %d", code, protocol.CloseSlowConsumer)
			}
			return frames, n
		}
		if frames%5 == 0 {
			c.send(clientFrame(true, opPing, []byte("still here")))
		}
		if max >= 0 && frames >= max {
			sc.mu.Lock()
			sent := sc.closeSent
			sc.mu.Unlock()
			if sent {
				return frames, n
			}
		}
		time.Sleep(pause)
	}
}

// trickle reads a frame of c's a second, in a goroutine of its own,
// until the connection ends or the function it returns is called.
func trickle(c *rawWS) (stop func()) {
	quit := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-quit:
				return
			case <-time.After(time.Second):
			}
			if _, _, err := c.next(); err != nil {
				return
			}
		}
	}()
	return func() { close(quit); <-done }
}
