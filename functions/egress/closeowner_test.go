package main

import (
	"bytes"
	"errors"
	"io"
	"log/slog"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/protocol"
	"github.com/wsrelay/wsrelay/shared/stream"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// TestClosesEndWithTheirCaller: the sweep (lifetime, idle, token expiry,
// missed pong), the hub's operator disconnect and the drain close a
// connection in their own goroutine, not in one started for it that
// nothing waits for (docs/design.md, Connections): when they return, the
// close has been made, and nothing of it outlives them but the
// connection's writer, which its handler waits for. And they do not wait
// for a slow socket: each connection's writer is blocked in a write its
// peer, which reads nothing, never takes, and the close returns at once
// (the writer sends the close frame when the socket takes it, or gives
// up after WRITE_TIMEOUT).
func TestClosesEndWithTheirCaller(t *testing.T) {
	const writeTimeout = 30 * time.Second // longer than the test: a close that waited for the socket would show
	newServer := func(t *testing.T) *Server {
		log := slog.New(slog.NewTextHandler(io.Discard, nil))
		return &Server{
			cfg: Config{SendQueue: 1 << 20, WriteTimeout: writeTimeout, PingInterval: time.Hour, IdleTimeout: time.Hour, ShutdownGrace: time.Second},
			log: log,
			hub: newHub(log, nil, keys.Scheme{Prefix: "t:"}, "i", 16),
		}
	}
	frame := wsFrame(opText, bytes.Repeat([]byte("x"), 8<<10))
	// stalled is a registered connection whose writer is in the middle
	// of a write that its peer, reading nothing, never takes.
	stalled := func(t *testing.T, s *Server, id string) *conn {
		server, client := tcpPair(t)
		_ = server.(*net.TCPConn).SetWriteBuffer(4 << 10)
		_ = client.(*net.TCPConn).SetReadBuffer(4 << 10)
		now := time.Now()
		c := &conn{s: s, nc: server, id: id, done: make(chan struct{}), openedAt: now}
		c.lastData.Store(mono(now))
		c.lastRead.Store(mono(now))
		c.lastPing.Store(mono(now))
		c.mu.Lock()
		for range 200 { // 1.6 MB, far more than the buffers hold
			c.queue = append(c.queue, &queued{frame: frame})
		}
		c.startWriterLocked()
		c.mu.Unlock()
		t.Cleanup(func() {
			_ = client.Close()
			_ = server.Close()
			c.writers.Wait()
		})
		// The writer has taken the batch: it is in its write.
		testkit.Eventually(t, 5*time.Second, func() error {
			c.mu.Lock()
			defer c.mu.Unlock()
			if len(c.queue) > 0 {
				return errors.New("the writer has not taken its batch")
			}
			return nil
		})
		s.hub.addConn(c)
		return c
	}
	// full is a registered connection whose socket takes nothing more
	// (its peer reads nothing and the buffers are full), with no write in
	// progress: the sweep counts a connection being written to as neither
	// idle nor silent (conn.write), so its idle and missed-pong closes
	// meet a stalled socket this way, not in a write of the writer.
	full := func(t *testing.T, s *Server, id string) *conn {
		server, client := tcpPair(t)
		_ = server.(*net.TCPConn).SetWriteBuffer(4 << 10)
		_ = client.(*net.TCPConn).SetReadBuffer(4 << 10)
		_ = server.SetWriteDeadline(time.Now().Add(200 * time.Millisecond))
		for {
			if _, err := server.Write(frame); err != nil {
				break
			}
		}
		_ = server.SetWriteDeadline(time.Time{})
		now := time.Now()
		c := &conn{s: s, nc: server, id: id, done: make(chan struct{}), openedAt: now}
		c.lastData.Store(mono(now))
		c.lastRead.Store(mono(now))
		c.lastPing.Store(mono(now))
		t.Cleanup(func() {
			_ = client.Close()
			_ = server.Close()
			c.writers.Wait()
		})
		s.hub.addConn(c)
		return c
	}
	// closedBy checks that c's close was made by the time the caller
	// returned, with code, and that the caller did not wait for the
	// socket.
	closedBy := func(t *testing.T, c *conn, took time.Duration, code int) {
		t.Helper()
		if !c.closeStarted.Load() {
			t.Fatal("the caller returned before the close was made: it runs in a goroutine nobody waits for")
		}
		c.mu.Lock()
		got := c.closeCode
		c.mu.Unlock()
		if got != code {
			t.Fatalf("closed with %d, want %d", got, code)
		}
		if took > writeTimeout/10 {
			t.Fatalf("the caller took %v: it waited for the stalled socket", took)
		}
	}

	sweepCases := []struct {
		name string
		code int
		set  func(s *Server, c *conn)
		idle bool // no write in progress (full, not stalled)
	}{
		{"lifetime", protocol.CloseLifetime, func(s *Server, c *conn) {
			c.lifetime = time.Minute
			c.openedAt = time.Now().Add(-time.Hour)
		}, false},
		{"idle", protocol.CloseIdleTimeout, func(s *Server, c *conn) {
			c.lastData.Store(mono(time.Now().Add(-2 * s.cfg.IdleTimeout)))
		}, true},
		{"token expired", protocol.CloseTokenExpired, func(s *Server, c *conn) {
			c.mu.Lock()
			c.exp = time.Now().Add(-time.Second)
			c.mu.Unlock()
		}, false},
		{"missed pong", 1006, func(s *Server, c *conn) {
			c.lastRead.Store(mono(time.Now().Add(-3 * s.cfg.PingInterval)))
		}, true},
	}
	for _, tc := range sweepCases {
		t.Run("sweep "+tc.name, func(t *testing.T) {
			t.Parallel()
			s := newServer(t)
			get := stalled
			if tc.idle {
				get = full
			}
			c := get(t, s, "c1")
			tc.set(s, c)
			start := time.Now()
			s.sweepConns(time.Now())
			closedBy(t, c, time.Since(start), tc.code)
		})
	}

	t.Run("operator disconnect", func(t *testing.T) {
		t.Parallel()
		s := newServer(t)
		c := stalled(t, s, "c1")
		start := time.Now()
		s.hub.deliver(s.hub.inbox, stream.ID{MS: 1}, stream.Disconnect(c.id), textFrame(`{}`), 0, nil)
		closedBy(t, c, time.Since(start), 4003)
	})

	t.Run("drain", func(t *testing.T) {
		t.Parallel()
		s := newServer(t)
		// Not counted in s.wg (no handler runs): drain does not wait for
		// them to end, only for its closes to be made.
		cs := []*conn{stalled(t, s, "c1"), stalled(t, s, "c2"), stalled(t, s, "c3")}
		start := time.Now()
		s.drain()
		took := time.Since(start)
		for _, c := range cs {
			closedBy(t, c, took, protocol.CloseGoingAway)
		}
	})
}

// deadlineConn records the read deadlines set on a net.Conn, and holds a
// far one (more than two seconds ahead) until something was written or
// 200 ms went by: it widens the window in which a server close's writer
// may send the close frame, and shorten the wait for the client's answer
// to a second, before closeWith sets its own bound.
type deadlineConn struct {
	net.Conn
	wrote     chan struct{}
	wroteOnce sync.Once
	mu        sync.Mutex
	last      time.Time
}

func (d *deadlineConn) Write(p []byte) (int, error) {
	n, err := d.Conn.Write(p)
	d.wroteOnce.Do(func() { close(d.wrote) })
	return n, err
}

func (d *deadlineConn) SetReadDeadline(t time.Time) error {
	if time.Until(t) > 2*time.Second {
		select {
		case <-d.wrote:
		case <-time.After(200 * time.Millisecond):
		}
	}
	d.mu.Lock()
	d.last = t
	d.mu.Unlock()
	return d.Conn.SetReadDeadline(t)
}

// TestServerCloseWaitsASecond: once a server close's frame is out, the
// connection waits a second for the client's answer, not WRITE_TIMEOUT
// plus a second: the longer bound closeWith sets for the whole close
// must not land after the writer's shorter one. Before, it was set after
// the writer had been started, and a writer quick to send the close
// frame had its second undone (the connection lingered 10 s more).
func TestServerCloseWaitsASecond(t *testing.T) {
	t.Parallel()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	s := &Server{cfg: Config{SendQueue: 16, WriteTimeout: 10 * time.Second}, log: log}
	server, client := tcpPair(t)
	defer client.Close()
	dc := &deadlineConn{Conn: server, wrote: make(chan struct{})}
	c := &conn{s: s, nc: dc, done: make(chan struct{})}
	c.closeWith(protocol.CloseIdleTimeout, "idle timeout", true)
	c.writers.Wait()
	dc.mu.Lock()
	left := time.Until(dc.last)
	dc.mu.Unlock()
	if left > 1500*time.Millisecond {
		t.Fatalf("after the close frame was sent, the read deadline is %v away, want about a second", left.Round(time.Millisecond))
	}
	// The close frame did go out: FIN and opcode, a short payload, the
	// code first.
	_ = client.SetReadDeadline(time.Now().Add(5 * time.Second))
	hdr := make([]byte, 4)
	if _, err := io.ReadFull(client, hdr); err != nil || hdr[0] != 0x80|opClose || !bytes.Equal(hdr[2:], u16(protocol.CloseIdleTimeout)) {
		t.Fatalf("%x, %v: want a close frame with %d", hdr, err, protocol.CloseIdleTimeout)
	}
}

// TestSendQueueHoldsSendQueueFrames: a connection's outgoing queue holds
// SEND_QUEUE frames, and the frame after them closes it 4002 (the README's
// table; docs/protocol.md, close codes: "the outgoing queue (SEND_QUEUE
// frames) overflowed"), not one frame sooner or later. The writer is held
// here, as openConn holds it until the connection is registered, so that
// nothing leaves the queue.
func TestSendQueueHoldsSendQueueFrames(t *testing.T) {
	t.Parallel()
	const size = 16
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	s := &Server{cfg: Config{SendQueue: size, WriteTimeout: time.Second}, log: log}
	server, client := tcpPair(t)
	defer client.Close()
	c := &conn{s: s, nc: server, done: make(chan struct{}), writing: true}
	frame := wsFrame(opText, []byte(`"x"`))
	for i := range size {
		if queued, _ := c.offer(&queued{frame: frame}); !queued || c.isClosing() {
			t.Fatalf("frame %d of a queue of %d: queued %v, closing %v; want it queued", i+1, size, queued, c.isClosing())
		}
	}
	if n := queuedFrames(c); n != size {
		t.Fatalf("%d frames queued, want %d", n, size)
	}
	if queued, _ := c.offer(&queued{frame: frame}); queued {
		t.Fatalf("frame %d queued in a queue of %d", size+1, size)
	}
	c.mu.Lock()
	code, closing := c.closeCode, c.closing
	c.mu.Unlock()
	if !closing || code != protocol.CloseSlowConsumer {
		t.Fatalf("after frame %d of a queue of %d: closing %v, code %d; want %d", size+1, size, closing, code, protocol.CloseSlowConsumer)
	}
	c.unlisting.Wait() // not listed: nothing to remove
}

// lossConn is a socket whose writes all go through and whose read
// deadlines are recorded: what TestServerCloseMeetsLoss looks at.
type lossConn struct {
	net.Conn // nil: only the methods below are used
	mu       sync.Mutex
	last     time.Time
}

func (l *lossConn) Write(p []byte) (int, error)      { return len(p), nil }
func (l *lossConn) Close() error                     { return nil }
func (l *lossConn) SetWriteDeadline(time.Time) error { return nil }
func (l *lossConn) SetReadDeadline(t time.Time) error {
	l.mu.Lock()
	l.last = t
	l.mu.Unlock()
	return nil
}

// TestServerCloseMeetsLoss: a server close (here the idle timeout's) made
// at the instant the writer finds the peer gone (lostOnWrite) leaves the
// reader a second to read what the client sent, as the loss alone does,
// and leaves the end to it unless the close came first. A close that
// found no loss yet and then, past lostOnWrite, set its own bound, kept
// a reader whose client had reset WRITE_TIMEOUT and a second (11 s)
// instead of one, and logged the client's end as the server's close
// (439). Each round races the two from a common start: the window is a
// few instructions wide, so it takes many rounds to show.
func TestServerCloseMeetsLoss(t *testing.T) {
	t.Parallel()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	s := &Server{cfg: Config{SendQueue: 16, WriteTimeout: 10 * time.Second}, log: log}
	const rounds = 20000
	for i := range rounds {
		lc := &lossConn{}
		// writing: lostOnWrite's caller is the writer, which stays the
		// socket's for good.
		c := &conn{s: s, nc: lc, done: make(chan struct{}), writing: true}
		var start, both sync.WaitGroup
		start.Add(1)
		both.Add(2)
		go func() {
			defer both.Done()
			start.Wait()
			c.closeWith(protocol.CloseIdleTimeout, "idle timeout", true)
		}()
		go func() {
			defer both.Done()
			start.Wait()
			c.lostOnWrite()
		}()
		start.Done()
		both.Wait()
		c.writers.Wait()
		c.unlisting.Wait()
		lc.mu.Lock()
		left := time.Until(lc.last)
		lc.mu.Unlock()
		if left > 2*time.Second {
			t.Fatalf("round %d of %d: the peer gone, the read deadline is %v away; want a second", i+1, rounds, left.Round(time.Millisecond))
		}
		// The reader's end: the client's, unless the server's close came
		// before the loss.
		c.closeWith(1006, "connection lost", false)
		c.mu.Lock()
		byServer, code := c.byServer, c.closeCode
		c.mu.Unlock()
		if byServer && code != protocol.CloseIdleTimeout || !byServer && code != 1006 {
			t.Fatalf("round %d: ended with %d (by the server: %v)", i+1, code, byServer)
		}
	}
}
