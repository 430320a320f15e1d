// Package protocol defines the egress WebSocket frames (docs/protocol.md):
// JSON objects in text frames, one per server frame, one or more per
// client frame.
package protocol

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
)

// Client → server frame types.
const (
	TypeSubscribe   = "subscribe"
	TypeUnsubscribe = "unsubscribe"
	TypePing        = "ping"
	TypeRefresh     = "refresh" // a fresh token for the connection
)

// Server → client frame types.
const (
	TypeWelcome      = "welcome"
	TypeSubscribed   = "subscribed"
	TypeUnsubscribed = "unsubscribed"
	TypePong         = "pong"
	TypeMessage      = "message"
	TypeError        = "error"
	TypeRefreshed    = "refreshed"
)

// Error codes of "error" frames.
const (
	CodeInvalidJSON       = "invalid_json"
	CodeInvalidFrame      = "invalid_frame"
	CodeUnknownType       = "unknown_type"
	CodeInvalidChannel    = "invalid_channel"
	CodeInvalidAfter      = "invalid_after"
	CodeAlreadySubscribed = "already_subscribed"
	CodeNotSubscribed     = "not_subscribed"
	CodeBinaryFrame       = "binary_frame"
	CodeForbidden         = "forbidden"
	CodeTooManySubs       = "too_many_subscriptions"
	CodeInvalidToken      = "invalid_token"
	CodeUnavailable       = "unavailable"
)

// Close codes (docs/protocol.md). Retryable ones say so.
const (
	CloseNormal        = 1000
	CloseGoingAway     = 1001 // server shutting down: reconnect elsewhere, resume
	CloseProtocolError = 1002 // a frame broke RFC 6455
	CloseInvalidData   = 1007 // a text frame that is not UTF-8 (RFC 6455 §8.1)
	ClosePolicy        = 1008 // repeated bad frames
	CloseTooBig        = 1009 // frame over the read limit
	CloseInternal      = 1011 // server error: reconnect, resume
	CloseTryAgainLater = 1013 // the registry or the inbox is unavailable: reconnect, resume
	CloseIdleTimeout   = 4000 // no data frame either way for IDLE_TIMEOUT: reconnect, resume
	CloseLifetime      = 4001 // MAX_LIFETIME reached: reconnect, resume
	CloseSlowConsumer  = 4002 // outgoing queue overflowed: reconnect, resume
	CloseDisconnected  = 4003 // disconnected by an operator: do not reconnect
	CloseTokenExpired  = 4004 // token expired: reconnect with a fresh token
)

// Request is a client request: a client frame holds one or more.
type Request struct {
	Type    string          `json:"type"`
	Channel string          `json:"channel,omitempty"`
	After   *string         `json:"after,omitempty"`
	Token   string          `json:"token,omitempty"`
	Ref     json.RawMessage `json:"ref,omitempty"`
}

// ErrFrame is a decoding failure with its error code.
type ErrFrame struct {
	Code    string
	Message string
}

func (e *ErrFrame) Error() string { return e.Code + ": " + e.Message }

// Frame reads the requests of one client text frame in order. A frame
// holds one or more JSON objects, one after another, with JSON whitespace
// (such as "\n") allowed around and between them (docs/protocol.md).
//
//	f := NewFrame(b)
//	for f.More() {
//		req, err := f.Next()
//		…
//	}
//
// A request that is well-formed JSON but not a valid request is an error
// of its own and the frame goes on with the next one. Broken JSON ends the
// frame: where the next request would start cannot be known. The zero
// Frame is an empty frame. A Frame is not safe for concurrent use.
type Frame struct {
	b   []byte // the frame; b[off:] is not read yet
	off int
	n   int  // requests read so far
	end bool // broken JSON was met: nothing more is read
	// dec reads b[base:] one value at a time, once the frame turned out
	// not to be a single JSON value: a frame holding one request (the
	// usual one) is decoded by json.Unmarshal, which neither copies it
	// nor allocates a decoder.
	dec  *json.Decoder
	base int
}

// NewFrame returns a Frame reading the requests of b, a client text frame
// (UTF-8, checked by the caller). b must not change while it is read.
func NewFrame(b []byte) Frame { return Frame{b: b} }

// More reports whether Next has a request (or an error) to return: always
// for the first call, so that an empty frame is reported; afterwards
// until only whitespace is left or broken JSON was met.
func (f *Frame) More() bool {
	if f.end {
		return false
	}
	if f.n == 0 {
		return true
	}
	f.off += leadingSpace(f.b[f.off:])
	return f.off < len(f.b)
}

