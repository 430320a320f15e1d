package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gin-gonic/gin"
	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redisconn"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// testEnv is an ingress Server on the test Redis under a key prefix of its
// own.
type testEnv struct {
	t    *testing.T
	srv  *Server
	rdb  redis.UniversalClient
	keys keys.Scheme
}

func testConfig(t *testing.T) Config {
	t.Helper()
	// Anonymous: these tests are about the core path (auth_test.go covers
	// credentials).
	cfg, err := loadConfig(func(k string) string { return map[string]string{"ALLOW_ANONYMOUS": "true"}[k] })
	if err != nil {
		t.Fatalf("default config: %v", err)
	}
	return cfg
}

func newEnv(t *testing.T, tweak ...func(*Config)) *testEnv {
	t.Helper()
	rdb, prefix := redistest.Client(t)
	cfg := testConfig(t)
	for _, f := range tweak {
		f(&cfg)
	}
	ks := keys.Scheme{Prefix: prefix}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	return &testEnv{t: t, srv: testServer(t, cfg, log, rdb, ks), rdb: rdb, keys: ks}
}

// newEnvOn is a server on the Redis at url with a 300 ms Redis timeout,
// for the tests of a Redis that is down or does not answer.
func newEnvOn(t *testing.T, url string) *testEnv {
	t.Helper()
	return newEnvWith(t, redisconn.Config{URL: url, Timeout: 300 * time.Millisecond}, nil, nil)
}

// newEnvWith is a server with its own Redis client, made from rc (closed
// when the test ends), logging to log (nil: nowhere), configured by set
// (nil: testConfig as it is). Its keys take rc's prefix, or one of the
// test's own when rc has none.
func newEnvWith(t *testing.T, rc redisconn.Config, log *slog.Logger, set func(*Config)) *testEnv {
	t.Helper()
	rdb, err := redisconn.New(rc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rdb.Close() })
	cfg := testConfig(t)
	cfg.Redis = rc
	if set != nil {
		set(&cfg)
	}
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	ks := keys.Scheme{Prefix: rc.KeyPrefix}
	if ks.Prefix == "" {
		ks.Prefix = redistest.Prefix(t)
	}
	return &testEnv{t: t, srv: testServer(t, cfg, log, rdb, ks), rdb: rdb, keys: ks}
}

// do sends one request; a non-empty body is sent as application/json
// unless a Content-Type header is given.
func (e *testEnv) do(method, path, body string, hdr ...string) *httptest.ResponseRecorder {
	e.t.Helper()
	var r io.Reader
	if body != "" {
		r = strings.NewReader(body)
	}
	req := httptest.NewRequest(method, path, r)
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	w := httptest.NewRecorder()
	e.srv.ServeHTTP(w, req)
	return w
}

// errorOf decodes a JSON error body, failing the test if it is not one.
func errorOf(t *testing.T, w *httptest.ResponseRecorder) (code string, index *int) {
	t.Helper()
	var b struct {
		Error struct {
			Code    string `json:"code"`
			Message string `json:"message"`
			Index   *int   `json:"index"`
		} `json:"error"`
	}
	if err := json.Unmarshal(w.Body.Bytes(), &b); err != nil || b.Error.Code == "" || b.Error.Message == "" {
		t.Fatalf("status %d: body %q is not a JSON error", w.Code, w.Body.String())
	}
	return b.Error.Code, b.Error.Index
}

// expectError checks status and code.
func expectError(t *testing.T, w *httptest.ResponseRecorder, status int, code string) {
	t.Helper()
	if w.Code != status {
		t.Fatalf("status = %d, want %d; body %s", w.Code, status, w.Body.String())
	}
	if got, _ := errorOf(t, w); got != code {
		t.Fatalf("code = %q, want %q; body %s", got, code, w.Body.String())
	}
}

// xlen is the length of channel ch's stream.
func (e *testEnv) xlen(ch string) int64 {
	e.t.Helper()
	n, err := e.rdb.XLen(e.t.Context(), e.keys.Stream(ch)).Result()
	if err != nil {
		e.t.Fatalf("XLEN: %v", err)
	}
	return n
}

