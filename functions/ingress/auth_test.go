package main

import (
	"crypto/hmac"
	"crypto/sha512"
	"encoding/base64"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/wsrelay/wsrelay/shared/auth"
	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/registry"
	"github.com/wsrelay/wsrelay/shared/stream"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

const (
	testSecret = "test-secret-0123456789abcdef0123456789"
	fullKey    = "full-key-0123456789"
	chatKey    = "chat-key-0123456789"
	adminKey   = "admin-key-0123456789"
)

var testKeys = fullKey + "," + chatKey + "=chat:*|news.*," + adminKey + "=" + auth.AdminScope

// newSecEnv is a server configured by env (plus the test Redis), whose
// log lines are kept in logs.
func newSecEnv(t *testing.T, env map[string]string) (*testEnv, *testkit.SyncBuffer) {
	t.Helper()
	cfg, err := loadConfig(func(k string) string { return env[k] })
	if err != nil {
		t.Fatalf("config: %v", err)
	}
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	logs := &testkit.SyncBuffer{}
	log := slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	return &testEnv{t: t, srv: testServer(t, cfg, log, rdb, ks), rdb: rdb, keys: ks}, logs
}

func bearer(cred string) []string { return []string{"Authorization", "Bearer " + cred} }

func userToken(t *testing.T, c auth.Claims) string {
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

func expectStatus(t *testing.T, w *httptest.ResponseRecorder, status int) {
	t.Helper()
	if w.Code != status {
		t.Fatalf("status = %d, want %d; body %s", w.Code, status, w.Body.String())
	}
}

// noSecrets fails if any secret appears in the logs.
func noSecrets(t *testing.T, logs *testkit.SyncBuffer, secrets ...string) {
	t.Helper()
	out := logs.String()
	for _, s := range secrets {
		if strings.Contains(out, s) {
			t.Errorf("a secret appears in the logs: %s", out)
		}
	}
}

func TestRefuseToStart(t *testing.T) {
	t.Parallel()
	_, err := loadConfig(func(string) string { return "" })
	if err == nil {
		t.Fatal("started with no credentials and without ALLOW_ANONYMOUS")
	}
	for _, w := range []string{"API_KEYS", "JWT_SECRET", "ALLOW_ANONYMOUS=true"} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error %q does not name %s", err, w)
		}
	}
	err = run(t.Context(), nil, func(string) string { return "" }, io.Discard, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "API_KEYS") {
		t.Errorf("run: %v", err)
	}
	for _, env := range []map[string]string{
		{"API_KEYS": "k"},
		{"JWT_SECRET": testSecret},
		{"ALLOW_ANONYMOUS": "true"},
	} {
		if _, err := loadConfig(func(k string) string { return env[k] }); err != nil {
			t.Errorf("%v: %v", env, err)
		}
	}
	for name, env := range map[string]map[string]string{
		"key with a dot":  {"API_KEYS": "sec.ret-key"},
		"bad scope":       {"API_KEYS": "sec-ret-key=a b"},
		"negative rate":   {"API_KEYS": "k", "PUBLISH_RATE_PER_IP": "-1"},
		"bad public key":  {"JWT_PUBLIC_KEY": "nope"},
		"previous alone":  {"API_KEYS": "k", "JWT_SECRET_PREVIOUS": testSecret},
		"duplicate key":   {"API_KEYS": "sec-ret-key,sec-ret-key"},
		"empty key scope": {"API_KEYS": "sec-ret-key="},
	} {
		_, err := loadConfig(func(k string) string { return env[k] })
		if err == nil {
			t.Errorf("%s: accepted", name)
		} else if strings.Contains(err.Error(), "sec-ret-key") || strings.Contains(err.Error(), "sec.ret-key") {
			t.Errorf("%s: error holds the key: %v", name, err)
		}
	}
}

// A batch reports its first bad item, whether malformed or not allowed,
// and writes nothing.
func TestBatchFirstBadItem(t *testing.T) {
	t.Parallel()
	e, _ := newSecEnv(t, map[string]string{"API_KEYS": testKeys})
	for _, tc := range []struct {
		name, body string
		status     int
		code       string
		index      int
	}{
		{"not allowed, then malformed", `{"messages":[{"channel":"chat:1","data":1},{"channel":"secret","data":1},{"channel":"chat:2"}]}`, 403, "forbidden", 1},
		{"malformed, then not allowed", `{"messages":[{"channel":"chat:1"},{"channel":"secret","data":1}]}`, 400, "missing_data", 0},
	} {
		w := e.do("POST", "/v1/messages", tc.body, bearer(chatKey)...)
		code, index := errorOf(t, w)
		if w.Code != tc.status || code != tc.code || index == nil || *index != tc.index {
			t.Errorf("%s: %d %s; want %d %s at index %d", tc.name, w.Code, w.Body, tc.status, tc.code, tc.index)
		}
		if !strings.Contains(w.Body.String(), fmt.Sprintf("message %d: ", tc.index)) {
			t.Errorf("%s: the message does not name item %d: %s", tc.name, tc.index, w.Body)
		}
	}
	if n := e.xlen("chat:1") + e.xlen("chat:2") + e.xlen("secret"); n != 0 {
		t.Fatalf("refused batches wrote %d messages", n)
	}
}

