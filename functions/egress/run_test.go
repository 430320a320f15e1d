package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/logging"
	"github.com/wsrelay/wsrelay/shared/protocol"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// serveSetup gives serve's tests an anonymous egress's configuration, its
// Redis client and a loopback listener.
func serveSetup(t *testing.T) (Config, redis.UniversalClient, net.Listener) {
	t.Helper()
	rdb, prefix := redistest.Client(t)
	env := map[string]string{"REDIS_URL": redistest.URL(t), "REDIS_KEY_PREFIX": prefix, "ALLOW_ANONYMOUS": "true"}
	cfg, err := loadConfig(func(k string) string { return env[k] })
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return cfg, rdb, ln
}

// TestServeLogsHTTPErrors: net/http's own messages (here an accept error,
// as when the instance is out of file descriptors, one per socket) are
// records of the function's structured log, not plain text on stderr,
// with a constant message that an alert can name ("http server").
func TestServeLogsHTTPErrors(t *testing.T) {
	t.Parallel()
	cfg, rdb, ln := serveSetup(t)
	var logs testkit.SyncBuffer
	log := slog.New(slog.NewJSONHandler(&logs, nil))
	ctx, cancel := context.WithCancel(t.Context())
	served := make(chan error, 1)
	go func() { served <- serve(ctx, log, testkit.FailFirstAccept(ln), NewServer(cfg, log, rdb)) }()
	testkit.Eventually(t, 5*time.Second, func() error {
		if !strings.Contains(logs.String(), `"msg":"http server","detail":"http: Accept error: accept4: too many open files`) {
			return fmt.Errorf("no accept error in the log: %s", logs.String())
		}
		return nil
	})
	cancel()
	if err := <-served; err != nil {
		t.Fatalf("serve: %v", err)
	}
}

// serveTuned serves an egress with the HTTP server the function runs,
// changed by tune, and returns its address and a socket upgraded on it,
// past its welcome.
func serveTuned(t *testing.T, tune func(*http.Server)) (addr string, ws *websocket.Conn) {
	t.Helper()
	cfg, rdb, ln := serveSetup(t)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	s := NewServer(cfg, log, rdb)
	hs := httpServer(s, log)
	tune(hs)
	ctx, cancel := context.WithCancel(t.Context())
	served := make(chan error, 1)
	go func() { served <- serveWith(ctx, log, ln, s, hs) }()
	t.Cleanup(func() { cancel(); <-served })
	ws, _, err := websocket.DefaultDialer.Dial("ws://"+ln.Addr().String()+"/ws", nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ws.Close() })
	next(t, ws, protocol.TypeWelcome)
	return ln.Addr().String(), ws
}

// TestSlowRequestBody: a request that declares a body it never sends (no
// credential needed) does not hold its connection for ever: net/http
// waits for the body before it answers, and only the server's
// ReadTimeout ends that wait. The timeout must not reach upgraded
// sockets, which stay open and answer well past it.
func TestSlowRequestBody(t *testing.T) {
	t.Parallel()
	const limit = time.Second
	addr, ws := serveTuned(t, func(hs *http.Server) {
		if hs.ReadTimeout <= 0 || hs.ReadTimeout > time.Minute {
			t.Fatalf("ReadTimeout %v: a request body can hold its connection for ever", hs.ReadTimeout)
		}
		hs.ReadTimeout = limit
	})
	for _, req := range []string{
		"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
		"GET /ws HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n",
	} {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := c.Write([]byte(req)); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		_ = c.SetReadDeadline(start.Add(limit + 5*time.Second))
		_, err = io.Copy(io.Discard, c)
		if err != nil {
			t.Errorf("%q: connection still open after %v: %v", req, time.Since(start), err)
		}
	}

	// The socket upgraded before all that is past the timeout and works.
	send(t, ws, map[string]any{"type": "ping", "ref": 1})
	next(t, ws, protocol.TypePong)
}

// TestUnreadResponses: a client that pipelines requests and never reads
// the answers (no credential needed: client.js is public) does not hold
// its connection for ever: the server's WriteTimeout cuts a response
// that cannot be written. The timeout must not reach upgraded sockets,
// which stay open and answer well past it.
func TestUnreadResponses(t *testing.T) {
	t.Parallel()
	const limit = time.Second
	addr, ws := serveTuned(t, func(hs *http.Server) {
		if hs.WriteTimeout <= 0 || hs.WriteTimeout > time.Minute {
			t.Fatalf("WriteTimeout %v: a client that does not read can hold its connection for ever", hs.WriteTimeout)
		}
		hs.WriteTimeout = limit
	})
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.(*net.TCPConn).SetReadBuffer(4 << 10)
	// Far more than the socket buffers on both sides hold.
	if _, err := c.Write([]byte(strings.Repeat("GET /client.js HTTP/1.1\r\nHost: x\r\n\r\n", 400))); err != nil {
		t.Fatal(err)
	}
	time.Sleep(limit + time.Second)
	// Read what was sent; the connection must end (EOF, or a reset as the
	// server closed it with requests unread), not time out.
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = io.Copy(io.Discard, c)
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatalf("connection still open %v after its responses stopped being read", limit+6*time.Second)
	}

	// The socket upgraded before all that is past the timeout and works.
	send(t, ws, map[string]any{"type": "ping", "ref": 1})
	next(t, ws, protocol.TypePong)
}

