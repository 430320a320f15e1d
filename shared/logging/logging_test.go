package logging

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"
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
	RedisLogger{Log: log}.Printf(context.Background(), "redis: connection pool: failed to dial after %d attempts: %s\n", 5, "connection refused")
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
