package main

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/redistest"
)

// TestClusterPubSubConnectionDropped: the Pub/Sub connection to a master
// (not the one holding the instance's inbox, whose probes would notice)
// is dropped while the master stays up, as a network blip or a proxy
// does. go-redis reconnects it and subscribes all its channels again in
// one SSUBSCRIBE, which the cluster refuses (CROSSSLOT) for channels in
// different slots: each must be subscribed again on its own, and the
// messages published meanwhile and afterwards delivered.
func TestClusterPubSubConnectionDropped(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a Redis Cluster")
	}
	c := redistest.StartCluster(t, 3, 0)
	rdb := c.Client(t)
	e := startClusterEgress(t, rdb, c.AddrsEnv())
	s := e.srv.Config.Handler.(*Server)
	ctx := context.Background()
	inboxNode, err := rdb.MasterForKey(ctx, s.hub.inbox.notify)
	if err != nil {
		t.Fatal(err)
	}
	chans, owner := channelsOnEveryMaster(t, rdb, e.ks, 3, 3)
	var target string
	var mine []string
	for _, ch := range chans {
		if owner[ch] != inboxNode.Options().Addr {
			if target == "" {
				target = owner[ch]
			}
			if owner[ch] == target {
				mine = append(mine, ch)
			}
		}
	}
	col := dialCollector(t, e.srv, mine)
	acked := map[string][]string{}
	for _, ch := range mine {
		id, err := e.publish(ctx, ch, 0)
		if err != nil {
			t.Fatal(err)
		}
		acked[ch] = append(acked[ch], id)
	}
	col.check(t, acked, 5*time.Second)
	node := masterAt(t, rdb, target)
	if err := node.ClientKillByFilter(ctx, "TYPE", "pubsub").Err(); err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= 3; i++ {
		for _, ch := range mine {
			id, err := e.publish(ctx, ch, i)
			if err != nil {
				t.Fatal(err)
			}
			acked[ch] = append(acked[ch], id)
		}
		time.Sleep(500 * time.Millisecond)
	}
	col.check(t, acked, 15*time.Second)
}

// masterAt is the client of the master at addr.
func masterAt(t *testing.T, rdb *redis.ClusterClient, addr string) *redis.Client {
	t.Helper()
	var mu sync.Mutex
	var node *redis.Client
	_ = rdb.ForEachMaster(context.Background(), func(_ context.Context, m *redis.Client) error {
		if m.Options().Addr == addr {
			mu.Lock()
			node = m
			mu.Unlock()
		}
		return nil
	})
	if node == nil {
		t.Fatalf("no master at %s", addr)
	}
	return node
}

// TestClusterUnsubscribeIdleChannels: channels on one master that nobody
// listens to any more are unsubscribed in Redis after the linger. One
// SUNSUBSCRIBE of channels in different slots is refused (CROSSSLOT),
// and the master would go on sending the instance their messages.
func TestClusterUnsubscribeIdleChannels(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a Redis Cluster")
	}
	c := redistest.StartCluster(t, 3, 0)
	rdb := c.Client(t)
	e := startClusterEgress(t, rdb, c.AddrsEnv())
	s := e.srv.Config.Handler.(*Server)
	ctx := context.Background()
	// On the master of the instance's inbox, so that its connection stays.
	inbox, err := rdb.MasterForKey(ctx, s.hub.inbox.notify)
	if err != nil {
		t.Fatal(err)
	}
	target := inbox.Options().Addr
	chans, owner := channelsOnEveryMaster(t, rdb, e.ks, 3, 3)
	var mine []string
	for _, ch := range chans {
		if owner[ch] == target {
			mine = append(mine, ch)
		}
	}
	for _, ch := range mine {
		cs, err := s.hub.acquire(ctx, ch)
		if err != nil {
			t.Fatal(err)
		}
		s.hub.release(cs)
	}
	s.hub.sweepIdle(ctx, time.Now().Add(2*linger))
	time.Sleep(500 * time.Millisecond)
	node := masterAt(t, rdb, target)
	for _, ch := range mine {
		n, err := node.Do(ctx, "PUBSUB", "SHARDNUMSUB", e.ks.Notify(ch)).Slice()
		if err != nil {
			t.Fatal(err)
		}
		if n[1].(int64) != 0 {
			t.Errorf("%s: still %v subscriber(s) in Redis after the instance unsubscribed", ch, n[1])
		}
	}
}
