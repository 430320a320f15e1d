package redisconn

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/redistest"
)

// TestMaxClients: a Redis at its maxclients answers a new connection
// "ERR max number of clients reached" and closes it. go-redis took that
// answer to its HELLO for a Redis without HELLO, went on with the
// connection's set-up, and returned the broken pipe or EOF of that: an
// operator read "write: broken pipe" from a Redis that was up and
// answering. The command's error names the refusal (MaxClients), on a
// single node and on a cluster's node, for commands, pipelines and
// Pub/Sub, and the client works again once a connection is free.
func TestMaxClients(t *testing.T) {
	t.Parallel()
	t.Run("single", func(t *testing.T) {
		t.Parallel()
		rs := redistest.Start(t)
		rdb, err := New(Config{URL: rs.URL(), Timeout: time.Second})
		if err != nil {
			t.Fatal(err)
		}
		defer rdb.Close()
		testMaxClients(t, rdb, []string{rs.Addr()})
	})
	t.Run("cluster", func(t *testing.T) {
		t.Parallel()
		c := redistest.StartCluster(t, 3, 0)
		if !c.Owned() {
			t.Skip("REDIS_CLUSTER_ADDRS is set: the test does not fill a cluster it does not own")
		}
		rdb, err := New(Config{ClusterAddrs: c.AddrsEnv(), Timeout: time.Second})
		if err != nil {
			t.Fatal(err)
		}
		defer rdb.Close()
		// The slot map is loaded (one connection), then the node filled.
		if err := rdb.Ping(t.Context()).Err(); err != nil {
			t.Fatal(err)
		}
		testMaxClients(t, rdb, c.Addrs())
	})
}

// testMaxClients fills the nodes at addrs (every node of rdb).
func testMaxClients(t *testing.T, rdb redis.UniversalClient, addrs []string) {
	ctx := t.Context()
	var admins []*redis.Client
	for _, addr := range addrs {
		admin := redis.NewClient(&redis.Options{Addr: addr, DisableIdentity: true, PoolSize: 1})
		defer admin.Close()
		admins = append(admins, admin)
		if err := admin.ConfigSet(ctx, "maxclients", "1").Err(); err != nil {
			t.Fatal(err)
		}
		// Every connection the client holds is dropped: the next needs
		// a new one, which Redis refuses while admin holds the only
		// place.
		if err := admin.Do(ctx, "CLIENT", "KILL", "SKIPME", "yes").Err(); err != nil {
			t.Fatal(err)
		}
	}
	check := func(what string, err error) {
		t.Helper()
		if err == nil {
			t.Fatalf("%s: no error from a Redis at its maxclients", what)
		}
		if !MaxClients(err) || !strings.Contains(err.Error(), "max number of clients") {
			t.Fatalf("%s: error %q (%T) does not say Redis is at its maxclients", what, err, err)
		}
		if !NodeFailure(err) {
			t.Errorf("%s: %q is not a node failure (a cluster would not reload its slot map)", what, err)
		}
	}
	check("SET", rdb.Set(ctx, "{m}k", "v", 0).Err())
	_, err := rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		p.Incr(ctx, "{m}a")
		p.Incr(ctx, "{m}b")
		return nil
	})
	check("pipeline", err)
	ps := rdb.SSubscribe(ctx)
	sctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	check("SSUBSCRIBE", ps.SSubscribe(sctx, "{m}n"))
	cancel()
	ps.Close()

	for _, admin := range admins {
		if err := admin.ConfigSet(ctx, "maxclients", "10000").Err(); err != nil {
			t.Fatal(err)
		}
	}
	if err := rdb.Set(ctx, "{m}k", "v", 0).Err(); err != nil {
		t.Fatalf("SET once connections are free: %v", err)
	}
}
