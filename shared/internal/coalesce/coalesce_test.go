package coalesce

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// call is a test request: its caller's id in, the id sent back out.
type call struct {
	id, got int
}

// TestQueueHandoff: many callers, some giving up at random moments, with
// requests pooled across callers (so leaders signal requests already
// someone else's). Every caller returns; one told nil was sent exactly
// once and got its own result; one told its ctx ended was never sent; no
// more than maxInFlight batches were ever sent at once; and once all have
// returned no leadership is held and nothing is pending. A leadership
// lost (a withdrawn request's not handed on, a promoted one's not
// exercised) leaves callers waiting: the test fails at its deadline.
func TestQueueHandoff(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ maxInFlight, maxBatch int }{{1, 1}, {1, 4}, {2, 3}, {4, 64}} {
		t.Run(fmt.Sprintf("inflight=%d,batch=%d", tc.maxInFlight, tc.maxBatch), func(t *testing.T) {
			t.Parallel()
			const callers, each = 16, 400
			var (
				mu       sync.Mutex
				sent     = make(map[int]int) // id: times sent
				inFlight atomic.Int32
				over     atomic.Int32 // the most batches seen in flight at once
			)
			q := New(tc.maxInFlight,
				func(pending []*Request[call]) int { return rand.IntN(tc.maxBatch) + 1 },
				func(batch []*Request[call]) {
					n := inFlight.Add(1)
					for o := over.Load(); n > o && !over.CompareAndSwap(o, n); o = over.Load() {
					}
					if rand.IntN(4) == 0 {
						runtime.Gosched()
					}
					mu.Lock()
					for _, r := range batch {
						sent[r.V.id]++
						r.V.got = r.V.id
					}
					mu.Unlock()
					inFlight.Add(-1)
				})
			pool := sync.Pool{New: func() any { return new(Request[call]) }}
			var wg sync.WaitGroup
			var ok, withdrawn [callers]int
			for c := range callers {
				wg.Go(func() {
					for i := range each {
						id := c*each + i
						ctx, cancel := context.WithCancel(context.Background())
						switch rand.IntN(3) {
						case 0: // keeps its ctx
						case 1:
							cancel()
						default:
							time.AfterFunc(time.Duration(rand.IntN(50))*time.Microsecond, cancel)
						}
						req := pool.Get().(*Request[call])
						req.V = call{id: id}
						err := q.Do(ctx, req)
						got := req.V.got
						pool.Put(req)
						cancel()
						mu.Lock()
						n := sent[id]
						mu.Unlock()
						switch {
						case err == nil && (n != 1 || got != id):
							t.Errorf("request %d: nil after being sent %d times, result %d", id, n, got)
						case err != nil && (n != 0 || !errors.Is(err, context.Canceled)):
							t.Errorf("request %d: %v after being sent %d times", id, err, n)
						case err == nil:
							ok[c]++
						default:
							withdrawn[c]++
						}
					}
				})
			}
			done := make(chan struct{})
			go func() { wg.Wait(); close(done) }()
			select {
			case <-done:
			case <-time.After(20 * time.Second):
				l, p := q.State()
				t.Fatalf("callers still waiting after 20 s: %d leaders, %d pending", l, p)
			}
			if m := over.Load(); m > int32(tc.maxInFlight) {
				t.Errorf("%d batches in flight at once, maxInFlight %d", m, tc.maxInFlight)
			}
			if l, p := q.State(); l != 0 || p != 0 {
				t.Errorf("idle queue has %d leaders and %d pending", l, p)
			}
			var nok, nw int
			for c := range callers {
				nok, nw = nok+ok[c], nw+withdrawn[c]
			}
			t.Logf("%d sent, %d withdrawn", nok, nw)
			if nok == 0 || nw == 0 {
				t.Errorf("%d sent and %d withdrawn: the test did not exercise both", nok, nw)
			}
		})
	}
}