// A token's claim names are exact (RFC 7519 §4): a "PUBLISH" claim does
// not let a user publish, nor a "Channels" after "channels" widen what it
// reads, nor an "EXP" stand in for a missing exp.
func TestUserTokenClaimNamesExact(t *testing.T) {
	t.Parallel()
	e, _ := newSecEnv(t, map[string]string{"JWT_SECRET": testSecret})
	exp := strconv.FormatInt(time.Now().Add(time.Hour).Unix(), 10)
	w := e.do("POST", "/v1/channels/x/messages", `{"data":1}`, bearer(signPayload(`{"sub":"alice","exp":`+exp+`,"PUBLISH":["*"]}`))...)
	expectStatus(t, w, 403)
	w = e.do("GET", "/v1/channels/x/messages", "", bearer(signPayload(`{"sub":"alice","exp":`+exp+`,"channels":["room.1"],"Channels":["*"]}`))...)
	expectStatus(t, w, 403)
	w = e.do("GET", "/v1/channels/room.1/messages", "", bearer(signPayload(`{"sub":"alice","EXP":`+exp+`,"channels":["room.1"]}`))...)
	expectStatus(t, w, 401)
}

// With JWT_ISSUER and JWT_AUDIENCE set, a token must carry that iss and
// hold that aud (401 invalid_token otherwise, saying which claim);
// unset, iss and aud are not looked at. And exp must be a number.
func TestUserTokenIssuerAudience(t *testing.T) {
	t.Parallel()
	exp := strconv.FormatInt(time.Now().Add(time.Hour).Unix(), 10)
	tok := func(claims string) string {
		return signPayload(`{"sub":"alice","exp":` + exp + `,"publish":["x"]` + claims + `}`)
	}
	publish := func(e *testEnv, token string) *httptest.ResponseRecorder {
		return e.do("POST", "/v1/channels/x/messages", `{"data":1}`, bearer(token)...)
	}
	e, logs := newSecEnv(t, map[string]string{"JWT_SECRET": testSecret, "JWT_ISSUER": "https://auth.example.com/", "JWT_AUDIENCE": "wsrelay"})
	expectStatus(t, publish(e, tok(`,"iss":"https://auth.example.com/","aud":"wsrelay"`)), 202)
	expectStatus(t, publish(e, tok(`,"iss":"https://auth.example.com/","aud":["billing","wsrelay"]`)), 202)
	for _, tc := range []struct{ name, claims, detail string }{
		{"wrong iss", `,"iss":"https://other.example.com/","aud":"wsrelay"`, "iss is not JWT_ISSUER"},
		{"no iss", `,"aud":"wsrelay"`, "no iss claim"},
		{"wrong aud", `,"iss":"https://auth.example.com/","aud":["billing"]`, "aud does not hold JWT_AUDIENCE"},
		{"no aud", `,"iss":"https://auth.example.com/"`, "no aud claim"},
	} {
		token := tok(tc.claims)
		w := publish(e, token)
		expectError(t, w, 401, "invalid_token")
		if !strings.Contains(w.Body.String(), tc.detail) || strings.Contains(w.Body.String(), token) {
			t.Errorf("%s: body %s, want the detail %q and not the token", tc.name, w.Body, tc.detail)
		}
		if w.Header().Get("WWW-Authenticate") == "" {
			t.Errorf("%s: 401 without WWW-Authenticate", tc.name)
		}
	}
	if n := e.xlen("x"); n != 2 {
		t.Fatalf("%d messages published, want the 2 accepted", n)
	}
	noSecrets(t, logs, testSecret)

	// Unset: any iss and aud, or none, as before.
	plain, _ := newSecEnv(t, map[string]string{"JWT_SECRET": testSecret})
	expectStatus(t, publish(plain, tok(``)), 202)
	expectStatus(t, publish(plain, tok(`,"iss":"https://other.example.com/","aud":["billing"]`)), 202)
	// exp must be a number, whatever JWT_ISSUER and JWT_AUDIENCE.
	w := publish(plain, signPayload(`{"sub":"alice","exp":"`+exp+`","publish":["x"]}`))
	expectError(t, w, 401, "invalid_token")
	if !strings.Contains(w.Body.String(), "exp must be a number") {
		t.Errorf("exp a string: body %s", w.Body)
	}
	// The right secret, another algorithm: the refusal names it, not
	// the signature (a backend would look for a wrong secret).
	enc := base64.RawURLEncoding
	hs512 := enc.EncodeToString([]byte(`{"alg":"HS512","typ":"JWT"}`)) + "." + enc.EncodeToString([]byte(`{"sub":"alice","exp":`+exp+`,"publish":["x"]}`))
	mac := hmac.New(sha512.New, []byte(testSecret))
	mac.Write([]byte(hs512))
	w = publish(plain, hs512+"."+enc.EncodeToString(mac.Sum(nil)))
	expectError(t, w, 401, "invalid_token")
	if !strings.Contains(w.Body.String(), "alg HS512 is not accepted here (accepted: HS256)") {
		t.Errorf("HS512 with the right secret: body %s, want the alg named", w.Body)
	}
}

