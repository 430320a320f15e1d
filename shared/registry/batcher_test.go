package registry

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// heldPipelines holds every pipeline of Puts until opened (a Gate), and
// counts the records (SETs) they carry.
type heldPipelines struct {
	*redistest.Gate
	set atomic.Int64
}

// held returns a Registry whose client holds its pipelines (h), and a
// Batcher over it.
func held(t *testing.T, maxInFlight int) (*Registry, *Batcher, *heldPipelines) {
	t.Helper()
	r, _ := newRegistry(t, time.Minute)
	h := &heldPipelines{}
	h.Gate = redistest.NewGate(func(cmds []redis.Cmder) bool {
		sets := int64(0)
		for _, c := range cmds {
			if c.Name() == "set" {
				sets++
			}
		}
		h.set.Add(sets)
		return sets > 0 // not a new connection's CLIENT SETINFO
	})
	r.rdb.AddHook(h.Gate)
	return r, NewBatcher(r, 5*time.Second, maxInFlight, 256), h
}

// waitQueued waits until every one of n Puts is either pending in b or in
// a pipeline h holds, with maxInFlight pipelines held.
func waitQueued(t *testing.T, b *Batcher, h *heldPipelines, n, maxInFlight int) {
	t.Helper()
	testkit.Eventually(t, 10*time.Second, func() error {
		_, p := b.q.State()
		if h.Running() != int64(maxInFlight) || int64(p)+h.set.Load() != int64(n) {
			return fmt.Errorf("%d pipelines held with %d records, %d pending; want %d in all", h.Running(), h.set.Load(), p, n)
		}
		return nil
	})
}

// TestBatcherSharesPipelines: concurrent Puts, while the Batcher's
// pipelines are held (Redis slow to answer, or the pool busy), queue for
// the few pipelines that follow instead of one each, and never run more
// than maxInFlight pipelines at once; each record is written whole.
func TestBatcherSharesPipelines(t *testing.T) {
	t.Parallel()
	const n, inFlight = 300, 2
	r, b, h := held(t, inFlight)
	ctx := t.Context()
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			errs[i] = b.Put(ctx, &Record{ID: fmt.Sprintf("c%d", i), User: fmt.Sprintf("u%d", i%7), Instance: "i1"})
		})
	}
	waitQueued(t, b, h, n, inFlight)
	h.Open()
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("Put c%d: %v", i, err)
		}
	}
	// The two held, then the 298 that waited: 256 and 42, by one leader
	// or two.
	if all, most := h.All(), h.Most(); all > 4 || most > inFlight {
		t.Errorf("%d Puts made %d pipelines, %d at once; want at most 4, %d at once", n, all, most, inFlight)
	}
	for i := range n {
		if _, err := r.Get(ctx, fmt.Sprintf("c%d", i)); err != nil {
			t.Fatalf("Get c%d: %v", i, err)
		}
	}
	if recs, err := r.User(ctx, "u3", 100); err != nil || len(recs) != (n+3)/7 {
		t.Fatalf("User u3: %d records, %v; want %d", len(recs), err, (n+3)/7)
	}
}

// TestBatcherWritesAsPut: a record put through a Batcher is written as
// Registry.Put writes it: the same keys, value, TTLs and scores.
func TestBatcherWritesAsPut(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	r, ks := newRegistry(t, time.Minute)
	at := time.UnixMilli(1700000000000)
	r.now = func() time.Time { return at }
	b := NewBatcher(r, 5*time.Second, 4, 256)
	rec := func(id string) *Record {
		return &Record{ID: id, User: "u-" + id, Instance: "i1", Channels: []string{"room-" + id}, ConnectedAt: at.UTC()}
	}
	if err := r.Put(ctx, rec("a")); err != nil {
		t.Fatal(err)
	}
	if err := b.Put(ctx, rec("b")); err != nil {
		t.Fatal(err)
	}
	for _, k := range []func(id string) string{ks.Conn, func(id string) string { return ks.UserConns("u-" + id) }, func(id string) string { return ks.ChannelConns("room-" + id) }} {
		ka, kb := k("a"), k("b")
		ta, tb := r.rdb.PTTL(ctx, ka).Val(), r.rdb.PTTL(ctx, kb).Val()
		if ta <= 55*time.Second || tb <= 55*time.Second || ta > time.Minute || tb > time.Minute {
			t.Errorf("TTLs %s %v, %s %v; want about a minute", ka, ta, kb, tb)
		}
	}
	for _, id := range []string{"a", "b"} {
		want, _ := json.Marshal(rec(id))
		if got := r.rdb.Get(ctx, ks.Conn(id)).Val(); got != string(want) {
			t.Errorf("record %s = %s, want %s", id, got, want)
		}
	}
	for _, k := range []string{ks.UserConns("u-b"), ks.ChannelConns("room-b")} {
		got := r.rdb.ZScore(ctx, k, "b").Val()
		if want := float64(at.Add(time.Minute).UnixMilli()); got != want {
			t.Errorf("score in %s = %v, want %v (as Put's)", k, got, want)
		}
	}
}