func TestHealthz(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	w := e.do("GET", "/healthz", "")
	if w.Code != 200 || !strings.Contains(w.Body.String(), `"ok"`) {
		t.Fatalf("healthz: %d %s", w.Code, w.Body.String())
	}
	// HEAD wherever GET (RFC 9110 §9.3.2): load balancers probe with it.
	for _, p := range []string{"/healthz", "/readyz"} {
		if w := e.do("HEAD", p, ""); w.Code != 200 {
			t.Errorf("HEAD %s: %d", p, w.Code)
		}
	}
}

func TestNotFoundAndMethodNotAllowed(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	for _, tc := range []struct {
		method, path string
		status       int
		code         string
	}{
		{"GET", "/nope", 404, "not_found"},
		{"POST", "/v1/channels", 404, "not_found"},
		{"GET", "/v1/channels/a/messages/extra", 404, "not_found"},
		{"PUT", "/v1/channels/a/messages", 405, "method_not_allowed"},
		{"PUT", "/v1/messages", 405, "method_not_allowed"},
		{"GET", "/v1/messages", 405, "method_not_allowed"},
		{"POST", "/healthz", 405, "method_not_allowed"},
	} {
		t.Run(tc.method+tc.path, func(t *testing.T) {
			expectError(t, e.do(tc.method, tc.path, ""), tc.status, tc.code)
		})
	}
}

// A server whose Redis is down answers publishes with 503 + Retry-After
// within the configured timeout, and /readyz turns 503.
func TestRedisDown(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	e := newEnvOn(t, rs.URL())

	if w := e.do("GET", "/readyz", ""); w.Code != 200 {
		t.Fatalf("readyz with Redis up: %d %s", w.Code, w.Body.String())
	}
	if w := e.do("POST", "/v1/channels/up/messages", `{"data":1}`); w.Code != 202 {
		t.Fatalf("publish with Redis up: %d %s", w.Code, w.Body.String())
	}

	rs.Stop()
	for _, tc := range []struct{ name, method, path, body string }{
		{"publish", "POST", "/v1/channels/down/messages", `{"data":1}`},
		{"batch", "POST", "/v1/messages", `{"messages":[{"channel":"down","data":1}]}`},
		{"history", "GET", "/v1/channels/down/messages", ""},
		{"user", "POST", "/v1/users/u1/messages", `{"data":1}`},
		{"connection", "GET", "/v1/connections/c1", ""},
		{"presence", "GET", "/v1/channels/down/connections", ""},
		{"user's connections", "GET", "/v1/users/u1/connections", ""},
		{"user disconnect", "DELETE", "/v1/users/u1/connections", ""},
		{"idempotent publish", "POST", "/v1/channels/down/messages", `{"data":1}`},
	} {
		start := time.Now()
		var hdr []string
		if tc.name == "idempotent publish" {
			hdr = []string{"Idempotency-Key", "k1"}
		}
		w := e.do(tc.method, tc.path, tc.body, hdr...)
		if d := time.Since(start); d > 2*time.Second {
			t.Errorf("%s: answered after %v", tc.name, d)
		}
		expectError(t, w, 503, "unavailable")
		if w.Header().Get("Retry-After") == "" {
			t.Errorf("%s: no Retry-After", tc.name)
		}
	}
	m := e.do("GET", "/metrics", "").Body.String()
	if !strings.Contains(m, `wsrelay_ingress_publishes_total{result="unavailable"} 4`) || strings.Contains(m, "wsrelay_ingress_redis_errors_total 0") {
		t.Errorf("metrics do not show the outage:\n%s", m)
	}
	testkit.Eventually(t, 3*time.Second, func() error {
		if w := e.do("GET", "/readyz", ""); w.Code != 503 {
			return fmt.Errorf("readyz = %d, want 503", w.Code)
		}
		return nil
	})

}