// With only API keys configured, a token is not accepted.
func TestUserTokenWithoutSecret(t *testing.T) {
	t.Parallel()
	e, _ := newSecEnv(t, map[string]string{"API_KEYS": fullKey})
	w := e.do("POST", "/v1/channels/room.1/messages", `{"data":1}`, bearer(userToken(t, auth.Claims{Subject: "a", Publish: []string{"*"}}))...)
	expectError(t, w, 401, "invalid_token")
}

func TestAnonymousMode(t *testing.T) {
	t.Parallel()
	e, _ := newSecEnv(t, map[string]string{"ALLOW_ANONYMOUS": "true", "JWT_SECRET": testSecret})
	expectStatus(t, e.do("POST", "/v1/channels/c/messages", `{"data":1,"from":"me"}`), 202)
	expectStatus(t, e.do("GET", "/v1/connections/c1", ""), 404) // admin routes open
	// A credential that is sent is still checked.
	expectError(t, e.do("POST", "/v1/channels/c/messages", `{"data":1}`, bearer("some-key")...), 401, "unauthorized")
	forged, _ := auth.SignHS256("not-the-secret-0123456789abcdef", auth.Claims{Subject: "a", Publish: []string{"*"}, Expires: time.Now().Add(time.Hour)})
	expectError(t, e.do("POST", "/v1/channels/c/messages", `{"data":1}`, bearer(forged)...), 401, "invalid_token")
	// And a user token still stamps from, and keeps its limits.
	tok := userToken(t, auth.Claims{Subject: "bob", Publish: []string{"c"}, Channels: []string{"c"}})
	expectStatus(t, e.do("POST", "/v1/channels/c/messages", `{"data":2,"from":"mallory"}`, bearer(tok)...), 202)
	expectError(t, e.do("POST", "/v1/channels/d/messages", `{"data":2}`, bearer(tok)...), 403, "forbidden")
	w := e.do("GET", "/v1/channels/c/messages", "")
	if !strings.Contains(w.Body.String(), `"from":"bob"`) || strings.Contains(w.Body.String(), "mallory") {
		t.Fatalf("history: %s", w.Body)
	}
}

func TestDisconnect(t *testing.T) {
	t.Parallel()
	e, _ := newSecEnv(t, map[string]string{"API_KEYS": testKeys})
	reg := registry.New(e.rdb, e.keys, 30*time.Second)
	rec := &registry.Record{ID: "conn1", User: "u", Instance: "inst1", Channels: []string{}, ConnectedAt: time.Now().UTC()}
	if err := reg.Put(t.Context(), rec); err != nil {
		t.Fatal(err)
	}
	expectError(t, e.do("DELETE", "/v1/connections/conn1", ""), 401, "unauthorized")
	expectError(t, e.do("DELETE", "/v1/connections/conn1", "", bearer(chatKey)...), 403, "forbidden")
	expectError(t, e.do("DELETE", "/v1/connections/nope", "", bearer(adminKey)...), 404, "connection_not_found")
	expectError(t, e.do("DELETE", "/v1/connections/bad%20id", "", bearer(adminKey)...), 404, "connection_not_found")
	entries, _ := stream.NewStore(e.rdb).Latest(t.Context(), e.keys.Inbox("inst1"), 10)
	if len(entries) != 0 {
		t.Fatalf("refused disconnects wrote %d entries", len(entries))
	}
	expectStatus(t, e.do("DELETE", "/v1/connections/conn1", "", bearer(adminKey)...), 202)
	entries, err := stream.NewStore(e.rdb).Latest(t.Context(), e.keys.Inbox("inst1"), 10)
	if err != nil || len(entries) != 1 || entries[0].Route != stream.Disconnect("conn1") {
		t.Fatalf("inbox: %v %+v", err, entries)
	}
}

