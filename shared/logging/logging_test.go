package logging

import (
	"bytes"
	"context"
	"encoding/json"
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
