package stream_test

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/stream"
)

// TestCluster runs the stream's cluster cases on one real three-master
// Redis Cluster.
func TestCluster(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a Redis Cluster")
	}
	c := redistest.StartCluster(t, 3, 0)
	rdb := c.Client(t)

	t.Run("append and resume", func(t *testing.T) {
		ks := keys.Scheme{Prefix: redistest.Prefix(t)}
		t.Cleanup(func() { redistest.Cleanup(rdb, ks.Prefix) })
		store := stream.NewStore(rdb)
		ctx := context.Background()
		// One pipeline across channels on different slots.
		var as []stream.Append
		for i := range 6 {
			ch := fmt.Sprintf("room-%d", i%2)
			as = append(as, stream.Append{
				Stream: ks.Stream(ch), Notify: ks.Notify(ch),
				Msg:    stream.Message{Channel: ch, Event: "e", TS: time.Now().UnixMilli(), Data: json.RawMessage(fmt.Sprintf(`{"n":%d}`, i))},
				Limits: stream.Limits{MaxLen: 100, TTLMS: 60000},
			})
		}
		ids, err := store.Append(ctx, as)
		if err != nil {
			t.Fatal(err)
		}
		for _, ch := range []string{"room-0", "room-1"} {
			off := 0
			if ch == "room-1" {
				off = 1
			}
			first := stream.MustParseID(ids[off])
			b, err := store.Resume(ctx, ks.Stream(ch), first, 10)
			if err != nil {
				t.Fatal(err)
			}
			got, recovered := b.Entries, b.Continuous
			if !recovered || len(got) != 2 || got[0].ID != ids[off+2] || got[1].ID != ids[off+4] {
				t.Fatalf("%s: resume after %s = %d entries, recovered %v; want ids %s %s", ch, first, len(got), recovered, ids[off+2], ids[off+4])
			}
			last, err := store.LastID(ctx, ks.Stream(ch))
			if err != nil || last.String() != ids[off+4] {
				t.Fatalf("%s: LastID = %v, %v", ch, last, err)
			}
			// From the end, with the stream gone and its last id kept:
			// the transaction that reads both runs on the channel's slot.
			if err := rdb.Del(ctx, ks.Stream(ch)).Err(); err != nil {
				t.Fatal(err)
			}
			if b, err := store.Resume(ctx, ks.Stream(ch), last, 10); err != nil || !b.Continuous || len(b.Entries) != 0 || b.From != last {
				t.Fatalf("%s: resume from the last id of an expired stream = %+v, %v", ch, b, err)
			}
		}
	})

	// Clear runs on each channel's master (its two keys share the slot),
	// and writes a missing last-id key there.
	t.Run("clear", func(t *testing.T) {
		ks := keys.Scheme{Prefix: redistest.Prefix(t)}
		t.Cleanup(func() { redistest.Cleanup(rdb, ks.Prefix) })
		store := stream.NewStore(rdb)
		ctx := context.Background()
		for i := range 9 { // over every master, most likely (checked above for 100)
			ch := fmt.Sprintf("clr-%d", i)
			key := ks.Stream(ch)
			a := stream.Append{
				Stream: key, Notify: ks.Notify(ch),
				Msg:    stream.Message{Channel: ch, TS: time.Now().UnixMilli(), Data: json.RawMessage(`{}`)},
				Limits: stream.Limits{MaxLen: 100, TTLMS: 60000},
			}
			ids, err := store.Append(ctx, []stream.Append{a, a})
			if err != nil {
				t.Fatal(err)
			}
			if i%2 == 0 {
				if err := rdb.Del(ctx, keys.Last(key)).Err(); err != nil {
					t.Fatal(err)
				}
			}
			if n, err := store.Clear(ctx, key); err != nil || n != 2 {
				t.Fatalf("%s: Clear = %d, %v", ch, n, err)
			}
			if last, err := store.LastID(ctx, key); err != nil || last.String() != ids[1] {
				t.Fatalf("%s: LastID after Clear = %v, %v; want %s", ch, last, err, ids[1])
			}
		}
	})

	t.Run("channels spread across masters", func(t *testing.T) {
		ks := keys.Scheme{Prefix: redistest.Prefix(t)}
		t.Cleanup(func() { redistest.Cleanup(rdb, ks.Prefix) })
		store := stream.NewStore(rdb)
		ctx := context.Background()
		const channels = 100
		var as []stream.Append
		for i := range channels {
			ch := fmt.Sprintf("chan-%d", i)
			as = append(as, stream.Append{
				Stream: ks.Stream(ch), Notify: ks.Notify(ch),
				Msg:    stream.Message{Channel: ch, Event: "e", TS: time.Now().UnixMilli(), Data: json.RawMessage(`{}`)},
				Limits: stream.Limits{MaxLen: 10, TTLMS: 60000},
			})
		}
		if _, err := store.Append(ctx, as); err != nil {
			t.Fatal(err)
		}
		var mu sync.Mutex
		spread := map[string]int{}
		err := rdb.ForEachMaster(ctx, func(ctx context.Context, n *redis.Client) error {
			keys, err := n.Keys(ctx, ks.Prefix+":*}:s").Result()
			if err != nil {
				return err
			}
			mu.Lock() // ForEachMaster runs concurrently
			spread[n.Options().Addr] = len(keys)
			mu.Unlock()
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("stream keys per master: %v", spread)
		total := 0
		for addr, n := range spread {
			if n == 0 {
				t.Errorf("master %s holds no channel", addr)
			}
			total += n
		}
		if len(spread) != 3 || total != channels {
			t.Fatalf("%d masters hold %d streams, want 3 and %d", len(spread), total, channels)
		}
	})
}

// TestClusterWaitAfterSlotMoved: with WaitForReplicas, appends run on the
// master the client's slot map names, outside go-redis's own routing. Right
// after a channel's slot moved to another master, that master is stale and
// answers MOVED: the append is run again on the master named, instead of
// failing until something else reloads the map.
func TestClusterWaitAfterSlotMoved(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a Redis Cluster")
	}
	c := redistest.StartCluster(t, 3, 1)
	rdb := c.Client(t)
	ctx := context.Background()
	ks := keys.Scheme{Prefix: redistest.Prefix(t)}
	store := stream.NewStore(rdb)
	store.WaitForReplicas(1, 2*time.Second)
	app := func() error {
		_, err := store.Append(ctx, []stream.Append{{Stream: ks.Stream("mv"), Notify: ks.Notify("mv"),
			Msg: stream.Message{Channel: "mv", TS: 1, Data: []byte(`1`)}, Limits: stream.Limits{MaxLen: 100, TTLMS: 60000}}})
		return err
	}
	// Once the replicas are in sync, appends are acknowledged.
	deadline := time.Now().Add(20 * time.Second)
	for err := app(); err != nil; err = app() {
		if time.Now().After(deadline) {
			t.Fatalf("append before the move: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}

	before, err := rdb.XLen(ctx, ks.Stream("mv")).Result() // appends not acknowledged in time were written too
	if err != nil {
		t.Fatal(err)
	}

	// Move the channel's slot to another master, as redis-cli --cluster
	// reshard does.
	slot := int(rdb.ClusterKeySlot(ctx, ks.Stream("mv")).Val())
	srcNode, err := rdb.MasterForKey(ctx, ks.Stream("mv"))
	if err != nil {
		t.Fatal(err)
	}
	src := srcNode.Options().Addr
	var mu sync.Mutex
	var dst string
	_ = rdb.ForEachMaster(ctx, func(ctx context.Context, m *redis.Client) error { // concurrently
		mu.Lock()
		defer mu.Unlock()
		if a := m.Options().Addr; a != src {
			dst = a // any other master
		}
		return nil
	})
	d := c.MoveSlot(t, slot, src, dst).Dst

	if err := app(); err != nil {
		t.Fatalf("append right after the slot moved: %v", err)
	}
	n, err := d.XLen(ctx, ks.Stream("mv")).Result()
	if err != nil || n != before+1 {
		t.Fatalf("the stream on its new master holds %d entries (%v), want %d", n, err, before+1)
	}
}

// TestClusterAppendAfterFailover: appends run on the masters' own clients,
// outside the cluster client's routing, which reloads its slot map only on
// its own errors or once a minute (go-redis's ClusterStateReloadInterval).
// Once a master is failed over, an append that found it gone has the map
// reloaded, so that the appends after it reach the promoted replica,
// instead of failing (503) until the periodic reload.
func TestClusterAppendAfterFailover(t *testing.T) {
	c := redistest.StartOwnedCluster(t, 3, 1, "the test cannot stop its nodes")
	rdb := c.Client(t) // its slot map is read by the first append below
	ctx := context.Background()
	ks := keys.Scheme{Prefix: redistest.Prefix(t)}
	t.Cleanup(func() { redistest.Cleanup(rdb, ks.Prefix) })
	store := stream.NewStore(rdb)
	app := func() error {
		_, err := store.Append(ctx, []stream.Append{{Stream: ks.Stream("fo"), Notify: ks.Notify("fo"),
			Msg: stream.Message{Channel: "fo", TS: 1, Data: []byte(`1`)}, Limits: stream.Limits{MaxLen: 100, TTLMS: 60000}}})
		return err
	}
	if err := app(); err != nil {
		t.Fatal(err)
	}
	m, err := rdb.MasterForKey(ctx, ks.Stream("fo"))
	if err != nil {
		t.Fatal(err)
	}
	addr := m.Options().Addr
	c.StopNode(t, c.Index(addr))
	c.WaitFailover(t, addr, 30*time.Second)

	// The first append after the failover may still be sent to the
	// stopped master; the ones after it must find the promoted replica,
	// long before the client's periodic reload (a minute after the map
	// was read) would have.
	deadline := time.Now().Add(20 * time.Second)
	failed := 0
	for err := app(); err != nil; err = app() {
		failed++
		if time.Now().After(deadline) {
			t.Fatalf("appends still fail %d attempts after %s was failed over: %v", failed, addr, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("%d appends failed after the failover", failed)
}

// TestClusterAppendWithoutSlotMap: a cluster client that cannot read the
// cluster's slot map (no node answers) cannot tell which master an append
// goes to: the append fails, and is never reported as written (with an
// empty id).
func TestClusterAppendWithoutSlotMap(t *testing.T) {
	t.Parallel()
	rdb := redistest.UnreachableCluster(t)
	ks := keys.Scheme{Prefix: redistest.Prefix(t)}
	store := stream.NewStore(rdb)
	ids, err := store.Append(t.Context(), []stream.Append{{Stream: ks.Stream("c"), Notify: ks.Notify("c"),
		Msg: stream.Message{Channel: "c", TS: 1, Data: []byte(`1`)}}})
	if err == nil {
		t.Fatalf("Append with no node reachable = %q, no error", ids)
	}
}