func TestRateLimits(t *testing.T) {
	t.Parallel()
	t.Run("per user default", func(t *testing.T) {
		t.Parallel()
		e, _ := newSecEnv(t, map[string]string{"JWT_SECRET": testSecret})
		tok := userToken(t, auth.Claims{Subject: "u", Publish: []string{"*"}})
		other := userToken(t, auth.Claims{Subject: "v", Publish: []string{"*"}})
		// The default burst is 20 (rate 10/s): the 21st at once is refused.
		// "At once" on the buckets' clock, stopped: on a loaded machine
		// the 21 requests can take more than the 100 ms that refill one.
		stopped := time.Now()
		e.srv.sec.limits.now = func() time.Time { return stopped }
		var w *httptest.ResponseRecorder
		for i := 0; i < 21; i++ {
			w = e.do("POST", "/v1/channels/c/messages", `{"data":1}`, bearer(tok)...)
			if i < 20 && w.Code != 202 {
				t.Fatalf("publish %d: %d %s", i, w.Code, w.Body)
			}
		}
		expectError(t, w, 429, "rate_limited")
		if w.Header().Get("Retry-After") != "1" {
			t.Errorf("Retry-After %q", w.Header().Get("Retry-After"))
		}
		if n := e.xlen("c"); n != 20 {
			t.Errorf("%d messages written, want 20", n)
		}
		// Another user has a budget of its own.
		expectStatus(t, e.do("POST", "/v1/channels/c/messages", `{"data":1}`, bearer(other)...), 202)
	})
	t.Run("per key", func(t *testing.T) {
		t.Parallel()
		e, _ := newSecEnv(t, map[string]string{"API_KEYS": fullKey + "," + chatKey, "PUBLISH_RATE_PER_KEY": "0.5", "PUBLISH_BURST_PER_KEY": "2"})
		expectStatus(t, e.do("POST", "/v1/messages", `{"messages":[{"channel":"a","data":1},{"channel":"b","data":1}]}`, bearer(fullKey)...), 202)
		w := e.do("POST", "/v1/channels/a/messages", `{"data":1}`, bearer(fullKey)...)
		expectError(t, w, 429, "rate_limited")
		if w.Header().Get("Retry-After") != "2" {
			t.Errorf("Retry-After %q, want 2", w.Header().Get("Retry-After"))
		}
		// Sends to a user or a connection count too (checked before the
		// connection is looked up).
		expectError(t, e.do("POST", "/v1/users/u1/messages", `{"data":1}`, bearer(fullKey)...), 429, "rate_limited")
		expectError(t, e.do("POST", "/v1/connections/c1/messages", `{"data":1}`, bearer(fullKey)...), 429, "rate_limited")
		expectStatus(t, e.do("POST", "/v1/channels/a/messages", `{"data":1}`, bearer(chatKey)...), 202)
		// A batch larger than the burst can never pass.
		w = e.do("POST", "/v1/messages", `{"messages":[{"channel":"a","data":1},{"channel":"b","data":1},{"channel":"c","data":1}]}`, bearer(chatKey)...)
		expectError(t, w, 429, "rate_limited")
		if ra := w.Header().Get("Retry-After"); ra != "" || !strings.Contains(w.Body.String(), "smaller batches") {
			t.Errorf("a batch that can never pass: Retry-After %q (want none: retrying it cannot succeed), body %s", ra, w.Body)
		}
	})
	t.Run("per key off by default", func(t *testing.T) {
		t.Parallel()
		e, _ := newSecEnv(t, map[string]string{"API_KEYS": fullKey})
		for i := 0; i < 50; i++ {
			expectStatus(t, e.do("POST", "/v1/channels/a/messages", `{"data":1}`, bearer(fullKey)...), 202)
		}
	})
	t.Run("per ip", func(t *testing.T) {
		t.Parallel()
		e, _ := newSecEnv(t, map[string]string{"ALLOW_ANONYMOUS": "true", "PUBLISH_RATE_PER_IP": "1", "PUBLISH_BURST_PER_IP": "1", "CLIENT_IP_HEADER": "X-Forwarded-For"})
		from := func(remote, xff string) int {
			req := httptest.NewRequest("POST", "/v1/channels/a/messages", strings.NewReader(`{"data":1}`))
			req.Header.Set("Content-Type", "application/json")
			req.RemoteAddr = remote
			if xff != "" {
				req.Header.Set("X-Forwarded-For", xff)
			}
			w := httptest.NewRecorder()
			e.srv.ServeHTTP(w, req)
			return w.Code
		}
		// Behind the gateway, the last X-Forwarded-For entry is the client;
		// the earlier ones are the client's to forge.
		if c := from("10.0.0.1:1", "1.1.1.1, 9.9.9.9"); c != 202 {
			t.Fatalf("first: %d", c)
		}
		if c := from("10.0.0.1:1", "2.2.2.2, 9.9.9.9"); c != 429 {
			t.Fatalf("same client, forged first entry: %d", c)
		}
		// However many entries the client forged ahead of it: a proxy
		// chain, or a client sending its own X-Forwarded-For list.
		if c := from("10.0.0.1:1", "3.3.3.3, 4.4.4.4, 7.7.7.7"); c != 202 {
			t.Fatalf("client 7.7.7.7, first: %d", c)
		}
		if c := from("10.0.0.1:1", "5.5.5.5, 6.6.6.6, 7.7.7.7"); c != 429 {
			t.Fatalf("same client 7.7.7.7, two forged entries: %d", c)
		}
		if c := from("10.0.0.1:1", "8.8.8.8"); c != 202 {
			t.Fatalf("other client: %d", c)
		}
		if c := from("10.0.0.2:1", ""); c != 202 {
			t.Fatalf("no header: %d", c)
		}
		if c := from("10.0.0.2:2", ""); c != 429 {
			t.Fatalf("same peer: %d", c)
		}
		// An IPv6 client is its /64 (a line's prefix, any address of
		// which it can use).
		if c := from("[2001:db8:1:2::1]:1", ""); c != 202 {
			t.Fatalf("IPv6 peer: %d", c)
		}
		if c := from("[2001:db8:1:2:aaaa::7]:1", ""); c != 429 {
			t.Fatalf("another address of the same /64: %d", c)
		}
		if c := from("[2001:db8:1:3::1]:1", ""); c != 202 {
			t.Fatalf("another /64: %d", c)
		}
		if c := from("[::ffff:10.0.0.2]:1", ""); c != 429 {
			t.Fatalf("an IPv4-mapped address of a limited IPv4 peer: %d", c)
		}
	})
}

