package main

import (
	"bufio"
	"context"
	"crypto/hmac"
	"crypto/sha512"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/auth"
	"github.com/wsrelay/wsrelay/shared/protocol"
	"github.com/wsrelay/wsrelay/shared/redisconn"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/stream"
)

const testSecret = "test-secret-0123456789abcdef0123456789"

type secEgress struct {
	s    *Server
	srv  *httptest.Server
	stop func() // shuts the egress down (drain included); also run at cleanup
}

// startSecEgress runs an egress configured by env on the test Redis.
func startSecEgress(t *testing.T, env map[string]string) *secEgress {
	t.Helper()
	rdb, prefix := redistest.Client(t)
	return startEgressOn(t, rdb, prefix, env)
}

// startEgressOn runs an egress configured by env on rdb (a test client,
// perhaps with hooks) under key prefix.
func startEgressOn(t *testing.T, rdb redis.UniversalClient, prefix string, env map[string]string) *secEgress {
	t.Helper()
	return startEgressLogging(t, rdb, prefix, env, io.Discard)
}

// startEgressLogging is startEgressOn with the egress's JSON log written
// to logs.
func startEgressLogging(t *testing.T, rdb redis.UniversalClient, prefix string, env map[string]string, logs io.Writer) *secEgress {
	t.Helper()
	return startEgressTuned(t, rdb, prefix, env, logs, nil)
}

// startEgressTuned is startEgressLogging with tune, when not nil, run on
// the server before it starts: for the settings no environment variable
// reaches (hub.lateWait).
func startEgressTuned(t *testing.T, rdb redis.UniversalClient, prefix string, env map[string]string, logs io.Writer, tune func(*Server)) *secEgress {
	t.Helper()
	env["REDIS_URL"] = redistest.URL(t)
	env["REDIS_KEY_PREFIX"] = prefix
	cfg, err := loadConfig(func(k string) string { return env[k] })
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer(cfg, slog.New(slog.NewJSONHandler(logs, nil)), rdb)
	if tune != nil {
		tune(s)
	}
	srv, stop := startEgress(t, s)
	return &secEgress{s: s, srv: srv, stop: stop}
}

// startEgress runs s (its background loops, and HTTP on an httptest server)
// until stop is called or the test ends. stop waits for the loops to end
// and closes the server; it may be called more than once.
func startEgress(t *testing.T, s *Server) (srv *httptest.Server, stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan struct{})
	go func() { s.Run(ctx); close(ran) }()
	srv = httptest.NewServer(s)
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			<-ran
			srv.Close()
		})
	}
	t.Cleanup(stop)
	return srv, stop
}

func (e *secEgress) url(q url.Values) string {
	return "ws" + strings.TrimPrefix(e.srv.URL, "http") + "/ws?" + q.Encode()
}

func (e *secEgress) dial(t *testing.T, q url.Values, hdr http.Header, protos ...string) (*websocket.Conn, *http.Response, error) {
	t.Helper()
	d := websocket.Dialer{Subprotocols: protos, HandshakeTimeout: 5 * time.Second}
	ws, resp, err := d.Dial(e.url(q), hdr)
	if ws != nil {
		t.Cleanup(func() { ws.Close() })
	}
	return ws, resp, err
}

// conn is the server's connection with id (nil if it has none).
func (e *secEgress) conn(id string) *conn {
	e.s.hub.mu.Lock()
	defer e.s.hub.mu.Unlock()
	return e.s.hub.conns[id]
}

// dialConn opens a socket with query q and returns it, past its welcome,
// and the server's connection.
func (e *secEgress) dialConn(t *testing.T, q url.Values) (*websocket.Conn, *conn) {
	t.Helper()
	ws, _, err := e.dial(t, q, nil)
	if err != nil {
		t.Fatal(err)
	}
	return ws, e.conn(next(t, ws, "welcome").ConnectionID)
}

