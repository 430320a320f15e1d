//go:build !linux

package main

// initRaw: elsewhere the reader reads through net.Conn.
func (r *frameReader) initRaw() {}

// writeNow: elsewhere the writer goroutine sends everything.
func (r *frameReader) writeNow([]byte) int { return 0 }

// unsent: elsewhere the send queue is not looked at (0).
func (r *frameReader) unsent() int { return 0 }

// hungUp: elsewhere a client's hang-up is seen when the reader reads.
func (r *frameReader) hungUp() bool { return false }