func TestLimiterSetBounded(t *testing.T) {
	t.Parallel()
	ls := newLimiterSet(1, 1)
	now := time.Now()
	for i := 0; i < maxLimiters+500; i++ {
		if d, _ := ls.reserve(fmt.Sprint("k", i), 1, now); d != 0 {
			t.Fatalf("fresh key %d limited", i)
		}
	}
	if n := ls.len(); n > maxLimiters {
		t.Fatalf("%d limiters kept, max %d", n, maxLimiters)
	}
	// Full of active keys, a sweep makes room for many new keys at once,
	// not for one (each sweep walks every bucket).
	if n := ls.len(); n > maxLimiters*9/10+500 {
		t.Fatalf("%d limiters after %d new keys: the sweeps made room one key at a time", n, maxLimiters+500)
	}
	// Idle buckets are dropped at the next sweep.
	ls.reserve("late", 1, now.Add(2*time.Minute))
	if n := ls.len(); n != 1 {
		t.Fatalf("%d limiters after all went idle", n)
	}
	if newLimiterSet(0, 5) != nil {
		t.Fatal("zero rate should be off")
	}
}

// TestLimiterSetKeepsSpentBuckets: a set full of buckets in use drops
// the fullest, so clients that spent their burst stay limited however
// many other clients come (dropping a bucket refills it: with arbitrary
// ones dropped, 11,000 one-off clients gave a quarter of them a full
// burst again).
func TestLimiterSetKeepsSpentBuckets(t *testing.T) {
	t.Parallel()
	ls := newLimiterSet(0.01, 5)
	now := time.Now()
	for i := range 50 {
		if d, _ := ls.reserve(fmt.Sprint("spent", i), 5, now); d != 0 {
			t.Fatalf("fresh key %d limited", i)
		}
	}
	for i := range maxLimiters + 1000 {
		ls.reserve(fmt.Sprint("once", i), 1, now)
	}
	if n := ls.len(); n > maxLimiters {
		t.Fatalf("%d limiters kept, max %d", n, maxLimiters)
	}
	for i := range 50 {
		if d, _ := ls.reserve(fmt.Sprint("spent", i), 1, now); d <= 0 {
			t.Fatalf("spent key %d may publish again after %d other keys came", i, maxLimiters+1000)
		}
	}
}

