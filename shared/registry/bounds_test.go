package registry

import (
	"errors"
	"fmt"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/redistest"
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

// countCmds counts, on r's client, the GETs of record reads and the
// member reads (ZREVRANGEBYSCORE) made from now on.
func countCmds(t *testing.T, r *Registry) (gets, ranges *atomic.Int64) {
	gets, ranges = new(atomic.Int64), new(atomic.Int64)
	r.rdb.(*redis.Client).AddHook(redistest.Fail{
		Cmd: func(c redis.Cmder) bool {
			if c.Name() == "zrevrangebyscore" {
				ranges.Add(1)
			}
			return false
		},
		Pipeline: func(cs []redis.Cmder) bool {
			for _, c := range cs {
				if c.Name() == "get" {
					gets.Add(1)
				}
			}
			return false
		},
	})
	return gets, ranges
}

// staleAhead adds n members to the channel a and user u sets without a
// record, scored newer than a Put's.
func staleAhead(t *testing.T, r *Registry, n int) {
	t.Helper()
	newer := float64(time.Now().Add(r.ttl + time.Minute).UnixMilli())
	var zs []redis.Z
	for i := range n {
		zs = append(zs, redis.Z{Score: newer, Member: fmt.Sprintf("stale%d", i)})
	}
	if err := r.rdb.ZAdd(t.Context(), r.keys.ChannelConns("a"), zs...).Err(); err != nil {
		t.Fatal(err)
	}
	if err := r.rdb.ZAdd(t.Context(), r.keys.UserConns("u"), zs...).Err(); err != nil {
		t.Fatal(err)
	}
}

// TestMembersScanFloor: a read skips up to 1,000 members whatever its
// limit (docs/api.md, Registry reads), in a few round trips, not one per
// skipped member.
func TestMembersScanFloor(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	r, _ := newRegistry(t, time.Minute)
	if err := r.Put(ctx, &Record{ID: "live", User: "u", Instance: "i", Channels: []string{"a"}}); err != nil {
		t.Fatal(err)
	}
	staleAhead(t, r, 990)
	_, ranges := countCmds(t, r)
	if recs, err := r.User(ctx, "u", 1); err != nil || !slices.Equal(ids(recs), []string{"live"}) {
		t.Fatalf("User limit 1 behind 990 skipped = %v, %v; want [live]", ids(recs), err)
	}
	if n := ranges.Load(); n > 12 {
		t.Errorf("read past 990 skipped members in %d round trips", n)
	}
}

// TestMembersScanMultiple: past 250, a read skips up to 4 × limit
// members: 300 live behind 850 skipped are all found.
func TestMembersScanMultiple(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	r, _ := newRegistry(t, time.Minute)
	recs := make([]*Record, 300)
	for i := range recs {
		recs[i] = &Record{ID: fmt.Sprintf("c%d", i), User: "u", Instance: "i", Channels: []string{"a"}}
	}
	if err := r.Refresh(ctx, recs); err != nil {
		t.Fatal(err)
	}
	staleAhead(t, r, 850)
	if got, err := r.Channel(ctx, "a", 300); err != nil || len(got) != 300 {
		t.Fatalf("Channel limit 300 behind 850 skipped: %d records, %v; want 300", len(got), err)
	}
}

// TestMembersScanBound: a set full of skipped members costs a read at
// most max(4 × limit, 1,000) record reads.
func TestMembersScanBound(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	r, _ := newRegistry(t, time.Minute)
	staleAhead(t, r, 3000)
	gets, _ := countCmds(t, r)
	for _, tc := range []struct{ limit, most int64 }{{1, 1000}, {300, 1200}, {600, 2400}} {
		gets.Store(0)
		if _, err := r.User(ctx, "u", tc.limit); err != nil {
			t.Fatal(err)
		}
		if n := gets.Load(); n > tc.most {
			t.Errorf("limit %d read %d records, want at most %d", tc.limit, n, tc.most)
		}
	}
}

// TestMembersNoDuplicates: a member refreshed between two reads of one
// list moves to the front, and the member read last moves back into the
// next read: it is listed once.
func TestMembersNoDuplicates(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	r, ks := newRegistry(t, time.Minute)
	for _, id := range []string{"l1", "l2"} {
		if err := r.Put(ctx, &Record{ID: id, User: "u", Instance: "i", Channels: []string{"a"}}); err != nil {
			t.Fatal(err)
		}
	}
	now := time.Now()
	key := ks.UserConns("u")
	r.rdb.ZAdd(ctx, key, redis.Z{Score: float64(now.Add(2 * time.Minute).UnixMilli()), Member: "stale"},
		redis.Z{Score: float64(now.Add(90 * time.Second).UnixMilli()), Member: "l1"})
	// Set now: stale, l1, l2. Before the second read, l2 is refreshed.
	var reads atomic.Int64
	r.rdb.(*redis.Client).AddHook(redistest.Fail{Cmd: func(c redis.Cmder) bool {
		if c.Name() == "zrevrangebyscore" && reads.Add(1) == 2 {
			r.rdb.ZAdd(ctx, key, redis.Z{Score: float64(now.Add(3 * time.Minute).UnixMilli()), Member: "l2"})
		}
		return false
	}})
	recs, err := r.User(ctx, "u", 2)
	if err != nil {
		t.Fatal(err)
	}
	if got := ids(recs); len(slices.Compact(slices.Clone(got))) != len(got) {
		t.Fatalf("User = %v: a connection listed twice", got)
	}
	if reads.Load() < 2 {
		t.Fatalf("one member read, want two (the case not made)")
	}
}

// TestRefreshFails: a Refresh whose writes fail says so, and on a single
// Redis stops at the first failed batch rather than wait for it again
// with each of the others.
func TestRefreshFails(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	r, _ := newRegistry(t, time.Minute)
	var pipelines atomic.Int64
	r.rdb.(*redis.Client).AddHook(redistest.Fail{Pipeline: func([]redis.Cmder) bool { pipelines.Add(1); return true }})
	recs := make([]*Record, 600)
	for i := range recs {
		recs[i] = &Record{ID: fmt.Sprintf("c%d", i), Instance: "i"}
	}
	f := r.Refresher()
	if err := f.Write(ctx, recs); !errors.Is(err, redistest.ErrFailed) {
		t.Fatalf("Write = %v, want ErrFailed", err)
	}
	if f.GoOn() {
		t.Errorf("GoOn on a single Redis")
	}
	if n := pipelines.Load(); n != 1 {
		t.Errorf("%d pipelines tried, want 1", n)
	}
}

// TestMembersNoneMissed: a list's set changing between two of its reads
// (a member refreshed to the front, a member already read removed) does
// not make it miss a connection live throughout: docs/api.md says a list
// holds all of them when fewer than limit are live. Before, each read
// went on at an offset into the set as it then was, and a member moved
// ahead of that offset, or one removed from before it, made the member
// that was next slip past the reads.
func TestMembersNoneMissed(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		live  []string // Put in this order: the last is the newest
		limit int64
		// change runs just before the second read of the set.
		change func(t *testing.T, r *Registry, key string)
		want   []string // at least these listed
	}{
		{"refreshed to the front", []string{"l2", "l1"}, 2, func(t *testing.T, r *Registry, key string) {
			r.rdb.ZAdd(t.Context(), key, redis.Z{Score: float64(time.Now().Add(3 * time.Minute).UnixMilli()), Member: "l2"})
		}, []string{"l1", "l2"}},
		{"read member removed", []string{"l2", "l1", "l0"}, 3, func(t *testing.T, r *Registry, key string) {
			if err := r.Remove(t.Context(), &Record{ID: "l0", User: "u", Instance: "i", Channels: []string{"a"}}); err != nil {
				t.Error(err)
			}
		}, []string{"l1", "l2"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ctx := t.Context()
			r, ks := newRegistry(t, time.Minute)
			key := ks.UserConns("u")
			now := time.Now()
			for i, id := range tc.live {
				if err := r.Put(ctx, &Record{ID: id, User: "u", Instance: "i", Channels: []string{"a"}}); err != nil {
					t.Fatal(err)
				}
				// Scores a second apart, in the order of tc.live.
				r.rdb.ZAdd(ctx, key, redis.Z{Score: float64(now.Add(time.Minute + time.Duration(i)*time.Second).UnixMilli()), Member: id})
			}
			// A stale member (no record) just behind the newest live one,
			// so that the first read skips it and a second one is made.
			newest := float64(now.Add(time.Minute + time.Duration(len(tc.live)-1)*time.Second).UnixMilli())
			r.rdb.ZAdd(ctx, key, redis.Z{Score: newest - 500, Member: "stale"})
			var reads atomic.Int64
			r.rdb.(*redis.Client).AddHook(redistest.Fail{Cmd: func(c redis.Cmder) bool {
				if c.Name() == "zrevrangebyscore" && reads.Add(1) == 2 {
					tc.change(t, r, key)
				}
				return false
			}})
			recs, err := r.User(ctx, "u", tc.limit)
			if err != nil {
				t.Fatal(err)
			}
			if reads.Load() < 2 {
				t.Fatalf("one read of the set, want two (the case not made)")
			}
			got := ids(recs)
			for _, id := range tc.want {
				if !slices.Contains(got, id) {
					t.Errorf("User = %v: live %s missed", got, id)
				}
			}
			if len(slices.Compact(slices.Clone(got))) != len(got) {
				t.Errorf("User = %v: a connection listed twice", got)
			}
		})
	}
}
