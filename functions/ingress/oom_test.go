package main

import (
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/gin-gonic/gin"

	"github.com/wsrelay/wsrelay/shared/redisconn"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// TestRedisOutOfMemory: a Redis at its maxmemory with noeviction refuses
// every write. Each request that writes is answered 503 unavailable with a
// message that says Redis is out of memory and a Retry-After of 5 s, and
// nothing is half-written (no entry, last-id key, once-key or
// Idempotency-Key claim appears). The log says "redis out of memory" once,
// at error level, not "redis unavailable". Reads go on. Once memory is
// freed, a publish succeeds, the keyed publish refused meanwhile is
// written once, and the end is logged once.
func TestRedisOutOfMemory(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	logs := &testkit.SyncBuffer{}
	e := newEnvWith(t, redisconn.Config{URL: rs.URL(), Timeout: time.Second}, slog.New(slog.NewJSONHandler(logs, nil)), nil)
	e.srv.redisOOM.Quiet = 100 * time.Millisecond
	ctx := t.Context()

	e.register("c1", "u1", "inst1", "a")
	e.register("c2", "u1", "inst2")
	for _, ch := range []string{"a", "b"} {
		if w := e.do("POST", "/v1/channels/"+ch+"/messages", `{"data":0}`); w.Code != 202 {
			t.Fatalf("publish before: %d %s", w.Code, w.Body.String())
		}
	}
	snapshot := func() string {
		t.Helper()
		ks, err := e.rdb.Keys(ctx, e.keys.Prefix+":*").Result()
		if err != nil {
			t.Fatal(err)
		}
		slices.Sort(ks)
		var b strings.Builder
		for _, k := range ks {
			if strings.Contains(k, ":filler:") {
				continue
			}
			fmt.Fprintf(&b, "%s", k)
			if typ := e.rdb.Type(ctx, k).Val(); typ == "stream" {
				fmt.Fprintf(&b, " %d entries", e.rdb.XLen(ctx, k).Val())
			} else if typ == "string" {
				fmt.Fprintf(&b, " %q", e.rdb.Get(ctx, k).Val())
			}
			b.WriteByte('\n')
		}
		return b.String()
	}

	first := e.do("POST", "/v1/channels/a/messages", `{"data":"k0"}`, "Idempotency-Key", "k0")
	if first.Code != 202 {
		t.Fatalf("keyed publish before: %d %s", first.Code, first.Body.String())
	}
	free := redistest.OutOfMemory(t, e.rdb, e.keys.Prefix)
	before := snapshot()
	// A retry of a request answered before is answered from its record:
	// Redis refuses the claim's SET NX at its maxmemory whether or not
	// the key is there, and a 503 "nothing was written" would tell a
	// publisher whose attempts ran out that an accepted message was not.
	if w := e.do("POST", "/v1/channels/a/messages", `{"data":"k0"}`, "Idempotency-Key", "k0"); w.Code != 202 ||
		w.Header().Get("Idempotent-Replayed") != "true" || w.Body.String() != first.Body.String() {
		t.Errorf("retry of an accepted publish out of memory: %d %v %s, want the replay of %s", w.Code, w.Header(), w.Body.String(), first.Body.String())
	}
	expectError(t, e.do("POST", "/v1/channels/a/messages", `{"data":"other"}`, "Idempotency-Key", "k0"), 422, "idempotency_key_reused")
	writes := []struct{ method, path, body, key string }{
		{"POST", "/v1/channels/a/messages", `{"data":1}`, ""},
		{"POST", "/v1/channels/a/messages", `{"data":1}`, "k1"},
		{"POST", "/v1/messages", `{"messages":[{"channel":"a","data":1},{"channel":"b","data":1},{"channel":"c","data":1}]}`, ""},
		{"POST", "/v1/messages", `{"messages":[{"channel":"a","data":1},{"channel":"c","data":1}]}`, "k2"},
		{"POST", "/v1/connections/c1/messages", `{"data":1}`, ""},
		{"POST", "/v1/users/u1/messages", `{"data":1}`, ""},
		{"DELETE", "/v1/connections/c1", "", ""},
		{"DELETE", "/v1/users/u1/connections", "", ""},
	}
	for range 3 {
		for _, w := range writes {
			var hdr []string
			if w.key != "" {
				hdr = []string{"Idempotency-Key", w.key}
			}
			r := e.do(w.method, w.path, w.body, hdr...)
			expectError(t, r, 503, "unavailable")
			if !strings.Contains(r.Body.String(), "out of memory") {
				t.Errorf("%s %s out of memory: body %s does not say so", w.method, w.path, r.Body.String())
			}
			if got := r.Header().Get("Retry-After"); got != "5" {
				t.Errorf("%s %s out of memory: Retry-After %q, want 5", w.method, w.path, got)
			}
		}
	}
	if w := e.do("GET", "/v1/channels/a/messages", ""); w.Code != 200 {
		t.Errorf("history read out of memory: %d %s", w.Code, w.Body.String())
	}
	if after := snapshot(); after != before {
		t.Errorf("requests refused out of memory changed Redis:\nbefore:\n%s\nafter:\n%s", before, after)
	}

	var lines []map[string]any
	for _, l := range logs.JSONLines(t) {
		if l["level"] == "WARN" || l["level"] == "ERROR" {
			lines = append(lines, l)
		}
	}
	if len(lines) != 1 || lines[0]["msg"] != "redis out of memory" || lines[0]["level"] != "ERROR" {
		t.Fatalf("%d requests refused out of memory logged %d warnings or errors, want one error \"redis out of memory\":\n%s", 3*len(writes), len(lines), logs.String())
	}

	free()
	if w := e.do("POST", "/v1/channels/a/messages", `{"data":2}`); w.Code != 202 {
		t.Fatalf("publish once memory is freed: %d %s", w.Code, w.Body.String())
	}
	n := e.xlen("a")
	for i := range 2 {
		w := e.do("POST", "/v1/channels/a/messages", `{"data":1}`, "Idempotency-Key", "k1")
		if w.Code != 202 || (w.Header().Get("Idempotent-Replayed") == "true") != (i == 1) {
			t.Fatalf("keyed publish %d once memory is freed: %d %v %s", i, w.Code, w.Header(), w.Body.String())
		}
	}
	if got := e.xlen("a"); got != n+1 {
		t.Errorf("keyed publish refused out of memory, then retried twice: %d entries added, want 1", got-n)
	}
	testkit.Eventually(t, 5*time.Second, func() error {
		if back := len(logs.Lines(t, "redis accepts writes again")); back != 1 {
			return fmt.Errorf("recovery logged %d times, want once:\n%s", back, logs.String())
		}
		return nil
	})
}

// TestMultiAppendRoutes: every route multiAppend names is one the ingress
// serves, so that a renamed route cannot silently lose its out-of-memory
// message for partial writes.
func TestMultiAppendRoutes(t *testing.T) {
	e := newEnv(t)
	served := map[string]bool{}
	for _, r := range e.srv.h.(*gin.Engine).Routes() {
		served[r.Path] = true
	}
	for path := range multiAppend {
		if !served[path] {
			t.Errorf("multiAppend names %s, which no route serves", path)
		}
	}
}
