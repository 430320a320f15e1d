package registry

import (
	"errors"
	"fmt"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

func TestMain(m *testing.M) { redistest.Main(m) }

func newRegistry(t *testing.T, ttl time.Duration) (*Registry, keys.Scheme) {
	t.Helper()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	return New(rdb, ks, ttl), ks
}

func ids(recs []*Record) []string {
	out := make([]string, 0, len(recs))
	for _, r := range recs {
		out = append(out, r.ID)
	}
	slices.Sort(out)
	return out
}

func TestPutGetRemove(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	r, ks := newRegistry(t, time.Minute)
	if r.TTL() != time.Minute {
		t.Fatalf("TTL = %v", r.TTL())
	}
	rec := &Record{ID: "c1", User: "alice", Instance: "i1", Channels: []string{"a", "b"}, ConnectedAt: time.UnixMilli(1700000000000).UTC()}
	if err := r.Put(ctx, rec); err != nil {
		t.Fatal(err)
	}
	got, err := r.Get(ctx, "c1")
	if err != nil {
		t.Fatal(err)
	}
	if got.ID != "c1" || got.User != "alice" || got.Instance != "i1" || !slices.Equal(got.Channels, []string{"a", "b"}) || !got.ConnectedAt.Equal(rec.ConnectedAt) {
		t.Fatalf("Get = %+v", got)
	}
	for _, tc := range []struct {
		name string
		got  func() ([]*Record, error)
		want []string
	}{
		{"channel a", func() ([]*Record, error) { return r.Channel(ctx, "a", 10) }, []string{"c1"}},
		{"channel b", func() ([]*Record, error) { return r.Channel(ctx, "b", 10) }, []string{"c1"}},
		{"channel c", func() ([]*Record, error) { return r.Channel(ctx, "c", 10) }, []string{}},
		{"user alice", func() ([]*Record, error) { return r.User(ctx, "alice", 10) }, []string{"c1"}},
		{"user bob", func() ([]*Record, error) { return r.User(ctx, "bob", 10) }, []string{}},
	} {
		recs, err := tc.got()
		if err != nil || !slices.Equal(ids(recs), tc.want) {
			t.Errorf("%s: %v, %v; want %v", tc.name, ids(recs), err, tc.want)
		}
	}

	if err := r.Remove(ctx, rec); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Get(ctx, "c1"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get after Remove: %v", err)
	}
	if recs, _ := r.Channel(ctx, "a", 10); len(recs) != 0 {
		t.Fatalf("channel a after Remove: %v", ids(recs))
	}
	if recs, _ := r.User(ctx, "alice", 10); len(recs) != 0 {
		t.Fatalf("user after Remove: %v", ids(recs))
	}
	// The memberships go with the record, not left for readers to skip.
	for _, k := range []string{ks.UserConns("alice"), ks.ChannelConns("a"), ks.ChannelConns("b")} {
		if err := r.rdb.ZScore(ctx, k, "c1").Err(); !errors.Is(err, redis.Nil) {
			t.Errorf("c1 in %s after Remove: %v", k, err)
		}
	}
}

func TestGetMissing(t *testing.T) {
	t.Parallel()
	r, _ := newRegistry(t, time.Minute)
	if _, err := r.Get(t.Context(), "nope"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get = %v", err)
	}
}

func TestLeaveChannel(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	r, ks := newRegistry(t, time.Minute)
	rec := &Record{ID: "c1", User: "u", Instance: "i", Channels: []string{"a", "b"}}
	if err := r.Put(ctx, rec); err != nil {
		t.Fatal(err)
	}
	rec.Channels = []string{"b"}
	if err := r.LeaveChannel(ctx, rec, "a"); err != nil {
		t.Fatal(err)
	}
	if recs, _ := r.Channel(ctx, "a", 10); len(recs) != 0 {
		t.Fatalf("channel a after leave: %v", ids(recs))
	}
	if err := r.rdb.ZScore(ctx, ks.ChannelConns("a"), "c1").Err(); !errors.Is(err, redis.Nil) {
		t.Errorf("c1 still in channel a's set after leave: %v", err)
	}
	if recs, _ := r.Channel(ctx, "b", 10); !slices.Equal(ids(recs), []string{"c1"}) {
		t.Fatalf("channel b after leave: %v", ids(recs))
	}
	got, err := r.Get(ctx, "c1")
	if err != nil || !slices.Equal(got.Channels, []string{"b"}) {
		t.Fatalf("record after leave: %+v %v", got, err)
	}
}

// JoinChannel adds one membership, removes the set's dead members
// (pruneCmd) and rewrites the record, and writes nothing else: a
// connection subscribing to n channels costs O(n) commands.
func TestJoinChannel(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	rdb, prefix := redistest.Client(t)
	r := New(rdb, keys.Scheme{Prefix: prefix}, time.Minute)
	rec := &Record{ID: "c1", User: "u", Instance: "i"}
	if err := r.Put(ctx, rec); err != nil {
		t.Fatal(err)
	}
	var cmds atomic.Int64
	rdb.AddHook(redistest.Fail{Pipeline: func(cs []redis.Cmder) bool { cmds.Add(int64(len(cs))); return false }})
	for i := range 100 {
		ch := fmt.Sprintf("ch%d", i)
		rec.Channels = append(rec.Channels, ch)
		if err := r.JoinChannel(ctx, rec, ch); err != nil {
			t.Fatal(err)
		}
	}
	if n := cmds.Load(); n != 400 {
		t.Errorf("100 joins took %d commands, want 400 (SET, ZADD, PEXPIRE, ZREMRANGEBYSCORE each)", n)
	}
	for _, ch := range []string{"ch0", "ch99"} {
		if recs, _ := r.Channel(ctx, ch, 10); !slices.Equal(ids(recs), []string{"c1"}) {
			t.Errorf("channel %s after join: %v", ch, ids(recs))
		}
	}
	got, err := r.Get(ctx, "c1")
	if err != nil || len(got.Channels) != 100 {
		t.Fatalf("record after joins: %+v %v", got, err)
	}
	if recs, _ := r.User(ctx, "u", 10); !slices.Equal(ids(recs), []string{"c1"}) {
		t.Errorf("user after joins: %v", ids(recs))
	}
}

// Records and memberships expire TTL after their last refresh; Refresh
// keeps them alive.
func TestExpiryAndRefresh(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	// A TTL of 2 s against a refresh every 200 ms: a refresher held up
	// for less than 1.8 s (a loaded machine) keeps its record.
	const ttl = 2 * time.Second
	r, ks := newRegistry(t, ttl)
	kept := &Record{ID: "kept", User: "u", Instance: "i", Channels: []string{"a"}}
	gone := &Record{ID: "gone", User: "u", Instance: "i", Channels: []string{"a"}}
	if err := r.Refresh(ctx, []*Record{kept, gone}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	refreshDone := make(chan struct{})
	go func() {
		defer close(refreshDone)
		for time.Since(start) < 2*ttl+500*time.Millisecond {
			_ = r.Refresh(ctx, []*Record{kept})
			time.Sleep(200 * time.Millisecond)
		}
	}()
	testkit.Eventually(t, 3*ttl, func() error {
		if _, err := r.Get(ctx, "gone"); !errors.Is(err, ErrNotFound) {
			return fmt.Errorf("gone still registered: %v", err)
		}
		return nil
	})
	if d := time.Since(start); d < ttl*8/10 {
		t.Fatalf("record expired after %v, TTL %v", d, ttl)
	}
	// The expired member is ignored by readers even if still in the sets.
	for _, f := range []func() ([]*Record, error){
		func() ([]*Record, error) { return r.Channel(ctx, "a", 10) },
		func() ([]*Record, error) { return r.User(ctx, "u", 10) },
	} {
		recs, err := f()
		if err != nil || !slices.Equal(ids(recs), []string{"kept"}) {
			t.Fatalf("members = %v, %v; want [kept]", ids(recs), err)
		}
	}
	<-refreshDone
	if _, err := r.Get(ctx, "kept"); err != nil {
		t.Fatalf("refreshed record: %v", err)
	}
	// Without refreshes everything, sets included, disappears.
	testkit.Eventually(t, 5*ttl, func() error {
		for _, k := range []string{ks.Conn("kept"), ks.ChannelConns("a"), ks.UserConns("u")} {
			if n := r.rdb.Exists(ctx, k).Val(); n != 0 {
				return fmt.Errorf("%s still exists", k)
			}
		}
		return nil
	})
}

// A member whose record key is gone but whose set score is still live
// (the record expired between the two reads, or was deleted) is skipped;
// a member whose score is more than a TTL past is not returned even if
// its record lives, and is removed from the set; one whose score is past
// by less than that (its egress's clock is behind) is still listed.
func TestMembersIgnoreStale(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	r, ks := newRegistry(t, time.Minute)
	for _, id := range []string{"c1", "c2", "c3", "c4"} {
		if err := r.Put(ctx, &Record{ID: id, User: "u", Instance: "i", Channels: []string{"a"}}); err != nil {
			t.Fatal(err)
		}
	}
	r.rdb.Del(ctx, ks.Conn("c2"))
	r.rdb.ZAdd(ctx, ks.ChannelConns("a"), redis.Z{Score: float64(time.Now().Add(-time.Minute - time.Second).UnixMilli()), Member: "c3"})
	r.rdb.ZAdd(ctx, ks.ChannelConns("a"), redis.Z{Score: float64(time.Now().Add(-time.Second).UnixMilli()), Member: "c4"})
	recs, err := r.Channel(ctx, "a", 10)
	if err != nil || !slices.Equal(ids(recs), []string{"c1", "c4"}) {
		t.Fatalf("Channel = %v, %v; want [c1 c4]", ids(recs), err)
	}
	// The member a TTL past was cleaned out of the set, the others kept.
	if got := r.rdb.ZRange(ctx, ks.ChannelConns("a"), 0, -1).Val(); !slices.Equal(got, []string{"c4", "c1", "c2"}) {
		t.Fatalf("set = %v, want [c4 c1 c2] (c3 removed)", got)
	}
	// limit bounds the read.
	if recs, _ := r.User(ctx, "u", 1); len(recs) != 1 {
		t.Fatalf("User limit 1 = %v", ids(recs))
	}
}

// Refresh writes more records than one pipeline batch.
func TestRefreshMany(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	r, _ := newRegistry(t, time.Minute)
	recs := make([]*Record, 600)
	for i := range recs {
		recs[i] = &Record{ID: fmt.Sprintf("c%d", i), Instance: "i", Channels: []string{"big"}}
	}
	if err := r.Refresh(ctx, recs); err != nil {
		t.Fatal(err)
	}
	got, err := r.Channel(ctx, "big", 1000)
	if err != nil || len(got) != 600 {
		t.Fatalf("Channel = %d records, %v", len(got), err)
	}
}

// TestNoUserNoUserSet: a connection without a user (anonymous) is a
// member of no user's set: a send to the user "" reaches nobody.
func TestNoUserNoUserSet(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	r, ks := newRegistry(t, time.Minute)
	rec := &Record{ID: "anon", Instance: "i", Channels: []string{"room"}}
	if err := r.Put(ctx, rec); err != nil {
		t.Fatal(err)
	}
	if err := r.Refresh(ctx, []*Record{rec}); err != nil {
		t.Fatal(err)
	}
	if recs, err := r.User(ctx, "", 10); err != nil || len(recs) != 0 {
		t.Errorf(`User("") = %v, %v; want none`, ids(recs), err)
	}
	if n := r.rdb.Exists(ctx, ks.UserConns("")).Val(); n != 0 {
		t.Errorf("the set of user \"\" exists")
	}
	if recs, err := r.Channel(ctx, "room", 10); err != nil || len(recs) != 1 {
		t.Errorf("Channel(room) = %v, %v; want [anon]", ids(recs), err)
	}
}

// Check writes the instance's check key, which lives a second: checks
// repeated by an instance left without connections leave nothing behind.
func TestCheckKeyExpires(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	r, ks := newRegistry(t, time.Minute)
	if err := r.Check(ctx, "i1"); err != nil {
		t.Fatal(err)
	}
	if pttl := r.rdb.PTTL(ctx, ks.RegistryCheck("i1")).Val(); pttl <= 0 || pttl > time.Second {
		t.Errorf("check key PTTL %v, want at most 1s", pttl)
	}
}
