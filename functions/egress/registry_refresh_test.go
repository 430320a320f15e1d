package main

import (
	"context"
	"fmt"
	"log/slog"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/protocol"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// lateRefresh holds, while armed, the first pipeline that writes the
// record key `key` (the registry refresh): it lets it reach Redis only
// once the record is gone (the connection's own removal landed first, as
// when the refresh's batch waited for a pool connection while the drain's
// removals took them all), and then answers only after the caller's
// context has ended (a Redis slower than the drain).
type lateRefresh struct {
	rdb   redis.UniversalClient
	key   string
	armed atomic.Bool
	taken atomic.Bool
	hit   chan struct{}
}

func (h *lateRefresh) DialHook(next redis.DialHook) redis.DialHook          { return next }
func (h *lateRefresh) ProcessHook(next redis.ProcessHook) redis.ProcessHook { return next }
func (h *lateRefresh) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		if !h.armed.Load() || cmds[0].Name() != "set" || cmds[0].Args()[1] != h.key || !h.taken.CompareAndSwap(false, true) {
			return next(ctx, cmds)
		}
		close(h.hit)
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
			if n, err := h.rdb.Exists(context.Background(), h.key).Result(); err == nil && n == 0 {
				break
			}
		}
		err := next(context.WithoutCancel(ctx), cmds)
		<-ctx.Done()
		return err
	}
}

