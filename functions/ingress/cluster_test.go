package main

import (
	"fmt"
	"log/slog"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/wsrelay/wsrelay/shared/redisconn"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// TestClusterPublishAfterFailover: an ingress alone on a cluster (no
// egress in the process to reload the slot map) whose channel's master
// dies publishes to that channel again soon after the replica has been
// promoted (docs/scaling.md: publishers see errors "only until the
// promotion"), not after go-redis's periodic slot-map reload (60 s).
// With PUBLISH_WAIT_REPLICAS the appends run on node clients, outside
// the cluster client's routing: the same holds.
func TestClusterPublishAfterFailover(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a Redis Cluster")
	}
	t.Run("plain", func(t *testing.T) { publishAfterFailover(t, 1, 0) })
	t.Run("wait-replicas", func(t *testing.T) { publishAfterFailover(t, 2, 1) })
}

func publishAfterFailover(t *testing.T, replicas, wait int) {
	c := redistest.StartCluster(t, 3, replicas)
	if !c.Owned() {
		t.Skip("REDIS_CLUSTER_ADDRS is set: the test cannot stop its nodes")
	}
	rc := redisconn.Config{ClusterAddrs: c.AddrsEnv(), Timeout: 300 * time.Millisecond, KeyPrefix: redistest.Prefix(t)}
	e := newEnvWith(t, rc, nil, func(cfg *Config) {
		cfg.PublishWaitReplicas = wait
		cfg.PublishWaitTimeout = 200 * time.Millisecond
	})
	ks := e.keys

	publishWithin := func(within time.Duration) time.Duration {
		start := time.Now()
		for time.Since(start) < within {
			if w := e.do("POST", "/v1/channels/fo/messages", `{"data":1}`); w.Code == 202 {
				return time.Since(start)
			}
			time.Sleep(100 * time.Millisecond)
		}
		t.Fatalf("no publish accepted within %s", within)
		return 0
	}
	publishWithin(20 * time.Second)
	victim, err := c.Client(t).MasterForKey(t.Context(), ks.Stream("fo"))
	if err != nil {
		t.Fatal(err)
	}
	addr := victim.Options().Addr
	c.StopNode(t, c.Index(addr))
	c.WaitFailover(t, addr, 30*time.Second)
	promoted := time.Now()
	took := publishWithin(90 * time.Second)
	t.Logf("first publish accepted %s after the promotion", took.Round(time.Millisecond))
	if took > 5*time.Second {
		t.Fatalf("publishes to the failed-over master's channel refused for %s after the promotion", time.Since(promoted).Round(time.Second))
	}
}

// TestClusterGlobalRateLimit: with PUBLISH_RATE_SCOPE=global on a Redis
// Cluster, each bucket is one key in one slot (no CROSSSLOT), buckets
// spread over the masters, and two ingress instances share each one.
func TestClusterGlobalRateLimit(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a Redis Cluster")
	}
	c := redistest.StartCluster(t, 3, 0)
	rc := redisconn.Config{ClusterAddrs: c.AddrsEnv(), Timeout: time.Second, KeyPrefix: redistest.Prefix(t)}
	limit := func(cfg *Config) {
		cfg.PublishRateScope = scopeGlobal
		cfg.PublishRatePerIP = 0.01
		cfg.PublishBurstPerIP = 2
	}
	a, b := newEnvWith(t, rc, nil, limit), newEnvWith(t, rc, nil, limit)
	masters := map[string]bool{}
	for i := range 8 {
		ip := fmt.Sprintf("192.0.2.%d", i+1)
		passed := 0
		for j := range 4 {
			e := []*testEnv{a, b}[j%2]
			req := httptest.NewRequest("POST", "/v1/channels/c/messages", strings.NewReader(`{"data":1}`))
			req.Header.Set("Content-Type", "application/json")
			req.RemoteAddr = ip + ":1000"
			w := httptest.NewRecorder()
			e.srv.ServeHTTP(w, req)
			switch w.Code {
			case 202:
				passed++
			case 429:
			default:
				t.Fatalf("%s, publish %d: %d %s", ip, j, w.Code, w.Body)
			}
		}
		if passed != 2 {
			t.Errorf("%s: %d of 4 publishes over two instances passed, want the burst, 2", ip, passed)
		}
		m, err := c.Client(t).MasterForKey(t.Context(), a.keys.PublishRate("ip:"+ip))
		if err != nil {
			t.Fatal(err)
		}
		masters[m.Options().Addr] = true
	}
	if len(masters) < 2 {
		t.Errorf("8 buckets on %d master(s): the keys do not spread", len(masters))
	}
}

