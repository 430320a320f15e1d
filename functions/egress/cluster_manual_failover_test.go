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
	c := redistest.StartOwnedCluster(t, 3, 1, "the test does not fail over a cluster it does not own")
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
	// catch-up; the same once the old master is stopped too.
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

// TestClusterManualFailoverThenReplicaMoved: a planned failover makes
// Redis drop the shard subscriptions on the old master, now a replica,
// with a sunsubscribe. Placed again with the slot map from before the
// switch, the channel was subscribed on that replica again, which
// accepts it (a replica serves its master's shard channels), and stayed
// there: a message published right after the switch, before the new
// master knew its replica, never reached the socket, and once that
// replica is made to follow another master (CLUSTER REPLICATE, or Redis's
// own replica migration) none does, the subscription kept without a
// word. Both must reach it, from the new master.
func TestClusterManualFailoverThenReplicaMoved(t *testing.T) {
	c := redistest.StartOwnedCluster(t, 3, 1, "the test does not fail over a cluster it does not own")
	rdb := c.Client(t)
	e := startClusterEgress(t, rdb, c.AddrsEnv())
	s := e.srv.Config.Handler.(*Server)
	ctx := context.Background()
	// Off the inbox's master, whose probes would replace its connection.
	inbox := inboxMaster(t, rdb, s).Options().Addr
	chans, owner := channelsOnEveryMaster(t, rdb, e.ks, 3, 1)
	var ch, other string
	for _, x := range chans {
		switch {
		case owner[x] == inbox:
		case ch == "":
			ch = x
		default:
			other = owner[x]
		}
	}
	col := dialCollector(t, e.srv, []string{ch})
	victim := owner[ch]
	c.ManualFailover(t, replicaOf(t, victim), victim, time.Minute)
	acked := map[string][]string{}
	publish := func() {
		t.Helper()
		testkit.Eventually(t, 10*time.Second, func() error {
			id, err := e.publish(ctx, ch, len(acked[ch]))
			if err == nil {
				acked[ch] = append(acked[ch], id)
			}
			return err
		})
	}
	publish()
	col.check(t, acked, 10*time.Second)

	oc := redis.NewClient(&redis.Options{Addr: other, DisableIdentity: true})
	defer oc.Close()
	id, err := oc.ClusterMyID(ctx).Result()
	if err != nil {
		t.Fatal(err)
	}
	old := redis.NewClient(&redis.Options{Addr: victim, DisableIdentity: true})
	defer old.Close()
	if err := old.Do(ctx, "CLUSTER", "REPLICATE", id).Err(); err != nil {
		t.Fatal(err)
	}
	publish()
	col.check(t, acked, 10*time.Second)
}
