package stream

import (
	"context"
	"slices"
	"sync"
	"time"
)

// Batcher coalesces the appends of concurrent callers into shared
// pipelines: under load, one Redis round trip (two system calls on each
// side) carries many publishes instead of one. It starts no goroutine:
// a caller that finds fewer than MaxInFlight pipelines running becomes a
// leader, sends everything pending, and hands leadership to the oldest
// waiting caller if more arrived meanwhile. An idle Batcher costs nothing
// and needs no Close.
//
// Each append still runs as its own script, so results and errors are per
// append; a pipeline's appends may interleave with others' in Redis, but
// one caller's appends keep their order (they are sent in one pipeline,
// and its first append to a stream it appends to again is sent with the
// script's source: loadFirstOfRepeated).
type Batcher struct {
	store       *Store
	timeout     time.Duration
	maxInFlight int
	maxBatch    int

	mu      sync.Mutex
	pending []*batchReq
	leaders int
}

type batchReq struct {
	as   []Append
	wake chan struct{} // capacity 1: finished or promoted; never replaced

	// guarded by Batcher.mu
	ids      []string
	errs     []error
	finished bool
	promoted int // leaderships handed to this request, not yet exercised
}

// reqPool recycles batchReqs and their wake channels (two allocations per
// append). A leader signals a finished request's channel after unlocking
// b.mu, possibly after its caller has returned it here: a recycled
// request can find a stale wake-up in its channel. That is harmless,
// since a wake-up is only a hint to look again at the state under b.mu.
var reqPool = sync.Pool{New: func() any { return &batchReq{wake: make(chan struct{}, 1)} }}

// recycle returns req, which no Batcher holds any more, to reqPool. Its
// wake is left as it is: a leader may still be reading the field.
func recycle(req *batchReq) {
	req.as, req.ids, req.errs = nil, nil, nil
	req.finished, req.promoted = false, 0
	reqPool.Put(req)
}

// NewBatcher returns a Batcher over store. Each pipeline is bounded by
// timeout (the callers' contexts cannot bound a shared pipeline); at most
// maxInFlight pipelines run at once, each with at most maxBatch appends.
func NewBatcher(store *Store, timeout time.Duration, maxInFlight, maxBatch int) *Batcher {
	return &Batcher{store: store, timeout: timeout, maxInFlight: max(1, maxInFlight), maxBatch: max(1, maxBatch)}
}

// Append appends as (in order, in one pipeline) and returns their ids, or
// the first error. Like Store.Append, on error some appends may have been
// written. A caller whose ctx ends while its appends still wait for a
// pipeline withdraws them and gets ctx's error (nothing was written);
// once a pipeline has taken them, it waits for that pipeline, which the
// Batcher's timeout bounds.
func (b *Batcher) Append(ctx context.Context, as []Append) ([]string, error) {
	req := reqPool.Get().(*batchReq)
	req.as = as
	b.mu.Lock()
	b.pending = append(b.pending, req)
	lead := b.leaders < b.maxInFlight
	if lead {
		b.leaders++
	}
	b.mu.Unlock()
	done := ctx.Done()
	for {
		if lead {
			b.flush()
			lead = false
		}
		b.mu.Lock()
		fin, pro := req.finished, req.promoted > 0
		if pro {
			req.promoted--
		}
		b.mu.Unlock()
		if pro {
			// Leadership was handed to us: exercise it even if another
			// leader has already sent our appends, or it would be lost.
			lead = true
			continue
		}
		if fin {
			break
		}
		select {
		case <-req.wake:
		case <-done:
			b.mu.Lock()
			if i := slices.Index(b.pending, req); i >= 0 {
				// No pipeline has taken it: withdraw, handing on any
				// leadership it was given.
				b.pending = slices.Delete(b.pending, i, i+1)
				for ; req.promoted > 0; req.promoted-- {
					b.passLocked()
				}
				b.mu.Unlock()
				recycle(req)
				return nil, ctx.Err()
			}
			b.mu.Unlock()
			done = nil // taken: wait for its pipeline
		}
	}
	ids, errs := req.ids, req.errs
	recycle(req)
	for _, err := range errs {
		if err != nil {
			return nil, err
		}
	}
	return ids, nil
}

// flush sends one pipeline of pending requests, then passes leadership on
// (or gives it up when nothing is pending).
func (b *Batcher) flush() {
	b.mu.Lock()
	var batch []*batchReq
	n := 0
	for len(batch) < len(b.pending) && (n == 0 || n+len(b.pending[len(batch)].as) <= b.maxBatch) {
		r := b.pending[len(batch)]
		batch = append(batch, r)
		n += len(r.as)
	}
	// Deleted in place (the rest moved down), so that pending keeps its
	// array: taking from its front left no room at its back, and appends
	// allocated a new one.
	b.pending = slices.Delete(b.pending, 0, len(batch))
	b.mu.Unlock()

	if len(batch) > 0 {
		all := batch[0].as // one request's appends need no copy
		if len(batch) > 1 {
			all = make([]Append, 0, n)
			for _, r := range batch {
				all = append(all, r.as...)
			}
		}
		var load []bool // each request's appends to one stream stay in order
		off := 0
		for _, r := range batch {
			load = loadFirstOfRepeated(load, all, off, off+len(r.as))
			off += len(r.as)
		}
		ctx, cancel := context.WithTimeout(context.Background(), b.timeout)
		ids, errs := b.store.appendLoading(ctx, all, load)
		cancel()
		b.mu.Lock()
		off = 0
		for _, r := range batch {
			r.ids, r.errs = ids[off:off+len(r.as)], errs[off:off+len(r.as)]
			off += len(r.as)
			r.finished = true
		}
		b.mu.Unlock()
		for _, r := range batch {
			signal(r.wake)
		}
	}

	b.mu.Lock()
	b.passLocked()
	b.mu.Unlock()
}

// passLocked hands a leadership on to the oldest pending request, or gives
// it up when nothing is pending. b.mu is held.
func (b *Batcher) passLocked() {
	if len(b.pending) > 0 {
		next := b.pending[0]
		next.promoted++
		signal(next.wake)
	} else {
		b.leaders--
	}
}

func signal(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}
