// Package coalesce holds the leader handoff that stream.Batcher and
// registry.Batcher share: concurrent callers' requests are gathered into
// batches, each sent in one round trip, with no goroutine of the Queue's
// own.
//
// A caller that finds fewer than maxInFlight leaders becomes one: it
// takes a batch from the front of what is pending, sends it, and then
// hands its leadership to the oldest pending request, or gives it up when
// nothing is pending. The invariants, all under Queue.mu:
//
//   - leaders is the number of leaderships held: by a caller about to
//     send or sending, or handed to a pending request (its promoted count)
//     and not yet exercised. It is at most maxInFlight, and 0 once every
//     caller has returned.
//   - a leadership is never dropped: a request handed one exercises it
//     even if another leader has already sent it; a request withdrawn
//     with leaderships handed to it hands each on (or gives it up).
//   - a request is in pending until a batch takes it or its caller
//     withdraws it; once taken it is sent exactly once and then finished,
//     and its caller waits for that, whatever its ctx.
package coalesce

import (
	"context"
	"slices"
	"sync"
)

// Request is one caller's request: V holds its arguments and, once
// Queue.Do has returned nil, its results, which send wrote before the
// batch was marked finished under Queue.mu (so the caller reads them
// without a lock). A Request is in one Do at a time, and may be used
// again (pooled) once Do has returned: Do never replaces its wake
// channel, so a leader that signals it late, after its caller returned
// it, leaves a stale wake-up there, which is harmless, a wake-up being
// only a hint to look again at the state under Queue.mu.
type Request[V any] struct {
	V V

	wake chan struct{} // capacity 1: finished or promoted; never replaced

	// guarded by Queue.mu
	finished bool
	promoted int // leaderships handed to this request, not yet exercised
}

// Queue coalesces the Requests of concurrent callers into batches. It is
// safe for concurrent use; an idle Queue costs nothing and needs no Close.
type Queue[V any] struct {
	maxInFlight int
	take        func(pending []*Request[V]) int
	send        func(batch []*Request[V])

	mu      sync.Mutex
	pending []*Request[V]
	leaders int
	// free holds batches' arrays, emptied, for leaders to reuse (at most
	// maxInFlight, none longer than the longest batch): send is called
	// through a func value, so a batch's array escapes, and a fresh one
	// would be an allocation per batch.
	free [][]*Request[V]
}

// New returns a Queue that sends at most maxInFlight batches at once
// (below 1: 1). take, called with q.mu held (so it must not call q) and
// pending never empty, returns how many of the oldest pending requests
// the next batch carries (below 1: one; beyond len(pending): all); it
// must not keep pending. send sends a batch, without q.mu held, and
// writes each request's results into its V; it must not keep batch, and
// must return in bounded time (its callers' contexts cannot bound it).
func New[V any](maxInFlight int, take func(pending []*Request[V]) int, send func(batch []*Request[V])) *Queue[V] {
	return &Queue[V]{maxInFlight: max(1, maxInFlight), take: take, send: send}
}

// Do queues req and returns nil once a batch has carried it (its results
// are in req.V), leading batches itself when fewer than maxInFlight are
// led. When ctx ends while req is still pending, Do withdraws it and
// returns ctx's error: nothing of it was sent. Once a batch has taken
// req, Do waits for that batch whatever ctx does (send must bound it).
func (q *Queue[V]) Do(ctx context.Context, req *Request[V]) error {
	if req.wake == nil {
		req.wake = make(chan struct{}, 1)
	}
	req.finished, req.promoted = false, 0
	q.mu.Lock()
	q.pending = append(q.pending, req)
	lead := q.leaders < q.maxInFlight
	if lead {
		q.leaders++
	}
	q.mu.Unlock()
	done := ctx.Done()
	for {
		if lead {
			q.flush()
			lead = false
		}
		q.mu.Lock()
		fin, pro := req.finished, req.promoted > 0
		if pro {
			req.promoted--
		}
		q.mu.Unlock()
		if pro {
			// Leadership was handed to us: exercise it even if another
			// leader has already sent req, or it would be lost.
			lead = true
			continue
		}
		if fin {
			return nil
		}
		select {
		case <-req.wake:
		case <-done:
			q.mu.Lock()
			if i := slices.Index(q.pending, req); i >= 0 {
				// No batch has taken it: withdraw, handing on any
				// leadership it was given.
				q.pending = slices.Delete(q.pending, i, i+1)
				for ; req.promoted > 0; req.promoted-- {
					q.passLocked()
				}
				q.mu.Unlock()
				return ctx.Err()
			}
			q.mu.Unlock()
			done = nil // taken: wait for its batch
		}
	}
}

// flush sends one batch of pending requests, then passes leadership on
// (or gives it up when nothing is pending).
func (q *Queue[V]) flush() {
	q.mu.Lock()
	var batch []*Request[V]
	if len(q.pending) > 0 {
		n := min(max(1, q.take(q.pending)), len(q.pending))
		if k := len(q.free); k > 0 {
			batch, q.free = q.free[k-1], q.free[:k-1]
		}
		batch = append(batch, q.pending[:n]...)
		// Deleted in place (the rest moved down), so that pending keeps
		// its array: taking from its front left no room at its back, and
		// appends allocated a new one.
		q.pending = slices.Delete(q.pending, 0, n)
	}
	q.mu.Unlock()

	if len(batch) > 0 {
		q.send(batch)
		q.mu.Lock()
		for _, r := range batch {
			r.finished = true
		}
		q.mu.Unlock()
		for _, r := range batch {
			signal(r.wake)
		}
		clear(batch) // holds no request once done with
	}

	q.mu.Lock()
	if batch != nil {
		q.free = append(q.free, batch[:0])
	}
	q.passLocked()
	q.mu.Unlock()
}

// passLocked hands a leadership on to the oldest pending request, or gives
// it up when nothing is pending. q.mu is held.
func (q *Queue[V]) passLocked() {
	if len(q.pending) > 0 {
		next := q.pending[0]
		next.promoted++
		signal(next.wake)
	} else {
		q.leaders--
	}
}

// State returns the number of leaderships held and of requests pending,
// for tests: both 0 once every caller has returned.
func (q *Queue[V]) State() (leaders, pending int) {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.leaders, len(q.pending)
}

func signal(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}