// TestClusterPublishWhileSlotMoves: while a resharding moves a channel's
// slot, its publishes are refused with 503 and Retry-After, nothing of
// them written, and the refusal says why: a slot being moved (logged as
// its own episode, not "redis unavailable"). Once the slot has moved they
// are accepted again, and the episode ends.
func TestClusterPublishWhileSlotMoves(t *testing.T) {
	c, e, logs := reshardEnv(t)
	if w := e.do("POST", "/v1/channels/mv/messages", `{"data":1}`); w.Code != 202 {
		t.Fatalf("before the move: %d %s", w.Code, w.Body)
	}
	ctx := t.Context()
	st := e.keys.Stream("mv")
	move := c.BeginKeySlotMove(t, st)

	for _, key := range []string{"", "k1"} {
		var hdr []string
		if key != "" {
			hdr = []string{"Idempotency-Key", key}
		}
		w := e.do("POST", "/v1/channels/mv/messages", `{"data":2}`, hdr...)
		if w.Code != 503 || w.Header().Get("Retry-After") != "1" || !strings.Contains(w.Body.String(), "slot is being moved") {
			t.Fatalf("while the slot moves (Idempotency-Key %q): %d Retry-After %q %s", key, w.Code, w.Header().Get("Retry-After"), w.Body)
		}
	}
	if n := move.Src.XLen(ctx, st).Val(); n != 1 {
		t.Fatalf("XLEN %d after the refused publishes, want 1", n)
	}
	recs := logs.JSONLines(t)
	if len(recs) != 1 || recs[0]["msg"] != "redis cluster slot being moved" || recs[0]["level"] != "WARN" || !strings.Contains(fmt.Sprint(recs[0]["err"]), "TRYAGAIN") {
		t.Fatalf("logged %v, want one line: redis cluster slot being moved (TRYAGAIN)", recs)
	}

	// The move ends, as redis-cli --cluster reshard ends it: the keys
	// migrate, and every master learns the slot's new owner. The keyed
	// publish is retried, as a publisher would.
	move.MigrateKeys(t)
	move.Finish(t)
	testkit.Eventually(t, 10*time.Second, func() error {
		if w := e.do("POST", "/v1/channels/mv/messages", `{"data":2}`, "Idempotency-Key", "k1"); w.Code != 202 {
			return fmt.Errorf("after the move: %d %s", w.Code, w.Body)
		}
		return nil
	})
	if n := move.Dst.XLen(ctx, st).Val(); n != 2 {
		t.Fatalf("XLEN %d on the new master, want 2", n)
	}
	testkit.Eventually(t, 5*time.Second, func() error {
		recs := logs.JSONLines(t)
		if last := recs[len(recs)-1]; last["msg"] != "redis cluster slots moved" || last["level"] != "INFO" {
			return fmt.Errorf("last line %v, want redis cluster slots moved", last)
		}
		return nil
	})
}

// reshardEnv is an ingress on a three-master cluster of the test's own,
// for tests that move its slots: its JSON log, and a slot-move episode
// that an append that succeeds ends at once.
func reshardEnv(t *testing.T) (*redistest.Cluster, *testEnv, *testkit.SyncBuffer) {
	t.Helper()
	c := redistest.StartOwnedCluster(t, 3, 0, "the test does not reshard a cluster it does not own")
	logs := &testkit.SyncBuffer{}
	rc := redisconn.Config{ClusterAddrs: c.AddrsEnv(), Timeout: time.Second, KeyPrefix: redistest.Prefix(t)}
	e := newEnvWith(t, rc, slog.New(slog.NewJSONHandler(logs, nil)), nil)
	e.srv.slotMoving.Quiet = time.Nanosecond
	return c, e, logs
}
