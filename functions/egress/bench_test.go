package main

import (
	"context"
	"log/slog"
	"strconv"
	"strings"
	"testing"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/stream"
)

// fanOutFixture is a hub with one channel and n subscribers whose queues
// are large enough never to overflow; no sockets, no Redis: it isolates
// the encode-once-and-enqueue path of deliver.
type fanOutFixture struct {
	h     *hub
	cs    *chanState
	conns []*conn
	frame []byte
}

func newFanOut(n int) *fanOutFixture {
	s := &Server{cfg: Config{SendQueue: 1 << 30}}
	f := &fanOutFixture{
		h:  &hub{inbox: &chanState{}, maxBuf: 1024},
		cs: &chanState{name: "bench", subs: make(map[*conn]stream.ID, n), resuming: map[*conn]*resumer{}},
		frame: []byte(`{"type":"message","channel":"bench","id":"1700000000000-0","ts":1700000000000,"data":{"p":"` +
			strings.Repeat("x", 90) + `"}}`),
	}
	for range n {
		// writing: as if a writer were running, so enqueue starts none
		// (there is no socket).
		c := &conn{s: s, writing: true, done: make(chan struct{}), queue: make([]*queued, 0, 64)}
		f.conns = append(f.conns, c)
		f.cs.subs[c] = stream.ID{}
	}
	return f
}

// deliver fans one message out, then empties the queues as a writer
// would (keeping their capacity), so that the next call starts equal.
func (f *fanOutFixture) deliver(seq uint64) {
	f.h.deliver(f.cs, stream.ID{MS: 1700000000000, Seq: seq}, "", wsFrame(opText, f.frame), 1700000000000, nil)
	for _, c := range f.conns {
		c.queue = c.queue[:0]
	}
}

// BenchmarkFanOut measures deliver to N local subscribers: one prepared
// frame, one queue append per subscriber.
func BenchmarkFanOut(b *testing.B) {
	for _, n := range []int{1, 100, 1000} {
		b.Run("subs="+strconv.Itoa(n), func(b *testing.B) {
			f := newFanOut(n)
			b.ReportAllocs()
			var seq uint64
			for b.Loop() {
				seq++
				f.deliver(seq)
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/delivery")
		})
	}
}

// TestFanOutAllocatesNothingPerSubscriber: the allocations of one
// delivery do not grow with the number of subscribers.
func TestFanOutAllocatesNothingPerSubscriber(t *testing.T) {
	var seq uint64
	allocs := func(n int) float64 {
		f := newFanOut(n)
		return testing.AllocsPerRun(200, func() { seq++; f.deliver(seq) })
	}
	one, many := allocs(1), allocs(1000)
	if many > one {
		t.Fatalf("deliver allocates %.1f objects for 1 subscriber and %.1f for 1000: something is allocated per subscriber", one, many)
	}
	t.Logf("allocations per delivered message: %.1f (1 subscriber), %.1f (1000 subscribers)", one, many)
}

// onMessageFixture is the live path of one notification to n local
// subscribers (see BenchmarkOnMessage): call delivers it once more and
// empties the queues; delivered reports whether the last call did.
func onMessageFixture(n int) (call func(), delivered func() bool) {
	f := newFanOut(n)
	h := newHub(slog.New(slog.DiscardHandler), nil, keys.Scheme{Prefix: "bench"}, "i", 1024)
	f.cs.notify, f.cs.confirmed = "n", true
	h.chans[f.cs.notify] = f.cs
	prev, id := stream.ID{MS: 1700000000000}, "1700000000000-1"
	payload := prev.String() + "\n" + id + "\n1700000000000\n\n" + strings.Replace(string(f.frame), "1700000000000-0", id, 1)
	ctx := context.Background()
	call = func() {
		f.cs.last = prev
		h.onMessage(ctx, f.cs.notify, payload)
		for _, c := range f.conns {
			c.queue = c.queue[:0]
		}
	}
	return call, func() bool { return f.cs.last != prev }
}

// BenchmarkOnMessage measures the whole live path of one notification:
// parse (stream.ParseNotification), the checks of onMessage, and the
// fan-out to N local subscribers. No Redis: the notification's
// predecessor is the channel's position, so no catch-up runs; the
// position is set back before each call so that the same notification
// is delivered again.
func BenchmarkOnMessage(b *testing.B) {
	for _, n := range []int{1, 100, 1000} {
		b.Run("subs="+strconv.Itoa(n), func(b *testing.B) {
			call, delivered := onMessageFixture(n)
			b.ReportAllocs()
			for b.Loop() {
				call()
			}
			if !delivered() {
				b.Fatal("the notification was not delivered")
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/delivery")
		})
	}
}

// TestLivePathAllocations: a notification that reaches its subscribers
// costs two allocations whatever their number, its WebSocket frame and
// its queue entry; the payload go-redis read is not copied on the way.
func TestLivePathAllocations(t *testing.T) {
	for _, n := range []int{1, 1000} {
		call, delivered := onMessageFixture(n)
		if a := testing.AllocsPerRun(200, call); a > 2 {
			t.Errorf("%d subscribers: %.1f allocations per notification, want 2 (the frame, the queue entry)", n, a)
		}
		if !delivered() {
			t.Fatal("the notification was not delivered")
		}
	}
}
