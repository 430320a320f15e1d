package main

import (
	"bytes"
	"net"
	"testing"
	"time"
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
		}
		c.mu.Lock()
		code, reason := c.closeCode, c.reason
		c.mu.Unlock()
		if code != 1006 || reason != "write failed" {
			t.Fatalf("closed with %d %q, want 1006 \"write failed\"", code, reason)
		}
		c.writers.Wait()
	})

	t.Run("slow but steady reader", func(t *testing.T) {
		c, client := newConn()
		// Read for 3×WRITE_TIMEOUT, a little at a time, while frames keep
		// coming: every write makes progress, so none times out.
		stop := time.Now().Add(3 * timeout)
		buf := make([]byte, 16<<10)
		for time.Now().Before(stop) {
			c.enqueue(&queued{frame: frame})
			_ = client.SetReadDeadline(time.Now().Add(timeout))
			if _, err := client.Read(buf); err != nil {
				t.Fatalf("read: %v", err)
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
}
