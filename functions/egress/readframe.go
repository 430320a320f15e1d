package main

import (
	"encoding/binary"
	"errors"
	"io"
	"net"
	"syscall"
	"unicode/utf8"
)

// Opcodes the server reads (RFC 6455 §5.2), beside those of frame.go.
const (
	opContinuation = 0x0
	opBinary       = 0x2
)

// readBufferSize is each connection's read buffer: client frames are small
// requests, and a larger message is read through it in pieces.
const readBufferSize = 256

// frameReader reads the client's frames (RFC 6455 §5) after gorilla has
// done the opening handshake. The server reads frames itself, as it writes
// them itself, so that an idle connection's only goroutine waits for the
// next frame — data or control — a few small frames deep, in Go's poller,
// and fits the smallest stack Go gives (2 KiB; docs/benchmarks.md, S3).
// Only the reader goroutine uses it, but for writeNow (the sweep's pings),
// which uses only raw, set once before the connection is shared.
type frameReader struct {
	buf    []byte // buf[r:w] is read but not consumed
	r, w   int
	src    net.Conn
	raw    syscall.RawConn // nil: read src (see readable_linux.go)
	rawFn  func(fd uintptr) bool
	n      int // result of the last rawFn
	errno  syscall.Errno
	limit  int64  // the largest data message accepted, in bytes
	frag   []byte // a fragmented data message being assembled
	fragOp byte   // its opcode; 0 when none
	// ctrl holds the last control frame's payload: a pong, the frame an
	// idle connection gets most, is read without allocating (which would
	// take the reader deeper than its small stack).
	ctrl [125]byte
}

// init makes r read nc, accepting data messages up to limit bytes.
func (r *frameReader) init(nc net.Conn, limit int64) {
	*r = frameReader{buf: make([]byte, readBufferSize), src: nc, limit: limit}
	r.initRaw()
}

// fill reads more bytes into the buffer, waiting for them.
func (r *frameReader) fill() error {
	if r.r > 0 {
		r.w = copy(r.buf, r.buf[r.r:r.w])
		r.r = 0
	}
	if r.raw == nil {
		n, err := r.src.Read(r.buf[r.w:])
		r.w += n
		if n > 0 {
			return nil
		}
		if err == nil {
			err = io.ErrNoProgress
		}
		return err
	}
	// rawFn reads without blocking; the poller waits between attempts and
	// reports the read deadline or a closed socket.
	if err := r.raw.Read(r.rawFn); err != nil {
		return err
	}
	switch {
	case r.errno != 0:
		return r.errno
	case r.n == 0:
		return io.EOF
	}
	r.w += r.n
	return nil
}

// header returns the next k (≤ len(buf)) bytes and consumes them.
func (r *frameReader) header(k int) ([]byte, error) {
	for r.w-r.r < k {
		if err := r.fill(); err != nil {
			return nil, err
		}
	}
	b := r.buf[r.r : r.r+k]
	r.r += k
	return b, nil
}

// readAppend appends the next n bytes of the stream to p. p grows as the
// bytes arrive, not by n at once: a header announcing a large payload is
// 14 bytes, and a client that sends only that (on every socket it may
// open) must not make the server hold MAX_FRAME_BYTES per socket.
func (r *frameReader) readAppend(p []byte, n int) ([]byte, error) {
	for n > 0 {
		if r.r == r.w {
			if err := r.fill(); err != nil {
				return p, err
			}
		}
		k := min(n, r.w-r.r)
		p = append(p, r.buf[r.r:r.r+k]...)
		r.r += k
		n -= k
	}
	return p, nil
}

// protocolError is a frame that breaks RFC 6455: the connection is closed
// with 1002.
type protocolError string

func (e protocolError) Error() string { return "websocket protocol error: " + string(e) }

// errTooBig: a data message over the read limit (closed with 1009).
var errTooBig = errors.New("message over the read limit")

// next returns the next control frame or complete data message, unmasked.
// Fragments of a data message are assembled; control frames between them
// are returned as they come. A control frame's payload is valid until the
// next call.
func (r *frameReader) next() (op byte, payload []byte, err error) {
	return r.nextPaced(nil)
}

