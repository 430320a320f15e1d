package stream

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/wsrelay/wsrelay/shared/internal/coalesce"
)

// Batcher coalesces the appends of concurrent callers into shared
// pipelines: under load, one Redis round trip (two system calls on each
// side) carries many publishes instead of one. It starts no goroutine:
// a caller that finds fewer than MaxInFlight pipelines running becomes a
// leader, sends everything pending, and hands leadership to the oldest
// waiting caller if more arrived meanwhile (coalesce.Queue). An idle
// Batcher costs nothing and needs no Close.
//
// Each append still runs as its own script, so results and errors are per
// append; a pipeline's appends may interleave with others' in Redis, but
// one caller's appends keep their order (they are sent in one pipeline,
// and its first append to a stream it appends to again is sent with the
// script's source: loadFirstOfRepeated).
type Batcher struct {
	store    *Store
	timeout  time.Duration
	maxBatch int
	q        *coalesce.Queue[batchReq]
}

// batchReq is one Append call: its appends, and their results once
// sent.
type batchReq struct {
	as   []Append
	ids  []string
	errs []error
	made []bool // those that found their once-key set; nil: none has one
}

// reqPool recycles requests and their wake channels (two allocations per
// append); coalesce.Request says why a leader's late wake-up is harmless.
var reqPool = sync.Pool{New: func() any { return new(coalesce.Request[batchReq]) }}

// NewBatcher returns a Batcher over store. Each pipeline is bounded by
// timeout (the callers' contexts cannot bound a shared pipeline); at most
// maxInFlight pipelines run at once, each with at most maxBatch appends.
func NewBatcher(store *Store, timeout time.Duration, maxInFlight, maxBatch int) *Batcher {
	b := &Batcher{store: store, timeout: timeout, maxBatch: max(1, maxBatch)}
	b.q = coalesce.New(maxInFlight, b.take, b.send)
	return b
}

// Append appends as (in order, in one pipeline) and returns their ids, or
// the first error. Like Store.Append, on error some appends may have been
// written. A caller whose ctx ends while its appends still wait for a
// pipeline withdraws them and gets ctx's error (nothing was written);
// once a pipeline has taken them, it waits for that pipeline, which the
// Batcher's timeout bounds.
func (b *Batcher) Append(ctx context.Context, as []Append) ([]string, error) {
	ids, _, err := b.AppendCount(ctx, as)
	return ids, err
}

// AppendCount is Append that also returns how many of as it appended,
// on error too: those that Redis wrote (acknowledged by too few replicas,
// ErrNotReplicated, included), not those that failed or found their
// once-key set (Append.Once: made before, they wrote nothing). An
// append whose reply was lost is not counted, though Redis may have run
// it.
func (b *Batcher) AppendCount(ctx context.Context, as []Append) (ids []string, appended int, err error) {
	req := reqPool.Get().(*coalesce.Request[batchReq])
	req.V.as = as
	err = b.q.Do(ctx, req)
	ids, errs, made := req.V.ids, req.V.errs, req.V.made
	req.V = batchReq{}
	reqPool.Put(req)
	if err != nil {
		return nil, 0, err // withdrawn: nothing was sent
	}
	for i, e := range errs {
		if e != nil && err == nil {
			err = e
		}
		if (e == nil || errors.Is(e, ErrNotReplicated)) && (made == nil || !made[i]) {
			appended++
		}
	}
	if err != nil {
		return nil, appended, err
	}
	return ids, appended, nil
}

// take returns how many of the oldest pending requests the next pipeline
// carries: as many as fit in maxBatch appends, and at least one.
func (b *Batcher) take(pending []*coalesce.Request[batchReq]) int {
	k, n := 0, 0
	for k < len(pending) && (n == 0 || n+len(pending[k].V.as) <= b.maxBatch) {
		n += len(pending[k].V.as)
		k++
	}
	return k
}

// send sends batch's appends in one pipeline and gives each request its
// appends' results.
func (b *Batcher) send(batch []*coalesce.Request[batchReq]) {
	all := batch[0].V.as // one request's appends need no copy
	if len(batch) > 1 {
		n := 0
		for _, r := range batch {
			n += len(r.V.as)
		}
		all = make([]Append, 0, n)
		for _, r := range batch {
			all = append(all, r.V.as...)
		}
	}
	var load []bool // each request's appends to one stream stay in order
	off := 0
	for _, r := range batch {
		load = loadFirstOfRepeated(load, all, off, off+len(r.V.as))
		off += len(r.V.as)
	}
	ctx, cancel := context.WithTimeout(context.Background(), b.timeout)
	ids, errs, made := b.store.appendLoading(ctx, all, load)
	cancel()
	off = 0
	for _, r := range batch {
		end := off + len(r.V.as)
		r.V.ids, r.V.errs = ids[off:end], errs[off:end]
		if made != nil {
			r.V.made = made[off:end]
		}
		off = end
	}
}