// TestRateLimitClockOutOfOrder: a request reads the clock before it
// takes a bucket's lock, so concurrent requests reach a bucket with their
// times out of order. One whose time is behind the bucket's last must not
// wind the bucket's clock back: rate then counted the refill between the
// two times again at the next request, and requests alternating so (a
// millisecond apart at 1,000/s is the same as a second at 1/s) passed at
// twice the rate. Here the clock is scripted: each second's request is
// followed by one that read its clock a second earlier.
func TestRateLimitClockOutOfOrder(t *testing.T) {
	t.Parallel()
	e, _ := newSecEnv(t, map[string]string{"API_KEYS": fullKey, "PUBLISH_RATE_PER_KEY": "1", "PUBLISH_BURST_PER_KEY": "2"})
	base := time.Now()
	var at []time.Time
	for s := 10; s < 20; s++ {
		at = append(at, base.Add(time.Duration(s)*time.Second), base.Add(time.Duration(s-1)*time.Second))
	}
	i := 0
	e.srv.sec.limits.now = func() time.Time { return at[i] }
	passed := 0
	for i = range at {
		if w := e.do("POST", "/v1/channels/c/messages", `{"data":1}`, bearer(fullKey)...); w.Code == 202 {
			passed++
		}
	}
	// Times 9 s to 19 s: a burst of 2 and 10 s at 1/s.
	if most := 2 + 10; passed > most {
		t.Fatalf("%d of %d publishes passed over 10 s, at most %d may (burst 2, 1/s)", passed, len(at), most)
	}

	// The same for a refund: a publish the per-user limit refuses gives
	// the per-IP bucket back its share at the time it took it (reserve's,
	// the bucket's last), not at the request's older one, which wound
	// that bucket's clock back just the same.
	e, _ = newSecEnv(t, map[string]string{"API_KEYS": fullKey, "JWT_SECRET": testSecret,
		"PUBLISH_RATE_PER_IP": "1", "PUBLISH_BURST_PER_IP": "2",
		"PUBLISH_RATE_PER_USER": "0.001", "PUBLISH_BURST_PER_USER": "1"})
	// The user spends its burst at 0 s; then each second one of the
	// key's, one of the user's (refused by the per-user limit) that read
	// its clock a second earlier, and another of the key's.
	tok := userToken(t, auth.Claims{Subject: "u", Publish: []string{"*"}})
	at, who := []time.Time{base}, []string{tok}
	for s := 10; s < 20; s++ {
		now := base.Add(time.Duration(s) * time.Second)
		at = append(at, now, now.Add(-time.Second), now)
		who = append(who, fullKey, tok, fullKey)
	}
	e.srv.sec.limits.now = func() time.Time { return at[i] }
	passed = 0
	for i = range at {
		w := e.do("POST", "/v1/channels/c/messages", `{"data":1}`, bearer(who[i])...)
		if i > 0 && w.Code == 202 {
			if who[i] != fullKey {
				t.Fatalf("request %d: the user passed its spent limit", i)
			}
			passed++
		}
	}
	// The IP's bucket is full again at 10 s: 2, and 9 s more at 1/s.
	if most := 2 + 9; passed > most {
		t.Fatalf("%d publishes passed the per-IP limit from 10 s to 19 s, at most %d may (burst 2, 1/s)", passed, most)
	}
}

// A refused publish gives back what the buckets checked before the
// refusing one took. The refusal itself must not reserve: a reservation
// cancelled at once leaves the bucket's last event in the future, and
// rate then reads every earlier reservation's refund as already spent.
func TestLimiterSetRefundAfterRefusal(t *testing.T) {
	t.Parallel()
	ls := newLimiterSet(1, 2)
	now := time.Now()
	d, r := ls.reserve("k", 1, now)
	if d != 0 || r.r == nil {
		t.Fatalf("first token refused: wait %v", d)
	}
	if d, r2 := ls.reserve("k", 2, now); d <= 0 || r2.r != nil {
		t.Fatalf("two tokens with one left: wait %v, reservation %v", d, r2.r != nil)
	} else if d != time.Second {
		t.Fatalf("wait for the missing token %v, want 1s", d)
	}
	r.cancel() // the publish was refused by a later bucket
	if d, _ := ls.reserve("k", 2, now); d != 0 {
		t.Fatalf("the refunded token was lost: both tokens need %v more", d)
	}
}

func TestCORS(t *testing.T) {
	t.Parallel()
	e, _ := newSecEnv(t, map[string]string{"API_KEYS": fullKey, "ALLOWED_ORIGINS": "https://app.example, https://b.example"})
	preflight := func(e *testEnv, origin string) *httptest.ResponseRecorder {
		return e.do("OPTIONS", "/v1/channels/c/messages", "",
			"Origin", origin, "Access-Control-Request-Method", "POST", "Access-Control-Request-Headers", "authorization, content-type, idempotency-key")
	}
	w := preflight(e, "https://app.example")
	expectStatus(t, w, 204)
	h := w.Header()
	if h.Get("Access-Control-Allow-Origin") != "https://app.example" || !strings.Contains(h.Get("Access-Control-Allow-Headers"), "Authorization") ||
		!strings.Contains(h.Get("Access-Control-Allow-Headers"), "Content-Type") || !strings.Contains(h.Get("Access-Control-Allow-Headers"), "Idempotency-Key") ||
		!strings.Contains(h.Get("Access-Control-Allow-Methods"), "POST") || !strings.Contains(strings.Join(h.Values("Vary"), ","), "Origin") {
		t.Fatalf("preflight headers: %v", h)
	}
	if h.Get("Access-Control-Allow-Credentials") != "" {
		t.Fatal("credentials allowed")
	}
	w = preflight(e, "https://evil.example")
	expectError(t, w, 403, "origin_not_allowed")
	if w.Header().Get("Access-Control-Allow-Origin") != "" {
		t.Fatal("foreign origin granted")
	}
	// Actual requests.
	w = e.do("POST", "/v1/channels/c/messages", `{"data":1}`, append(bearer(fullKey), "Origin", "https://b.example")...)
	expectStatus(t, w, 202)
	if w.Header().Get("Access-Control-Allow-Origin") != "https://b.example" || !strings.Contains(w.Header().Get("Access-Control-Expose-Headers"), "Retry-After") {
		t.Fatalf("headers: %v", w.Header())
	}
	w = e.do("POST", "/v1/channels/c/messages", `{"data":1}`, append(bearer(fullKey), "Origin", "https://evil.example")...)
	expectError(t, w, 403, "origin_not_allowed")
	if n := e.xlen("c"); n != 1 {
		t.Fatalf("%d messages, want 1", n)
	}
	// Without Origin (not a browser): no CORS headers, served.
	w = e.do("POST", "/v1/channels/c/messages", `{"data":1}`, bearer(fullKey)...)
	expectStatus(t, w, 202)
	if w.Header().Get("Access-Control-Allow-Origin") != "" {
		t.Fatal("CORS header without Origin")
	}

	star, _ := newSecEnv(t, map[string]string{"API_KEYS": fullKey, "ALLOWED_ORIGINS": "*"})
	w = preflight(star, "https://any.example")
	expectStatus(t, w, 204)
	if w.Header().Get("Access-Control-Allow-Origin") != "*" {
		t.Fatalf("star: %v", w.Header())
	}
	// Unset: only the ingress's own host (httptest requests are for example.com).
	own, _ := newSecEnv(t, map[string]string{"API_KEYS": fullKey})
	expectStatus(t, preflight(own, "https://example.com"), 204)
	expectStatus(t, preflight(own, "https://other.com"), 403)
}