// Next decodes the next request. The error, if any, is an *ErrFrame; the
// Request returned with it carries the ref when one could be read, for
// the error reply. After an invalid_json error More reports false.
func (f *Frame) Next() (Request, error) {
	var r Request
	f.n++
	f.off += leadingSpace(f.b[f.off:])
	// encoding/json would take null for an empty object and report an
	// array, string or number as a type error of field "".
	if f.end || f.off == len(f.b) || f.b[f.off] != '{' {
		return r, f.broken()
	}
	var err error
	if f.dec == nil {
		err = json.Unmarshal(f.b[f.off:], &r)
		var se *json.SyntaxError
		if !errors.As(err, &se) {
			f.off = len(f.b) // what is left is one JSON value
		} else {
			// Several values, or broken JSON: read one value at a time.
			f.base = f.off
			f.dec = json.NewDecoder(bytes.NewReader(f.b[f.off:]))
		}
	}
	if f.dec != nil {
		err = f.dec.Decode(&r)
		var ute *json.UnmarshalTypeError
		if err != nil && !errors.As(err, &ute) {
			return Request{}, f.broken()
		}
		f.off = f.base + int(f.dec.InputOffset())
	}
	// The ref is checked first: every error reply echoes it, and one that
	// is not a short string or number (an object, 60 KiB of string) is
	// not echoed whatever else is wrong with the request.
	badRef := len(r.Ref) > 0 && (len(r.Ref) > 64 || (r.Ref[0] != '"' && (r.Ref[0] < '0' || r.Ref[0] > '9') && r.Ref[0] != '-'))
	if badRef {
		r.Ref = nil
	}
	if err != nil {
		var ute *json.UnmarshalTypeError
		errors.As(err, &ute)
		return r, &ErrFrame{CodeInvalidFrame, fmt.Sprintf("field %q has the wrong type", ute.Field)}
	}
	if badRef {
		return r, &ErrFrame{CodeInvalidFrame, "ref must be a string or a number of at most 64 bytes"}
	}
	switch r.Type {
	case TypeSubscribe, TypeUnsubscribe, TypePing, TypeRefresh:
	case "":
		return r, &ErrFrame{CodeInvalidFrame, `missing "type"`}
	default:
		return r, &ErrFrame{CodeUnknownType, fmt.Sprintf("unknown frame type %q", truncate(r.Type))}
	}
	return r, nil
}

// broken ends the frame at a request that is not a JSON object.
func (f *Frame) broken() error {
	f.end = true
	if f.n == 1 {
		return &ErrFrame{CodeInvalidJSON, "frame is not a JSON object"}
	}
	return &ErrFrame{CodeInvalidJSON, fmt.Sprintf("request %d of the frame is not a JSON object: it and the rest of the frame are dropped", f.n)}
}

// leadingSpace counts the JSON whitespace at the start of b.
func leadingSpace(b []byte) int {
	for i, c := range b {
		if c != ' ' && c != '\t' && c != '\r' && c != '\n' {
			return i
		}
	}
	return len(b)
}

func truncate(s string) string {
	if len(s) > 32 {
		return s[:32] + "…"
	}
	return s
}

// Reply is a server frame other than "message".
type Reply struct {
	Type         string          `json:"type"`
	ConnectionID string          `json:"connection_id,omitempty"`
	User         *string         `json:"user,omitempty"`
	Instance     string          `json:"instance,omitempty"`
	Channel      string          `json:"channel,omitempty"`
	Recovered    *bool           `json:"recovered,omitempty"`
	Position     string          `json:"position,omitempty"` // subscribed: resume point
	Code         string          `json:"code,omitempty"`
	Message      string          `json:"message,omitempty"`
	Ref          json.RawMessage `json:"ref,omitempty"`
	// MaxFrameBytes (welcome) is the largest client frame the server
	// reads. Its presence announces that the server reads several
	// requests per frame; zero (absent): one request per frame.
	MaxFrameBytes int64 `json:"max_frame_bytes,omitempty"`
	// IdleTimeoutMs (welcome) is the server's IDLE_TIMEOUT in ms (a part
	// of a ms rounded up): a connection with no data frame either way for
	// that long is closed (4000). Zero (absent): no idle close. A client
	// that probes a silent connection with pings waits longer than this,
	// so that its pings do not keep open a connection the server would
	// close as idle.
	IdleTimeoutMs int64 `json:"idle_timeout_ms,omitempty"`
}

// Encode marshals r.
func (r *Reply) Encode() []byte {
	b, _ := json.Marshal(r)
	return b
}
