package registry

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redistest"
)

// TestPutOutOfMemoryWritesNothing: a Put refused by a Redis at its
// maxmemory, alone or batched, leaves no record and no membership.
func TestPutOutOfMemoryWritesNothing(t *testing.T) {
	srv := redistest.Start(t)
	rdb := redis.NewClient(srv.Options())
	t.Cleanup(func() { rdb.Close() })
	ctx := t.Context()
	r := New(rdb, keys.Scheme{Prefix: "p"}, time.Minute)
	// an existing user set and channel set
	if err := r.Put(ctx, &Record{ID: "old", User: "u", Instance: "i", Channels: []string{"a"}}); err != nil {
		t.Fatal(err)
	}
	free := redistest.OutOfMemory(t, rdb, "p")
	rec := &Record{ID: "new", User: "u", Instance: "i", Channels: []string{"a", "b"}}
	err := r.Put(ctx, rec)
	t.Logf("put under OOM: %v", err)
	if err == nil {
		t.Fatal("Put succeeded under OOM")
	}
	b := NewBatcher(r, time.Second, 4, 256)
	err = b.Put(ctx, &Record{ID: "new2", User: "u", Instance: "i", Channels: []string{"a", "b"}})
	t.Logf("batcher put under OOM: %v", err)
	free()
	for _, id := range []string{"new", "new2"} {
		if _, err := r.Get(ctx, id); !errors.Is(err, ErrNotFound) {
			t.Errorf("record %s written: %v", id, err)
		}
		for _, k := range []string{r.keys.UserConns("u"), r.keys.ChannelConns("a"), r.keys.ChannelConns("b")} {
			if _, err := rdb.ZScore(ctx, k, id).Result(); !errors.Is(err, redis.Nil) {
				t.Errorf("%s member of %s", id, k)
			}
		}
	}
}

// TestMembersMatchModel: on random sets (live members, members without a
// record, members whose record does not list the channel) a read returns
// the first limit live members, newest first, whenever they lie within
// its scan budget (docs/api.md, Registry reads).
func TestMembersMatchModel(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	r, ks := newRegistry(t, time.Minute)
	rng := rand.New(rand.NewPCG(1, 2))
	for iter := range 20 {
		ch := fmt.Sprint("m", iter)
		n := rng.IntN(3000)
		type m struct {
			id    string
			score float64
			live  bool
		}
		var all []m
		base := time.Now().Add(time.Minute).UnixMilli()
		p := r.rdb.Pipeline()
		for i := range n {
			id := fmt.Sprintf("x%d_%d", iter, i)
			sc := float64(base + int64(rng.IntN(20000)) - 10000)
			kind := rng.IntN(10)
			live := kind < 5
			all = append(all, m{id, sc, live})
			p.ZAdd(ctx, ks.ChannelConns(ch), redis.Z{Score: sc, Member: id})
			switch {
			case live:
				p.Set(ctx, ks.Conn(id), fmt.Sprintf(`{"id":%q,"instance":"i","channels":[%q]}`, id, ch), time.Minute)
			case kind < 7:
				p.Set(ctx, ks.Conn(id), fmt.Sprintf(`{"id":%q,"instance":"i","channels":[]}`, id), time.Minute)
			}
		}
		if _, err := p.Exec(ctx); err != nil && n > 0 {
			t.Fatal(err)
		}
		slices.SortFunc(all, func(a, b m) int {
			if a.score != b.score {
				if a.score > b.score {
					return -1
				}
				return 1
			}
			if a.id > b.id {
				return -1
			}
			return 1
		})
		for _, limit := range []int64{1, 2, 7, 100, 1000, 10000} {
			var want []string
			pos := 0
			for i, x := range all {
				if int64(len(want)) == limit {
					break
				}
				pos = i + 1
				if x.live {
					want = append(want, x.id)
				}
			}
			if int64(pos) > max(memberScan*limit, minMemberScan) {
				continue
			}
			got, err := r.Channel(ctx, ch, limit)
			if err != nil {
				t.Fatal(err)
			}
			var gotIDs []string
			for _, g := range got {
				gotIDs = append(gotIDs, g.ID)
			}
			if !slices.Equal(gotIDs, want) {
				t.Fatalf("iter %d n %d limit %d: got %d %v..., want %d", iter, n, limit, len(gotIDs), gotIDs[:min(5, len(gotIDs))], len(want))
			}
		}
	}
}
