package main

import (
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/redisconn"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// TestRedisMaxClients: a Redis at its maxclients refuses the ingress's new
// connections. A publish is answered 503 unavailable at once, and the log
// line of the outage names the cause: it said "write: broken pipe" of a
// Redis that was up (docs/metrics.md, "redis unavailable"). Once a
// connection is free, publishing goes on.
func TestRedisMaxClients(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	logs := &testkit.SyncBuffer{}
	e := newEnvWith(t, redisconn.Config{URL: rs.URL(), Timeout: time.Second}, slog.New(slog.NewJSONHandler(logs, nil)), nil)
	ctx := t.Context()
	admin := redis.NewClient(&redis.Options{Addr: rs.Addr(), DisableIdentity: true, PoolSize: 1})
	defer admin.Close()
	if err := admin.ConfigSet(ctx, "maxclients", "1").Err(); err != nil {
		t.Fatal(err)
	}
	if err := admin.Do(ctx, "CLIENT", "KILL", "SKIPME", "yes").Err(); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	w := e.do("POST", "/v1/channels/a/messages", `{"data":0}`)
	if d := time.Since(start); d > time.Second {
		t.Errorf("answered after %v", d)
	}
	expectError(t, w, 503, "unavailable")
	if w.Header().Get("Retry-After") == "" {
		t.Error("no Retry-After")
	}
	if l := logs.String(); !strings.Contains(l, `"msg":"redis unavailable"`) || !strings.Contains(l, "max number of clients") {
		t.Fatalf("the log does not say Redis is at its maxclients:\n%s", l)
	}
	if err := admin.ConfigSet(ctx, "maxclients", "10000").Err(); err != nil {
		t.Fatal(err)
	}
	if w := e.do("POST", "/v1/channels/a/messages", `{"data":1}`); w.Code != 202 {
		t.Fatalf("publish once connections are free: %d %s", w.Code, w.Body.String())
	}
}
