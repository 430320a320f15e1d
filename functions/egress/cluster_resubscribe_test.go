package main

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
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
	inboxNode := inboxMaster(t, rdb, s)
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

// inboxMaster is the master holding s's inbox, whose connection the
// instance's probes watch.
func inboxMaster(t *testing.T, rdb *redis.ClusterClient, s *Server) *redis.Client {
	t.Helper()
	m, err := rdb.MasterForKey(context.Background(), s.hub.inbox.notify)
	if err != nil {
		t.Fatal(err)
	}
	return m
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
	inbox := inboxMaster(t, rdb, s)
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
	// SUNSUBSCRIBE gets no reply the sweep waits for: until Redis has
	// it, polled, where a 500 ms sleep was trusted to cover it.
	node := masterAt(t, rdb, target)
	testkit.Eventually(t, 5*time.Second, func() error {
		for _, ch := range mine {
			n, err := node.Do(ctx, "PUBSUB", "SHARDNUMSUB", e.ks.Notify(ch)).Slice()
			if err != nil {
				return err
			}
			if n[1].(int64) != 0 {
				return fmt.Errorf("%s: still %v subscriber(s) in Redis after the instance unsubscribed", ch, n[1])
			}
		}
		return nil
	})
}

// TestClusterInboxNodeDown: the master holding the instance's inbox goes
// down and stays down (no replica to promote). The probes, published to
// the inbox, get no answer, and the instance resubscribes every
// 4 × PROBE_INTERVAL: only the inbox's node connection is in question
// (each of the others has its own ping), so the channels on the masters
// that are up must keep their subscriptions, not be subscribed again and
// caught up from their streams each time.
func TestClusterInboxNodeDown(t *testing.T) {
	c := redistest.StartOwnedCluster(t, 3, 0, "the test cannot stop its nodes")
	rdb := c.Client(t)
	e := startClusterEgressWith(t, rdb, c.AddrsEnv(), map[string]string{"PROBE_INTERVAL": "250ms"})
	s := e.srv.Config.Handler.(*Server)
	ctx := context.Background()
	inboxNode := inboxMaster(t, rdb, s)
	inbox := inboxNode.Options().Addr
	chans, owner := channelsOnEveryMaster(t, rdb, e.ks, 3, 5)
	var live []string
	for _, ch := range chans {
		if owner[ch] != inbox {
			live = append(live, ch)
		}
	}
	col := dialCollector(t, e.srv, live)
	c.StopNode(t, c.Index(inbox))
	before := s.hub.reconnects.Load()
	time.Sleep(4 * time.Second) // several resubscribes
	resubscribes := s.hub.reconnects.Load() - before
	if resubscribes == 0 {
		t.Fatal("the instance never resubscribed: the test does not test anything")
	}
	// Each resubscribe counts one; each channel subscribed again and
	// caught up counts one more.
	s.hub.sub.mu.Lock()
	nodes := len(s.hub.sub.nodes)
	s.hub.sub.mu.Unlock()
	t.Logf("%d repeated confirmations and resubscribes in 4 s with the inbox's master down (%d channels on masters that are up, %d node connections)", resubscribes, len(live), nodes)
	if resubscribes > 8 {
		t.Errorf("%d resubscribes and repeated confirmations in 4 s: the channels on the masters that are up were subscribed again", resubscribes)
	}
	acked := map[string][]string{}
	for _, ch := range live {
		id, err := e.publish(ctx, ch, 1)
		if err != nil {
			t.Fatal(err)
		}
		acked[ch] = append(acked[ch], id)
	}
	col.check(t, acked, 5*time.Second)
}

// TestClusterResubscribeManyOnSlowHub: the Pub/Sub connection to a master
// holding many channels is dropped; go-redis's one-command resubscribe is
// refused (CROSSSLOT) and every channel is sent its own SSUBSCRIBE at
// once. The hub reads the stream for each confirmation, so the
// confirmations wait in the connection for the hub: a channel must not be
// sent SSUBSCRIBE again for that wait (each extra confirmation costs the
// hub one more catch-up, which delays the others further: with thousands
// of channels, more duplicates than channels).
func TestClusterResubscribeManyOnSlowHub(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a Redis Cluster")
	}
	c := redistest.StartCluster(t, 3, 0)
	rdb := c.Client(t)
	ks := keys.Scheme{Prefix: redistest.Prefix(t)}
	sub := newSubscriber(slog.New(slog.DiscardHandler), rdb, nil)
	defer sub.Close()
	var (
		mu       sync.Mutex
		confirms = map[string]int{}
		slow     atomic.Bool
	)
	// The subscriber never closes its events: this reader ends with the
	// test.
	done := make(chan struct{})
	defer close(done)
	go func() {
		for {
			var ev psEvent
			select {
			case ev = <-sub.Events():
			case <-done:
				return
			}
			if !ev.confirmed {
				continue
			}
			mu.Lock()
			confirms[ev.channel]++
			mu.Unlock()
			if slow.Load() {
				time.Sleep(2 * time.Millisecond) // the hub's catch-up read
			}
		}
	}()
	ctx := context.Background()
	inbox := ks.InboxNotify("x")
	if err := sub.Subscribe(ctx, inbox); err != nil {
		t.Fatal(err)
	}
	m, err := rdb.MasterForKey(ctx, inbox)
	if err != nil {
		t.Fatal(err)
	}
	target := m.Options().Addr
	var chans []string
	for i := 0; len(chans) < 1500; i++ {
		ch := ks.Notify(fmt.Sprintf("c%d", i))
		if n, err := rdb.MasterForKey(ctx, ch); err != nil {
			t.Fatal(err)
		} else if n.Options().Addr == target {
			chans = append(chans, ch)
		}
	}
	for _, ch := range chans {
		if err := sub.Subscribe(ctx, ch); err != nil {
			t.Fatal(err)
		}
	}
	confirmed := func() error {
		mu.Lock()
		defer mu.Unlock()
		for _, ch := range chans {
			if confirms[ch] == 0 {
				return fmt.Errorf("%s not confirmed", ch)
			}
		}
		return nil
	}
	testkit.Eventually(t, 20*time.Second, confirmed)
	mu.Lock()
	clear(confirms)
	mu.Unlock()
	slow.Store(true)
	if err := masterAt(t, rdb, target).ClientKillByFilter(ctx, "TYPE", "pubsub").Err(); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	testkit.Eventually(t, 60*time.Second, confirmed)
	took := time.Since(start)
	time.Sleep(2 * time.Second) // duplicates still in the connection
	mu.Lock()
	defer mu.Unlock()
	dup := 0
	for _, ch := range chans {
		dup += confirms[ch] - 1
	}
	t.Logf("%d channels confirmed again in %s, %d duplicate confirmations", len(chans), took.Round(time.Millisecond), dup)
	if dup > len(chans)/100 {
		t.Errorf("%d duplicate confirmations for %d channels: SSUBSCRIBEs sent again while their confirmations waited for the hub", dup, len(chans))
	}
}
