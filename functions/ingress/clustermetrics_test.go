package main

import (
	"fmt"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/wsrelay/wsrelay/shared/redisconn"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

var redisErrorsRe = regexp.MustCompile(`(?m)^wsrelay_ingress_redis_errors_total (\d+)$`)

func (e *testEnv) redisErrors() int {
	e.t.Helper()
	m := redisErrorsRe.FindStringSubmatch(e.do("GET", "/metrics", "").Body.String())
	if m == nil {
		e.t.Fatal("no wsrelay_ingress_redis_errors_total")
	}
	n, _ := strconv.Atoi(m[1])
	return n
}

// TestClusterWaitReplicasCountsRedisErrors: with PUBLISH_WAIT_REPLICAS on
// a cluster, appends run in pipelines on the masters' own clients, outside
// the cluster client's hooks: a master that stops answering must still
// show in wsrelay_ingress_redis_errors_total (one per failed pipeline, as
// for every other command), and commands the cluster client routes must
// not be counted twice.
func TestClusterWaitReplicasCountsRedisErrors(t *testing.T) {
	c := redistest.StartOwnedCluster(t, 3, 1, "the test cannot stop its nodes")
	rc := redisconn.Config{ClusterAddrs: c.AddrsEnv(), Timeout: 300 * time.Millisecond, KeyPrefix: redistest.Prefix(t)}
	e := newEnvWith(t, rc, nil, func(cfg *Config) {
		cfg.PublishWaitReplicas = 1
		cfg.PublishWaitTimeout = 500 * time.Millisecond
	})
	rdb, ks := e.rdb, e.keys

	ok := false
	for range 50 { // the replicas may still be syncing
		if w := e.do("POST", "/v1/channels/rc/messages", `{"data":1}`); w.Code == 202 {
			ok = true
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if !ok {
		t.Fatal("no publish accepted")
	}
	// A command the cluster client routes, failing: counted once.
	base := e.redisErrors()
	if err := rdb.Do(t.Context(), "NOSUCHCOMMAND", ks.Stream("rc")).Err(); err == nil {
		t.Fatal("an unknown command succeeded")
	}
	if n := e.redisErrors() - base; n != 1 {
		t.Fatalf("one failed routed command counted %d times", n)
	}

	victim, err := c.Client(t).MasterForKey(t.Context(), ks.Stream("rc"))
	if err != nil {
		t.Fatal(err)
	}
	base = e.redisErrors()
	c.StopNode(t, c.Index(victim.Options().Addr))
	for range 3 {
		if w := e.do("POST", "/v1/channels/rc/messages", `{"data":1}`); w.Code != 503 {
			t.Fatalf("publish to a stopped master: %d %s", w.Code, w.Body.String())
		}
	}
	n := e.redisErrors() - base
	if n != 3 {
		t.Fatalf("3 publishes failed on a stopped master: wsrelay_ingress_redis_errors_total rose by %d, want 3 (one per failed pipeline)", n)
	}
}

// TestClusterReadinessPingsCountRedisErrors: on a Redis Cluster the
// readiness probe pings every master on that master's own client,
// outside the cluster client's hooks. A master down makes /readyz answer
// 503: its failed pings must show in wsrelay_ingress_redis_errors_total
// as a failed ping does on a single Redis, or an ingress that only its
// probe reaches is out of rotation with no Redis error counted.
func TestClusterReadinessPingsCountRedisErrors(t *testing.T) {
	c := redistest.StartOwnedCluster(t, 3, 0, "the test cannot stop its nodes")
	rc := redisconn.Config{ClusterAddrs: c.AddrsEnv(), Timeout: 300 * time.Millisecond, KeyPrefix: redistest.Prefix(t)}
	e := newEnvWith(t, rc, nil, nil)
	testkit.Eventually(t, 10*time.Second, func() error {
		if w := e.do("GET", "/readyz", ""); w.Code != 200 {
			return fmt.Errorf("/readyz %d %s", w.Code, w.Body.String())
		}
		return nil
	})
	if n := e.redisErrors(); n != 0 {
		t.Fatalf("%d Redis errors before the stop", n)
	}
	c.StopNode(t, 0)
	testkit.Eventually(t, 10*time.Second, func() error {
		if w := e.do("GET", "/readyz", ""); w.Code != 503 {
			return fmt.Errorf("/readyz %d %s, want 503", w.Code, w.Body.String())
		}
		return nil
	})
	// The 503 came from a ping that failed: it was counted before it.
	if e.redisErrors() == 0 {
		t.Errorf("/readyz 503 for a master down, and no Redis error counted")
	}
}
