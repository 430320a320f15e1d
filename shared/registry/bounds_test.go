package registry

import (
	"slices"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// TestKeyTTLs: a Put's record and sets, and a JoinChannel's set, live
// REGISTRY_TTL (docs/api.md: a dead instance's records disappear within
// it), and their members are scored when they expire, a TTL from now.
func TestKeyTTLs(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	const ttl = time.Minute
	r, ks := newRegistry(t, ttl)
	rec := &Record{ID: "c1", User: "u", Instance: "i", Channels: []string{"a"}}
	if err := r.Put(ctx, rec); err != nil {
		t.Fatal(err)
	}
	rec.Channels = append(rec.Channels, "j")
	if err := r.JoinChannel(ctx, rec, "j"); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{ks.Conn("c1"), ks.UserConns("u"), ks.ChannelConns("a"), ks.ChannelConns("j")} {
		if d := r.rdb.PTTL(ctx, k).Val(); d <= ttl-10*time.Second || d > ttl {
			t.Errorf("%s lives %v, want about %v", k, d, ttl)
		}
	}
	want := time.Now().Add(ttl)
	for _, k := range []string{ks.UserConns("u"), ks.ChannelConns("a"), ks.ChannelConns("j")} {
		score, err := r.rdb.ZScore(ctx, k, "c1").Result()
		if got := time.UnixMilli(int64(score)); err != nil || got.Before(want.Add(-10*time.Second)) || got.After(want) {
			t.Errorf("c1 in %s scored %v (%v), want about %v", k, got, err, want)
		}
	}
}

// TestMembersCutoffEdge: a member exactly a TTL past its score is past:
// not listed, and dropped from the set; one a millisecond short of that
// is listed and kept. The read and the cleanup agree on the edge.
func TestMembersCutoffEdge(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	const ttl = time.Minute
	r, ks := newRegistry(t, ttl)
	now := time.UnixMilli(time.Now().UnixMilli())
	r.now = func() time.Time { return now }
	for _, id := range []string{"edge", "inside"} {
		if err := r.Put(ctx, &Record{ID: id, User: "u", Instance: "i", Channels: []string{"a"}}); err != nil {
			t.Fatal(err)
		}
	}
	edge := float64(now.Add(-ttl).UnixMilli())
	r.rdb.ZAdd(ctx, ks.ChannelConns("a"), redis.Z{Score: edge, Member: "edge"}, redis.Z{Score: edge + 1, Member: "inside"})
	if recs, err := r.Channel(ctx, "a", 10); err != nil || !slices.Equal(ids(recs), []string{"inside"}) {
		t.Fatalf("Channel = %v, %v; want [inside]", ids(recs), err)
	}
	if got := r.rdb.ZRange(ctx, ks.ChannelConns("a"), 0, -1).Val(); !slices.Equal(got, []string{"inside"}) {
		t.Fatalf("set = %v, want [inside] (edge removed)", got)
	}
}
