package registry_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/registry"
)

// TestClusterRegistry writes, reads and removes records whose keys live
// on different slots of a real three-master Redis Cluster: every pipeline
// crosses nodes, and no command touches keys of two slots.
func TestClusterRegistry(t *testing.T) {
	reg, _, _ := clusterRegistry(t, 5*time.Second, nil)
	ctx := context.Background()

	var recs []*registry.Record
	for i := range 20 {
		recs = append(recs, &registry.Record{
			ID:          fmt.Sprintf("conn-%d", i),
			User:        fmt.Sprintf("user-%d", i%4),
			Instance:    "i1",
			Channels:    []string{fmt.Sprintf("room-%d", i%5), "lobby"},
			ConnectedAt: time.Now().UTC().Truncate(time.Millisecond),
		})
	}
	if err := reg.Refresh(ctx, recs); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		read func() ([]*registry.Record, error)
		want int
	}{
		{"lobby", func() ([]*registry.Record, error) { return reg.Channel(ctx, "lobby", 100) }, 20},
		{"room-3", func() ([]*registry.Record, error) { return reg.Channel(ctx, "room-3", 100) }, 4},
		{"user-1", func() ([]*registry.Record, error) { return reg.User(ctx, "user-1", 100) }, 5},
	} {
		got, err := tc.read()
		if err != nil || len(got) != tc.want {
			t.Fatalf("%s: %d records, %v; want %d", tc.name, len(got), err, tc.want)
		}
	}
	rec, err := reg.Get(ctx, "conn-7")
	if err != nil || rec.User != "user-3" || len(rec.Channels) != 2 {
		t.Fatalf("Get conn-7 = %+v, %v", rec, err)
	}
	for _, r := range recs[:10] {
		if err := reg.Remove(ctx, r); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := reg.Get(ctx, "conn-3"); !errors.Is(err, registry.ErrNotFound) {
		t.Fatalf("Get removed conn-3: %v, want ErrNotFound", err)
	}
	got, err := reg.Channel(ctx, "lobby", 100)
	if err != nil || len(got) != 10 {
		t.Fatalf("lobby after removing 10: %d records, %v", len(got), err)
	}
}

// TestClusterFailedRemoves: on a cluster a Remove's DEL of the record and
// its ZREM from the user's set go to different nodes, and the ZREM can
// fail alone (its node unreachable for a moment), leaving a member whose
// record is gone and whose score is as new as a live connection's. A
// user's list read with a small limit still finds the live connection
// behind a few of them. Before, five such members made a limit=1 read
// answer [] while the user had a live connection.
func TestClusterFailedRemoves(t *testing.T) {
	var failZRem atomic.Bool
	reg, rdb, ks := clusterRegistry(t, 5*time.Second, redistest.Fail{Pipeline: func(cmds []redis.Cmder) bool {
		return failZRem.Load() && slices.ContainsFunc(cmds, func(c redis.Cmder) bool { return c.Name() == "zrem" })
	}})
	ctx := context.Background()

	node := func(key string) string {
		n, err := rdb.MasterForKey(ctx, key)
		if err != nil {
			t.Fatal(err)
		}
		return n.Options().Addr
	}
	if err := reg.Put(ctx, &registry.Record{ID: "a-live", User: "u", Instance: "i1"}); err != nil {
		t.Fatal(err)
	}
	// Connections whose records are on another node than the user's set
	// (so that their DELs are made), opened after the live one (so that
	// they sort ahead of it), and closed while the set's node fails.
	setNode := node(ks.UserConns("u"))
	var stale []*registry.Record
	for i := 0; len(stale) < 5; i++ {
		id := fmt.Sprintf("s-%d", i)
		if node(ks.Conn(id)) != setNode {
			stale = append(stale, &registry.Record{ID: id, User: "u", Instance: "i1"})
		}
	}
	if err := reg.Refresh(ctx, stale); err != nil {
		t.Fatal(err)
	}
	failZRem.Store(true)
	for _, r := range stale {
		if err := reg.Remove(ctx, r); !errors.Is(err, redistest.ErrFailed) {
			t.Fatalf("Remove %s: %v, want its ZREM failed", r.ID, err)
		}
		if _, err := reg.Get(ctx, r.ID); !errors.Is(err, registry.ErrNotFound) {
			t.Fatalf("Get %s after its failed Remove: %v, want its record gone", r.ID, err)
		}
	}
	failZRem.Store(false)
	if n := rdb.ZCard(ctx, ks.UserConns("u")).Val(); n != 6 {
		t.Fatalf("%d members in the user's set, want 6 (the live one and 5 left behind)", n)
	}
	for _, lim := range []int64{1, 2} {
		got, err := reg.User(ctx, "u", lim)
		if err != nil || len(got) != 1 || got[0].ID != "a-live" {
			t.Fatalf("User limit %d = %v, %v; want [a-live]", lim, got, err)
		}
	}
}

// oomReply is a reply of Redis (a redis.Error), as a master out of memory
// gives.
type oomReply struct{}

func (oomReply) Error() string { return "OOM command not allowed when used memory > 'maxmemory'" }
func (oomReply) RedisError()   {}