func TestMetrics(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.do("POST", "/v1/channels/secret-room/messages", `{"data":1}`)
	e.do("POST", "/v1/channels/secret-room/messages", `{"nodata":1}`)
	e.do("GET", "/v1/channels/secret-room/messages", "")
	e.do("GET", "/nope", "")
	w := e.do("GET", "/metrics", "")
	if w.Code != 200 {
		t.Fatalf("metrics: %d", w.Code)
	}
	body := w.Body.String()
	for _, want := range []string{
		`wsrelay_ingress_publishes_total{result="accepted"} 1`,
		`wsrelay_ingress_publishes_total{result="missing_data"} 1`,
		`wsrelay_ingress_messages_appended_total 1`,
		`wsrelay_ingress_append_latency_seconds_count 1`,
		`wsrelay_ingress_http_requests_total{method="POST",route="/v1/channels/:channel/messages",status="2xx"} 1`,
		`wsrelay_ingress_http_requests_total{method="POST",route="/v1/channels/:channel/messages",status="4xx"} 1`,
		`wsrelay_ingress_http_requests_total{method="GET",route="/v1/channels/:channel/messages",status="2xx"} 1`,
		`wsrelay_ingress_http_requests_total{method="GET",route="unmatched",status="4xx"} 1`,
		`wsrelay_ingress_redis_errors_total 0`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("metrics lack %s", want)
			t.Log(body)
		}
	}
	if strings.Contains(body, "secret-room") {
		t.Error("a channel name appears in the metrics")
	}
}

// TestPanic: a handler that panics gets a JSON 500, one slog line (no
// report of gin's own), and is counted in the request metrics.
func TestPanic(t *testing.T) {
	t.Parallel()
	e, logs := newSecEnv(t, map[string]string{"ALLOW_ANONYMOUS": "true"})
	e.srv.h.(*gin.Engine).GET("/panic", func(*gin.Context) { panic("boom") })
	expectError(t, e.do("GET", "/panic", ""), 500, "internal")
	body := e.do("GET", "/metrics", "").Body.String()
	if want := `wsrelay_ingress_http_requests_total{method="GET",route="/panic",status="5xx"} 1`; !strings.Contains(body, want) {
		t.Errorf("metrics lack %s", want)
	}
	if !strings.Contains(logs.String(), `"msg":"panic"`) || !strings.Contains(logs.String(), `"panic":"boom"`) {
		t.Errorf("logs: %s", logs.String())
	}
}

// A Redis that accepts connections and never answers (a hung server or a
// black-holed route) gets the same 503 once REDIS_TIMEOUT passes.
func TestRedisHung(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	e := newEnvOn(t, "redis://"+ln.Addr().String()+"/0")
	start := time.Now()
	w := e.do("POST", "/v1/channels/hung/messages", `{"data":1}`)
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("answered after %v", d)
	}
	expectError(t, w, 503, "unavailable")
}

// holdUntilCanceled is a go-redis hook that holds the commands named name
// until their context ends (at most 5 s).
type holdUntilCanceled string

func (h holdUntilCanceled) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h holdUntilCanceled) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

func (h holdUntilCanceled) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if cmd.Name() == string(h) {
			select {
			case <-ctx.Done():
			case <-time.After(5 * time.Second):
			}
		}
		return next(ctx, cmd)
	}
}

// TestCanceledRequestNotAnswered: a client that sends its request and
// shuts down its sending side (net/http then cancels the request's
// context) before the request gets to Redis is not told it succeeded: the
// request writes nothing and is not answered at all (it was answered 200
// with an empty body).
func TestCanceledRequestNotAnswered(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.rdb.AddHook(holdUntilCanceled("set")) // the Idempotency-Key's claim
	ts := httptest.NewServer(e.srv)
	defer ts.Close()
	c, err := net.Dial("tcp", strings.TrimPrefix(ts.URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	const body = `{"data":1}`
	fmt.Fprintf(c, "POST /v1/channels/hc/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nIdempotency-Key: k\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if resp, err := http.ReadResponse(bufio.NewReader(c), nil); err == nil {
		t.Fatalf("answered %d; want no answer", resp.StatusCode)
	} else if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatal("the connection was left open")
	}
	if n := e.xlen("hc"); n != 0 {
		t.Fatalf("XLEN = %d, want 0", n)
	}
}

// testServer is NewServer, closed (its background work stopped) when the
// test ends, before the Redis client that the test closes: the package's
// tests end with no goroutine left running (redistest.Main).
func testServer(t testing.TB, cfg Config, log *slog.Logger, rdb redis.UniversalClient, ks keys.Scheme) *Server {
	srv := NewServer(cfg, log, rdb, ks)
	t.Cleanup(srv.Close)
	return srv
}
