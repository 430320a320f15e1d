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

// TestWaitNotMetAfterScriptFlush: with PUBLISH_WAIT_REPLICAS and no
// replica to confirm, a publish is answered 503 "not confirmed by enough
// Redis replicas", logged as such, also when Redis's script cache was
// empty (after a restart or a failover): the append then runs twice,
// each time followed by a WAIT that runs to PUBLISH_WAIT_TIMEOUT. With
// the defaults (500 ms each, REDIS_TIMEOUT 1 s) the two WAITs used to
// outlast the pipeline's deadline of one REDIS_TIMEOUT, and the publish,
// written, was answered "Redis cannot be reached" and logged as an
// outage.
func TestWaitNotMetAfterScriptFlush(t *testing.T) {
	t.Parallel()
	srv := redistest.Start(t)
	admin := redis.NewClient(srv.Options())
	t.Cleanup(func() { admin.Close() })
	logs := &testkit.SyncBuffer{}
	e := newEnvWith(t, redisconn.Config{URL: srv.URL(), Timeout: time.Second}, slog.New(slog.NewJSONHandler(logs, nil)), func(c *Config) {
		c.PublishWaitReplicas = 1
		c.PublishWaitTimeout = 500 * time.Millisecond
	})
	t.Cleanup(e.srv.Close)
	for i, flush := range []bool{false, true} {
		if flush {
			if err := admin.ScriptFlush(t.Context()).Err(); err != nil {
				t.Fatal(err)
			}
		}
		w := e.do("POST", "/v1/channels/w/messages", `{"data":1}`)
		expectError(t, w, 503, "unavailable")
		if !strings.Contains(w.Body.String(), "replicas") {
			t.Errorf("publish %d (script cache flushed: %v): %s, want the replicas' 503", i+1, flush, w.Body)
		}
	}
	if n := e.xlen("w"); n != 2 {
		t.Errorf("XLEN = %d, want 2: both publishes are written, only not confirmed", n)
	}
	if l := logs.Lines(t, "redis unavailable"); len(l) != 0 {
		t.Errorf("logged as an outage: %v", l)
	}
	if l := logs.Lines(t, "publish not replicated in time"); len(l) != 1 {
		t.Errorf("want one 'publish not replicated in time' line, got %v", l)
	}
}
