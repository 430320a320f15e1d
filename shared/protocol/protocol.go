// Package protocol defines the egress WebSocket frames (docs/protocol.md):
// one JSON object per text frame.
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
	CodeInternal          = "internal"
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
	CloseTryAgainLater = 1013 // instance full: reconnect elsewhere
	CloseIdleTimeout   = 4000 // no data frame either way for IDLE_TIMEOUT: reconnect, resume
	CloseLifetime      = 4001 // MAX_LIFETIME reached: reconnect, resume
	CloseSlowConsumer  = 4002 // outgoing queue overflowed: reconnect, resume
	CloseDisconnected  = 4003 // disconnected by an operator: do not reconnect
	CloseTokenExpired  = 4004 // token expired: reconnect with a fresh token
)

// Request is a client frame.
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

// Decode parses one client text frame. The error, if any, is an *ErrFrame.
func Decode(b []byte) (Request, error) {
	var r Request
	// encoding/json would take null for an empty object and report an
	// array, string or number as a type error of field "".
	if t := bytes.TrimLeft(b, " \t\r\n"); len(t) == 0 || t[0] != '{' {
		return r, &ErrFrame{CodeInvalidJSON, "frame is not a JSON object"}
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	if err := dec.Decode(&r); err != nil {
		var ute *json.UnmarshalTypeError
		if errors.As(err, &ute) {
			return r, &ErrFrame{CodeInvalidFrame, fmt.Sprintf("field %q has the wrong type", ute.Field)}
		}
		return r, &ErrFrame{CodeInvalidJSON, "frame is not a JSON object"}
	}
	if dec.More() {
		return r, &ErrFrame{CodeInvalidJSON, "frame holds more than one JSON value"}
	}
	if len(r.Ref) > 0 {
		if len(r.Ref) > 64 || (r.Ref[0] != '"' && (r.Ref[0] < '0' || r.Ref[0] > '9') && r.Ref[0] != '-') {
			r.Ref = nil
			return r, &ErrFrame{CodeInvalidFrame, "ref must be a string or a number of at most 64 bytes"}
		}
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
	Position     string          `json:"position,omitempty"` // subscribed: resume point`
	Code         string          `json:"code,omitempty"`
	Message      string          `json:"message,omitempty"`
	Ref          json.RawMessage `json:"ref,omitempty"`
}

// Encode marshals r.
func (r *Reply) Encode() []byte {
	b, _ := json.Marshal(r)
	return b
}
