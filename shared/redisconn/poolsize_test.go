package redisconn

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/redistest"
)

// TestPoolSizeBoundsConnections: REDIS_POOL_SIZE is the number of command
// connections a process opens to each node (README, docs/scaling.md),
// which is how an operator sizes Redis's maxclients for n instances.
// go-redis v9.23 also keeps a pool of its own for pipelines (up to 10
// more connections per node, with 128 KiB buffers each): an egress with
// one socket held two command connections, its probe's and its
// registry pipelines', and a process with REDIS_POOL_SIZE=2 opened
// twelve. Plain commands and pipelines, issued one after the other and
// then from 20 goroutines at once, stay within the pool size on every
// node.
func TestPoolSizeBoundsConnections(t *testing.T) {
	t.Parallel()
	const poolSize = 2
	t.Run("single", func(t *testing.T) {
		t.Parallel()
		rs := redistest.Start(t)
		rdb, err := New(Config{URL: rs.URL(), Timeout: time.Second, PoolSize: poolSize})
		if err != nil {
			t.Fatal(err)
		}
		defer rdb.Close()
		testPoolSizeBound(t, rdb, []string{rs.Addr()}, poolSize)
	})
	t.Run("cluster", func(t *testing.T) {
		t.Parallel()
		c := redistest.StartCluster(t, 3, 0)
		if !c.Owned() {
			t.Skip("REDIS_CLUSTER_ADDRS is set: other clients' connections would be counted")
		}
		rdb, err := New(Config{ClusterAddrs: c.AddrsEnv(), Timeout: time.Second, PoolSize: poolSize})
		if err != nil {
			t.Fatal(err)
		}
		defer rdb.Close()
		testPoolSizeBound(t, rdb, c.Addrs(), poolSize)
	})
}

func testPoolSizeBound(t *testing.T, rdb redis.UniversalClient, addrs []string, poolSize int) {
	ctx := t.Context()
	prefix := redistest.Prefix(t)
	work := func(ctx context.Context, i int) error {
		key := fmt.Sprintf("%s:{k%d}", prefix, i%50)
		if err := rdb.Set(ctx, key, i, time.Minute).Err(); err != nil {
			return err
		}
		_, err := rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
			p.Get(ctx, key)
			p.PExpire(ctx, key, time.Minute)
			return nil
		})
		return err
	}
	// One after the other: a command, then a pipeline.
	for i := range 50 {
		if err := work(ctx, i); err != nil {
			t.Fatal(err)
		}
	}
	checkConns(t, addrs, poolSize, "sequential commands and pipelines")
	// At once, from more goroutines than the pool has connections.
	var wg sync.WaitGroup
	errs := make(chan error, 20)
	for g := range 20 {
		wg.Go(func() {
			for i := range 50 {
				if err := work(ctx, g*50+i); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	checkConns(t, addrs, poolSize, "concurrent commands and pipelines")
}

// checkConns counts, on each node, the clients other than the counting
// one: the test's own Redis servers have no other client.
func checkConns(t *testing.T, addrs []string, poolSize int, what string) {
	t.Helper()
	for _, addr := range addrs {
		admin := redis.NewClient(&redis.Options{Addr: addr, DisableIdentity: true, PoolSize: 1})
		list, err := admin.ClientList(t.Context()).Result()
		admin.Close()
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for _, line := range strings.Split(strings.TrimSpace(list), "\n") {
			// The counting client's CLIENT LIST, and a cluster's own
			// links (they do not show in CLIENT LIST), aside.
			if line != "" && !strings.Contains(line, "cmd=client|list") {
				n++
			}
		}
		if n > poolSize {
			t.Errorf("%s: %d connections to %s with REDIS_POOL_SIZE=%d:\n%s", what, n, addr, poolSize, list)
		}
	}
}
