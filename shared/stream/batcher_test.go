package stream

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// TestBatcherConcurrent: many concurrent callers through a Batcher each
// get their own ids, every append lands once, and per-channel order is
// the order of each caller's own appends.
func TestBatcherConcurrent(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	b := NewBatcher(NewStore(rdb), 2*time.Second, 2, 64)
	const callers, each = 32, 50
	var wg sync.WaitGroup
	got := make([][]string, callers)
	errs := make(chan error, callers)
	for c := range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ch := fmt.Sprintf("c%d", c%4)
			for i := range each {
				msg := Message{Channel: ch, TS: 1, Data: []byte(fmt.Sprintf(`{"c":%d,"i":%d}`, c, i))}
				ids, err := b.Append(context.Background(), []Append{{Stream: ks.Stream(ch), Notify: ks.Notify(ch), Msg: msg}})
				if err != nil {
					errs <- err
					return
				}
				got[c] = append(got[c], ids[0])
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	total := int64(0)
	for c := range 4 {
		n, err := rdb.XLen(context.Background(), ks.Stream(fmt.Sprintf("c%d", c))).Result()
		if err != nil {
			t.Fatal(err)
		}
		total += n
	}
	if total != callers*each {
		t.Fatalf("%d entries in the streams, want %d", total, callers*each)
	}
	seen := map[string]bool{}
	for c, ids := range got {
		if len(ids) != each {
			t.Fatalf("caller %d got %d ids", c, len(ids))
		}
		for i, id := range ids {
			k := fmt.Sprintf("c%d/%s", c%4, id) // ids are unique per stream
			if seen[k] {
				t.Fatalf("id %s handed out twice", k)
			}
			seen[k] = true
			if i > 0 && !MustParseID(ids[i-1]).Less(MustParseID(id)) {
				t.Fatalf("caller %d: ids out of order: %s then %s", c, ids[i-1], id)
			}
		}
	}
	assertIdle(t, b)
}

// TestBatcherErrorsStayPerAppend: an append that fails does not fail the
// others sharing its pipeline.
func TestBatcherErrorsStayPerAppend(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	// A string where a stream should be: XADD fails for that key only.
	rdb.Set(context.Background(), ks.Stream("broken"), "x", time.Minute)
	// The pipeline carrying the append to "hold" is held once it has run;
	// every pipeline's appends to "broken" and "fine" are recorded.
	var mu sync.Mutex
	var carried [][]string
	hold := redistest.NewHold(func(cmds []redis.Cmder) bool {
		held := false
		var seen []string
		for _, c := range cmds {
			for _, a := range c.Args() {
				switch a {
				case ks.Stream("hold"):
					held = true
				case ks.Stream("broken"), ks.Stream("fine"):
					seen = append(seen, a.(string))
				}
			}
		}
		mu.Lock()
		carried = append(carried, seen)
		mu.Unlock()
		return held
	})
	t.Cleanup(hold.Release)
	rdb.AddHook(hold)
	b := NewBatcher(NewStore(rdb), 2*time.Second, 1, 64)
	appendTo := func(ch string) error {
		_, err := b.Append(context.Background(), []Append{{Stream: ks.Stream(ch), Notify: ks.Notify(ch), Msg: Message{Channel: ch, Data: []byte(`1`)}}})
		return err
	}
	var wg sync.WaitGroup
	results := make([]error, 3) // broken, fine, hold
	wg.Add(1)
	go func() {
		defer wg.Done()
		results[2] = appendTo("hold")
	}()
	// The one pipeline allowed in flight is held, so the next two appends
	// queue up behind it and go in the next pipeline together.
	awaitHold(t, hold)
	for i, ch := range []string{"broken", "fine"} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i] = appendTo(ch)
		}()
	}
	testkit.Eventually(t, 5*time.Second, func() error {
		if _, p := b.q.State(); p < 2 {
			return fmt.Errorf("%d appends pending, want 2", p)
		}
		return nil
	})
	hold.Release()
	wg.Wait()
	shared := false
	mu.Lock()
	for _, c := range carried {
		shared = shared || len(c) == 2
	}
	mu.Unlock()
	if !shared {
		t.Fatalf("the two appends did not share a pipeline: %v", carried)
	}
	if results[0] == nil || results[1] != nil || results[2] != nil {
		t.Fatalf("errors: broken %v, fine %v, hold %v", results[0], results[1], results[2])
	}
	assertIdle(t, b)
}

