package main

import (
	"encoding/binary"
	"unicode/utf8"

	"github.com/wsrelay/wsrelay/shared/stream"
)

// WebSocket opcodes of the frames the server writes itself.
const (
	opText  = 0x1
	opClose = 0x8
	opPing  = 0x9
	opPong  = 0xA
)

// wsFrame returns a complete, unmasked, final server frame (RFC 6455
// §5.2): header and payload in one slice. A message's frame is built once
// and the same bytes are written to every subscriber, many frames per
// write (writev), instead of one write per frame.
func wsFrame(op byte, payload []byte) []byte {
	return append(frameHeader(op, len(payload)), payload...)
}

// textFrame is wsFrame of a text payload held as a string (a live
// notification's, as go-redis read it), without copying it first.
func textFrame(payload string) []byte {
	return append(frameHeader(opText, len(payload)), payload...)
}

// entryFrame is the text frame of a stream entry's frame (its head, id and
// tail), built in one allocation.
func entryFrame(e *stream.Entry) []byte {
	b := frameHeader(opText, len(e.Head)+len(e.ID)+len(e.Tail))
	b = append(b, e.Head...)
	b = append(b, e.ID...)
	return append(b, e.Tail...)
}

// frameHeader returns the header of a final frame of type op whose
// payload is n bytes long, with room after it for the payload.
func frameHeader(op byte, n int) []byte {
	var b []byte
	switch {
	case n < 126:
		b = make([]byte, 2, 2+n)
		b[1] = byte(n)
	case n <= 0xFFFF:
		b = make([]byte, 4, 4+n)
		b[1] = 126
		binary.BigEndian.PutUint16(b[2:], uint16(n))
	default:
		b = make([]byte, 10, 10+n)
		b[1] = 127
		binary.BigEndian.PutUint64(b[2:], uint64(n))
	}
	b[0] = 0x80 | op
	return b
}

// closePayload is a close frame's payload: the code, then the reason,
// truncated so that the control frame stays within 125 bytes, at a
// character boundary so that it stays UTF-8.
func closePayload(code int, reason string) []byte {
	if len(reason) > 123 {
		n := 123
		for n > 0 && !utf8.RuneStart(reason[n]) {
			n--
		}
		reason = reason[:n]
	}
	b := make([]byte, 2, 2+len(reason))
	binary.BigEndian.PutUint16(b, uint16(code))
	return append(b, reason...)
}

// pingFrame is the server's (empty) ping.
var pingFrame = wsFrame(opPing, nil)