// TestBatcherFailedPipeline: a shared pipeline that fails fails every Put
// it carried, each with the error; a pipeline in which only some
// commands failed (on a cluster, a master down) fails only the Puts they
// belong to.
func TestBatcherFailedPipeline(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		fail func(cmds []redis.Cmder, ks keys.Scheme) error // after the pipeline ran
		bad  func(i int) bool                               // the Puts that must fail
	}{
		{"whole", func([]redis.Cmder, keys.Scheme) error { return redistest.ErrFailed }, func(int) bool { return true }},
		{"part", func(cmds []redis.Cmder, ks keys.Scheme) error {
			var err error
			for _, c := range cmds {
				if c.Name() == "zadd" && c.Args()[1] == ks.UserConns("u1") {
					c.SetErr(redistest.ErrFailed)
					err = redistest.ErrFailed
				}
			}
			return err
		}, func(i int) bool { return i%3 == 1 }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			const n = 30
			r, b, h := held(t, 1)
			var failOn atomic.Bool
			r.rdb.AddHook(afterPipeline(func(cmds []redis.Cmder, err error) error {
				if failOn.Load() {
					return tc.fail(cmds, r.keys)
				}
				return err
			}))
			ctx := t.Context()
			errs := make([]error, n)
			var wg sync.WaitGroup
			for i := range n {
				wg.Go(func() {
					errs[i] = b.Put(ctx, &Record{ID: fmt.Sprintf("c%d", i), User: fmt.Sprintf("u%d", i%3), Instance: "i1"})
				})
			}
			waitQueued(t, b, h, n, 1)
			failOn.Store(true)
			h.Open()
			wg.Wait()
			for i, err := range errs {
				if tc.bad(i) != errors.Is(err, redistest.ErrFailed) || errors.Is(err, ErrNotWritten) {
					t.Errorf("Put c%d (user u%d): %v", i, i%3, err)
				}
			}
			if all := h.All(); all > 2 {
				t.Errorf("%d pipelines, want 2 (the one held and the rest)", all)
			}
		})
	}
}

// afterPipeline is a go-redis hook that runs f on each pipeline once it
// ran: f returns the pipeline's error.
type afterPipeline func(cmds []redis.Cmder, err error) error

func (f afterPipeline) DialHook(next redis.DialHook) redis.DialHook          { return next }
func (f afterPipeline) ProcessHook(next redis.ProcessHook) redis.ProcessHook { return next }
func (f afterPipeline) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		return f(cmds, next(ctx, cmds))
	}
}

// TestBatcherWithdraw: a Put whose context ends while it waits for a
// pipeline returns its context's error and writes nothing, and the Puts
// queued behind it are still written.
func TestBatcherWithdraw(t *testing.T) {
	t.Parallel()
	r, b, h := held(t, 1)
	ctx := t.Context()
	var wg sync.WaitGroup
	errs := make([]error, 3)
	wg.Go(func() { errs[0] = b.Put(ctx, &Record{ID: "first", Instance: "i1"}) })
	waitQueued(t, b, h, 1, 1)
	cctx, cancel := context.WithCancel(ctx)
	wg.Go(func() { errs[1] = b.Put(cctx, &Record{ID: "gone", User: "ug", Instance: "i1"}) })
	wg.Go(func() { errs[2] = b.Put(ctx, &Record{ID: "last", Instance: "i1"}) })
	waitQueued(t, b, h, 3, 1)
	cancel()
	testkit.Eventually(t, 5*time.Second, func() error {
		if _, p := b.q.State(); p != 1 {
			return fmt.Errorf("%d pending, want 1 (the cancelled Put withdrawn)", p)
		}
		return nil
	})
	h.Open()
	wg.Wait()
	if errs[0] != nil || errs[2] != nil || !errors.Is(errs[1], context.Canceled) || !errors.Is(errs[1], ErrNotWritten) {
		t.Fatalf("Puts = %v, want nil, context.Canceled (ErrNotWritten), nil", errs)
	}
	for id, want := range map[string]int64{"first": 1, "gone": 0, "last": 1} {
		if got := r.rdb.Exists(ctx, r.keys.Conn(id)).Val(); got != want {
			t.Errorf("record %s exists %d, want %d", id, got, want)
		}
	}
	if n := r.rdb.Exists(ctx, r.keys.UserConns("ug")).Val(); n != 0 {
		t.Errorf("the withdrawn Put's user set written")
	}
}
