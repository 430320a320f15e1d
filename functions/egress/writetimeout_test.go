package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/protocol"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// TestWriteTimeout: a peer that stops reading is dropped (1006, "write
// failed") once the socket has taken no data for WRITE_TIMEOUT — no
// sooner than half of it, because a busy writer re-arms the deadline only
// when less than half is left — and a peer that keeps reading is not,
// however long the writes go on.
func TestWriteTimeout(t *testing.T) {
	const timeout = 400 * time.Millisecond
	s := &Server{cfg: Config{SendQueue: 1 << 20, WriteTimeout: timeout}}
	frame := wsFrame(opText, bytes.Repeat([]byte("x"), 8<<10))
	newConn := func() (*conn, net.Conn) {
		server, client := tcpPair(t)
		// Small buffers, so that a few frames fill them.
		_ = server.(*net.TCPConn).SetWriteBuffer(4 << 10)
		_ = client.(*net.TCPConn).SetReadBuffer(4 << 10)
		return &conn{s: s, nc: server, done: make(chan struct{})}, client
	}

	t.Run("stalled reader", func(t *testing.T) {
		c, _ := newConn()
		start := time.Now()
		// The peer reads nothing: after the buffers fill, the writer
		// blocks in write(2) until its deadline.
		for range 200 {
			c.enqueue(&queued{frame: frame})
		}
		deadline := time.After(10 * timeout)
		for !c.isClosing() {
			select {
			case <-deadline:
				t.Fatalf("a peer that reads nothing is still connected after %v", time.Since(start))
			case <-time.After(10 * time.Millisecond):
			}
		}
		if d := time.Since(start); d < timeout/2 {
			t.Fatalf("dropped %v after the writes began, before WRITE_TIMEOUT/2", d)
		} else if d > 3*timeout {
			// The buffers fill within milliseconds of the start. The write
			// that filled them had sent bytes when it timed out, and
			// writeAll gives it a fresh WRITE_TIMEOUT: the drop comes
			// about 2×WRITE_TIMEOUT after the socket took its last byte,
			// the most docs/protocol.md (Timeouts) allows. A deadline
			// armed later than that shows here.
			t.Fatalf("dropped %v after the writes began, a peer that took nothing after the first milliseconds; want within 3×WRITE_TIMEOUT (%v)", d.Round(time.Millisecond), 3*timeout)
		}
		c.mu.Lock()
		code, reason := c.closeCode, c.reason
		c.mu.Unlock()
		if code != 1006 || reason != "write failed" {
			t.Fatalf("closed with %d %q, want 1006 \"write failed\"", code, reason)
		}
		c.writers.Wait()
	})

	// largeBatch starts a writer on one batch of frames frames (a
	// replay's backlog), with buffers of 64 KiB: with 4 KiB ones,
	// loopback's 64 KiB segments make the receiver hold back its window
	// updates, and the sender waits for TCP's persist timer instead of
	// the reader.
	const frames = 1000
	largeBatch := func() (*conn, net.Conn) {
		c, client := newConn()
		_ = c.nc.(*net.TCPConn).SetWriteBuffer(64 << 10)
		_ = client.(*net.TCPConn).SetReadBuffer(64 << 10)
		c.mu.Lock()
		for range frames {
			c.queue = append(c.queue, &queued{frame: frame})
		}
		c.startWriterLocked()
		c.mu.Unlock()
		return c, client
	}

	t.Run("slow but steady reader of one large batch", func(t *testing.T) {
		// It takes the reader several WRITE_TIMEOUTs to take: at most
		// 16 KiB per read, a read every 2 ms or more, 1,000 frames of
		// 8 KiB.
		c, client := largeBatch()
		start := time.Now()
		buf := make([]byte, 16<<10)
		for read := 0; read < frames*len(frame); {
			_ = client.SetReadDeadline(time.Now().Add(2 * timeout))
			n, err := client.Read(buf)
			if err != nil {
				c.mu.Lock()
				defer c.mu.Unlock()
				t.Fatalf("after %d of %d bytes in %v: %v (closed %d %q)", read, frames*len(frame), time.Since(start), err, c.closeCode, c.reason)
			}
			read += n
			time.Sleep(2 * time.Millisecond)
		}
		if d := time.Since(start); d < 2*timeout {
			t.Fatalf("the batch went out in %v, too fast to show anything", d)
		}
		if c.isClosing() {
			t.Fatal("a reading peer was dropped")
		}
		c.closeWith(1006, "test over", true)
		c.writers.Wait()
	})

	t.Run("close owed after a failed write", func(t *testing.T) {
		c, client := newConn()
		for range 100 {
			c.enqueue(&queued{frame: frame})
		}
		time.Sleep(50 * time.Millisecond) // the writer is blocked: the peer reads nothing
		c.closeWith(protocol.CloseSlowConsumer, "slow consumer", true)
		c.writers.Wait() // its write fails, a frame cut off mid-way
		// Now the peer reads, and the reader ends (serve finishes).
		read := make(chan []byte)
		go func() { b, _ := io.ReadAll(client); read <- b }()
		c.finishWrites()
		_ = c.nc.Close()
		got := <-read
		// Walk the whole frames; what follows them is a cut frame, which
		// must not carry the close frame inside it.
		pos := 0
		for pos+4 <= len(got) { // our frames here have 2- or 4-byte headers
			n, hdr := int(got[pos+1]&0x7f), 2
			if n == 126 {
				n, hdr = int(binary.BigEndian.Uint16(got[pos+2:])), 4
			}
			if pos+hdr+n > len(got) {
				break
			}
			pos += hdr + n
		}
		closeFrame := wsFrame(opClose, closePayload(protocol.CloseSlowConsumer, "slow consumer"))
		if pos < len(got) && bytes.HasSuffix(got, closeFrame) {
			t.Fatalf("the close frame was written inside a frame cut off at byte %d of %d", pos, len(got))
		}
	})

	t.Run("slow but steady reader", func(t *testing.T) {
		c, client := newConn()
		// Read for 3×WRITE_TIMEOUT, a little at a time, while frames keep
		// coming: every write makes progress, so none times out.
		stop := time.Now().Add(3 * timeout)
		buf := make([]byte, 16<<10)
		for time.Now().Before(stop) {
			c.enqueue(&queued{frame: frame})
			// The deadline only keeps a broken test from hanging: a read
			// may wait out TCP's persist timer with these small buffers,
			// longer still on a loaded machine, and a peer the server
			// dropped sees its reads end at once.
			_ = client.SetReadDeadline(time.Now().Add(10 * timeout))
			if _, err := client.Read(buf); err != nil {
				c.mu.Lock()
				defer c.mu.Unlock()
				t.Fatalf("read: %v (closed %d %q)", err, c.closeCode, c.reason)
			}
			time.Sleep(5 * time.Millisecond)
		}
		if c.isClosing() {
			c.mu.Lock()
			defer c.mu.Unlock()
			t.Fatalf("a reading peer was dropped: %d %q", c.closeCode, c.reason)
		}
		c.closeWith(1006, "test over", true)
		c.writers.Wait()
	})

	t.Run("slow but steady reader after a server close", func(t *testing.T) {
		// The reader would take about 10 s to take it (16 KiB every
		// 20 ms), every write making progress.
		c, client := largeBatch()
		readc := make(chan int, 1)
		go func() {
			buf := make([]byte, 16<<10)
			read := 0
			for {
				n, err := client.Read(buf)
				read += n
				if err != nil {
					readc <- read
					return
				}
				time.Sleep(20 * time.Millisecond)
			}
		}()
		time.Sleep(timeout) // the writer is in its batch
		// MAX_LIFETIME (or an operator's disconnect): the socket must end
		// within about WRITE_TIMEOUT, not when the batch has gone out.
		c.closeWith(protocol.CloseLifetime, "maximum lifetime reached", true)
		ended := make(chan struct{})
		go func() { c.writers.Wait(); close(ended) }()
		select {
		case <-ended:
		case <-time.After(10 * timeout):
			t.Fatalf("the writer went on with its batch %v after the close", 10*timeout)
		}
		_ = c.nc.Close()
		if read := <-readc; read >= frames*len(frame) {
			t.Fatal("the whole batch went out")
		}
	})
}