// TestNoResponseStored: every ingress answer is live (a history page, the
// registry, readiness, metrics), and a history page or the registry may
// hold what only its caller may read, so no cache, a browser's or a shared
// one (a CDN, a proxy), stores any of them: Cache-Control: no-store. And
// each says it varies with Origin, also when the request has none: that
// answer lacks the CORS headers a browser's request gets, and a cache
// that stored it anyway (or a cache that ignores no-store) must not give
// it to a browser, which would refuse it (the Fetch standard, "CORS
// protocol and HTTP caches"). Origin-less requests are what a server or
// curl sends, and a same-origin page's GET.
func TestNoResponseStored(t *testing.T) {
	t.Parallel()
	for _, allowed := range []string{"https://app.example", "*"} {
		e, _ := newSecEnv(t, map[string]string{"API_KEYS": fullKey, "ALLOWED_ORIGINS": allowed})
		for _, r := range []struct{ method, path, body string }{
			{"GET", "/v1/channels/c/messages", ""},
			{"HEAD", "/v1/channels/c/messages", ""},
			{"POST", "/v1/channels/c/messages", `{"data":1}`},
			{"GET", "/v1/channels/c/connections", ""},
			{"GET", "/healthz", ""},
			{"GET", "/readyz", ""},
			{"GET", "/metrics", ""},
			{"GET", "/v1/nope", ""},     // 404
			{"PUT", "/healthz", ""},     // 405
			{"OPTIONS", "/healthz", ""}, // not a preflight without Origin
		} {
			for _, o := range []string{"", "https://app.example"} {
				hdr := bearer(fullKey)
				if o != "" {
					hdr = append(hdr, "Origin", o)
				}
				w := e.do(r.method, r.path, r.body, hdr...)
				if w.Code >= 500 {
					t.Fatalf("%s %s: %d %s", r.method, r.path, w.Code, w.Body)
				}
				h := w.Header()
				if h.Get("Cache-Control") != "no-store" || !slices.Contains(h.Values("Vary"), "Origin") {
					t.Errorf("ALLOWED_ORIGINS=%s, %s %s, Origin %q: %d, Cache-Control %q, Vary %q; want no-store and Origin",
						allowed, r.method, r.path, o, w.Code, h.Get("Cache-Control"), h.Values("Vary"))
				}
			}
		}
		w := e.do("OPTIONS", "/v1/channels/c/messages", "", "Origin", "https://app.example", "Access-Control-Request-Method", "GET")
		expectStatus(t, w, 204)
		if !slices.Contains(w.Header().Values("Vary"), "Origin") {
			t.Errorf("ALLOWED_ORIGINS=%s, preflight: Vary %q", allowed, w.Header().Values("Vary"))
		}
	}
}

// Open endpoints need no credential.
func TestOpenEndpoints(t *testing.T) {
	t.Parallel()
	e, _ := newSecEnv(t, map[string]string{"API_KEYS": fullKey})
	for _, p := range []string{"/healthz", "/readyz", "/metrics"} {
		if w := e.do("GET", p, ""); w.Code != http.StatusOK {
			t.Errorf("%s: %d %s", p, w.Code, w.Body)
		}
	}
}