func token(t *testing.T, c auth.Claims) string {
	t.Helper()
	if c.Expires.IsZero() {
		c.Expires = time.Now().Add(time.Hour)
	}
	tok, err := auth.SignHS256(testSecret, c)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// next reads frames until one of type typ (failing on timeout).
func next(t *testing.T, ws *websocket.Conn, typ string) protocol.Reply {
	t.Helper()
	return nextWithin(t, ws, typ, 5*time.Second)
}

// nextWithin reads frames until one of type typ, failing if none has come
// within the given time.
func nextWithin(t *testing.T, ws *websocket.Conn, typ string, within time.Duration) protocol.Reply {
	t.Helper()
	_ = ws.SetReadDeadline(time.Now().Add(within))
	for {
		var r protocol.Reply
		if err := ws.ReadJSON(&r); err != nil {
			t.Fatalf("waiting for %s: %v", typ, err)
		}
		if r.Type == typ {
			return r
		}
	}
}

func send(t *testing.T, ws *websocket.Conn, v any) {
	t.Helper()
	if err := ws.WriteJSON(v); err != nil {
		t.Fatal(err)
	}
}

// closeCode reads until the server closes the socket and returns the code.
func closeCode(t *testing.T, ws *websocket.Conn, within time.Duration) int {
	t.Helper()
	_ = ws.SetReadDeadline(time.Now().Add(within))
	for {
		if _, _, err := ws.ReadMessage(); err != nil {
			var ce *websocket.CloseError
			if errors.As(err, &ce) {
				return ce.Code
			}
			t.Fatalf("no close frame: %v", err)
		}
	}
}

func TestEgressRefuseToStart(t *testing.T) {
	t.Parallel()
	_, err := loadConfig(func(string) string { return "" })
	if err == nil {
		t.Fatal("started without a way to verify tokens")
	}
	for _, w := range []string{"JWT_SECRET", "JWT_PUBLIC_KEY", "ALLOW_ANONYMOUS=true"} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error %q does not name %s", err, w)
		}
	}
	for _, env := range []map[string]string{{"JWT_SECRET": "x"}, {"ALLOW_ANONYMOUS": "true"}} {
		if _, err := loadConfig(func(k string) string { return env[k] }); err != nil {
			t.Errorf("%v: %v", env, err)
		}
	}
	if _, err := loadConfig(func(k string) string {
		return map[string]string{"ALLOW_ANONYMOUS": "true", "JWT_SECRET_PREVIOUS": testSecret}[k]
	}); err == nil || !strings.Contains(err.Error(), "JWT_SECRET_PREVIOUS") || strings.Contains(err.Error(), testSecret) {
		t.Errorf("JWT_SECRET_PREVIOUS without JWT_SECRET: %v", err)
	}
	if _, err := loadConfig(func(k string) string {
		return map[string]string{"JWT_SECRET": "x", "PUBLIC_CHANNELS": "ok.*,bad pattern"}[k]
	}); err == nil || !strings.Contains(err.Error(), "PUBLIC_CHANNELS") {
		t.Errorf("bad PUBLIC_CHANNELS: %v", err)
	}
	bad := map[string]string{"ALLOW_ANONYMOUS": "true", "REGISTRY_TTL": "2s", "MAX_FRAMES_PER_SECOND": "-1", "REDIS_POOL_SIZE": "-1", "ALLOWED_ORIGINS": "app.example", "WRITE_TIMEOUT": "1ns", "JWT_ISSUER": "issuer ", "JWT_AUDIENCE": strings.Repeat("a", 257), "INSTANCE_ID": "egress}1"}
	_, err = loadConfig(func(k string) string { return bad[k] })
	for _, w := range []string{"REGISTRY_TTL", "MAX_FRAMES_PER_SECOND", "REDIS_POOL_SIZE", "ALLOWED_ORIGINS", "WRITE_TIMEOUT", "JWT_ISSUER", "JWT_AUDIENCE", "INSTANCE_ID"} {
		if err == nil || !strings.Contains(err.Error(), w) {
			t.Errorf("error %v does not name %s", err, w)
		}
	}
	if err != nil && strings.Contains(err.Error(), "\n") {
		t.Errorf("error %q is several lines (SCF logs stderr line by line)", err)
	}
}