// TestWriteToResetPeer: a write that fails because the peer ended the TCP
// connection (its socket closed with data unread, which resets it, or a
// platform cutting it) is the peer's end, logged as a lost connection
// (closed by the client, SCF status 456) as when the reader notices it
// first. Before, the writer called it a close by the server (439), so
// the same end of a socket was counted either way, as the reader or the
// writer happened to notice first.
func TestWriteToResetPeer(t *testing.T) {
	s := &Server{cfg: Config{SendQueue: 1 << 20, WriteTimeout: 10 * time.Second}}
	server, client := tcpPair(t)
	c := &conn{s: s, nc: server, done: make(chan struct{})}
	_ = client.(*net.TCPConn).SetLinger(0)
	client.Close() // a reset
	frame := wsFrame(opText, []byte(`{"type":"pong"}`))
	testkit.Eventually(t, 5*time.Second, func() error {
		if c.isClosing() {
			return nil
		}
		c.enqueue(&queued{frame: frame})
		return errors.New("writes to the reset peer have not failed yet")
	})
	c.writers.Wait()
	// The reader records the end (lostOnWrite): it reads the reset.
	c.fr.init(server, 1<<16)
	c.readLoop(context.Background())
	c.mu.Lock()
	code, byServer, reason := c.closeCode, c.byServer, c.reason
	c.mu.Unlock()
	if code != 1006 || byServer || scfStatus(code, byServer) != 456 {
		t.Fatalf("closed with %d %q by server %v (SCF status %d), want 1006 by the client (456)", code, reason, byServer, scfStatus(code, byServer))
	}
}

// TestClientCloseAheadOfReset: a client that closes with 1000 and then
// its socket (with data unread, which resets it) while its reader is
// busy (a replay being written to it) is logged as the 1000 it sent,
// closed by the client, SCF status 200 (docs/protocol.md: its close frame
// came first). The writer, finding the peer gone before the reader read
// the close frame, had called it a lost connection (1006, 456).
func TestClientCloseAheadOfReset(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	logs := &testkit.SyncBuffer{}
	e := startEgressLogging(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"}, logs)
	<-e.s.hub.inbox.ready
	appendData(t, rdb, keys.Scheme{Prefix: prefix}, "big", []byte(`"`+strings.Repeat("x", 8000)+`"`), 400)
	const n = 3
	for range n {
		c := rawDial(t, e, rcvBufDialer(4096))
		c.send(clientFrame(true, opText, []byte(`{"type":"subscribe","channel":"big","after":"0-0"}`)), clientFrame(true, opClose, u16(1000)))
		time.Sleep(50 * time.Millisecond) // the replay fills the socket
		c.nc.Close()
	}
	testkit.Eventually(t, 10*time.Second, func() error { return openSockets(e.s, 0) })
	ends := logs.Lines(t, "connection closed")
	if len(ends) != n {
		t.Fatalf("%d ends logged, want %d", len(ends), n)
	}
	for _, l := range ends {
		if l["close_code"] != float64(1000) || l["closed_by"] != "client" || l["scf_status"] != float64(200) {
			t.Errorf("logged close %v by %v (%v), SCF status %v; want 1000 by the client, 200", l["close_code"], l["closed_by"], l["reason"], l["scf_status"])
		}
	}
}
