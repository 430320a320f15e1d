package main

import (
	"context"
	"io"
	"log/slog"
	"net/http/httptest"
	"os"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"testing"

	"github.com/gorilla/websocket"

	"github.com/wsrelay/wsrelay/shared/redistest"
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
	f.h.deliver(f.cs, stream.ID{MS: 1700000000000, Seq: seq}, "", f.frame, 1700000000000)
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

// TestIdleConnectionHeapProfile opens WSRELAY_IDLE_CONNS (default 2000)
// idle subscribed sockets on a real egress Server and writes a heap
// profile to $WSRELAY_HEAPPROFILE: where an idle connection's memory goes
// (docs/benchmarks.md). Skipped unless WSRELAY_HEAPPROFILE is set.
func TestIdleConnectionHeapProfile(t *testing.T) {
	path := os.Getenv("WSRELAY_HEAPPROFILE")
	if path == "" {
		t.Skip("set WSRELAY_HEAPPROFILE=file to profile idle connections")
	}
	n := 2000
	if v, err := strconv.Atoi(os.Getenv("WSRELAY_IDLE_CONNS")); err == nil && v > 0 {
		n = v
	}
	rdb, prefix := redistest.Client(t)
	env := map[string]string{"REDIS_URL": redistest.URL(t), "REDIS_KEY_PREFIX": prefix, "ALLOW_ANONYMOUS": "true", "LOG_LEVEL": "warn"}
	cfg, err := loadConfig(func(k string) string { return env[k] })
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)), rdb)
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan struct{})
	go func() { s.Run(ctx); close(ran) }()
	hs := httptest.NewServer(s)
	defer func() { hs.Close(); cancel(); <-ran }()
	<-s.hub.inbox.ready

	url := "ws" + strings.TrimPrefix(hs.URL, "http") + "/ws?channels="
	d := &websocket.Dialer{ReadBufferSize: 256, WriteBufferSize: 256}
	clients := make([]*websocket.Conn, 0, n)
	defer func() {
		for _, c := range clients {
			c.Close()
		}
	}()
	for i := range n {
		c, _, err := d.Dial(url+"idle"+strconv.Itoa(i/10), nil)
		if err != nil {
			t.Fatalf("dial %d: %v", i, err)
		}
		for { // welcome, then subscribed
			_, b, err := c.ReadMessage()
			if err != nil {
				t.Fatal(err)
			}
			if strings.Contains(string(b), `"subscribed"`) {
				break
			}
		}
		clients = append(clients, c)
	}
	runtime.GC()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := pprof.Lookup("heap").WriteTo(f, 0); err != nil {
		t.Fatal(err)
	}
}