// TestClusterRefreshAfterReply: a master that answered a refresh's write
// with an error of its own (out of memory, say) answered: the refresh
// reports the error and goes on writing to it, unlike a master that could
// not be reached.
func TestClusterRefreshAfterReply(t *testing.T) {
	var refuse atomic.Bool
	reg, _, _ := clusterRegistry(t, time.Minute, replyHook{on: &refuse})
	ctx := context.Background()
	rec := &registry.Record{ID: "c1", User: "u", Instance: "i1"}
	if err := reg.Put(ctx, rec); err != nil { // every node dialled
		t.Fatal(err)
	}
	ref := reg.Refresher()
	refuse.Store(true)
	if err := ref.Write(ctx, []*registry.Record{rec}); err == nil {
		t.Fatal("Write while every master refuses: no error")
	}
	refuse.Store(false)
	if err := ref.Write(ctx, []*registry.Record{rec}); err != nil {
		t.Fatalf("Write once the masters accept again: %v", err)
	}
}

// replyHook answers every command of a pipeline with oomReply while on.
type replyHook struct{ on *atomic.Bool }

func (h replyHook) DialHook(next redis.DialHook) redis.DialHook          { return next }
func (h replyHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook { return next }
func (h replyHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		if !h.on.Load() {
			return next(ctx, cmds)
		}
		for _, c := range cmds {
			c.SetErr(oomReply{})
		}
		return oomReply{}
	}
}

// clusterRegistry starts a three-master Redis Cluster and returns a
// registry on it with ttl, its client and key scheme (the keys removed
// at the end); hook, when not nil, is added to the client of every node.
// It skips the test with -short.
func clusterRegistry(t *testing.T, ttl time.Duration, hook redis.Hook) (*registry.Registry, *redis.ClusterClient, keys.Scheme) {
	t.Helper()
	if testing.Short() {
		t.Skip("starts a Redis Cluster")
	}
	rdb := redistest.StartCluster(t, 3, 0).Client(t)
	if hook != nil {
		rdb.OnNewNode(func(n *redis.Client) { n.AddHook(hook) })
	}
	ks := keys.Scheme{Prefix: redistest.Prefix(t)}
	t.Cleanup(func() { redistest.Cleanup(rdb, ks.Prefix) })
	return registry.New(rdb, ks, ttl), rdb, ks
}

// TestClusterRefreshGoesOnPastFailedMaster: a refresh of more records than
// one batch holds, while one master cannot be reached, goes on with the
// later batches (GoOn on a cluster): the records whose keys are on the
// masters that answer are all written, not only those of the first batch,
// and the refresh still reports the failed master's writes.
func TestClusterRefreshGoesOnPastFailedMaster(t *testing.T) {
	var down atomic.Value // the address of the master that fails, once set
	down.Store("")
	var rdb *redis.ClusterClient
	master := func(key string) string {
		m, err := rdb.MasterForKey(context.Background(), key)
		if err != nil {
			return ""
		}
		return m.Options().Addr
	}
	reg, rdb, ks := clusterRegistry(t, time.Minute, redistest.Fail{Pipeline: func(cmds []redis.Cmder) bool {
		bad := down.Load().(string)
		return bad != "" && len(cmds) > 0 && len(cmds[0].Args()) > 1 && master(fmt.Sprint(cmds[0].Args()[1])) == bad
	}})
	ctx := context.Background()
	recs := make([]*registry.Record, 600) // three batches
	for i := range recs {
		recs[i] = &registry.Record{ID: fmt.Sprintf("c%d", i), Instance: "i1"}
	}
	bad := master(ks.Conn(recs[0].ID))            // a key of the first batch fails
	if err := reg.Put(ctx, recs[0]); err != nil { // every node dialled
		t.Fatal(err)
	}
	if err := rdb.Del(ctx, ks.Conn(recs[0].ID)).Err(); err != nil {
		t.Fatal(err)
	}
	down.Store(bad)
	ref := reg.Refresher()
	if !ref.GoOn() {
		t.Errorf("GoOn on a cluster")
	}
	if err := ref.Write(ctx, recs); !errors.Is(err, redistest.ErrFailed) {
		t.Fatalf("Write with master %s failing = %v, want ErrFailed", bad, err)
	}
	down.Store("")
	var missing []string
	written := 0
	for _, r := range recs {
		if master(ks.Conn(r.ID)) == bad {
			continue
		}
		if rdb.Exists(ctx, ks.Conn(r.ID)).Val() != 1 {
			missing = append(missing, r.ID)
		} else {
			written++
		}
	}
	if len(missing) > 0 {
		t.Errorf("%d records on the masters that answer not written (%d were), among them %v", len(missing), written, missing[:min(5, len(missing))])
	}
}

// TestClusterRefreshWithoutSlotMap: a refresh through a cluster client that
// cannot read the cluster's slot map (no node answers) cannot tell which
// master a key is on; its writes go to go-redis, which fails them, and the
// refresh says so instead of reporting records written.
func TestClusterRefreshWithoutSlotMap(t *testing.T) {
	t.Parallel()
	rdb := redistest.UnreachableCluster(t)
	reg := registry.New(rdb, keys.Scheme{Prefix: redistest.Prefix(t)}, time.Minute)
	rec := &registry.Record{ID: "c1", User: "u", Instance: "i1", Channels: []string{"room"}}
	if err := reg.Put(context.Background(), rec); err == nil {
		t.Fatal("Put with no node reachable: no error")
	}
}
