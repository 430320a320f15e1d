package main

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redisconn"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// TestClusterRefreshPastDownMaster: one master of the cluster is down
// (the window of a failover, 10–30 s on managed offerings; here it stays
// down) while an instance holds connections whose registry keys are
// spread over every master. The registry refresh cannot write the keys
// on that master, but the records of connections whose keys live on the
// masters that are up must stay: sends to them and to their users go on
// finding them. A refresh that stops at its first failing pipeline (a
// batch holding any key of the master down) lets them expire.
func TestClusterRefreshPastDownMaster(t *testing.T) {
	c := redistest.StartOwnedCluster(t, 3, 0, "the test cannot stop its nodes")
	rdb := c.Client(t)
	prefix := redistest.Prefix(t)
	ks := keys.Scheme{Prefix: prefix}
	vars := map[string]string{
		"REDIS_CLUSTER_ADDRS": c.AddrsEnv(),
		"REDIS_KEY_PREFIX":    prefix,
		"ALLOW_ANONYMOUS":     "true",
		"SHUTDOWN_GRACE":      "1s",
		"REGISTRY_TTL":        "9s", // refreshed every 3 s
	}
	cfg, err := loadConfig(func(k string) string { return vars[k] })
	if err != nil {
		t.Fatal(err)
	}
	logs := &testkit.SyncBuffer{}
	// The egress's client, as run makes it (its timeouts, retries and
	// slot-map reloads).
	erdb, err := redisconn.New(cfg.Redis)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { erdb.Close() })
	s := NewServer(cfg, slog.New(slog.NewJSONHandler(logs, nil)), erdb)
	// A pipeline per connection: the batches of an instance with
	// thousands of connections, with a few connections.
	s.refreshBatch = 1
	t.Cleanup(func() {
		redistest.Cleanup(rdb, prefix)
		if t.Failed() {
			t.Logf("egress log:\n%s", logs.String())
		}
	})
	srv, _ := startEgress(t, s)
	<-s.hub.inbox.ready
	ctx := context.Background()
	master := func(key string) string {
		m, err := rdb.MasterForKey(ctx, key)
		if err != nil {
			t.Fatal(err)
		}
		return m.Options().Addr
	}
	inbox := master(s.hub.inbox.notify)
	var down string
	for _, a := range c.Addrs() {
		if a != inbox {
			down = a
		}
	}
	dial := func(user string) string {
		ws, _, err := websocket.DefaultDialer.Dial("ws"+strings.TrimPrefix(srv.URL, "http")+"/ws?user="+user, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ws.Close() })
		return next(t, ws, "welcome").ConnectionID
	}
	// Users whose connection set is on the master that goes down, and
	// connections whose record and user's set are both on masters that
	// stay up.
	var onDown, up int
	live := map[string]string{} // connection id → user
	for i := 0; onDown < 6 || len(live) < 3; i++ {
		user := fmt.Sprintf("u%d", i)
		switch {
		case master(ks.UserConns(user)) == down:
			if onDown < 6 {
				dial(user)
				onDown++
			}
		case len(live) < 3:
			id := dial(user)
			up++
			if master(ks.Conn(id)) != down {
				live[id] = user
			}
		}
		if i > 1000 {
			t.Fatal("no users found")
		}
	}
	t.Logf("%d connections of users kept on %s, %d with all their keys elsewhere (%d kept)", onDown, down, up, len(live))
	c.StopNode(t, c.Index(down))
	stopped := time.Now()
	// Longer than REGISTRY_TTL, and the first refresh that meets the
	// master down (go-redis tries its refused dial for about 3 s): every
	// record written before the stop has expired unless a refresh wrote
	// it since. (A record is due 3 s after its last write and lives 9:
	// the refresh that meets the master down has 6 s to reach it, twice
	// what the refused dial takes, so that a slow machine does not
	// expire it.)
	for time.Since(stopped) < 10*time.Second {
		cmds, _ := rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
			for id := range maps.Keys(live) {
				p.Exists(ctx, ks.Conn(id))
			}
			return nil
		})
		for _, cmd := range cmds {
			n, err := cmd.(*redis.IntCmd).Result()
			if err != nil {
				t.Fatalf("%v: %v", cmd.Args(), err)
			}
			if n == 0 {
				t.Fatalf("%v after the master stopped: the record of a connection on masters that are up expired (%v)", time.Since(stopped).Round(time.Millisecond), cmd.Args()[1])
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
}
