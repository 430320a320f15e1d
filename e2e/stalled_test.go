package e2e

import (
	"encoding/json"
	"net/http"
	"testing"
	"time"

	"github.com/gorilla/websocket"
)

// stalledReader opens a socket with a tiny receive buffer, reads its first
// frames, then stops reading until the server gives up on it.
type stalledReader struct {
	t      testing.TB
	ws     *websocket.Conn
	lastID string
}

func newStalledReader(t testing.TB, u string) *stalledReader {
	t.Helper()
	ws, _, err := websocket.DefaultDialer.Dial(u, http.Header{})
	if err != nil {
		t.Fatal(err)
	}
	s := &stalledReader{t: t, ws: ws}
	t.Cleanup(func() { ws.Close() })
	// Read until subscribed, then stall.
	for {
		_, b, err := ws.ReadMessage()
		if err != nil {
			t.Fatal(err)
		}
		var f frame
		_ = json.Unmarshal(b, &f)
		if f.Type == "subscribed" {
			return s
		}
	}
}

// waitClosed resumes reading and returns the close code, recording the
// last message id it read before the close.
func (s *stalledReader) waitClosed() int {
	time.Sleep(500 * time.Millisecond) // stay stalled while the server's queue overflows
	_ = s.ws.SetReadDeadline(time.Now().Add(20 * time.Second))
	for {
		_, b, err := s.ws.ReadMessage()
		if err != nil {
			if ce, ok := err.(*websocket.CloseError); ok {
				return ce.Code
			}
			s.t.Fatalf("stalled reader: %v", err)
		}
		var f frame
		if json.Unmarshal(b, &f) == nil && f.Type == "message" {
			s.lastID = f.ID
		}
	}
}