// TestRunStartupLine: the startup line says where Redis is and how the
// egress is set up, with no credential.
func TestRunStartupLine(t *testing.T) {
	t.Parallel()
	port, err := redistest.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	env := map[string]string{
		"PORT":                   fmt.Sprint(port),
		"REDIS_CLUSTER_ADDRS":    "127.0.0.1:1, 127.0.0.1:2",
		"REDIS_CLUSTER_PASSWORD": "hunter2-pass",
		"REDIS_KEY_PREFIX":       "pfx",
		"JWT_SECRET":             "jwt-secret-0123456789abcdef0123456789",
		"SHUTDOWN_GRACE":         "1s",
	}
	var logs testkit.SyncBuffer
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- run(ctx, nil, func(k string) string { return env[k] }, &logs, io.Discard) }()
	testkit.Eventually(t, 5*time.Second, func() error {
		if !strings.Contains(logs.String(), `"msg":"listening"`) {
			return fmt.Errorf("no startup line: %s", logs.String())
		}
		return nil
	})
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("run: %v", err)
	}
	out := logs.String()
	for _, want := range []string{`"redis_cluster":"127.0.0.1:1,127.0.0.1:2"`, `"redis_password":true`, `"key_prefix":"pfx"`, `"jwt":"secret"`, `"instance":`, `"msg":"stopped"`} {
		if !strings.Contains(out, want) {
			t.Errorf("the log lacks %s:\n%s", want, out)
		}
	}
	for _, secret := range []string{"hunter2", "jwt-secret"} {
		if strings.Contains(out, secret) {
			t.Errorf("a secret (%s) is in the log:\n%s", secret, out)
		}
	}
}

// TestNothingLoggedAfterStopped: "stopped" is the egress's last line. An
// outage that ended just before shutdown (a registry write failed, the
// next one succeeded) has its end line ("registry writes back") pending
// for Quiet after the failure; it is logged before "stopped", at once,
// and not from a timer after the server has stopped (in a process that
// has exited by then, never). A server whose listener fails (Serve's own
// error, not a shutdown) ends the same way, its sockets drained and its
// last line "serving failed" in place of "stopped", and serve returns the
// error.
func TestNothingLoggedAfterStopped(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		end  func(cancel context.CancelFunc, ln net.Listener)
		last string
	}{
		{"SIGTERM", func(cancel context.CancelFunc, _ net.Listener) { cancel() }, "stopped"},
		// Accept then fails with an error that is not temporary.
		{"listener fails", func(_ context.CancelFunc, ln net.Listener) { ln.Close() }, "serving failed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			cfg, rdb, ln := serveSetup(t)
			var failing atomic.Bool
			// The registry's writes (a record is a SET), not the subscription.
			rdb.AddHook(redistest.Fail{Pipeline: func(cmds []redis.Cmder) bool { return failing.Load() && cmds[0].Name() == "set" }})
			var logs testkit.SyncBuffer
			log := slog.New(slog.NewJSONHandler(&logs, nil))
			s := NewServer(cfg, log, rdb)
			const quiet = 2 * time.Second
			s.regFail.Quiet = quiet
			ctx, cancel := context.WithCancel(t.Context())
			served := make(chan error, 1)
			go func() { served <- serve(ctx, log, ln, s) }()
			stop := sync.OnceValue(func() error { tc.end(cancel, ln); return <-served })
			t.Cleanup(func() { cancel(); _ = stop() })
			u := "ws://" + ln.Addr().String() + "/ws"

			failing.Store(true) // the socket's registry record cannot be written: 1013
			ws, _, err := websocket.DefaultDialer.Dial(u, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer ws.Close()
			if code := closeCode(t, ws, 5*time.Second); code != websocket.CloseTryAgainLater {
				t.Fatalf("close %d, want 1013", code)
			}
			testkit.Eventually(t, 5*time.Second, func() error {
				if len(logs.Lines(t, "registry write failed")) == 0 {
					return fmt.Errorf("no registry failure logged: %s", logs.String())
				}
				return nil
			})
			failing.Store(false)
			ws2, _, err := websocket.DefaultDialer.Dial(u, nil) // its record is written: the end is pending
			if err != nil {
				t.Fatal(err)
			}
			defer ws2.Close()
			next(t, ws2, protocol.TypeWelcome)
			closed := make(chan int, 1)
			go func() { // answers the drain's close
				for {
					if _, _, err := ws2.ReadMessage(); err != nil {
						code := 0 // no close frame
						if ce, ok := errors.AsType[*websocket.CloseError](err); ok {
							code = ce.Code
						}
						closed <- code
						return
					}
				}
			}()
			if err := stop(); (err != nil) != (tc.last != "stopped") {
				t.Fatalf("serve: %v", err)
			}
			if code := <-closed; code != websocket.CloseGoingAway {
				t.Errorf("socket closed %d, want 1001 (drained)", code)
			}
			time.Sleep(quiet + 500*time.Millisecond) // past the pending end
			logs.CheckLast(t, tc.last, "stopped", "serving failed")
			if len(logs.Lines(t, "registry writes back")) != 1 {
				t.Errorf("want one end line before %s; log:\n%s", tc.last, logs.String())
			}
		})
	}
}

