package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"reflect"
	"runtime/debug"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/wsrelay/wsrelay/shared/logging"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

func TestMain(m *testing.M) { redistest.Main(m) }

// run serves on $PORT until its context ends, then returns nil.
func TestRun(t *testing.T) {
	t.Parallel()
	port, err := redistest.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	env := map[string]string{
		"PORT":             strconv.Itoa(port),
		"REDIS_URL":        redistest.URL(t),
		"REDIS_KEY_PREFIX": redistest.Prefix(t),
		"ALLOW_ANONYMOUS":  "true",
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- run(ctx, nil, func(k string) string { return env[k] }, io.Discard, io.Discard) }()

	url := fmt.Sprintf("http://127.0.0.1:%d/readyz", port)
	testkit.Eventually(t, 5*time.Second, func() error {
		resp, err := http.Get(url)
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return fmt.Errorf("readyz: %d", resp.StatusCode)
		}
		return nil
	})
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("run: %v", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("run did not return after its context ended")
	}
}

func TestRunBadConfig(t *testing.T) {
	t.Parallel()
	env := map[string]string{"PORT": "0", "HISTORY_SIZE": "-1"}
	err := run(t.Context(), nil, func(k string) string { return env[k] }, io.Discard, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "PORT") || !strings.Contains(err.Error(), "HISTORY_SIZE") {
		t.Fatalf("run with bad config: %v", err)
	}
}

// TestRunBadAPIKeysQuoteNoKey: API_KEYS with its items joined by spaces
// (or semicolons, or the newlines of a YAML block) instead of commas is
// refused, and the error run returns (printed to stderr, which the
// platform keeps with the logs) quotes none of the keys after the first,
// which the parser reads as the first item's scope.
func TestRunBadAPIKeysQuoteNoKey(t *testing.T) {
	t.Parallel()
	const second = "second-key-5f0c2a9e71"
	for _, keys := range []string{"first-key=chat:* " + second + "=news.*", "first-key=chat:*;" + second, "first-key=+admin\n" + second} {
		env := map[string]string{"API_KEYS": keys, "REDIS_URL": redistest.URL(t)}
		var logs testkit.SyncBuffer
		err := run(t.Context(), nil, func(k string) string { return env[k] }, &logs, io.Discard)
		if err == nil || !strings.Contains(err.Error(), "API_KEYS") {
			t.Fatalf("API_KEYS=%q: %v, want an API_KEYS error", keys, err)
		}
		if strings.Contains(err.Error()+logs.String(), second) {
			t.Errorf("API_KEYS=%q: a key is in the error: %v %s", keys, err, logs.String())
		}
	}
}

// TestDefaultGC: without GOGC the ingress collects at gcPercent; a GOGC
// the operator set is left as the runtime applied it.
func TestDefaultGC(t *testing.T) {
	before := debug.SetGCPercent(100)
	t.Cleanup(func() { debug.SetGCPercent(before) })

	defaultGC(func(string) string { return "" })
	if got := debug.SetGCPercent(100); got != gcPercent {
		t.Errorf("without GOGC: GC percent %d, want %d", got, gcPercent)
	}
	defaultGC(func(k string) string {
		if k == "GOGC" {
			return "50"
		}
		return ""
	})
	if got := debug.SetGCPercent(100); got != 100 {
		t.Errorf("with GOGC set: GC percent changed to %d", got)
	}
}

// TestServeGraceOver: a request still running when the shutdown grace is
// over has its connection closed; serve waits for its handler to end (so
// that none uses Redis after run closes it), logs it, and returns nil:
// the process stopped as asked, and "stopped" is its last line.
func TestServeGraceOver(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	started := make(chan struct{})
	var ended atomic.Bool
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		close(started)
		<-r.Context().Done() // the connection is closed
		time.Sleep(100 * time.Millisecond)
		ended.Store(true)
	})
	var logs testkit.SyncBuffer
	log := slog.New(slog.NewJSONHandler(&logs, nil))
	ctx, cancel := context.WithCancel(t.Context())
	served := make(chan error, 1)
	go func() { served <- serve(ctx, log, ln, h, 200*time.Millisecond, time.Second) }()
	go func() { _, _ = http.Get("http://" + ln.Addr().String() + "/") }()
	<-started
	cancel()
	if err := <-served; err != nil {
		t.Fatalf("serve: %v, want nil", err)
	}
	if !ended.Load() {
		t.Error("serve returned while a handler was still running")
	}
	if !strings.Contains(logs.String(), "shutdown grace period over") {
		t.Errorf("logs: %s", logs.String())
	}
	logs.CheckLast(t, "stopped", "stopped", "serving failed")
}

