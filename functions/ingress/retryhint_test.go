package main

import (
	"strings"
	"testing"
	"time"

	"github.com/wsrelay/wsrelay/shared/redisconn"
	"github.com/wsrelay/wsrelay/shared/redistest"
)

// TestRetryNamesIdempotencyKeyOnlyWhereTaken: only the publishes (every
// POST route) take an Idempotency-Key; a 503 from any other route (the
// disconnects, DELETE /v1/connections/{id} and DELETE
// /v1/users/{user}/connections, whose repeat is harmless, and the reads)
// says to retry without telling the client to send the same key, while
// a publish's still does: Redis out of memory, PUBLISH_WAIT_REPLICAS not
// met, Redis down.
func TestRetryNamesIdempotencyKeyOnlyWhereTaken(t *testing.T) {
	t.Parallel()
	check := func(t *testing.T, e *testEnv, says string, requests ...string) {
		t.Helper()
		for _, r := range requests {
			method, path, _ := strings.Cut(r, " ")
			w := e.do(method, path, "")
			expectError(t, w, 503, "unavailable")
			if b := w.Body.String(); !strings.Contains(b, says) || strings.Contains(b, "Idempotency-Key") {
				t.Errorf("%s: %s, want a message that says %q and names no Idempotency-Key", r, b, says)
			}
		}
		w := e.do("POST", "/v1/users/u1/messages", `{"data":1}`)
		if b := w.Body.String(); w.Code != 503 || !strings.Contains(b, says) || !strings.Contains(b, "Idempotency-Key") {
			t.Errorf("POST /v1/users/u1/messages: %d %s, want a 503 that says %q and names the Idempotency-Key", w.Code, b, says)
		}
	}
	deletes := []string{"DELETE /v1/connections/c1", "DELETE /v1/users/u1/connections"}
	t.Run("out of memory", func(t *testing.T) {
		t.Parallel()
		rs := redistest.Start(t)
		e := newEnvWith(t, redisconn.Config{URL: rs.URL(), Timeout: time.Second}, nil, nil)
		e.register("c1", "u1", "inst1")
		redistest.OutOfMemory(t, e.rdb, e.keys.Prefix)
		check(t, e, "out of memory", deletes...)
	})
	t.Run("replicas", func(t *testing.T) {
		t.Parallel()
		rs := redistest.Start(t)
		e := newEnvWith(t, redisconn.Config{URL: rs.URL(), Timeout: time.Second}, nil, func(c *Config) {
			c.PublishWaitReplicas = 1
			c.PublishWaitTimeout = 200 * time.Millisecond
		})
		t.Cleanup(e.srv.Close)
		e.register("c1", "u1", "inst1")
		check(t, e, "replicas", deletes...)
	})
	t.Run("redis down", func(t *testing.T) {
		t.Parallel()
		rs := redistest.Start(t)
		e := newEnvOn(t, rs.URL())
		rs.Stop()
		check(t, e, "cannot be reached", append(deletes, "GET /v1/connections/c1", "GET /v1/users/u1/connections",
			"GET /v1/channels/room/connections", "GET /v1/channels/room/messages", "DELETE /v1/channels/room/messages")...)
	})
}
