//go:build !wsrelay_lean

package main

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// TestClusterReadinessPingsCountRedisErrors: on a Redis Cluster the
// readiness probe pings every master on that master's own client,
// outside the cluster client's hooks. A master down that holds none of
// the instance's keys makes /readyz answer 503 and nothing else fail:
// its failed pings must still show in wsrelay_egress_redis_errors_total
// (docs/metrics.md: readiness pings are counted), or the
// WsrelayRedisErrors alert never fires for an instance out of rotation.
func TestClusterReadinessPingsCountRedisErrors(t *testing.T) {
	c := redistest.StartOwnedCluster(t, 3, 0, "the test cannot stop its nodes")
	rdb := c.Client(t)
	e := startClusterEgress(t, rdb, c.AddrsEnv())
	testkit.Eventually(t, 10*time.Second, func() error {
		a, err := getReadyz(e.srv.URL)
		if err == nil && a.status != 200 {
			err = fmt.Errorf("/readyz %d %q", a.status, a.message)
		}
		return err
	})
	ctx := context.Background()
	own, err := rdb.MasterForKey(ctx, e.ks.Inbox(e.s.instance))
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var victim string
	if err := rdb.ForEachMaster(ctx, func(_ context.Context, n *redis.Client) error {
		mu.Lock()
		defer mu.Unlock()
		if a := n.Options().Addr; a != own.Options().Addr {
			victim = a
		}
		return nil
	}); err != nil || victim == "" {
		t.Fatalf("no master but the instance's own (%v)", err)
	}
	page, err := scrape(e.srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	if n := metricValue(t, page, "wsrelay_egress_redis_errors_total"); n != "0" {
		t.Fatalf("%s Redis errors before the stop", n)
	}
	c.StopNode(t, c.Index(victim))
	testkit.Eventually(t, 10*time.Second, func() error {
		a, err := getReadyz(e.srv.URL)
		if err == nil && (a.status != 503 || !strings.Contains(a.message, "Redis does not answer")) {
			err = fmt.Errorf("/readyz %d %q, want 503: Redis does not answer", a.status, a.message)
		}
		return err
	})
	// The 503 came from a ping that failed: it was counted before it.
	page, err = scrape(e.srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	if n := metricValue(t, page, "wsrelay_egress_redis_errors_total"); n == "0" {
		t.Errorf("/readyz 503 for a master down, and no Redis error counted")
	}
}