// TestBatcherCallerContext: a caller whose context ends while its appends
// wait behind other pipelines gets its context's error at once, instead
// of waiting its turn behind pipelines to a Redis that does not answer.
func TestBatcherCallerContext(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() { // accepts, reads, never answers
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { _, _ = io.Copy(io.Discard, c); c.Close() }()
		}
	}()
	rdb := redis.NewClient(&redis.Options{Addr: ln.Addr().String(), MaxRetries: -1, DialerRetries: 1,
		ReadTimeout: time.Second, WriteTimeout: time.Second, DisableIdentity: true, Protocol: 2})
	defer rdb.Close()
	b := NewBatcher(NewStore(rdb), time.Second, 1, 1)
	ap := []Append{{Stream: "{c:x}:s", Notify: "{c:x}:n", Msg: Message{Channel: "x", Data: []byte("1")}}}
	var wg sync.WaitGroup
	var finished atomic.Int32
	for range 3 { // three pipelines of a second each ahead of it
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := b.Append(context.Background(), ap); err == nil {
				t.Error("an append to a Redis that does not answer succeeded")
			}
			finished.Add(1)
		}()
	}
	// Until one of them leads a pipeline and the other two wait behind it:
	// after a fixed 20 ms, a loaded machine could still have them unstarted,
	// and the caller below led its own pipeline instead, the test passing
	// without anything ahead of it.
	testkit.Eventually(t, 5*time.Second, func() error {
		if l, p := b.q.State(); l != 1 || p != 2 {
			return fmt.Errorf("%d leaders and %d appends pending, want 1 and 2", l, p)
		}
		return nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, err = b.Append(ctx, ap)
	// Returned while the first pipeline ahead of it still waits for its
	// second-long timeout, not after its turn came.
	if n := finished.Load(); !errors.Is(err, context.DeadlineExceeded) || n > 0 {
		t.Fatalf("a caller with 50 ms left got %v after %d of the pipelines ahead of it ended", err, n)
	}
	wg.Wait()
	assertIdle(t, b)
}

// TestBatcherCancellations: callers giving up at random moments. Every
// caller returns, a caller told its context ended wrote nothing, one given
// ids wrote once, and leadership is neither lost nor leaked.
func TestBatcherCancellations(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	b := NewBatcher(NewStore(rdb), 2*time.Second, 2, 8)
	const callers, each = 16, 40
	var wg sync.WaitGroup
	var written atomic.Int64
	for c := range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				ctx, cancel := context.WithTimeout(context.Background(), time.Duration((c*each+i)%7)*100*time.Microsecond)
				_, err := b.Append(ctx, []Append{{Stream: ks.Stream("k"), Notify: ks.Notify("k"), Msg: Message{Channel: "k", Data: []byte("1")}}})
				cancel()
				switch {
				case err == nil:
					written.Add(1)
				case !errors.Is(err, context.DeadlineExceeded):
					t.Errorf("append: %v", err)
				}
			}
		}()
	}
	wg.Wait()
	if n := rdb.XLen(context.Background(), ks.Stream("k")).Val(); n != written.Load() {
		t.Fatalf("%d entries written, %d appends reported written", n, written.Load())
	}
	t.Logf("%d of %d appends written, the rest given up", written.Load(), callers*each)
	assertIdle(t, b)
}

// awaitHold waits, 10 s at most, until h holds its pipeline: a bare
// receive would hang until the test binary's timeout, with no word of
// what was waited for.
func awaitHold(t *testing.T, h *redistest.Hold) {
	t.Helper()
	select {
	case <-h.Hit():
	case <-time.After(10 * time.Second):
		t.Fatal("the held pipeline never reached Redis")
	}
}

// assertIdle fails unless b has no leader and nothing pending, as a
// Batcher must once its callers have returned.
func assertIdle(t *testing.T, b *Batcher) {
	t.Helper()
	if l, p := b.q.State(); l != 0 || p != 0 {
		t.Fatalf("idle batcher has %d leaders and %d pending", l, p)
	}
}

