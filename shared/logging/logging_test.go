package logging

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// TestRedisLogger: a go-redis message becomes one JSON warn line of the
// function's logger.
func TestRedisLogger(t *testing.T) {
	t.Parallel()
	var buf bytes.Buffer
	log, err := New(Config{Format: "json", Level: "info"}, &buf, "egress")
	if err != nil {
		t.Fatal(err)
	}
	(&RedisLogger{Log: log}).Printf(context.Background(), "redis: connection pool: failed to dial after %d attempts: %s\n", 5, "connection refused")
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 1 {
		t.Fatalf("%d lines: %q", len(lines), buf.String())
	}
	var rec map[string]any
	if err := json.Unmarshal([]byte(lines[0]), &rec); err != nil {
		t.Fatalf("not JSON: %s", lines[0])
	}
	if rec["level"] != "WARN" || rec["msg"] != "redis client" || rec["function"] != "egress" ||
		rec["detail"] != "redis: connection pool: failed to dial after 5 attempts: connection refused" {
		t.Errorf("record %v", rec)
	}
}

// TestRedisLoggerRepeats: during an outage go-redis logs a failed dial
// per connection it tries; messages of one form are written once per
// RedisRepeat, the next line saying how many it stood for.
func TestRedisLoggerRepeats(t *testing.T) {
	t.Parallel()
	var buf bytes.Buffer
	log, err := New(Config{Format: "json", Level: "info"}, &buf, "ingress")
	if err != nil {
		t.Fatal(err)
	}
	l := &RedisLogger{Log: log}
	const dial = "redis: connection pool: failed to dial after %d attempts: %v"
	for range 40 {
		l.Printf(context.Background(), dial, 1, "connection refused")
	}
	l.Printf(context.Background(), "redis: re-authentication failed: %v", "WRONGPASS")
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 2 {
		t.Fatalf("41 messages, 2 forms: %d lines, want 2:\n%s", len(lines), buf.String())
	}
	// Once RedisRepeat has passed, the next one is written with the count.
	l.seen[dial].at = time.Now().Add(-RedisRepeat)
	buf.Reset()
	l.Printf(context.Background(), dial, 1, "connection refused")
	var rec map[string]any
	if err := json.Unmarshal(buf.Bytes(), &rec); err != nil {
		t.Fatalf("not JSON: %s", buf.String())
	}
	if rec["repeated"] != float64(39) {
		t.Errorf("record %v, want repeated 39", rec)
	}
}

// TestServerErrorLog: net/http's own lines (here a handler's superfluous
// WriteHeader and a handler's panic) become records with a constant
// message, net/http's text in detail, so that an alert can name them: a
// panic as "panic" at error level, as the ingress's recovery logs one,
// anything else as "http server" at warn.
func TestServerErrorLog(t *testing.T) {
	t.Parallel()
	log, buf := jsonLog(t, "egress")
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/panic" {
			panic("boom")
		}
		w.WriteHeader(204)
		w.WriteHeader(500)
	}))
	srv.Config.ErrorLog = ServerErrorLog(log)
	srv.Start()
	for _, p := range []string{"/twice", "/panic"} {
		if resp, err := http.Get(srv.URL + p); err == nil {
			resp.Body.Close()
		}
	}
	srv.Close() // waits for the handlers, and so for their lines
	want := map[string]string{"http server": "WARN", "panic": "ERROR"}
	got := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(buf.String()), "\n") {
		var rec map[string]any
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			t.Fatalf("not JSON: %s", line)
		}
		msg, _ := rec["msg"].(string)
		detail, _ := rec["detail"].(string)
		if want[msg] == "" || !strings.HasPrefix(detail, "http: ") || rec["function"] != "egress" {
			t.Errorf("line %s: want msg %q or %q with net/http's text in detail", line, "http server", "panic")
		}
		got[msg], _ = rec["level"].(string)
	}
	if !maps.Equal(got, want) {
		t.Errorf("levels by message %v, want %v", got, want)
	}
}

// TestLevels: LOG_LEVEL is one of the four names (any case) and nothing
// else: slog's parser also takes offsets such as "info+4" (which is
// warn), empty, or a number, which the startup line would report as
// given.
func TestLevels(t *testing.T) {
	for v, want := range map[string]slog.Level{"debug": slog.LevelDebug, "info": slog.LevelInfo, "WARN": slog.LevelWarn, "Error": slog.LevelError} {
		log, err := New(Config{Level: v}, io.Discard, "ingress")
		if err != nil {
			t.Errorf("%q: %v", v, err)
			continue
		}
		if !log.Enabled(context.Background(), want) || log.Enabled(context.Background(), want-1) {
			t.Errorf("%q: not at level %v", v, want)
		}
	}
	for _, v := range []string{"", "info+4", "warn-1", "8", "warning", "trace", " info"} {
		if _, err := New(Config{Level: v}, io.Discard, "ingress"); err == nil || !strings.Contains(err.Error(), "LOG_LEVEL") {
			t.Errorf("%q accepted (%v)", v, err)
		}
	}
}

// TestBadLevelAndFormatTogether: a bad LOG_LEVEL and a bad LOG_FORMAT are
// reported in one error, as the README says of every bad value.
func TestBadLevelAndFormatTogether(t *testing.T) {
	_, err := New(Config{Level: "loud", Format: "xml"}, io.Discard, "ingress")
	if err == nil || !strings.Contains(err.Error(), "LOG_LEVEL") || !strings.Contains(err.Error(), "LOG_FORMAT") {
		t.Fatalf("err = %v, want both LOG_LEVEL and LOG_FORMAT named", err)
	}
}