func TestEgressTokens(t *testing.T) {
	t.Parallel()
	e := startSecEgress(t, map[string]string{"JWT_SECRET": testSecret, "PUBLIC_CHANNELS": "news.*"})
	good := token(t, auth.Claims{Subject: "alice", Channels: []string{"room.*"}})
	expired := token(t, auth.Claims{Subject: "alice", Expires: time.Now().Add(-time.Minute)})
	forged, _ := auth.SignHS256("not-the-secret-0123456789abcdef", auth.Claims{Subject: "alice", Channels: []string{"*"}, Expires: time.Now().Add(time.Hour)})
	// The right secret, another algorithm (some libraries' default for a
	// long key): the refusal names the algorithm, not the signature.
	enc := base64.RawURLEncoding
	hs512 := enc.EncodeToString([]byte(`{"alg":"HS512","typ":"JWT"}`)) + "." + enc.EncodeToString([]byte(`{"sub":"alice","exp":`+strconv.FormatInt(time.Now().Add(time.Hour).Unix(), 10)+`}`))
	mac := hmac.New(sha512.New, []byte(testSecret))
	mac.Write([]byte(hs512))
	hs512 += "." + enc.EncodeToString(mac.Sum(nil))

	for name, tc := range map[string]struct {
		q          url.Values
		code, says string
	}{
		"no token":  {url.Values{"user": {"alice"}}, "unauthorized", "missing token"},
		"expired":   {url.Values{"token": {expired}}, "token_expired", "expired"},
		"forged":    {url.Values{"token": {forged}}, "invalid_token", "bad signature"},
		"not a jwt": {url.Values{"token": {"abc"}}, "invalid_token", "not a JWT"},
		"HS512":     {url.Values{"token": {hs512}}, "invalid_token", "alg HS512 is not accepted here (accepted: HS256)"},
	} {
		_, resp, err := e.dial(t, tc.q, nil)
		if err == nil || resp == nil || resp.StatusCode != 401 {
			t.Errorf("%s: %v %v", name, err, resp)
			continue
		}
		body, _ := io.ReadAll(resp.Body)
		if !strings.Contains(string(body), `"`+tc.code+`"`) || !strings.Contains(string(body), tc.says) {
			t.Errorf("%s: body %s, want %s saying %q", name, body, tc.code, tc.says)
		}
		// RFC 6750 §3.1, as the ingress: a token that was sent and
		// refused is error="invalid_token" (expired ones too); none sent,
		// no error.
		want := `Bearer realm="wsrelay", error="invalid_token"`
		if tc.code == "unauthorized" {
			want = `Bearer realm="wsrelay"`
		}
		if got := resp.Header.Get("WWW-Authenticate"); got != want {
			t.Errorf("%s: WWW-Authenticate %q, want %q", name, got, want)
		}
	}

	// Query token; the user query parameter does not override sub.
	ws, _, err := e.dial(t, url.Values{"token": {good}, "user": {"mallory"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if w := next(t, ws, protocol.TypeWelcome); w.User == nil || *w.User != "alice" {
		t.Fatalf("welcome %+v", w)
	}
	send(t, ws, map[string]any{"type": "subscribe", "channel": "room.1", "ref": 1})
	next(t, ws, protocol.TypeSubscribed)
	send(t, ws, map[string]any{"type": "subscribe", "channel": "news.eu", "ref": 2})
	next(t, ws, protocol.TypeSubscribed)
	send(t, ws, map[string]any{"type": "subscribe", "channel": "lobby", "ref": 3})
	if r := next(t, ws, protocol.TypeError); r.Code != protocol.CodeForbidden || string(r.Ref) != "3" {
		t.Fatalf("outside the claim: %+v", r)
	}
	send(t, ws, map[string]any{"type": "ping", "ref": 4})
	next(t, ws, protocol.TypePong) // still open

	// Subprotocol token; "wsrelay" is echoed, never the token.
	ws2, resp, err := e.dial(t, nil, nil, Subprotocol, "token."+good)
	if err != nil {
		t.Fatal(err)
	}
	if p := resp.Header.Get("Sec-WebSocket-Protocol"); p != Subprotocol || ws2.Subprotocol() != Subprotocol {
		t.Fatalf("subprotocol %q", p)
	}
	next(t, ws2, protocol.TypeWelcome)
	// Initial channels go through the same check.
	ws3, _, err := e.dial(t, url.Values{"token": {good}, "channels": {"room.2,lobby"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	next(t, ws3, protocol.TypeSubscribed)
	if r := next(t, ws3, protocol.TypeError); r.Code != protocol.CodeForbidden {
		t.Fatalf("initial channel outside the claim: %+v", r)
	}
}

// With JWT_ISSUER and JWT_AUDIENCE set, a token must carry that iss and
// hold that aud, or the upgrade is refused 401 invalid_token, saying
// which claim; unset, iss and aud are not looked at. The refresh frame's
// token goes through the same check.
func TestEgressTokenIssuerAudience(t *testing.T) {
	t.Parallel()
	exp := strconv.FormatInt(time.Now().Add(time.Hour).Unix(), 10)
	tok := func(claims string) string {
		return signPayload(`{"sub":"alice","exp":` + exp + `,"channels":["a"]` + claims + `}`)
	}
	e := startSecEgress(t, map[string]string{"JWT_SECRET": testSecret, "JWT_ISSUER": "https://auth.example.com/", "JWT_AUDIENCE": "wsrelay"})
	good := tok(`,"iss":"https://auth.example.com/","aud":["billing","wsrelay"]`)
	ws, _, err := e.dial(t, url.Values{"token": {good}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	next(t, ws, protocol.TypeWelcome)
	for _, tc := range []struct{ name, claims, detail string }{
		{"wrong iss", `,"iss":"https://other.example.com/","aud":"wsrelay"`, "iss is not JWT_ISSUER"},
		{"no iss", `,"aud":"wsrelay"`, "no iss claim"},
		{"wrong aud", `,"iss":"https://auth.example.com/","aud":"billing"`, "aud does not hold JWT_AUDIENCE"},
		{"no aud", `,"iss":"https://auth.example.com/"`, "no aud claim"},
	} {
		token := tok(tc.claims)
		_, resp, err := e.dial(t, url.Values{"token": {token}}, nil)
		if err == nil || resp == nil || resp.StatusCode != 401 {
			t.Errorf("%s: %v %v", tc.name, err, resp)
			continue
		}
		body, _ := io.ReadAll(resp.Body)
		if !strings.Contains(string(body), `"invalid_token"`) || !strings.Contains(string(body), tc.detail) || strings.Contains(string(body), token) {
			t.Errorf("%s: body %s, want invalid_token, the detail %q and not the token", tc.name, body, tc.detail)
		}
		if resp.Header.Get("WWW-Authenticate") == "" {
			t.Errorf("%s: 401 without WWW-Authenticate", tc.name)
		}
		// The subprotocol form is checked the same way.
		if _, resp, err := e.dial(t, nil, nil, Subprotocol, "token."+token); err == nil || resp == nil || resp.StatusCode != 401 {
			t.Errorf("%s, subprotocol: %v %v", tc.name, err, resp)
		}
	}
	// A refresh with a token of another issuer is refused; the
	// connection keeps its token.
	send(t, ws, map[string]any{"type": "refresh", "token": tok(`,"iss":"https://other.example.com/","aud":"wsrelay"`), "ref": 1})
	if r := next(t, ws, protocol.TypeError); r.Code != protocol.CodeInvalidToken {
		t.Fatalf("refresh, wrong iss: %+v", r)
	}
	send(t, ws, map[string]any{"type": "refresh", "token": good, "ref": 2})
	next(t, ws, protocol.TypeRefreshed)

	// Unset: any iss and aud, or none, as before.
	plain := startSecEgress(t, map[string]string{"JWT_SECRET": testSecret})
	for _, claims := range []string{``, `,"iss":"https://other.example.com/","aud":["billing"]`} {
		ws, _, err := plain.dial(t, url.Values{"token": {tok(claims)}}, nil)
		if err != nil {
			t.Fatalf("JWT_ISSUER and JWT_AUDIENCE unset, claims %s: %v", claims, err)
		}
		next(t, ws, protocol.TypeWelcome)
	}
	// exp must be a number, whatever JWT_ISSUER and JWT_AUDIENCE.
	_, resp, err := plain.dial(t, url.Values{"token": {signPayload(`{"sub":"alice","exp":"` + exp + `"}`)}}, nil)
	if err == nil || resp == nil || resp.StatusCode != 401 {
		t.Fatalf("exp a string: %v %v", err, resp)
	}
	if body, _ := io.ReadAll(resp.Body); !strings.Contains(string(body), "exp must be a number") {
		t.Errorf("exp a string: body %s", body)
	}
}

func TestEgressAnonymous(t *testing.T) {
	t.Parallel()
	e := startSecEgress(t, map[string]string{"ALLOW_ANONYMOUS": "true", "JWT_SECRET": testSecret})
	ws, _, err := e.dial(t, url.Values{"user": {"dev"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if w := next(t, ws, protocol.TypeWelcome); *w.User != "dev" {
		t.Fatalf("welcome %+v", w)
	}
	send(t, ws, map[string]any{"type": "subscribe", "channel": "anything"})
	next(t, ws, protocol.TypeSubscribed)
	// A bad token is still refused.
	if _, resp, err := e.dial(t, url.Values{"token": {"a.b.c"}}, nil); err == nil || resp.StatusCode != 401 {
		t.Fatalf("bad token in anonymous mode: %v", err)
	}
	// So is a user the ingress's /v1/users/{user}/… routes could not
	// address ("." and ".." are resolved away in a URL path).
	for _, u := range []string{".", "..", "a b"} {
		ws, resp, err := e.dial(t, url.Values{"user": {u}}, nil)
		if err == nil {
			ws.Close()
		}
		if err == nil || resp == nil || resp.StatusCode != 400 {
			t.Errorf("user %q: %v (response %v), want 400", u, err, resp != nil)
			continue
		}
		if body, _ := io.ReadAll(resp.Body); !strings.Contains(string(body), `"invalid_user"`) {
			t.Errorf("user %q: body %s, want invalid_user", u, body)
		}
	}
}

func TestEgressTokenExpiry(t *testing.T) {
	t.Parallel()
	e := startSecEgress(t, map[string]string{"JWT_SECRET": testSecret})
	// exp has one-second precision: expires 1–2 s from now.
	short := token(t, auth.Claims{Subject: "alice", Channels: []string{"a"}, Expires: time.Now().Add(2 * time.Second)})
	ws, _, err := e.dial(t, url.Values{"token": {short}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	next(t, ws, protocol.TypeWelcome)
	if code := closeCode(t, ws, 6*time.Second); code != protocol.CloseTokenExpired {
		t.Fatalf("close %d, want %d", code, protocol.CloseTokenExpired)
	}
}

func TestEgressRefresh(t *testing.T) {
	t.Parallel()
	e := startSecEgress(t, map[string]string{"JWT_SECRET": testSecret})
	oldExp := time.Now().Add(time.Minute)
	ws, _, err := e.dial(t, url.Values{"token": {token(t, auth.Claims{Subject: "alice", Channels: []string{"a", "b"}, Expires: oldExp})}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	next(t, ws, protocol.TypeWelcome)
	send(t, ws, map[string]any{"type": "subscribe", "channel": "a"})
	next(t, ws, protocol.TypeSubscribed)
	send(t, ws, map[string]any{"type": "subscribe", "channel": "b"})
	next(t, ws, protocol.TypeSubscribed)

	// Refused refreshes leave the connection as it was.
	send(t, ws, map[string]any{"type": "refresh", "token": token(t, auth.Claims{Subject: "bob", Channels: []string{"*"}}), "ref": 1})
	if r := next(t, ws, protocol.TypeError); r.Code != protocol.CodeForbidden {
		t.Fatalf("other user: %+v", r)
	}
	send(t, ws, map[string]any{"type": "refresh", "token": "a.b.c", "ref": 2})
	if r := next(t, ws, protocol.TypeError); r.Code != protocol.CodeInvalidToken {
		t.Fatalf("bad token: %+v", r)
	}
	send(t, ws, map[string]any{"type": "refresh", "token": token(t, auth.Claims{Subject: "alice", Expires: time.Now().Add(-time.Second)}), "ref": 3})
	if r := next(t, ws, protocol.TypeError); r.Code != protocol.CodeInvalidToken {
		t.Fatalf("expired token: %+v", r)
	}

	// A good refresh: later expiry, narrower channels (b is dropped).
	send(t, ws, map[string]any{"type": "refresh", "token": token(t, auth.Claims{Subject: "alice", Channels: []string{"a", "c"}, Expires: time.Now().Add(time.Hour)}), "ref": 4})
	if r := next(t, ws, protocol.TypeUnsubscribed); r.Channel != "b" {
		t.Fatalf("unsubscribed %+v", r)
	}
	if r := next(t, ws, protocol.TypeRefreshed); string(r.Ref) != "4" {
		t.Fatalf("refreshed %+v", r)
	}
	conns := e.s.hub.snapshotConns()
	if len(conns) != 1 || conns[0].expired(oldExp.Add(time.Second)) || !conns[0].expired(time.Now().Add(2*time.Hour)) {
		t.Fatal("expiry not moved by the refresh")
	}
	send(t, ws, map[string]any{"type": "subscribe", "channel": "c"})
	next(t, ws, protocol.TypeSubscribed)
	send(t, ws, map[string]any{"type": "subscribe", "channel": "b", "ref": 5})
	if r := next(t, ws, protocol.TypeError); r.Code != protocol.CodeForbidden {
		t.Fatalf("b after refresh: %+v", r)
	}
}

// dialExpiring connects alice to an egress with JWT_SECRET and env, and
// makes her connection's token expire now, as the sweep sees it: exp has
// whole seconds, so a token cannot be made to expire at a chosen
// millisecond.
func dialExpiring(t *testing.T, env map[string]string) (*secEgress, *websocket.Conn) {
	t.Helper()
	cfg := map[string]string{"JWT_SECRET": testSecret}
	maps.Copy(cfg, env)
	e := startSecEgress(t, cfg)
	ws, _, err := e.dial(t, url.Values{"token": {token(t, auth.Claims{Subject: "alice", Channels: []string{"a"}})}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	next(t, ws, protocol.TypeWelcome)
	conns := e.s.hub.snapshotConns()
	if len(conns) != 1 {
		t.Fatalf("%d connections", len(conns))
	}
	c := conns[0]
	c.mu.Lock()
	c.exp = time.Now().Add(-time.Millisecond)
	c.mu.Unlock()
	return e, ws
}

// TestRefreshAfterExpiry: a refresh that comes once the connection's
// token has expired is refused, and the connection ends 4004, whether or
// not the sweep has seen the expiry yet: it was accepted when the sweep
// had not, and a sweep that had could close the connection 4004 right
// after its "refreshed".
func TestRefreshAfterExpiry(t *testing.T) {
	t.Parallel()
	_, ws := dialExpiring(t, nil)
	send(t, ws, map[string]any{"type": "refresh", "token": token(t, auth.Claims{Subject: "alice", Channels: []string{"a"}}), "ref": 1})
	if r := next(t, ws, protocol.TypeError); r.Code != protocol.CodeInvalidToken || !strings.Contains(r.Message, "expired") {
		t.Fatalf("refresh after expiry: %+v", r)
	}
	if code := closeCode(t, ws, 3*time.Second); code != protocol.CloseTokenExpired {
		t.Fatalf("close %d, want %d", code, protocol.CloseTokenExpired)
	}
}

// TestExpiredTokenGetsNoMessage: a connection whose token has expired,
// and which the sweep has not closed yet (a process frozen past exp runs
// its fan-out as soon as it runs again), is written none of the messages
// queued for it, live, replayed or targeted, however long before exp
// they were queued: its replies go, then the 4004 close, at once. No
// sweep runs here (no Run): the writer does it.
func TestExpiredTokenGetsNoMessage(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	cfg := Config{SendQueue: 16, WriteTimeout: time.Second, PingInterval: time.Hour, ShutdownGrace: time.Second,
		Redis: redisconn.Config{KeyPrefix: prefix, Timeout: time.Second}}
	s := NewServer(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)), rdb)
	server, client := tcpPair(t)
	c := &conn{s: s, nc: server, id: "a", user: "alice", done: make(chan struct{}), openedAt: time.Now(),
		exp: time.Now().Add(-time.Millisecond)}
	c.fr.init(server, 1<<16)
	t.Cleanup(func() {
		_ = server.Close()
		c.unlisting.Wait()
		c.writers.Wait()
	})
	// Queued as one batch: the writer is held back (writing) until all
	// of it is in the queue.
	c.mu.Lock()
	c.writing = true
	c.mu.Unlock()
	msg := func(data string) []byte {
		return wsFrame(opText, []byte(`{"type":"message","channel":"a","id":"1-0","data":"`+data+`"}`))
	}
	c.enqueue(&queued{frame: msg("live"), id: stream.ID{MS: 1}, ts: 1})
	c.enqueue(&queued{frame: msg("targeted"), id: stream.ID{MS: 2}, ts: 2, targeted: true})
	if !c.enqueueIfRoom(&queued{frame: msg("replayed"), id: stream.ID{MS: 3}, ts: 3, replay: true}) {
		t.Fatal("the replayed message was not queued")
	}
	c.sendError(protocol.CodeInvalidToken, "the connection's token has expired: reconnect with a fresh token", nil)
	c.mu.Lock()
	c.writing = false
	c.startWriterLocked()
	c.mu.Unlock()

	ws := &rawWS{t: t, nc: client, br: bufio.NewReader(client)}
	var texts []string
	for {
		op, p, err := ws.next()
		if err != nil {
			t.Errorf("no close frame: %v", err)
			break
		}
		if op == opText {
			texts = append(texts, string(p))
			continue
		}
		if op != opClose {
			continue
		}
		if code := int(binary.BigEndian.Uint16(p)); code != protocol.CloseTokenExpired {
			t.Errorf("closed %d %q, want %d", code, p[2:], protocol.CloseTokenExpired)
		}
		break
	}
	if len(texts) != 1 || !strings.Contains(texts[0], protocol.CodeInvalidToken) {
		t.Errorf("frames before the close: %q, want the error reply alone", texts)
	}
	c.writers.Wait()
	c.mu.Lock()
	replaying := c.replaying
	c.mu.Unlock()
	if replaying != 0 {
		t.Errorf("%d bytes of replayed frames still counted (replayBudget)", replaying)
	}
	if n := s.hub.undelivered.Load(); n != 1 {
		t.Errorf("%d targeted messages counted undelivered, want 1", n)
	}
}

// TestExpiryBeforeLifetimeAndIdle: a sweep that finds a connection's
// token expired and its lifetime and idle time reached closes it 4004,
// so that the client fetches a fresh token before it reconnects rather
// than after a 401.
func TestExpiryBeforeLifetimeAndIdle(t *testing.T) {
	t.Parallel()
	e, ws := dialExpiring(t, map[string]string{"MAX_LIFETIME": "1h", "IDLE_TIMEOUT": "1h"})
	// Two hours on: past the lifetime and the idle timeout too. (The
	// sweep of its own, should it come first, closes 4004 as well.)
	e.s.sweepConns(time.Now().Add(2 * time.Hour))
	if code := closeCode(t, ws, 3*time.Second); code != protocol.CloseTokenExpired {
		t.Fatalf("close %d, want %d", code, protocol.CloseTokenExpired)
	}
}

func TestEgressOrigins(t *testing.T) {
	t.Parallel()
	e := startSecEgress(t, map[string]string{"ALLOW_ANONYMOUS": "true", "ALLOWED_ORIGINS": "https://app.example"})
	if _, _, err := e.dial(t, nil, http.Header{"Origin": {"https://app.example"}}); err != nil {
		t.Fatalf("allowed origin: %v", err)
	}
	_, resp, err := e.dial(t, nil, http.Header{"Origin": {"https://evil.example"}})
	if err == nil || resp == nil || resp.StatusCode != 403 {
		t.Fatalf("foreign origin: %v", err)
	}
	if b, _ := io.ReadAll(resp.Body); !strings.Contains(string(b), `"origin_not_allowed"`) {
		t.Errorf("foreign origin: body %s, want code origin_not_allowed", b)
	}
	if _, _, err := e.dial(t, nil, nil); err != nil {
		t.Fatalf("no origin: %v", err)
	}
}

// Each limit: the allowed side, then the refused one.
func TestEgressLimits(t *testing.T) {
	t.Parallel()
	t.Run("connections", func(t *testing.T) {
		t.Parallel()
		e := startSecEgress(t, map[string]string{"ALLOW_ANONYMOUS": "true", "MAX_CONNECTIONS": "1"})
		ws, _, err := e.dial(t, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		next(t, ws, protocol.TypeWelcome)
		_, resp, err := e.dial(t, nil, nil)
		if err == nil || resp.StatusCode != 503 || resp.Header.Get("Retry-After") == "" {
			t.Fatalf("over MAX_CONNECTIONS: %v", err)
		}
	})
	t.Run("subscriptions", func(t *testing.T) {
		t.Parallel()
		e := startSecEgress(t, map[string]string{"ALLOW_ANONYMOUS": "true", "MAX_SUBSCRIPTIONS": "2"})
		ws, _, err := e.dial(t, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		for _, ch := range []string{"a", "b"} {
			send(t, ws, map[string]any{"type": "subscribe", "channel": ch})
			next(t, ws, protocol.TypeSubscribed)
		}
		send(t, ws, map[string]any{"type": "subscribe", "channel": "c"})
		if r := next(t, ws, protocol.TypeError); r.Code != protocol.CodeTooManySubs {
			t.Fatalf("%+v", r)
		}
	})
	t.Run("frame size", func(t *testing.T) {
		t.Parallel()
		e := startSecEgress(t, map[string]string{"ALLOW_ANONYMOUS": "true", "MAX_FRAME_BYTES": "256"})
		ws, _, err := e.dial(t, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		send(t, ws, map[string]any{"type": "ping", "channel": strings.Repeat("x", 200)})
		next(t, ws, protocol.TypePong)
		send(t, ws, map[string]any{"type": "ping", "channel": strings.Repeat("x", 300)})
		if code := closeCode(t, ws, 5*time.Second); code != protocol.CloseTooBig {
			t.Fatalf("close %d", code)
		}
	})
	t.Run("text that is not UTF-8", func(t *testing.T) {
		t.Parallel()
		e := startSecEgress(t, map[string]string{"ALLOW_ANONYMOUS": "true"})
		ws, _, err := e.dial(t, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		next(t, ws, protocol.TypeWelcome)
		if err := ws.WriteMessage(websocket.TextMessage, []byte("{\"type\":\"ping\",\"ref\":\"\xff\"}")); err != nil {
			t.Fatal(err)
		}
		if code := closeCode(t, ws, 5*time.Second); code != protocol.CloseInvalidData {
			t.Fatalf("close %d, want 1007", code)
		}
	})
	t.Run("frames per second", func(t *testing.T) {
		t.Parallel()
		e := startSecEgress(t, map[string]string{"ALLOW_ANONYMOUS": "true", "MAX_FRAMES_PER_SECOND": "3"})
		ws, _, err := e.dial(t, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		next(t, ws, protocol.TypeWelcome)
		// Frames over the limit are held, not refused: every ping is
		// answered, in order, and the five over the burst take a second
		// and two thirds at least.
		start := time.Now()
		for i := 0; i < 8; i++ {
			send(t, ws, map[string]any{"type": "ping", "ref": i})
		}
		for i := 0; i < 8; i++ {
			var r protocol.Reply
			_ = ws.SetReadDeadline(time.Now().Add(5 * time.Second))
			if err := ws.ReadJSON(&r); err != nil || r.Type != protocol.TypePong || string(r.Ref) != strconv.Itoa(i) {
				t.Fatalf("reply %d: %+v, %v; want the pong to ping %d", i, r, err, i)
			}
		}
		if d := time.Since(start); d < 5*time.Second/3 {
			t.Fatalf("8 frames at 3 per second answered in %v: not held", d)
		}
	})
}

// TestEgressKeyRotation: during a rotation of the HS256 secret, tokens
// signed with the new secret and with the one it replaced both connect;
// any other secret is refused.
func TestEgressKeyRotation(t *testing.T) {
	t.Parallel()
	const current = "the-new-secret-0123456789abcdef0123"
	e := startSecEgress(t, map[string]string{"JWT_SECRET": current, "JWT_SECRET_PREVIOUS": testSecret})
	exp := time.Now().Add(time.Hour)
	for name, tc := range map[string]struct {
		secret string
		ok     bool
	}{"current": {current, true}, "previous": {testSecret, true}, "other": {"not-the-secret-0123456789abcdef", false}} {
		tok, err := auth.SignHS256(tc.secret, auth.Claims{Subject: "alice", Expires: exp})
		if err != nil {
			t.Fatal(err)
		}
		ws, resp, err := e.dial(t, url.Values{"token": {tok}}, nil)
		switch {
		case tc.ok && err != nil:
			t.Errorf("%s: %v", name, err)
		case tc.ok:
			next(t, ws, protocol.TypeWelcome)
			ws.Close()
		case err == nil || resp == nil || resp.StatusCode != 401:
			t.Errorf("%s: %v %v, want 401", name, err, resp)
		}
	}
}

// signPayload signs payload as it is with testSecret (auth.SignPayloadHS256).
func signPayload(payload string) string { return auth.SignPayloadHS256(testSecret, payload) }