// nextPaced is next, calling pace (unless nil) before it reads each
// continuation fragment: the connection's reader charges those to the
// client's MAX_FRAMES_PER_SECOND, so that a message sent as an endless
// run of empty fragments, which never becomes a request, is read at
// that pace and does not keep a core busy parsing headers.
func (r *frameReader) nextPaced(pace func()) (op byte, payload []byte, err error) {
	for {
		h, err := r.header(2)
		if err != nil {
			return 0, nil, err
		}
		fin, op := h[0]&0x80 != 0, h[0]&0x0F
		if h[0]&0x70 != 0 {
			return 0, nil, protocolError("reserved bits set (no extension was negotiated)")
		}
		if h[1]&0x80 == 0 {
			return 0, nil, protocolError("client frames must be masked")
		}
		n := uint64(h[1] & 0x7F)
		switch n {
		case 126:
			if h, err = r.header(2); err != nil {
				return 0, nil, err
			}
			n = uint64(binary.BigEndian.Uint16(h))
		case 127:
			if h, err = r.header(8); err != nil {
				return 0, nil, err
			}
			n = binary.BigEndian.Uint64(h)
			if n>>63 != 0 {
				return 0, nil, protocolError("payload length has its top bit set")
			}
		}
		if h, err = r.header(4); err != nil {
			return 0, nil, err
		}
		key := [4]byte(h)
		control := op >= opClose
		switch {
		case control && op > opPong:
			return 0, nil, protocolError("unknown opcode")
		case control && !fin:
			return 0, nil, protocolError("fragmented control frame")
		case control && n > 125:
			return 0, nil, protocolError("control frame over 125 bytes")
		case op == opContinuation && r.fragOp == 0:
			return 0, nil, protocolError("continuation frame outside a fragmented message")
		case (op == opText || op == opBinary) && r.fragOp != 0:
			return 0, nil, protocolError("new message inside a fragmented one")
		case !control && op != opContinuation && op != opText && op != opBinary:
			return 0, nil, protocolError("unknown opcode")
		}
		if !control && uint64(len(r.frag))+n > uint64(r.limit) {
			return 0, nil, errTooBig
		}
		// The payload: its own slice, or appended to the message so far.
		// A payload already in the buffer (a small request, the usual
		// frame) gets one allocation of its exact size.
		var p []byte
		start := 0
		switch {
		case control:
			p, err = r.readAppend(r.ctrl[:0], int(n))
		case fin && op != opContinuation:
			p, err = r.readAppend(make([]byte, 0, min(int(n), max(r.w-r.r, readBufferSize))), int(n))
		default:
			if op == opContinuation && pace != nil {
				pace()
			}
			start = len(r.frag)
			r.frag, err = r.readAppend(r.frag, int(n))
			p = r.frag
		}
		if err != nil {
			return 0, nil, err
		}
		for i := range p[start:] {
			p[start+i] ^= key[i&3]
		}
		switch {
		case control || (fin && op != opContinuation):
			return op, p, nil
		case op != opContinuation: // the first fragment
			r.fragOp = op
		case fin: // the last fragment
			op, p = r.fragOp, r.frag
			r.frag, r.fragOp = nil, 0
			return op, p, nil
		}
	}
}

// parseClose reads a close frame's payload: no payload is 1005 (no status
// received); otherwise a code a peer may send and a UTF-8 reason.
func parseClose(p []byte) (code int, reason string, err error) {
	switch {
	case len(p) == 0:
		return 1005, "", nil
	case len(p) == 1:
		return 0, "", protocolError("close frame with a one-byte payload")
	}
	code = int(binary.BigEndian.Uint16(p))
	valid := (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1014) || (code >= 3000 && code <= 4999)
	if !valid {
		return 0, "", protocolError("close code a peer may not send")
	}
	if !utf8.Valid(p[2:]) {
		return 0, "", protocolError("close reason is not UTF-8")
	}
	return code, string(p[2:]), nil
}
