package main

import (
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/wsrelay/wsrelay/shared/auth"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// TestAbuseLogVolume: what a hostile client can repeat at will costs no
// log line, or one per socket (its end), never one per request or frame:
// refused upgrades (a bad token in the query or in the subprotocol, a
// foreign origin, a full instance, no upgrade at all), bad frames, bad
// subscribes and bad refreshes on an open socket, kept open with pings.
// No line carries a token, valid or not.
func TestAbuseLogVolume(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	var logs testkit.SyncBuffer
	e := startEgressLogging(t, rdb, prefix, map[string]string{"JWT_SECRET": testSecret, "MAX_CONNECTIONS": "1", "ALLOWED_ORIGINS": "https://app.example"}, &logs)
	good := token(t, auth.Claims{Subject: "mallory", Channels: []string{"room.*"}})
	forged, _ := auth.SignHS256("another-secret-0123456789abcdef0123456789", auth.Claims{Subject: "mallory", Expires: time.Now().Add(time.Hour)})
	ws, _, err := e.dial(t, url.Values{"token": {good}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	next(t, ws, "welcome")
	const n = 20 // 100 frames: 2 s at MAX_FRAMES_PER_SECOND
	for range n {
		for _, try := range []struct {
			q      url.Values
			hdr    http.Header
			protos []string
		}{
			{url.Values{"token": {forged}}, nil, nil},
			{nil, nil, []string{"wsrelay", "token." + forged}},
			{url.Values{"token": {good}}, http.Header{"Origin": {"https://evil.example"}}, nil},
			{url.Values{"token": {good}}, nil, nil}, // over MAX_CONNECTIONS
		} {
			if _, _, err := e.dial(t, try.q, try.hdr, try.protos...); err == nil {
				t.Fatal("upgrade accepted")
			}
		}
		if resp, err := http.Get(e.srv.URL + "/ws?token=" + good); err == nil {
			resp.Body.Close()
		}
		for _, f := range []string{`{"type":"nope"}`, `not json` + strings.Repeat("\n", 3), `{"type":"subscribe","channel":"secret"}`, `{"type":"refresh","token":"` + forged + `"}`, `{"type":"ping"}`} {
			if err := ws.WriteMessage(websocket.TextMessage, []byte(f)); err != nil {
				t.Fatal(err)
			}
		}
	}
	send(t, ws, map[string]any{"type": "ping", "ref": "last"})
	for string(next(t, ws, "pong").Ref) != `"last"` {
	}
	if out := logs.String(); out != "" {
		t.Fatalf("%d refused upgrades and %d bad frames wrote:\n%s", 5*n, 4*n, out)
	}
	_ = ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(1000, ""), time.Now().Add(time.Second))
	closeCode(t, ws, 5*time.Second)
	testkit.Eventually(t, 5*time.Second, func() error {
		if n := e.s.open.Load(); n != 0 {
			return fmt.Errorf("%d sockets open", n)
		}
		return nil
	})
	recs := logs.JSONLines(t)
	if len(recs) != 1 || recs[0]["msg"] != "connection closed" || recs[0]["level"] != "INFO" {
		t.Fatalf("after the socket ended: %v, want its one info line", recs)
	}
	for _, s := range []string{good, forged, testSecret} {
		if strings.Contains(logs.String(), s[strings.LastIndexByte(s, '.')+1:]) {
			t.Errorf("a secret is in the log: %s", logs.String())
		}
	}
}