// TestStopEpisodesCoversAll: stopEpisodes stops every outage log of the
// server and its hub, one added later included, and each once.
func TestStopEpisodesCoversAll(t *testing.T) {
	t.Parallel()
	cfg, rdb, _ := serveSetup(t)
	s := NewServer(cfg, slog.New(slog.DiscardHandler), rdb)
	fields := episodeFields(reflect.TypeFor[Server]()) + episodeFields(reflect.TypeFor[hub]())
	got := s.episodes()
	seen := map[*logging.Episode]bool{}
	for _, ep := range got {
		seen[ep] = true
	}
	if len(got) != fields || len(seen) != fields || seen[nil] {
		t.Fatalf("episodes() lists %d, want the %d *logging.Episode fields of Server and hub, each once", len(got), fields)
	}
}

// episodeFields counts the fields of struct type st that are episodes,
// and those of the structs it holds by value (hub.pacing's).
func episodeFields(st reflect.Type) int {
	n := 0
	for f := range st.Fields() {
		switch {
		case f.Type == reflect.TypeFor[*logging.Episode]():
			n++
		case f.Type.Kind() == reflect.Struct && f.Type.PkgPath() == st.PkgPath():
			n += episodeFields(f.Type)
		}
	}
	return n
}

// TestShutdownOutOfTime: a request still running when shutdown's time is
// over (here one whose headers never end, which net/http waits for until
// ReadHeaderTimeout, and which holds its shutdown for 5 s, long after
// SHUTDOWN_GRACE) has its connection closed, the cut is logged, and
// "stopped" is still the last line, once: the process stopped as asked,
// and serve returns nil, as the ingress's does. (A request that declared
// a body it never sends held it only if the handler's answer came before
// the shutdown: net/http closes the connection instead of waiting for the
// body once it is shutting down, so that version of this test failed when
// the handler ran late.)
func TestShutdownOutOfTime(t *testing.T) {
	t.Parallel()
	cfg, rdb, ln := serveSetup(t)
	cfg.ShutdownGrace = 100 * time.Millisecond
	var logs testkit.SyncBuffer
	log := slog.New(slog.NewJSONHandler(&logs, nil))
	s := NewServer(cfg, log, rdb)
	hs := httpServer(s, log)
	accepted := make(chan struct{}, 1)
	hs.ConnState = func(_ net.Conn, st http.ConnState) {
		if st == http.StateNew {
			select {
			case accepted <- struct{}{}:
			default:
			}
		}
	}
	ctx, cancel := context.WithCancel(t.Context())
	served := make(chan error, 1)
	go func() { served <- serveWith(ctx, log, ln, s, hs) }()
	stop := sync.OnceValue(func() error { cancel(); return <-served })
	t.Cleanup(func() { _ = stop() })

	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("GET /healthz HTTP/1.1\r\nHost: x\r\n")); err != nil {
		t.Fatal(err)
	}
	<-accepted
	if err := stop(); err != nil {
		t.Errorf("serve: %v, want nil", err)
	}
	// Closed by the server, not left open until ReadTimeout.
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.Copy(io.Discard, c); err != nil {
		t.Errorf("the request's connection is still open after serve returned: %v", err)
	}
	if len(logs.Lines(t, "shutdown grace period over: closing the connections of requests still running")) != 1 {
		t.Errorf("the cut is not logged once:\n%s", logs.String())
	}
	logs.CheckLast(t, "stopped", "stopped", "serving failed")
}
