package stream

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redistest"
)

// TestClusterWaitMastersIndependent: with WaitForReplicas on a cluster, a
// pipeline's appends (the Batcher's: concurrent publishes to any channels,
// or a batch across channels) run per master, each with its WAIT. Masters
// whose replica is gone answer their WAIT only at its timeout; the appends
// to a healthy master in the same pipeline must still be acknowledged, and
// not wait for the others' timeouts one after the other, past the
// pipeline's deadline (the ingress's REDIS_TIMEOUT).
func TestClusterWaitMastersIndependent(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a Redis Cluster")
	}
	c := redistest.StartCluster(t, 3, 1)
	if !c.Owned() {
		t.Skip("REDIS_CLUSTER_ADDRS is set: the test cannot stop its nodes")
	}
	rdb := c.Client(t)
	ctx := context.Background()
	ks := keys.Scheme{Prefix: redistest.Prefix(t)}
	t.Cleanup(func() { redistest.Cleanup(rdb, ks.Prefix) })

	// One channel per master, and each master's replica.
	chanOf := map[string]string{} // master addr → channel
	for i := 0; len(chanOf) < 3; i++ {
		ch := fmt.Sprintf("w-%d", i)
		m, err := rdb.MasterForKey(ctx, ks.Stream(ch))
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := chanOf[m.Options().Addr]; !ok {
			chanOf[m.Options().Addr] = ch
		}
	}
	replicaOf := map[string]string{} // master addr → replica addr
	for _, a := range c.Addrs() {
		n := redis.NewClient(&redis.Options{Addr: a, DisableIdentity: true})
		info, err := n.Info(ctx, "replication").Result()
		n.Close()
		if err != nil {
			t.Fatal(err)
		}
		var host, port string
		for _, l := range strings.Split(info, "\r\n") {
			if v, ok := strings.CutPrefix(l, "master_host:"); ok {
				host = v
			}
			if v, ok := strings.CutPrefix(l, "master_port:"); ok {
				port = v
			}
		}
		if host != "" {
			replicaOf[host+":"+port] = a
		}
	}
	var masters []string
	for m := range chanOf {
		masters = append(masters, m)
	}
	healthy := masters[0]

	s := NewStore(rdb)
	s.WaitForReplicas(1, 500*time.Millisecond)
	appends := func() []Append {
		var as []Append
		for _, m := range masters {
			ch := chanOf[m]
			as = append(as, Append{Stream: ks.Stream(ch), Notify: ks.Notify(ch),
				Msg: Message{Channel: ch, TS: 1, Data: []byte(`1`)}, Limits: Limits{MaxLen: 100, TTLMS: 60000}})
		}
		return as
	}
	// Once every replica is in sync, every append is acknowledged.
	deadline := time.Now().Add(20 * time.Second)
	for {
		_, errs := s.appendEach(ctx, appends())
		ok := true
		for _, err := range errs {
			ok = ok && err == nil
		}
		if ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("appends before the replicas stop: %v", errs)
		}
		time.Sleep(200 * time.Millisecond)
	}
	for _, m := range masters[1:] {
		c.StopNode(t, c.Index(replicaOf[m]))
	}
	// The ingress bounds a pipeline by REDIS_TIMEOUT (1 s by default,
	// PUBLISH_WAIT_TIMEOUT 500 ms); the masters come in map order.
	for round := range 6 {
		pctx, cancel := context.WithTimeout(ctx, time.Second)
		start := time.Now()
		_, errs := s.appendEach(pctx, appends())
		took := time.Since(start)
		cancel()
		if errs[0] != nil {
			t.Fatalf("round %d: the append to the healthy master %s failed after %s: %v", round, healthy, took.Round(time.Millisecond), errs[0])
		}
		for i, err := range errs[1:] {
			if err == nil {
				t.Fatalf("round %d: append %d to a master without replica acknowledged", round, i+1)
			}
		}
		if took > 900*time.Millisecond {
			t.Fatalf("round %d: the pipeline took %s: the masters' WAITs ran one after the other", round, took.Round(time.Millisecond))
		}
	}
}
