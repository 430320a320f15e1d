package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"

	"github.com/wsrelay/wsrelay/shared/auth"
	"github.com/wsrelay/wsrelay/shared/protocol"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// rawHandshake sends req (a whole HTTP request, as written) to e over a
// TCP connection of its own and reads the answer's head and up to 1 KiB of
// its body (none for a 101 or an answer to HEAD).
func rawHandshake(t *testing.T, e *secEgress, req string) (*http.Response, string) {
	t.Helper()
	nc, err := net.Dial("tcp", strings.TrimPrefix(e.srv.URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	_ = nc.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(nc, req); err != nil {
		t.Fatal(err)
	}
	method, _, _ := strings.Cut(req, " ")
	resp, err := http.ReadResponse(bufio.NewReader(nc), &http.Request{Method: method})
	if err != nil {
		t.Fatalf("%q: %v", strings.SplitN(req, "\r\n", 2)[0], err)
	}
	var body []byte
	if resp.StatusCode != http.StatusSwitchingProtocols {
		body, _ = io.ReadAll(io.LimitReader(resp.Body, 1024))
	}
	return resp, string(body)
}

// TestHandshakeRefusals: what hostile or sloppy clients send at the upgrade
// is answered as docs/protocol.md says (status, JSON error code, headers),
// and leaves no connection, registry record or goroutine behind. A client
// offering another WebSocket version is told the one the server speaks
// (RFC 6455 §4.4: Sec-WebSocket-Version: 13), which was missing; a HEAD
// upgrade, a request that is not a WebSocket upgrade, was a 405 without
// Allow (RFC 9110 §15.5.6) on an endpoint documented to take HEAD.
func TestHandshakeRefusals(t *testing.T) {
	rdb, prefix := redistest.Client(t)
	e := startEgressOn(t, rdb, prefix, map[string]string{"JWT_SECRET": testSecret, "MAX_CONNECTIONS": "1"})
	<-e.s.hub.inbox.ready // the hub's own goroutines are all started
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	good := token(t, auth.Claims{Subject: "alice", Channels: []string{"*"}})
	host := strings.TrimPrefix(e.srv.URL, "http://")
	const key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
	const up = "Upgrade: websocket\r\nConnection: Upgrade\r\n"
	const v13 = "Sec-WebSocket-Version: 13\r\n"
	get := func(query, headers string) string {
		return "GET /ws?token=" + good + query + " HTTP/1.1\r\nHost: " + host + "\r\n" + headers + "\r\n"
	}
	for _, tc := range []struct {
		name, req string
		status    int
		code      string
	}{
		{"version 8", get("", up+key+"Sec-WebSocket-Version: 8\r\n"), 400, "bad_handshake"},
		{"no version", get("", up+key), 400, "bad_handshake"},
		{"no key", get("", up+v13), 400, "bad_handshake"},
		{"key of 8 bytes", get("", up+"Sec-WebSocket-Key: AAAAAAAAAAA=\r\n"+v13), 400, "bad_handshake"},
		{"key not base64", get("", up+"Sec-WebSocket-Key: not a key!!!!!!!!!!!!\r\n"+v13), 400, "bad_handshake"},
		{"no upgrade headers", get("", ""), 400, "bad_handshake"},
		{"Upgrade: h2c", get("", "Upgrade: h2c\r\nConnection: Upgrade\r\n"+key+v13), 400, "bad_handshake"},
		{"Connection: keep-alive only", get("", "Upgrade: websocket\r\nConnection: keep-alive\r\n"+key+v13), 400, "bad_handshake"},
		{"HEAD upgrade", "HEAD /ws?token=" + good + " HTTP/1.1\r\nHost: " + host + "\r\n" + up + key + v13 + "\r\n", 400, "bad_handshake"},
		{"POST upgrade", "POST /ws?token=" + good + " HTTP/1.1\r\nHost: " + host + "\r\nContent-Length: 0\r\n" + up + key + v13 + "\r\n", 405, "method_not_allowed"},
		{"upgrade on another path", "GET /socket HTTP/1.1\r\nHost: " + host + "\r\n" + up + key + v13 + "\r\n", 404, "not_found"},
		{"upgrade on //ws", "GET //ws?token=" + good + " HTTP/1.1\r\nHost: " + host + "\r\n" + up + key + v13 + "\r\n", 404, "not_found"},
		{"origin null", get("", up+key+v13+"Origin: null\r\n"), 403, "origin_not_allowed"},
		{"origin of another port", get("", up+key+v13+"Origin: http://127.0.0.1:1\r\n"), 403, "origin_not_allowed"},
		{"origin with a path", get("", up+key+v13+"Origin: http://"+host+"/app\r\n"), 403, "origin_not_allowed"},
		{"Authorization instead of a token", "GET /ws HTTP/1.1\r\nHost: " + host + "\r\n" + up + key + v13 + "Authorization: Bearer " + good + "\r\n\r\n", 401, "unauthorized"},
		{"empty subprotocol token", "GET /ws HTTP/1.1\r\nHost: " + host + "\r\n" + up + key + v13 + "Sec-WebSocket-Protocol: wsrelay, token.\r\n\r\n", 401, "unauthorized"},
		{"token over 8 KiB", "GET /ws?token=" + strings.Repeat("a", 9000) + " HTTP/1.1\r\nHost: " + host + "\r\n" + up + key + v13 + "\r\n", 401, "invalid_token"},
		{"channels with an empty item", get("&channels=a,,b", up+key+v13), 400, "invalid_channel"},
		// A body with the upgrade, here in the same packet as its head,
		// was closed without an answer (gorilla finds the bytes after its
		// hijack); one that came later was read as WebSocket frames.
		{"upgrade with a body", get("", up+key+v13+"Content-Length: 5\r\n") + "hello", 400, "bad_handshake"},
		{"upgrade with an empty chunked body", get("", up+key+v13+"Transfer-Encoding: chunked\r\n") + "0\r\n\r\n", 400, "bad_handshake"},
		// Expecting 100-continue, the client sends its body once told
		// to: refused, it is never asked for it, nor upgraded.
		{"upgrade expecting 100-continue", get("", up+key+v13+"Content-Length: 5\r\nExpect: 100-continue\r\n"), 400, "bad_handshake"},
	} {
		resp, body := rawHandshake(t, e, tc.req)
		var b struct{ Error struct{ Code string } }
		if tc.req[:4] != "HEAD" {
			if err := json.Unmarshal([]byte(body), &b); err != nil || resp.Header.Get("Content-Type") != "application/json; charset=utf-8" {
				t.Errorf("%s: %s %q, body %q, want a JSON error", tc.name, resp.Status, resp.Header.Get("Content-Type"), body)
			}
		} else {
			b.Error.Code = tc.code // no body to read it from
		}
		if resp.StatusCode != tc.status || b.Error.Code != tc.code {
			t.Errorf("%s: %d %q (%s), want %d %q", tc.name, resp.StatusCode, b.Error.Code, body, tc.status, tc.code)
		}
		if resp.StatusCode == 405 && resp.Header.Get("Allow") == "" {
			t.Errorf("%s: 405 without Allow", tc.name)
		}
		if strings.HasPrefix(tc.name, "version") || tc.name == "no version" {
			if v := resp.Header.Get("Sec-WebSocket-Version"); v != "13" {
				t.Errorf("%s: Sec-WebSocket-Version %q, want 13", tc.name, v)
			}
		}
		if resp.StatusCode == 401 && resp.Header.Get("WWW-Authenticate") == "" {
			t.Errorf("%s: 401 without WWW-Authenticate", tc.name)
		}
	}
	// With MAX_CONNECTIONS 1, a slot a refusal had taken and not given
	// back would refuse this upgrade.
	ws, _, err := e.dial(t, nil, nil, Subprotocol, "token."+good)
	if err != nil {
		t.Fatalf("upgrade after the refusals: %v", err)
	}
	ws.Close()
	testkit.Eventually(t, 10*time.Second, func() error { return rndLeftovers(e.s, rdb, prefix) })
}

// TestHandshakeAccepted: the handshakes browsers and other clients send
// are taken whatever their headers' case and token lists (Firefox sends
// Connection: keep-alive, Upgrade), an offered permessage-deflate is not
// accepted (the egress does not implement it), and the subprotocol echoed
// is "wsrelay" when it was offered, else none: never the token, nor a
// protocol the client did not offer.
func TestHandshakeAccepted(t *testing.T) {
	t.Parallel()
	e := startSecEgress(t, map[string]string{"JWT_SECRET": testSecret})
	good := token(t, auth.Claims{Subject: "alice", Channels: []string{"*"}})
	host := strings.TrimPrefix(e.srv.URL, "http://")
	for _, tc := range []struct{ name, query, headers, proto string }{
		{"token lists and case", "?token=" + good, "Upgrade: WebSocket\r\nConnection: keep-alive, upgrade\r\nSec-WebSocket-Version: 13\r\n", ""},
		{"deflate offered", "?token=" + good, "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n", ""},
		{"same-host origin", "?token=" + good, "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nOrigin: http://" + strings.ToUpper(host) + "\r\n", ""},
		{"wsrelay offered, query token", "?token=" + good, "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: chat, wsrelay\r\n", Subprotocol},
		{"subprotocols in two headers", "", "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: token." + good + "\r\nSec-WebSocket-Protocol: wsrelay\r\n", Subprotocol},
		{"token subprotocol alone", "", "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: token." + good + "\r\n", ""},
	} {
		resp, body := rawHandshake(t, e, "GET /ws"+tc.query+" HTTP/1.1\r\nHost: "+host+"\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"+tc.headers+"\r\n")
		if resp.StatusCode != http.StatusSwitchingProtocols {
			t.Errorf("%s: %s %s", tc.name, resp.Status, body)
			continue
		}
		if got := resp.Header.Values("Sec-WebSocket-Protocol"); strings.Join(got, ",") != tc.proto {
			t.Errorf("%s: Sec-WebSocket-Protocol %q, want %q", tc.name, got, tc.proto)
		}
		if ext := resp.Header.Get("Sec-WebSocket-Extensions"); ext != "" {
			t.Errorf("%s: extension %q accepted", tc.name, ext)
		}
	}
}

// TestHandshakeStormSharesPipelines: sockets opening together on one
// egress (the clients of a lost instance reconnecting to it) have their
// registry records written in a few shared pipelines, not one each. One
// each, 5,000 sockets within 500 ms on 2 vCPU queued that long for the
// Redis pool that half of them waited out REDIS_TIMEOUT and were closed
// 1013 (bench/cmd/storm); here the records' pipelines are held until
// every socket is upgraded, as a busy pool holds them.
func TestHandshakeStormSharesPipelines(t *testing.T) {
	t.Parallel()
	const n = 60
	e, h, wss := dialHeld(t, "5s", n)
	testkit.Eventually(t, 5*time.Second, func() error {
		e.s.hub.mu.Lock()
		defer e.s.hub.mu.Unlock()
		if len(e.s.hub.conns) < n {
			return fmt.Errorf("%d of %d sockets at their registry write", len(e.s.hub.conns), n)
		}
		return nil
	})
	h.Open()
	for _, ws := range wss {
		next(t, ws, "welcome")
	}
	// Four pipelines at once (held), then the rest in one.
	if got := h.All(); got > 8 {
		t.Fatalf("%d sockets' records written in %d pipelines, want a few shared ones", n, got)
	}
}

// dialHeld starts an egress with REDIS_TIMEOUT redisTimeout whose
// connection records' pipelines are held (recordWrites), and dials n
// sockets to it, users u0 to u<n-1>, without waiting for their welcomes.
func dialHeld(t *testing.T, redisTimeout string, n int) (*secEgress, *recordWrites, []*websocket.Conn) {
	t.Helper()
	rdb, prefix := redistest.Client(t)
	h := newRecordWrites(rdb)
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true", "REDIS_TIMEOUT": redisTimeout})
	<-e.s.hub.inbox.ready
	var wss []*websocket.Conn
	for i := range n {
		ws, _, err := e.dial(t, url.Values{"user": {fmt.Sprintf("u%d", i)}}, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ws.Close() })
		wss = append(wss, ws)
	}
	return e, h, wss
}

// recordWrites holds the pipelines writing connection records (their
// first command a SET) until opened (a Gate), counting the records they
// carry, and counts the records' removals (pipelines whose first command
// is a DEL).
type recordWrites struct {
	*redistest.Gate
	taken, removals atomic.Int64
}

func newRecordWrites(rdb redis.UniversalClient) *recordWrites {
	h := &recordWrites{}
	h.Gate = redistest.NewGate(func(cmds []redis.Cmder) bool {
		switch cmds[0].Name() {
		case "set":
			for _, c := range cmds {
				if c.Name() == "set" {
					h.taken.Add(1)
				}
			}
			return true
		case "del":
			h.removals.Add(1)
		}
		return false
	})
	rdb.AddHook(h.Gate)
	return h
}

// TestRefusedUnwrittenNotRemoved: a socket whose registry write gave up
// waiting for a shared pipeline (a storm's queue) is refused 1013
// without a removal of its record, which was never written: in a storm
// that removal is one more round trip for nothing. A socket whose write
// a pipeline took, and failed, still gets one (the write may have been
// made).
func TestRefusedUnwrittenNotRemoved(t *testing.T) {
	t.Parallel()
	const n = 10
	e, h, wss := dialHeld(t, "300ms", n)
	// The pipelines (4 at once) hold what they took; the sockets left
	// waiting give up after REDIS_TIMEOUT and leave the hub.
	testkit.Eventually(t, 10*time.Second, func() error {
		e.s.hub.mu.Lock()
		defer e.s.hub.mu.Unlock()
		if taken := h.taken.Load(); int64(len(e.s.hub.conns)) != taken || taken == 0 || taken == n {
			return fmt.Errorf("%d sockets in the hub, %d taken by pipelines", len(e.s.hub.conns), taken)
		}
		return nil
	})
	h.Open() // their deadline has passed: they fail too
	for _, ws := range wss {
		if code := closeCode(t, ws, 10*time.Second); code != protocol.CloseTryAgainLater {
			t.Fatalf("socket closed %d, want %d", code, protocol.CloseTryAgainLater)
		}
	}
	e.stop() // every handler has returned, its removal made
	if taken, removals := h.taken.Load(), h.removals.Load(); removals != taken {
		t.Fatalf("%d of %d sockets refused 1013 had their records removed, want the %d whose write a pipeline took", removals, n, taken)
	}
}