// TestNothingLoggedAfterStopped: "stopped" is the ingress's last line. An
// outage that ended just before shutdown (an idempotency record not
// saved, the next one saved) has its end line pending for Quiet after
// the failure; it is logged before "stopped", at once, and not from a
// timer after the server has stopped (in a process that has exited by
// then, never). A server whose listener fails (Serve's own error, not a
// shutdown) ends the same way, its last line "serving failed" in place
// of "stopped", and serve returns the error.
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
			var logs testkit.SyncBuffer
			log := slog.New(slog.NewJSONHandler(&logs, nil))
			e, failing := newEnvRecordsFail(t, log)
			const quiet = 2 * time.Second
			e.srv.unsaved.Quiet = quiet
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			served := make(chan error, 1)
			go func() { served <- serve(ctx, log, ln, e.srv, time.Second, time.Second) }()
			publish := func(key string) {
				t.Helper()
				req, _ := http.NewRequest("POST", "http://"+ln.Addr().String()+"/v1/channels/r/messages", strings.NewReader(`{"data":1}`))
				req.Header.Set("Content-Type", "application/json")
				req.Header.Set("Idempotency-Key", key)
				resp, err := http.DefaultClient.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				resp.Body.Close()
				if resp.StatusCode != 202 {
					t.Fatalf("publish %s: %d", key, resp.StatusCode)
				}
			}
			failing.Store(true)
			publish("lost") // written, its record not saved
			failing.Store(false)
			publish("saved") // the end is pending
			if len(logs.Lines(t, "idempotency record not saved")) != 1 {
				t.Fatalf("no failure logged:\n%s", logs.String())
			}
			tc.end(cancel, ln)
			if err := <-served; (err != nil) != (tc.last != "stopped") {
				t.Fatalf("serve: %v", err)
			}
			time.Sleep(quiet + 500*time.Millisecond) // past the pending end
			logs.CheckLast(t, tc.last, "stopped", "serving failed")
			if len(logs.Lines(t, "idempotency records saved again")) != 1 {
				t.Errorf("want one end line before %s; log:\n%s", tc.last, logs.String())
			}
		})
	}
}

// TestServeLogsHTTPErrors: net/http's own messages (here an accept error,
// as when the process is out of file descriptors) are records of the
// function's structured log, not plain text on stderr, with a constant
// message that an alert can name ("http server").
func TestServeLogsHTTPErrors(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var logs testkit.SyncBuffer
	log := slog.New(slog.NewJSONHandler(&logs, nil))
	ctx, cancel := context.WithCancel(t.Context())
	served := make(chan error, 1)
	go func() {
		served <- serve(ctx, log, testkit.FailFirstAccept(ln), http.NotFoundHandler(), time.Second, time.Second)
	}()
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

// TestRunStartupLine: the startup line says where Redis is and how the
// ingress is set up, with no credential; the shutdown line follows.
func TestRunStartupLine(t *testing.T) {
	t.Parallel()
	port, err := redistest.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	env := map[string]string{
		"PORT":             strconv.Itoa(port),
		"REDIS_URL":        "redis://:hunter2-pass@127.0.0.1:1/3",
		"REDIS_KEY_PREFIX": "pfx",
		"API_KEYS":         "key-0123456789abcdef-secret,other-0123456789abcdef-secret",
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
	for _, want := range []string{`"redis":"127.0.0.1:1"`, `"redis_db":3`, `"redis_password":true`, `"key_prefix":"pfx"`, `"api_keys":2`, `"jwt":"off"`, `"msg":"stopped"`} {
		if !strings.Contains(out, want) {
			t.Errorf("the log lacks %s:\n%s", want, out)
		}
	}
	for _, secret := range []string{"hunter2", "secret"} {
		if strings.Contains(out, secret) {
			t.Errorf("a secret (%s) is in the log:\n%s", secret, out)
		}
	}
}

// TestQuiesceCoversAll: quiesce stops every outage log of the server, one
// added later included, and each once.
func TestQuiesceCoversAll(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	t.Cleanup(e.srv.Close)
	n := 0
	for f := range reflect.TypeFor[Server]().Fields() {
		if f.Type == reflect.TypeFor[*logging.Episode]() {
			n++
		}
	}
	got := e.srv.episodes()
	seen := map[*logging.Episode]bool{}
	for _, ep := range got {
		seen[ep] = true
	}
	if len(got) != n || len(seen) != n || seen[nil] {
		t.Fatalf("episodes() lists %d, want the %d *logging.Episode fields of Server, each once", len(got), n)
	}
}