// TestBatcherRequestReuse: the Batcher's requests are pooled, so a request
// one caller returned is soon another's, while leaders may still signal
// it. Callers appending one or several messages at once, some giving up
// at random moments, each get the ids of their own messages: read back,
// every id holds what its caller appended at that position.
func TestBatcherRequestReuse(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	b := NewBatcher(NewStore(rdb), 2*time.Second, 2, 5)
	const callers, each = 16, 60
	type result struct {
		ids  []string
		data []string
	}
	results := make([][]result, callers)
	var wg sync.WaitGroup
	for c := range callers {
		wg.Go(func() {
			for i := range each {
				n := 1 + (c+i)%3 // one to three appends, to two streams
				var as []Append
				var data []string
				for j := range n {
					ch := fmt.Sprintf("r%d", (c+j)%2)
					d := fmt.Sprintf(`{"c":%d,"i":%d,"j":%d}`, c, i, j)
					data = append(data, d)
					as = append(as, Append{Stream: ks.Stream(ch), Notify: ks.Notify(ch), Msg: Message{Channel: ch, TS: 1, Data: []byte(d)}})
				}
				ctx, cancel := context.WithTimeout(context.Background(), time.Duration((c*each+i)%5)*150*time.Microsecond)
				if (c+i)%4 == 0 {
					cancel() // given up before it starts
				}
				ids, err := b.Append(ctx, as)
				cancel()
				switch {
				case err == nil:
					if len(ids) != n {
						t.Errorf("caller %d: %d ids for %d appends", c, len(ids), n)
						return
					}
					results[c] = append(results[c], result{ids, data})
				case !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, context.Canceled):
					t.Errorf("append: %v", err)
					return
				}
			}
		})
	}
	wg.Wait()
	written := 0
	for c := range callers {
		for _, r := range results[c] {
			for j, id := range r.ids {
				ch := fmt.Sprintf("r%d", (c+j)%2)
				msgs, err := rdb.XRange(context.Background(), ks.Stream(ch), id, id).Result()
				if err != nil || len(msgs) != 1 {
					t.Fatalf("caller %d: %s %s: %v %v", c, ch, id, msgs, err)
				}
				e := entriesOf(msgs)[0]
				d, err := e.Decode()
				if err != nil || string(d.Data) != r.data[j] {
					t.Fatalf("caller %d: %s %s holds %s, want %s (%v)", c, ch, id, d.Data, r.data[j], err)
				}
				written++
			}
		}
	}
	total := rdb.XLen(context.Background(), ks.Stream("r0")).Val() + rdb.XLen(context.Background(), ks.Stream("r1")).Val()
	if total != int64(written) {
		t.Fatalf("%d entries written, %d appends reported written", total, written)
	}
	t.Logf("%d appends written", written)
	assertIdle(t, b)
}

// TestBatcherMaxBatch: a pipeline carries at most maxBatch appends
// (NewBatcher), so that callers queued behind a busy Redis go out in
// pipelines of bounded size; except one caller's appends, which are
// never split, even when they alone are more: one pipeline is what keeps
// their order (Batcher). Callers queue up behind a held pipeline, seven
// of one append and then one of five, with maxBatch 3: 3, 3, 1, then 5.
func TestBatcherMaxBatch(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	appendOf := func(ch string) Append {
		return Append{Stream: ks.Stream(ch), Notify: ks.Notify(ch), Msg: Message{Channel: ch, Data: []byte(`1`)}}
	}
	// The script is loaded first, so that no append is refused NOSCRIPT
	// and sent again in a pipeline of its own.
	if _, err := NewStore(rdb).Append(t.Context(), []Append{appendOf("load")}); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var sizes []int // the appends of each pipeline after the held one
	hold := redistest.NewHold(func(cmds []redis.Cmder) bool {
		held, n := false, 0
		for _, c := range cmds {
			if c.Name() == "evalsha" || c.Name() == "eval" {
				n++
			}
			for _, a := range c.Args() {
				held = held || a == ks.Stream("hold")
			}
		}
		if !held {
			mu.Lock()
			sizes = append(sizes, n)
			mu.Unlock()
		}
		return held
	})
	t.Cleanup(hold.Release)
	rdb.AddHook(hold)
	b := NewBatcher(NewStore(rdb), 2*time.Second, 1, 3)
	var wg sync.WaitGroup
	errs := make(chan error, 9)
	appendAll := func(as []Append) {
		wg.Go(func() {
			if _, err := b.Append(context.Background(), as); err != nil {
				errs <- err
			}
		})
	}
	appendAll([]Append{appendOf("hold")})
	awaitHold(t, hold)
	pending := func(n int) {
		testkit.Eventually(t, 5*time.Second, func() error {
			if _, p := b.q.State(); p != n {
				return fmt.Errorf("%d callers pending, want %d", p, n)
			}
			return nil
		})
	}
	// One at a time, so that they queue in this order.
	for i := range 7 {
		appendAll([]Append{appendOf(fmt.Sprintf("one%d", i))})
		pending(i + 1)
	}
	appendAll([]Append{appendOf("five"), appendOf("five"), appendOf("five"), appendOf("five"), appendOf("five")})
	pending(8)
	hold.Release()
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if fmt.Sprint(sizes) != "[3 3 1 5]" {
		t.Fatalf("appends per pipeline: %v, want [3 3 1 5]", sizes)
	}
	assertIdle(t, b)
}

