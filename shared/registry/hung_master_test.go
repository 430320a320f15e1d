package registry_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redisconn"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/registry"
)

// TestClusterRefreshPastHungMaster: one master does not answer (paused:
// a hung process or a black-holed network, not a refused dial). A
// refresh made as the egress makes it (a Refresher, a batch per record,
// each with a deadline of 5×REDIS_TIMEOUT) must go on writing the
// records whose keys all live on the masters that answer.
func TestClusterRefreshPastHungMaster(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a Redis Cluster")
	}
	const timeout = 200 * time.Millisecond
	h := startHungCluster(t, timeout)
	ks, reg, admin, ctx := h.ks, h.reg, h.admin, context.Background()
	// First a record with a key on the hung master, then records whose
	// record key and user set are both elsewhere.
	var recs []*registry.Record
	var up []*registry.Record
	for i := 0; len(up) < 5; i++ {
		r := &registry.Record{ID: fmt.Sprintf("c%d", i), User: fmt.Sprintf("u%d", i), Instance: "i1"}
		onHung := h.onHung(t, r)
		switch {
		case len(recs) == 0 && onHung:
			recs = append(recs, r)
		case len(recs) > 0 && !onHung:
			recs = append(recs, r)
			up = append(up, r)
		}
	}
	if err := reg.Refresh(ctx, recs); err != nil { // all warm, every node dialled
		t.Fatal(err)
	}
	for _, r := range up {
		admin.Del(ctx, ks.Conn(r.ID))
	}
	h.pause(t)
	ref := reg.Refresher()
	start := time.Now()
	for i, r := range recs {
		bctx, cancel := context.WithTimeout(ctx, 5*timeout)
		err := ref.Write(bctx, []*registry.Record{r})
		cancel()
		t.Logf("batch %d (%s): %v after %v", i, r.ID, err, time.Since(start).Round(time.Millisecond))
		if i == 0 && err == nil {
			t.Errorf("batch 0, with a key on the hung master, reported no error")
		}
	}
	// The hung master is left out of the rest of the refresh: a batch with
	// a key of its own fails at once, without waiting for it again, and
	// says so (its keys count as failed writes).
	bctx, cancel := context.WithTimeout(ctx, 5*timeout)
	again := time.Now()
	err := ref.Write(bctx, recs[:1])
	cancel()
	if d := time.Since(again); err == nil || d > 4*timeout {
		t.Errorf("batch 0 again: %v after %v; want an error, without waiting for the hung master", err, d)
	}
	for _, r := range up {
		if n := admin.Exists(ctx, ks.Conn(r.ID)).Val(); n != 1 {
			t.Errorf("record %s, whose keys are all on masters that answer, not written by the refresh", r.ID)
		}
	}
}

// hungCluster is a cluster of 3 masters for the tests of one that does
// not answer: a registry on a client whose REDIS_TIMEOUT is the tests',
// and the master that pause hangs.
type hungCluster struct {
	c     *redistest.Cluster
	admin *redis.ClusterClient
	ks    keys.Scheme
	reg   *registry.Registry
	hung  string // the hung master's address
}

func startHungCluster(t *testing.T, timeout time.Duration) *hungCluster {
	t.Helper()
	c := redistest.StartCluster(t, 3, 0)
	h := &hungCluster{c: c, admin: c.Client(t), ks: keys.Scheme{Prefix: redistest.Prefix(t)}, hung: c.Addrs()[0]}
	t.Cleanup(func() { redistest.Cleanup(h.admin, h.ks.Prefix) })
	rdb, err := redisconn.New(redisconn.Config{ClusterAddrs: c.AddrsEnv(), Timeout: timeout, PoolSize: 10})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rdb.Close() })
	h.reg = registry.New(rdb, h.ks, time.Minute)
	return h
}

// onHung reports whether a key of r (its record, its user's set) lives on
// the hung master.
func (h *hungCluster) onHung(t *testing.T, r *registry.Record) bool {
	t.Helper()
	for _, key := range []string{h.ks.Conn(r.ID), h.ks.UserConns(r.User)} {
		m, err := h.admin.MasterForKey(context.Background(), key)
		if err != nil {
			t.Fatal(err)
		}
		if m.Options().Addr == h.hung {
			return true
		}
	}
	return false
}

// pause hangs the master (CLIENT PAUSE ALL for 15 s, undone at cleanup):
// a hung process or a black-holed network, not a refused dial.
func (h *hungCluster) pause(t *testing.T) {
	t.Helper()
	for _, nc := range h.c.NodeClients(t) {
		if nc.Options().Addr == h.hung {
			if err := nc.Do(context.Background(), "CLIENT", "PAUSE", "15000", "ALL").Err(); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { nc.Do(context.Background(), "CLIENT", "UNPAUSE") })
		}
	}
}