// TestIPKeyWithPort: a gateway that writes the client's address with its
// port ("203.0.113.7:51234", "[2001:db8::1]:443", as some do in
// X-Forwarded-For) must not give each client connection a bucket of its
// own: the key is the address (its /64 for IPv6), whatever the port.
func TestIPKeyWithPort(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ in, want string }{
		{"203.0.113.7", "203.0.113.7"},
		{"203.0.113.7:51234", "203.0.113.7"},
		{"[2001:db8:1:2::1]:443", "2001:db8:1:2::/64"},
		{"2001:db8:1:2::1", "2001:db8:1:2::/64"},
		{"[::ffff:10.0.0.2]:1", "10.0.0.2"},
		{"unknown", "unknown"},
		// A bracketed IPv6 address without a port (RFC 7239 style) is
		// keyed by its /64 too, not address by address; so is a full
		// IPv6 address written with its port and without brackets.
		{"[2001:db8:1:2::1]", "2001:db8:1:2::/64"},
		{"[2001:db8:1:2::2]", "2001:db8:1:2::/64"},
		{"2001:db8:1:2:3:4:5:6:51234", "2001:db8:1:2::/64"},
		{"[fe80::1%eth0]", "fe80::/64"},
	} {
		if got := ipKey(tc.in); got != tc.want {
			t.Errorf("ipKey(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

// TestMetricsToken: with METRICS_TOKEN set, /metrics answers only a scrape
// that carries it (the probes stay open); a bad METRICS_TOKEN is refused
// at start.
func TestMetricsToken(t *testing.T) {
	t.Parallel()
	const tok = "scrape-token-0123456789"
	e, _ := newSecEnv(t, map[string]string{"API_KEYS": fullKey, "METRICS_TOKEN": tok})
	for _, hdr := range [][]string{nil, bearer("wrong"), bearer(fullKey)} {
		w := e.do("GET", "/metrics", "", hdr...)
		expectError(t, w, 401, "unauthorized")
		if w.Header().Get("WWW-Authenticate") == "" || strings.Contains(w.Body.String(), "wsrelay_") {
			t.Errorf("%v: headers %v, body %s", hdr, w.Header(), w.Body)
		}
	}
	if w := e.do("GET", "/metrics", "", bearer(tok)...); w.Code != 200 || !strings.Contains(w.Body.String(), "wsrelay_ingress_") {
		t.Errorf("with the token: %d %.200s", w.Code, w.Body)
	}
	for _, p := range []string{"/healthz", "/readyz"} {
		if w := e.do("GET", p, ""); w.Code != http.StatusOK {
			t.Errorf("%s: %d %s", p, w.Code, w.Body)
		}
	}
	_, err := loadConfig(func(k string) string {
		return map[string]string{"API_KEYS": fullKey, "METRICS_TOKEN": "has space"}[k]
	})
	if err == nil || !strings.Contains(err.Error(), "METRICS_TOKEN") {
		t.Errorf("METRICS_TOKEN with a space: %v", err)
	}
}

// signPayload signs payload as it is with testSecret (auth.SignPayloadHS256).
func signPayload(payload string) string { return auth.SignPayloadHS256(testSecret, payload) }

// A rate so low that a bucket's refill time (burst / rate) is past
// time.Duration's range: the idle time after which a bucket is dropped
// (and so refilled) wrapped round to the minimum, 1 s, and a client that
// spent its burst got it back at the next sweep, and the wait for a
// token wrapped round as well.
func TestLimiterSetTinyRate(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		rate  float64
		burst int
	}{{1e-10, 1}, {0.0001, maxBurst}} {
		ls := newLimiterSet(tc.rate, tc.burst)
		now := time.Now()
		if d, _ := ls.reserve("spent", tc.burst, now); d != 0 {
			t.Fatalf("rate %g: fresh key limited", tc.rate)
		}
		later := now.Add(2 * time.Minute)
		ls.reserve("other", 1, later) // sweeps
		if d, _ := ls.reserve("spent", tc.burst, later); d <= 0 {
			t.Errorf("rate %g burst %d: the spent bucket was refilled after 2 minutes (wait %v)", tc.rate, tc.burst, d)
		}
		// The wait (Retry-After) too: it wrapped round to 1ns, so 1 s.
		if d, _ := ls.reserve("spent", 1, later); d < time.Hour {
			t.Errorf("rate %g burst %d: wait %v for a token", tc.rate, tc.burst, d)
		}
	}
}

// TestLimiterSetDefaultBurst: a burst of 0 is twice the rate rounded up
// to whole messages, so a rate below 0.5 still lets one message through
// (the README's and docs/security.md's PUBLISH_BURST_* rows).
func TestLimiterSetDefaultBurst(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		rate float64
		want int
	}{{10, 20}, {2.3, 5}, {0.5, 1}, {0.2, 1}, {1e-9, 1}} {
		if got := newLimiterSet(tc.rate, 0).burst; got != tc.want {
			t.Errorf("rate %g, burst 0: burst %d, want %d", tc.rate, got, tc.want)
		}
	}
}