// TestBatcherZeroBounds: NewBatcher takes a zero maxInFlight or maxBatch
// as one (a config left at zero), not as "no pipeline may run", which
// would leave every caller waiting for a leader that never comes.
func TestBatcherZeroBounds(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	b := NewBatcher(NewStore(rdb), 5*time.Second, 0, 0)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	as := []Append{
		{Stream: ks.Stream("z"), Notify: ks.Notify("z"), Msg: Message{Channel: "z", Data: []byte(`1`)}},
		{Stream: ks.Stream("z"), Notify: ks.Notify("z"), Msg: Message{Channel: "z", Data: []byte(`2`)}},
	}
	if ids, err := b.Append(ctx, as); err != nil || len(ids) != 2 {
		t.Fatalf("Append through a Batcher with zero bounds = %v, %v", ids, err)
	}
}

// TestAppendCount: AppendCount counts the appends it wrote, not those
// that found their once-key set (written before: an Idempotency-Key
// retry whose first attempt's reply was not kept), and on error those
// Redis wrote all the same: one acknowledged by too few replicas
// (ErrNotReplicated), or one beside an append that failed. Every entry
// is so counted once (wsrelay_ingress_messages_appended_total).
func TestAppendCount(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := t.Context()
	b := NewBatcher(e.store, 2*time.Second, 2, 64)
	once := func(ch string, n int) Append {
		a := e.appendOf(ch, "1", Limits{TTLMS: 60000})
		a.Once, a.OnceTTLMS = e.keys.Once(a.Stream, "d", n), 60000
		return a
	}
	ids, n, err := b.AppendCount(ctx, []Append{once("a", 0), e.appendOf("a", "2", Limits{})})
	if err != nil || n != 2 {
		t.Fatalf("two appends = %v, %d, %v; want 2 appended", ids, n, err)
	}
	// Again: the first finds its once-key (the same id), the second,
	// without one, writes again.
	again, n, err := b.AppendCount(ctx, []Append{once("a", 0), e.appendOf("a", "2", Limits{})})
	if err != nil || n != 1 || again[0] != ids[0] || again[1] == ids[1] {
		t.Fatalf("the same again = %v, %d, %v; want %s found and 1 appended", again, n, err, ids[0])
	}
	if l := e.rdb.XLen(ctx, e.keys.Stream("a")).Val(); l != 3 {
		t.Fatalf("XLEN = %d, want 3", l)
	}
	// b's stream key holds a string: its append fails, c's is written
	// and counted; the retry counts b only.
	if err := e.rdb.Set(ctx, e.keys.Stream("b"), "x", 0).Err(); err != nil {
		t.Fatal(err)
	}
	if _, n, err = b.AppendCount(ctx, []Append{once("c", 0), once("b", 0)}); err == nil || n != 1 {
		t.Fatalf("an append beside one that fails = %d, %v; want an error, 1 appended", n, err)
	}
	e.rdb.Del(ctx, e.keys.Stream("b"))
	if _, n, err = b.AppendCount(ctx, []Append{once("c", 0), once("b", 0)}); err != nil || n != 1 {
		t.Fatalf("its retry = %d, %v; want 1 appended", n, err)
	}
	// Acknowledged by too few replicas: written, and counted; its retry
	// finds it.
	w := NewStore(e.rdb)
	w.WaitForReplicas(1, 50*time.Millisecond)
	wb := NewBatcher(w, 2*time.Second, 2, 64)
	for i, want := range []int{1, 0} {
		if _, n, err := wb.AppendCount(ctx, []Append{once("d", 0)}); n != want || err != nil && !errors.Is(err, ErrNotReplicated) {
			t.Fatalf("append %d waiting for a replica = %d, %v; want %d appended", i, n, err, want)
		}
	}
}
