package main

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// TestClusterManualFailover promotes a replica with CLUSTER FAILOVER (an
// operator's or a managed offering's planned switch-over: the old master
// stays up and becomes a replica of the new one) while publishing and
// subscribing go on: the subscriptions move to the new master, delivery
// resumes within seconds, and every acknowledged message arrives once, in
// order.
func TestClusterManualFailover(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a Redis Cluster")
	}
	c := redistest.StartCluster(t, 3, 1)
	if !c.Owned() {
		t.Skip("REDIS_CLUSTER_ADDRS is set: the test does not fail over a cluster it does not own")
	}
	rdb := c.Client(t)
	e := startClusterEgress(t, rdb, c.AddrsEnv())
	chans, owner := channelsOnEveryMaster(t, rdb, e.ks, 3, 1)
	col := dialCollector(t, e.srv, chans)
	victim := owner[chans[0]]

	pub := startClusterPublisher(t, e, chans, 20*time.Millisecond)
	ackedOn := pub.ackedOn
	testkit.Eventually(t, 10*time.Second, func() error {
		if n := len(ackedOn(chans[0])); n < 20 {
			return fmt.Errorf("only %d published", n)
		}
		return nil
	})

	replica := replicaOf(t, victim)
	started := time.Now()
	c.ManualFailover(t, replica, victim, time.Minute)
	t.Logf("CLUSTER FAILOVER of %s to %s took %s", victim, replica, time.Since(started).Round(time.Millisecond))

	// A message acknowledged after the switch reaches the live socket
	// within a few seconds, not only at the end through a later
	// catch-up; the same once the old master is stopped too (the
	// subscriptions Redis kept on it move to the new master).
	liveAfter := func(what string) {
		t.Helper()
		from := len(ackedOn(chans[0]))
		since := time.Now()
		var probe string
		testkit.Eventually(t, 10*time.Second, func() error {
			if a := ackedOn(chans[0]); len(a) > from {
				probe = a[from]
				return nil
			}
			return fmt.Errorf("nothing acknowledged on %s %s", chans[0], what)
		})
		testkit.Eventually(t, 8*time.Second, func() error {
			col.mu.Lock()
			defer col.mu.Unlock()
			for _, id := range col.got[chans[0]] {
				if id == probe {
					return nil
				}
			}
			return fmt.Errorf("%s published %s not delivered live", probe, what)
		})
		t.Logf("delivery %s resumed within %s", what, time.Since(since).Round(time.Millisecond))
	}
	liveAfter("after the failover")
	c.StopNode(t, c.Index(victim))
	liveAfter("after the old master stopped")
	final, retries := pub.stop()
	t.Logf("acknowledged on %s: %d, publish retries: %d", chans[0], len(final[chans[0]]), retries)
	col.check(t, final, 10*time.Second)
}

// replicaOf returns the address of a replica of the master at addr.
func replicaOf(t *testing.T, addr string) string {
	t.Helper()
	m := redis.NewClient(&redis.Options{Addr: addr, DisableIdentity: true})
	defer m.Close()
	var replica string
	testkit.Eventually(t, 10*time.Second, func() error {
		info, err := m.Info(context.Background(), "replication").Result()
		if err != nil {
			return err
		}
		for _, line := range strings.Split(info, "\r\n") {
			if !strings.HasPrefix(line, "slave0:") {
				continue
			}
			var ip, port string
			for _, kv := range strings.Split(strings.TrimPrefix(line, "slave0:"), ",") {
				k, v, _ := strings.Cut(kv, "=")
				switch k {
				case "ip":
					ip = v
				case "port":
					port = v
				}
			}
			replica = ip + ":" + port
			return nil
		}
		return fmt.Errorf("%s has no replica", addr)
	})
	return replica
}