// TestRefreshDuringShutdownLeavesNoRecord: a registry refresh under way
// when the instance shuts down writes back the record of a connection
// the drain has just removed; its clean-up (removing the records of the
// connections that ended meanwhile) must still run once the hub's
// context is cancelled, or the record of a connection that is gone stays
// for REGISTRY_TTL (sends to its user accepted and dropped).
func TestRefreshDuringShutdownLeavesNoRecord(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	h := &lateRefresh{rdb: rdb, hit: make(chan struct{})}
	rdb.AddHook(h)
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true", "REGISTRY_TTL": "60s"})
	ws, _, err := e.dial(t, url.Values{"user": {"alice"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	id := next(t, ws, protocol.TypeWelcome).ConnectionID
	h.key = ks.Conn(id)
	h.armed.Store(true)
	e.s.hub.refreshDue.Store(true)
	select {
	case <-h.hit:
	case <-time.After(5 * time.Second):
		t.Fatal("no registry refresh")
	}
	// The client answers the drain's close frame.
	go func() {
		for {
			if _, _, err := ws.ReadMessage(); err != nil {
				return
			}
		}
	}()
	e.stop()
	ttl, err := rdb.PTTL(t.Context(), ks.Conn(id)).Result()
	if err != nil {
		t.Fatal(err)
	}
	if ttl > 0 {
		t.Fatalf("the record of %s, whose connection ended at shutdown, is still there (TTL %v)", id, ttl.Round(time.Second))
	}
}

// TestDueRefreshRetriedAfterFailure: the registry refresh asked for when
// Redis confirms the subscriptions again (refreshDue: Redis may have lost
// the records) fails, as it does while a Redis restarting from its
// snapshot answers -LOADING to writes but already takes subscriptions.
// It must be tried again soon, not only at the next scheduled refresh
// (REGISTRY_TTL/3 later): until then sends to the instance's users find
// nobody.
func TestDueRefreshRetriedAfterFailure(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	connKey := strings.TrimSuffix(ks.Conn(""), "}")
	var failing atomic.Bool
	var failed atomic.Int32
	rdb.AddHook(redistest.Fail{Pipeline: func(cmds []redis.Cmder) bool {
		key, _ := cmds[0].Args()[1].(string)
		if failing.Load() && cmds[0].Name() == "set" && strings.HasPrefix(key, connKey) {
			failed.Add(1)
			return true
		}
		return false
	}})
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true", "REGISTRY_TTL": "30s"})
	ws, _, err := e.dial(t, url.Values{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	id := next(t, ws, protocol.TypeWelcome).ConnectionID
	time.Sleep(1500 * time.Millisecond)                             // clear of the refresh of the start
	if err := rdb.Del(t.Context(), ks.Conn(id)).Err(); err != nil { // lost
		t.Fatal(err)
	}
	failing.Store(true)
	e.s.hub.refreshDue.Store(true) // as onConfirmed does
	for deadline := time.Now().Add(5 * time.Second); failed.Load() == 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("no refresh")
		}
	}
	failing.Store(false)
	for deadline := time.Now().Add(4 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if n, err := rdb.Exists(t.Context(), ks.Conn(id)).Result(); err == nil && n == 1 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the record of %s is still missing 4 s after Redis took writes again (next scheduled refresh: 10 s)", id)
		}
	}
}

// TestRegistryBackSoonAfterFlushAll: Redis loses its data while the
// egress's Pub/Sub connection stays up (FLUSHALL; nothing is confirmed
// again): the probe finds its oldest connection's record missing and the
// registry is rewritten then, not at the next scheduled refresh (10 s).
func TestRegistryBackSoonAfterFlushAll(t *testing.T) {
	t.Parallel()
	le := startLossEnv(t, nil, map[string]string{"REGISTRY_TTL": "30s"})
	a := newGoClient(t, le.wsURL(), "alice", "room", "")
	le.publish("room", 1)
	a.waitData(5*time.Second, "1")
	if err := le.pub.FlushAll(t.Context()).Err(); err != nil {
		t.Fatal(err)
	}
	le.publish("room", 2)
	a.waitData(5*time.Second, "1", "2")
	start := time.Now()
	for {
		n, err := le.sendToUser("alice", 100)
		if err == nil && n == 1 {
			return
		}
		if time.Since(start) > 6*time.Second {
			t.Fatalf("send to alice 6 s after FLUSHALL (the scheduled refresh comes 10 s after the start): %d connections, %v", n, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestRecordsMissingLogsOnce: a Redis that evicts the instance's registry
// records (maxmemory with a policy other than noeviction) takes them
// again after each rewrite. The probe finds each loss and the records
// are rewritten at once, every time, but the log says so once, not at
// every loss, and once more when the losses are over, with how many
// there were.
func TestRecordsMissingLogsOnce(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	// REGISTRY_TTL long: in the test's time only the probe's finding
	// rewrites a record, so that each deletion is found.
	env := map[string]string{"ALLOW_ANONYMOUS": "true", "REGISTRY_TTL": "60s", "PROBE_INTERVAL": "100ms", "REDIS_TIMEOUT": "300ms",
		"REDIS_URL": redistest.URL(t), "REDIS_KEY_PREFIX": prefix}
	cfg, err := loadConfig(func(k string) string { return env[k] })
	if err != nil {
		t.Fatal(err)
	}
	logs := &testkit.SyncBuffer{}
	s := NewServer(cfg, slog.New(slog.NewJSONHandler(logs, nil)), rdb)
	s.regLost.Quiet = 3 * time.Second // far longer than a loss and its rewrite take here
	srv, _ := startEgress(t, s)
	ws, _, err := websocket.DefaultDialer.Dial("ws"+strings.TrimPrefix(srv.URL, "http")+"/ws?user=alice", nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ws.Close() })
	next(t, ws, "welcome")
	key := s.hub.keys.Conn(s.hub.snapshotConns()[0].id)
	const losses = 4
	for i := range losses {
		if err := rdb.Del(t.Context(), key).Err(); err != nil {
			t.Fatal(err)
		}
		testkit.Eventually(t, 10*time.Second, func() error {
			if n, err := rdb.Exists(t.Context(), key).Result(); err != nil || n != 1 {
				return fmt.Errorf("record not rewritten after loss %d: %d, %v", i+1, n, err)
			}
			return nil
		})
	}
	var back []map[string]any
	testkit.Eventually(t, 10*time.Second, func() error {
		if back = logs.Lines(t, "registry records kept in redis again"); len(back) == 0 {
			return fmt.Errorf("the losses' end is not logged")
		}
		return nil
	})
	if l := logs.Lines(t, "registry records missing in redis, rewriting them"); len(l) != 1 || l[0]["level"] != "WARN" {
		t.Fatalf("%d losses logged %d times, want once:\n%s", losses, len(l), logs.String())
	}
	// A probe may find a loss again before its rewrite is done.
	if n, _ := back[0]["failures"].(float64); len(back) != 1 || n < losses {
		t.Fatalf("end lines %v, want one that counts at least %d losses", back, losses)
	}
}
