package registry

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// TestChannelSkipsLeft: a connection whose record no longer lists the
// channel (its LeaveChannel wrote the record but the ZREM failed: on a
// cluster they are on different nodes) is not listed for it.
func TestChannelSkipsLeft(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	r, _ := newRegistry(t, time.Minute)
	rec := &Record{ID: "c1", User: "u", Instance: "i", Channels: []string{"a", "b"}}
	if err := r.Put(ctx, rec); err != nil {
		t.Fatal(err)
	}
	rec.Channels = []string{"b"}
	if _, err := r.rdb.Pipelined(ctx, func(p redis.Pipeliner) error { return r.writeRecord(ctx, p, rec) }); err != nil {
		t.Fatal(err)
	}
	if recs, err := r.Channel(ctx, "a", 10); err != nil || len(recs) != 0 {
		t.Errorf("channel a after leaving it: %v, %v", ids(recs), err)
	}
	if recs, err := r.Channel(ctx, "b", 10); err != nil || !slices.Equal(ids(recs), []string{"c1"}) {
		t.Errorf("channel b: %v, %v", ids(recs), err)
	}
}

// TestMembersLimit: exactly limit, limit+1 and limit-1 members; members
// skipped (no record) do not make the read miss live ones.
func TestMembersLimit(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	r, ks := newRegistry(t, time.Minute)
	for i := range 5 {
		if err := r.Put(ctx, &Record{ID: fmt.Sprintf("c%d", i), User: "u", Instance: "i", Channels: []string{"a"}}); err != nil {
			t.Fatal(err)
		}
	}
	for _, lim := range []int64{4, 5, 6} {
		if recs, err := r.Channel(ctx, "a", lim); err != nil || len(recs) != int(min(lim, 5)) {
			t.Errorf("limit %d: %v, %v", lim, ids(recs), err)
		}
	}
	// Two stale members (records gone, scores live) scored lowest.
	for _, id := range []string{"s1", "s2"} {
		r.rdb.ZAdd(ctx, ks.ChannelConns("a"), redis.Z{Score: float64(time.Now().Add(time.Second).UnixMilli()), Member: id})
		r.rdb.ZAdd(ctx, ks.UserConns("u"), redis.Z{Score: float64(time.Now().Add(time.Second).UnixMilli()), Member: id})
	}
	for _, lim := range []int64{1, 2, 5, 7} {
		if recs, err := r.Channel(ctx, "a", lim); err != nil || len(recs) != int(min(lim, 5)) {
			t.Errorf("with stale members, channel limit %d: %v, %v", lim, ids(recs), err)
		}
		if recs, err := r.User(ctx, "u", lim); err != nil || len(recs) != int(min(lim, 5)) {
			t.Errorf("with stale members, user limit %d: %v, %v", lim, ids(recs), err)
		}
	}
}

// TestClocksApart: the egress that writes a connection's scores and the
// ingress that reads them have clocks of their own. An egress clock
// behind and an ingress clock ahead, by most of a TTL between them, still
// list the connection and leave it in its sets. Before, a reader ahead by
// more than the time left on a score (20–30 s with the defaults) hid the
// connection from targeted sends and removed it from the sets until the
// next refresh.
func TestClocksApart(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	const ttl = 30 * time.Second
	writer, ks := newRegistry(t, ttl)
	writer.now = func() time.Time { return time.Now().Add(-20 * time.Second) }
	reader := New(writer.rdb, ks, ttl)
	reader.now = func() time.Time { return time.Now().Add(25 * time.Second) }

	if err := writer.Put(ctx, &Record{ID: "c1", User: "u", Instance: "i", Channels: []string{"a"}}); err != nil {
		t.Fatal(err)
	}
	for range 2 { // the second read after the first one's cleanup
		if recs, err := reader.Channel(ctx, "a", 10); err != nil || !slices.Equal(ids(recs), []string{"c1"}) {
			t.Fatalf("Channel = %v, %v; want [c1]", ids(recs), err)
		}
		if recs, err := reader.User(ctx, "u", 10); err != nil || !slices.Equal(ids(recs), []string{"c1"}) {
			t.Fatalf("User = %v, %v; want [c1]", ids(recs), err)
		}
	}
	for _, k := range []string{ks.ChannelConns("a"), ks.UserConns("u")} {
		if err := writer.rdb.ZScore(ctx, k, "c1").Err(); err != nil {
			t.Fatalf("c1 in %s: %v", k, err)
		}
	}
}

// TestMembersNewestFirst: with more dead members than the read's passes
// can skip (an instance that crashed with many connections on the
// channel), the live ones, refreshed since, are still found.
func TestMembersNewestFirst(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	r, ks := newRegistry(t, time.Minute)
	if err := r.Put(ctx, &Record{ID: "live", User: "u", Instance: "i", Channels: []string{"a"}}); err != nil {
		t.Fatal(err)
	}
	// Dead members: no record, scores from an earlier refresh.
	old := float64(time.Now().Add(30 * time.Second).UnixMilli())
	var dead []redis.Z
	for i := range 2 * minMemberScan {
		dead = append(dead, redis.Z{Score: old, Member: fmt.Sprintf("dead%d", i)})
	}
	r.rdb.ZAdd(ctx, ks.ChannelConns("a"), dead...)
	if recs, err := r.Channel(ctx, "a", 1); err != nil || !slices.Equal(ids(recs), []string{"live"}) {
		t.Fatalf("Channel limit 1 = %v, %v; want [live]", ids(recs), err)
	}
}

// TestMembersStaleAhead: members whose records are gone but whose scores
// are the newest (a Remove whose ZREM failed while its DEL was made: on a
// cluster they go to different nodes) do not make a small read come back
// short while live connections remain. Before, a read skipped at most
// 4 × limit of them: five ahead made a limit-1 read say [].
func TestMembersStaleAhead(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	r, ks := newRegistry(t, time.Minute)
	for _, id := range []string{"live1", "live2"} {
		if err := r.Put(ctx, &Record{ID: id, User: "u", Instance: "i", Channels: []string{"a"}}); err != nil {
			t.Fatal(err)
		}
	}
	// Refreshed after the live ones, then removed but for the ZREMs.
	newer := float64(time.Now().Add(time.Minute + time.Second).UnixMilli())
	for i := range 50 {
		id := fmt.Sprintf("stale%d", i)
		r.rdb.ZAdd(ctx, ks.ChannelConns("a"), redis.Z{Score: newer, Member: id})
		r.rdb.ZAdd(ctx, ks.UserConns("u"), redis.Z{Score: newer, Member: id})
	}
	for _, lim := range []int64{1, 2, 3} {
		want := []string{"live1", "live2"}[:min(lim, 2)]
		recs, err := r.User(ctx, "u", lim)
		if got := ids(recs); err != nil || len(got) != len(want) {
			t.Errorf("User limit %d = %v, %v; want %d of %v", lim, got, err, len(want), want)
		}
		recs, err = r.Channel(ctx, "a", lim)
		if got := ids(recs); err != nil || len(got) != len(want) {
			t.Errorf("Channel limit %d = %v, %v; want %d of %v", lim, got, err, len(want), want)
		}
	}
}
