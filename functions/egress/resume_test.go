package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/protocol"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/registry"
	"github.com/wsrelay/wsrelay/shared/stream"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// Tests of the resume path's seam as a client sees it: a subscribe with
// `after` gets every message after it once, in order, however the
// replay's reads, the hub's reads and the linger sweep interleave with
// publishing.

// aroundCmd is a go-redis hook that calls before and after (either may be
// nil) around each single command (not pipelines).
type aroundCmd struct{ before, after func(cmd redis.Cmder) }

func (h aroundCmd) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h aroundCmd) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if h.before != nil {
			h.before(cmd)
		}
		err := next(ctx, cmd)
		if h.after != nil {
			h.after(cmd)
		}
		return err
	}
}

func (h aroundCmd) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

// publisher appends to one channel until stopped and keeps the ids in
// order.
type publisher struct {
	mu   sync.Mutex
	ids  []string
	stop chan struct{}
	done chan struct{}
}

func startPublisher(t *testing.T, rdb redis.UniversalClient, ks keys.Scheme, ch string, every time.Duration) *publisher {
	t.Helper()
	p := &publisher{stop: make(chan struct{}), done: make(chan struct{})}
	store := stream.NewStore(rdb)
	go func() {
		defer close(p.done)
		for {
			select {
			case <-p.stop:
				return
			case <-time.After(every):
			}
			ids, err := store.Append(context.Background(), []stream.Append{{Stream: ks.Stream(ch), Notify: ks.Notify(ch),
				Msg: stream.Message{Channel: ch, TS: time.Now().UnixMilli(), Data: []byte("1")}}})
			if err != nil {
				t.Error(err)
				return
			}
			p.mu.Lock()
			p.ids = append(p.ids, ids[0])
			p.mu.Unlock()
		}
	}()
	t.Cleanup(func() { p.Stop() })
	return p
}

// Stop stops the publisher and returns what it published. It may be
// called more than once.
func (p *publisher) Stop() []string {
	select {
	case <-p.stop:
	default:
		close(p.stop)
	}
	<-p.done
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.ids)
}

// TestResumeSeamAtEachRead: a message published right before or right
// after one of a replay's stream reads (the first; the second of a replay
// of two batches; the empty one that ends a replay of exactly one full
// batch) is delivered once, in order: read from the stream, taken from
// the live buffer merged after the replay, or both and merged by id. The
// randomized and e2e seam tests reach these instants by chance; this one
// at each of them.
func TestResumeSeamAtEachRead(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name    string
		history int  // messages after the resume position
		read    int  // the replay's read (1-based) the publish lands beside
		before  bool // before that read, else after it
	}{
		{"before the first read", 2, 1, true},
		{"after the first read", 2, 1, false},
		{"before the second read", replayBatch + 10, 2, true},
		{"after the second read", replayBatch + 10, 2, false},
		{"after the empty read ending a full batch", replayBatch, 2, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			rdb, prefix := redistest.Client(t)
			ks := keys.Scheme{Prefix: prefix}
			key := ks.Stream("seam")
			ids := make([]string, 0, tc.history+1)
			for i := range tc.history + 1 {
				ids = append(ids, appendTo(t, rdb, ks, "seam", ks.Notify("seam"), i))
			}
			// The hub reads the stream only to fill a gap, which there
			// is none of: every XRANGE of it is the replay's.
			var reads atomic.Int64
			landed := make(chan string, 1)
			publish := func(cmd redis.Cmder) {
				if a := cmd.Args(); strings.EqualFold(cmd.Name(), "xrange") && len(a) > 1 && a[1] == key && reads.Add(1) == int64(tc.read) {
					got, err := stream.NewStore(rdb).Append(context.Background(), []stream.Append{{Stream: key, Notify: ks.Notify("seam"),
						Msg: stream.Message{Channel: "seam", TS: time.Now().UnixMilli(), Data: []byte("0")}}})
					if err != nil {
						t.Error(err)
						got = []string{""}
					}
					landed <- got[0]
				}
			}
			h := aroundCmd{after: publish}
			if tc.before {
				h = aroundCmd{before: publish}
			}
			rdb.AddHook(h)
			e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"})

			ws := resumeOn(t, e, "seam", ids[0])
			if r := next(t, ws, "subscribed"); r.Recovered == nil || !*r.Recovered {
				t.Fatalf("recovered %v, want true", r.Recovered)
			}
			var raced string
			select {
			case raced = <-landed:
			case <-time.After(5 * time.Second):
				t.Fatalf("the replay made fewer than %d reads", tc.read)
			}
			last := appendTo(t, rdb, ks, "seam", ks.Notify("seam"), -1) // live
			want := append(slices.Clone(ids[1:]), raced, last)
			got, code := readThrough(ws, 5*time.Second, last)
			if !slices.Equal(got, want) {
				t.Fatalf("got %d messages (…%v, close %d), want %d (…%v) once each in order",
					len(got), got[max(0, len(got)-3):], code, len(want), want[len(want)-3:])
			}
		})
	}
}

// TestLingerSweepRacesResubscribe: a client unsubscribes from a busy
// channel and subscribes again (live, or resuming from the last id it
// got) while the linger sweep drops the channel, which nobody here
// listens to for that instant: the sweep's SUNSUBSCRIBE, its check for a
// channel acquired again meanwhile, and the new subscription's SSUBSCRIBE
// and position read interleave differently each round. Each subscription
// gets the channel's messages after its position, none missing, none
// twice, and each resume is recovered.
func TestLingerSweepRacesResubscribe(t *testing.T) {
	t.Parallel()
	srv := redistest.Start(t) // its own, to count the sweep's SUNSUBSCRIBEs
	rdb := redis.NewClient(&redis.Options{Addr: srv.Addr()})
	t.Cleanup(func() { rdb.Close() })
	prefix := redistest.Prefix(t)
	ks := keys.Scheme{Prefix: prefix}
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true", "MAX_FRAMES_PER_SECOND": "0"})
	pub := startPublisher(t, rdb, ks, "busy", 100*time.Microsecond)
	ws, _, err := e.dial(t, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	next(t, ws, "welcome")
	before := commandCalls(t, rdb)

	type run struct {
		position string
		ids      []string
	}
	var runs []run
	last := ""
	const rounds = 150
	for i := range rounds {
		req := map[string]any{"type": "subscribe", "channel": "busy", "ref": i}
		if last != "" && i%2 == 0 {
			req["after"] = last
		}
		var sweep sync.WaitGroup
		if i > 0 { // unsubscribed: the channel is idle here
			sweep.Go(func() {
				time.Sleep(time.Duration(i%7) * 50 * time.Microsecond)
				e.s.hub.sweepIdle(context.Background(), time.Now().Add(2*linger))
			})
		}
		send(t, ws, req)
		r := next(t, ws, "subscribed")
		sweep.Wait()
		if _, resumed := req["after"]; resumed && (r.Recovered == nil || !*r.Recovered || r.Position != last) {
			t.Fatalf("round %d: resume after %s: recovered %v, position %s", i, last, r.Recovered, r.Position)
		}
		got, code := readMessages(ws, 5*time.Second, func(string) bool { return true })
		for len(got) < 5 && code == 0 {
			var more []string
			more, code = readMessages(ws, 5*time.Second, func(string) bool { return true })
			got = append(got, more...)
		}
		if code != 0 {
			t.Fatalf("round %d: got %v, then close %d", i, got, code)
		}
		runs = append(runs, run{r.Position, got})
		last = got[len(got)-1]
		send(t, ws, map[string]any{"type": "unsubscribe", "channel": "busy"})
		next(t, ws, "unsubscribed")
	}
	ids := pub.Stop()
	for i, r := range runs {
		from := 0
		if r.position != stream.Zero.String() {
			if from = slices.Index(ids, r.position) + 1; from == 0 {
				t.Fatalf("round %d: position %s was never published", i, r.position)
			}
		}
		if want := ids[from:min(len(ids), from+len(r.ids))]; !slices.Equal(r.ids, want) {
			t.Fatalf("round %d: after %s got %v, want %v", i, r.position, r.ids, want)
		}
	}
	// The race was run: the sweep dropped the channel in some rounds.
	if n := commandCalls(t, rdb)["sunsubscribe"] - before["sunsubscribe"]; n == 0 {
		t.Fatalf("the sweep never dropped the channel in %d rounds", rounds)
	} else {
		t.Logf("%d rounds, the channel dropped by the sweep in %d", rounds, n)
	}
}

// TestResumeWhileCatchUpStalled: the hub's read of a channel's gap fails
// and is retried (stall) while a client resumes the channel. The client's
// replay, read on its own, is whole; when the hub's read comes back it
// delivers the messages the replay already gave that client to the
// channel's older subscriber only, and what was published meanwhile to
// both, once each.
func TestResumeWhileCatchUpStalled(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	key := ks.Stream("s")
	var failFrom atomic.Value // the hub's reads of the gap start at this id
	failFrom.Store("")
	rdb.AddHook(redistest.Fail{Cmd: func(cmd redis.Cmder) bool {
		a := cmd.Args()
		return strings.EqualFold(cmd.Name(), "xrange") && len(a) > 2 && a[1] == key && a[2] == failFrom.Load()
	}})
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"})
	start := appendTo(t, rdb, ks, "s", ks.Notify("s"), 0)
	old, _ := subscribedTo(t, e, "s")
	ids := []string{appendTo(t, rdb, ks, "s", ks.Notify("s"), 1)}
	if got, code := readMessages(old, 5*time.Second, func(string) bool { return true }); !slices.Equal(got, ids) {
		t.Fatalf("first message: %v (close %d), want %v", got, code, ids)
	}
	failFrom.Store(ids[0])
	for i := 2; i <= 3; i++ { // their notifications are lost
		ids = append(ids, appendTo(t, rdb, ks, "s", ks.Notify("s")+"-lost", i))
	}
	ids = append(ids, appendTo(t, rdb, ks, "s", ks.Notify("s"), 4)) // shows the gap
	testkit.Eventually(t, 3*time.Second, func() error {
		if e.s.hub.stalling.Load() == 0 {
			return errors.New("the hub's read of the gap has not stalled")
		}
		return nil
	})

	resumed := resumeOn(t, e, "s", start)
	if r := next(t, resumed, "subscribed"); r.Recovered == nil || !*r.Recovered {
		t.Fatalf("resume after %s: recovered %v, want true", start, r.Recovered)
	}
	if got, code := readMessages(resumed, 5*time.Second, func(id string) bool { return id == ids[3] }); !slices.Equal(got, ids) {
		t.Fatalf("replay: %v (close %d), want %v", got, code, ids)
	}
	replayed := len(ids)
	ids = append(ids, appendTo(t, rdb, ks, "s", ks.Notify("s"), 5)) // set aside by the stalled hub
	failFrom.Store("")
	ids = append(ids, appendTo(t, rdb, ks, "s", ks.Notify("s"), 6))
	last := ids[len(ids)-1]
	for _, c := range []struct {
		name string
		ws   *websocket.Conn
		want []string
	}{{"older subscriber", old, ids[1:]}, {"resumed subscriber", resumed, ids[replayed:]}} {
		got, code := readThrough(c.ws, 5*time.Second, last)
		if !slices.Equal(got, c.want) {
			t.Errorf("%s: got %v (close %d), want %v once each", c.name, got, code, c.want)
		}
	}
}

// TestResumeHandOverWaitsForRoom: a resume's replay sends its last
// batch (read from the stream before the live messages below were
// published) to a client that paused reading, and waits for room in the
// queue, which it leaves half full; meanwhile as many live messages as
// SEND_QUEUE are published, which the replay's buffer takes without
// overflowing. Then the client reads on, as fast as it can. Handing the
// buffer over to the queue at once, as the replay ends, would overflow
// the queue and close the client 4002, although neither its buffer nor
// its queue ever held more than SEND_QUEUE: the hand-over waits for room
// in the queue as the replay does, and the client gets the history and
// the live messages once each, in order, and stays open.
func TestResumeHandOverWaitsForRoom(t *testing.T) {
	t.Parallel()
	e, rdb, ks, pause := pausedEgress(t, map[string]string{"WRITE_TIMEOUT": "30s"})
	<-e.s.hub.inbox.ready
	// Two batches after the resume position, the second (the last)
	// more than the socket's buffers hold: the replay waits for the
	// client while it sends it. The first is small: 6 MB more through
	// the 16 KiB receive buffer took seconds.
	hist := appendData(t, rdb, ks, "ho", []byte(`"x"`), replayBatch+1)
	data := []byte(`"` + strings.Repeat("x", 64<<10) + `"`)
	hist = append(hist, appendData(t, rdb, ks, "ho", data, replayBatch-1)...)
	second := &pausePoint{key: ks.Stream("ho"), start: hist[replayBatch], after: true, reached: make(chan struct{}), released: make(chan struct{})}
	pause.arm(second)
	defer second.release()
	ws, _, err := smallBufDialer.Dial(e.url(nil), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	next(t, ws, "welcome")
	send(t, ws, map[string]any{"type": "subscribe", "channel": "ho", "after": hist[0]})
	// The first batch; then the client pauses, and the replay makes its
	// last read and sends what it read until it waits for the client.
	got, code := readMessages(ws, 45*time.Second, func(id string) bool { return id == hist[replayBatch] })
	if !slices.Equal(got, hist[1:replayBatch+1]) {
		t.Fatalf("first batch: %d messages (close %d), want %d", len(got), code, replayBatch)
	}
	second.await(t, "the replay never made its second read")
	second.release()
	cs := e.s.hub.state(ks.Notify("ho"))
	// As many live messages as the buffer holds, while the replay waits.
	var live []string
	for i := range e.s.cfg.SendQueue {
		live = append(live, appendTo(t, rdb, ks, "ho", ks.Notify("ho"), i))
	}
	testkit.Eventually(t, 5*time.Second, func() error {
		cs.mu.Lock()
		defer cs.mu.Unlock()
		for _, r := range cs.resuming {
			if len(r.buf) == len(live) && !r.overflow {
				return nil
			}
			return fmt.Errorf("the replay's buffer holds %d live messages (overflow %v), want %d", len(r.buf), r.overflow, len(live))
		}
		return errors.New("the replay has ended")
	})
	want := append(slices.Clone(hist[replayBatch+1:]), live...)
	// 6 MB through a 16 KiB receive buffer, at under 1 MB/s on an idle
	// machine (delayed acknowledgements) and less under make test's load.
	got, code = readThrough(ws, 45*time.Second, live[len(live)-1])
	if code != 0 || !slices.Equal(got, want) {
		t.Fatalf("got %d of %d messages (close %d), want all once, in order, and no close", len(got), len(want), code)
	}
}

// TestReplayHeldBytesBounded: a resume's replay builds this connection's
// own frames (a live message's frame is shared by every queue), so it is
// paced by their bytes as well as by the queue's length: a client that
// resumes from far back in a channel of large messages and does not read
// holds about replayBudget of them, not half a SEND_QUEUE (30 MB with
// 60 KB messages, per connection, until WRITE_TIMEOUT). One that reads
// gets every message, in order.
func TestReplayHeldBytesBounded(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true", "WRITE_TIMEOUT": "30s"})
	const n, size = 40, 60 << 10 // 2.4 MB: more than twice replayBudget
	ids := appendData(t, rdb, ks, "big", []byte(`"`+strings.Repeat("x", size)+`"`), n)
	ws, c := smallBuffers(t, e, nil)
	send(t, ws, map[string]any{"type": "subscribe", "channel": "big", "after": "0-0"})
	// The client reads nothing: the writer blocks, and the replay waits.
	held := func() (queued, total int) {
		c.mu.Lock()
		defer c.mu.Unlock()
		for _, q := range c.queue {
			queued += len(q.frame)
		}
		return queued, c.replaying
	}
	testkit.Eventually(t, 10*time.Second, func() error {
		if w := c.writeSince.Load(); w == 0 || time.Since(time.Unix(0, w)) < 200*time.Millisecond {
			return fmt.Errorf("the writer is not stuck yet")
		}
		return nil
	})
	time.Sleep(100 * time.Millisecond) // for the replay to queue what it may
	if queued, total := held(); total > 1<<20+size+64 || queued > total {
		t.Fatalf("a stalled replay holds %d bytes (%d queued), want at most about 1 MiB", total, queued)
	}
	got, _ := readMessages(ws, 45*time.Second, func(id string) bool { return id == ids[n-1] }) // under 1 MB/s through small buffers
	if !slices.Equal(got, ids) {
		t.Fatalf("read %d messages, want the %d replayed in order", len(got), n)
	}
}

// pooledClient is a client of the test Redis with a pool of size
// connections, and a wait for one of timeout (go-redis's default when 0),
// closed at cleanup.
func pooledClient(t *testing.T, size int, timeout time.Duration) *redis.Client {
	t.Helper()
	o, err := redis.ParseURL(redistest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	o.PoolSize, o.PoolTimeout = size, timeout
	rdb := redis.NewClient(o)
	t.Cleanup(func() { rdb.Close() })
	return rdb
}

// TestResumeWaitsForBusyPool: a resume whose stream read finds every
// connection of the egress's Redis pool taken for longer than the pool's
// timeout waits for one, at its first read and at a later read of its
// replay, and the client gets every message once. In a reconnect storm
// (thousands of clients of a lost instance resuming on this one at once)
// their replays, registry writes and handshakes queue for the pool for
// seconds while Redis answers every command in microseconds; such a read
// was answered `unavailable` (first read) or closed 1011 (later read),
// and each reconnect that followed redid the handshake, the registry
// writes and the reads, adding to the queue (2,000 clients on one
// egress: a quarter of them cut so, bench/cmd/storm).
func TestResumeWaitsForBusyPool(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		read int64 // the replay's read (1-based) that finds the pool busy
	}{
		{"first read", 1},
		{"second read", 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			pub, prefix := redistest.Client(t)
			ks := keys.Scheme{Prefix: prefix}
			key := ks.Stream("busy")
			ids := appendData(t, pub, ks, "busy", []byte("1"), replayBatch+10)
			// The egress's own client: one pooled connection, and a short
			// wait for it (go-redis's default is REDIS_TIMEOUT + 1 s).
			rdb := pooledClient(t, 1, 100*time.Millisecond)
			var reads atomic.Int64
			rdb.AddHook(aroundCmd{before: func(cmd redis.Cmder) {
				if a := cmd.Args(); !strings.EqualFold(cmd.Name(), "xrange") || len(a) < 2 || a[1] != key || reads.Add(1) != tc.read {
					return
				}
				// Another command takes the pool's connection for a
				// second (go-redis gives up on the pool after about half
				// a second here) before this read asks for it.
				go func() { _ = rdb.Do(context.Background(), "blpop", prefix+"nothing", "1").Err() }()
				for s := rdb.PoolStats(); s.TotalConns != 1 || s.IdleConns != 0; s = rdb.PoolStats() {
					time.Sleep(time.Millisecond)
				}
			}})
			e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true", "PROBE_INTERVAL": "1m"})

			ws := resumeOn(t, e, "busy", ids[0])
			_ = ws.SetReadDeadline(time.Now().Add(5 * time.Second))
			var r protocol.Reply
			if err := ws.ReadJSON(&r); err != nil || r.Type != "subscribed" || r.Recovered == nil || !*r.Recovered {
				t.Fatalf("first frame %+v (%v), want subscribed, recovered", r, err)
			}
			last := appendTo(t, pub, ks, "busy", ks.Notify("busy"), -1) // live
			want := append(slices.Clone(ids[1:]), last)
			got, code := readThrough(ws, 5*time.Second, last)
			if !slices.Equal(got, want) {
				t.Fatalf("got %d messages (close %d), want %d once each in order", len(got), code, len(want))
			}
			if n := reads.Load(); n < tc.read {
				t.Fatalf("the replay made %d reads, want at least %d", n, tc.read)
			}
		})
	}
}

// TestReplayReadsLeaveHalfThePool: replays resuming at once ask the
// egress's Redis pool for at most half its connections, however many
// there are, and each client still gets every message once. In a
// reconnect storm the handshakes' registry writes, which get
// REDIS_TIMEOUT for the pool's wait and the write together and close the
// socket 1013 when it runs out, share the pool with the replays: with
// the pool all theirs, 2,000 clients resuming on one egress had a
// quarter to a half of their sockets refused so (bench/cmd/storm), none
// once the replays kept to half.
func TestReplayReadsLeaveHalfThePool(t *testing.T) {
	t.Parallel()
	const clients, pool = 12, 4
	pub, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	key := ks.Stream("half")
	ids := appendData(t, pub, ks, "half", []byte("1"), 2*replayBatch+50)
	rdb := pooledClient(t, pool, 0)
	var inFlight, most atomic.Int64
	rdb.AddHook(aroundCmd{
		before: func(cmd redis.Cmder) {
			if a := cmd.Args(); strings.EqualFold(cmd.Name(), "xrange") && len(a) > 1 && a[1] == key {
				n := inFlight.Add(1)
				for m := most.Load(); n > m && !most.CompareAndSwap(m, n); m = most.Load() {
				}
				time.Sleep(10 * time.Millisecond) // so that the replays' reads overlap
			}
		},
		after: func(cmd redis.Cmder) {
			if a := cmd.Args(); strings.EqualFold(cmd.Name(), "xrange") && len(a) > 1 && a[1] == key {
				inFlight.Add(-1)
			}
		},
	})
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true", "PROBE_INTERVAL": "1m"})
	var wss []*websocket.Conn
	for range clients {
		ws, _, err := e.dial(t, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ws.Close() })
		next(t, ws, "welcome")
		wss = append(wss, ws)
	}
	for _, ws := range wss {
		send(t, ws, map[string]any{"type": "subscribe", "channel": "half", "after": ids[0]})
	}
	readAllThrough(t, wss, ids[1:])
	if m := most.Load(); m > pool/2 {
		t.Fatalf("%d replay reads asked the pool of %d at once, want at most %d", m, pool, pool/2)
	}
	t.Logf("at most %d replay reads at once", most.Load())
}

// readAllThrough reads each of wss at once until want's last message
// (readThrough), and reports each client that did not get want once
// each, in order.
func readAllThrough(t *testing.T, wss []*websocket.Conn, want []string) {
	t.Helper()
	var wg sync.WaitGroup
	for i, ws := range wss {
		wg.Go(func() {
			got, code := readThrough(ws, 10*time.Second, want[len(want)-1])
			if !slices.Equal(got, want) {
				t.Errorf("client %d: got %d messages (close %d), want %d once each in order", i, len(got), code, len(want))
			}
		})
	}
	wg.Wait()
}

// TestReplaysShareReads: resumes of one channel from the same position
// whose first reads wait for their turn (hub.replayReads, all taken: a
// reconnect storm, its clients resuming from the last message the lost
// instance sent them) make that read once, not once each, and each client
// still gets every message once, in order. When the client whose
// connection was to make the read goes while it waits, another one
// makes it. An entry no client could read (TestUndecodableEntrySkipped)
// in the shared batch is skipped for each of them, and logged once.
func TestReplaysShareReads(t *testing.T) {
	t.Parallel()
	for _, leaderLeaves := range []bool{false, true} {
		t.Run(fmt.Sprintf("leader leaves %v", leaderLeaves), func(t *testing.T) {
			t.Parallel()
			const clients = 8
			pub, prefix := redistest.Client(t)
			ks := keys.Scheme{Prefix: prefix}
			key := ks.Stream("storm")
			ids := appendData(t, pub, ks, "storm", []byte("1"), 50)
			head, _ := (&stream.Message{Channel: "storm"}).Frame()
			broken, err := pub.XAdd(t.Context(), &redis.XAddArgs{Stream: key, Values: []any{"h", head, "T", `","ts":1,"data":2}`, "g", "", "s", "1", "p", ids[len(ids)-1]}}).Result()
			if err != nil {
				t.Fatal(err)
			}
			if err := pub.Set(t.Context(), keys.Last(key), broken, 0).Err(); err != nil {
				t.Fatal(err)
			}
			ids = append(ids, appendData(t, pub, ks, "storm", []byte("1"), 2*replayBatch)...)
			rdb := pooledClient(t, 2, 0) // one place among the replay reads
			var first, all atomic.Int64
			rdb.AddHook(aroundCmd{before: func(cmd redis.Cmder) {
				if a := cmd.Args(); strings.EqualFold(cmd.Name(), "xrange") && len(a) > 2 && a[1] == key {
					all.Add(1)
					if a[2] == ids[0] {
						first.Add(1)
					}
				}
			}})
			logs := &testkit.SyncBuffer{}
			e := startEgressLogging(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true", "PING_INTERVAL": "1m", "PROBE_INTERVAL": "1m"}, logs)
			turns := e.s.hub.replayReads
			turns <- struct{}{} // the one place is taken (the storm's other replays)
			joined := func(n int) error {
				_, err := waitingRead(e.s.hub, key, ids[0], n)
				return err
			}
			var wss []*websocket.Conn
			for i := range clients {
				ws, _, err := e.dial(t, nil, nil)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { ws.Close() })
				next(t, ws, "welcome")
				send(t, ws, map[string]any{"type": "subscribe", "channel": "storm", "after": ids[0]})
				testkit.Eventually(t, 5*time.Second, func() error { return joined(i) })
				wss = append(wss, ws)
			}
			if leaderLeaves {
				// The first client's connection leads the read: it goes,
				// the others' read is still made.
				_ = wss[0].UnderlyingConn().Close()
				wss = wss[1:]
				testkit.Eventually(t, 5*time.Second, func() error { return joined(clients - 2) })
			}
			<-turns
			readAllThrough(t, wss, ids[1:])
			if n := first.Load(); n != 1 {
				t.Errorf("%d clients resuming from one position read its first batch %d times, want once", len(wss), n)
			}
			if lines := logs.Lines(t, "undecodable stream entries"); len(lines) != 1 || lines[0]["id"] != broken {
				t.Errorf("the skipped entry logged %d warnings, want one naming %s", len(lines), broken)
			}
			t.Logf("%d stream reads for %d replays of 3 batches each", all.Load(), len(wss))
		})
	}
}

// TestReplayReadTurnEndsWithConn: a replay waiting for a place among the
// replay reads (hub.replayReads, all taken) gives up once its connection
// is closing, its reader has ended, or its context is done, without
// taking a place: in a reconnect storm a closed connection does not wait
// for its turn, nor read for a client that has gone. Nothing else wakes
// a closing connection's reader in that wait: the close is seen by the
// wait's own look every 50 ms.
func TestReplayReadTurnEndsWithConn(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		end  func(c *conn, cancel context.CancelFunc)
	}{
		{"closing", func(c *conn, _ context.CancelFunc) {
			c.mu.Lock()
			c.closing = true
			c.mu.Unlock()
		}},
		{"reader ended", func(c *conn, _ context.CancelFunc) { close(c.done) }},
		{"context done", func(_ *conn, cancel context.CancelFunc) { cancel() }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			h := &hub{replayReads: make(chan struct{}, 1)}
			h.replayReads <- struct{}{} // the one place is taken
			c := &conn{s: &Server{hub: h}, done: make(chan struct{})}
			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			got := make(chan bool, 1)
			go func() { got <- c.awaitReplay(ctx, h.replayReads, nil) }()
			tc.end(c, cancel)
			select {
			case ok := <-got:
				if ok {
					t.Fatal("awaitReplay took a place that was not free")
				}
			case <-time.After(5 * time.Second):
				t.Fatal("awaitReplay still waits for a place 5 s after its connection ended")
			}
			if n := len(h.replayReads); n != 1 {
				t.Fatalf("%d places taken, want the 1 taken before", n)
			}
			// A free place is taken at once, and readHistory gives it back.
			<-h.replayReads
			c2 := &conn{s: &Server{hub: h}, done: make(chan struct{})}
			if !c2.awaitReplay(t.Context(), h.replayReads, nil) || len(h.replayReads) != 1 {
				t.Fatalf("a free place was not taken (%d taken)", len(h.replayReads))
			}
		})
	}
}

// TestReplayTurnSeesClientGone: a client that goes away while its resume
// waits for a place among the replay reads (hub.replayReads, all taken)
// is seen by the wait's look every 50 ms: its FIN, even behind frames it
// sent that the server has not read (the reader, handling the subscribe,
// reads nothing meanwhile), or its reset. The connection ends as a read
// of the end of the stream would end it (1006 by the client, SCF 456),
// and no stream read is made for it. Before, such a client was seen only
// when a ping's write failed, up to PING_INTERVAL later, or when its turn
// came, and then its read was made for nobody: in a reconnect storm,
// clients that give up and reconnect while their replays wait added
// those reads to the queue. A client whose last frame before its FIN is
// a close frame ends with that frame's code, as the reader's read of it
// would record it (1000 by the client, SCF 200), not as a lost one.
func TestReplayTurnSeesClientGone(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("the hang-up is looked for on Linux only (readable_linux.go)")
	}
	t.Parallel()
	for _, tc := range []struct {
		name       string
		reset      bool
		closeFrame bool // the client's close frame (1000) goes ahead of its FIN
		code, scf  int  // the end logged
	}{
		{"FIN behind unread frames", false, false, 1006, 456},
		{"reset", true, false, 1006, 456},
		{"close frame and FIN behind unread frames", false, true, 1000, 200},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			pub, prefix := redistest.Client(t)
			ks := keys.Scheme{Prefix: prefix}
			key := ks.Stream("gone")
			ids := appendData(t, pub, ks, "gone", []byte("1"), 3)
			rdb := pooledClient(t, 2, 0) // one place among the replay reads
			var reads atomic.Int64
			rdb.AddHook(aroundCmd{before: func(cmd redis.Cmder) {
				if a := cmd.Args(); strings.EqualFold(cmd.Name(), "xrange") && len(a) > 1 && a[1] == key {
					reads.Add(1)
				}
			}})
			logs := &testkit.SyncBuffer{}
			e := startEgressLogging(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true", "PING_INTERVAL": "1m", "PROBE_INTERVAL": "1m"}, logs)
			turns := e.s.hub.replayReads
			turns <- struct{}{} // the one place is taken (the storm's other replays)

			ws, c := e.dialConn(t, nil)
			send(t, ws, map[string]any{"type": "subscribe", "channel": "gone", "after": ids[0]})
			testkit.Eventually(t, 5*time.Second, func() error {
				if !c.handling.Load() {
					return errors.New("the subscribe is not being handled yet")
				}
				return nil
			})
			// Frames the reader, waiting on the subscribe, leaves in the
			// socket: the FIN comes behind them.
			for range 20 {
				send(t, ws, map[string]any{"type": "ping"})
			}
			if tc.closeFrame {
				if err := ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(1000, "bye"), time.Now().Add(time.Second)); err != nil {
					t.Fatal(err)
				}
			}
			tcp := ws.UnderlyingConn().(*net.TCPConn)
			if tc.reset {
				_ = tcp.SetLinger(0)
			}
			_ = tcp.Close()
			left := time.Now()

			var end struct {
				Msg       string
				CloseCode int    `json:"close_code"`
				ClosedBy  string `json:"closed_by"`
				SCFStatus int    `json:"scf_status"`
			}
			testkit.Eventually(t, 2*time.Second, func() error {
				for l := range strings.Lines(logs.String()) {
					if err := json.Unmarshal([]byte(l), &end); err != nil {
						t.Fatalf("log line %q: %v", l, err)
					}
					if end.Msg == "connection closed" {
						return nil
					}
				}
				return errors.New("the connection has not ended")
			})
			t.Logf("the connection ended %v after its client left", time.Since(left).Round(time.Millisecond))
			if end.CloseCode != tc.code || end.ClosedBy != "client" || end.SCFStatus != tc.scf {
				t.Errorf("connection closed %+v, want %d by the client, SCF status %d", end, tc.code, tc.scf)
			}
			checkEndMetrics(t, e, logs.String(), 1) // counted under the status logged
			if _, err := e.s.reg.Get(t.Context(), c.id); !errors.Is(err, registry.ErrNotFound) {
				t.Errorf("the gone client's record: %v, want it removed", err)
			}
			if n := reads.Load(); n != 0 {
				t.Errorf("%d stream reads made for a client that had gone, want none", n)
			}
			if n := len(turns); n != 1 {
				t.Errorf("%d places taken, want the 1 taken before", n)
			}
		})
	}
}

// TestReplayWaitEndRemovesOnce: a connection that ends while its resume
// waits for a place among the replay reads (hub.replayReads, all taken),
// whichever way it ends (its client hangs up, an operator's disconnect,
// the drain), has its registry record removed once, the channel's
// membership with it, and nothing of it is left in the registry. The
// resume's subscription, given up, made a removal of its own as well,
// one more round trip per connection in the reconnect storm that fills
// the replay reads' queue.
func TestReplayWaitEndRemovesOnce(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("the hang-up is looked for on Linux only (readable_linux.go)")
	}
	t.Parallel()
	for _, tc := range []struct {
		name string
		end  func(t *testing.T, rdb redis.UniversalClient, ks keys.Scheme, e *secEgress, ws *websocket.Conn, c *conn)
	}{
		{"hang-up", func(t *testing.T, _ redis.UniversalClient, _ keys.Scheme, _ *secEgress, ws *websocket.Conn, _ *conn) {
			_ = ws.UnderlyingConn().Close()
		}},
		{"operator's disconnect", func(t *testing.T, rdb redis.UniversalClient, ks keys.Scheme, e *secEgress, ws *websocket.Conn, c *conn) {
			toInbox(t, rdb, ks, e, nil, stream.Disconnect(c.id))
			if code := closeCode(t, ws, 5*time.Second); code != 4003 {
				t.Errorf("closed %d, want 4003", code)
			}
		}},
		{"drain", func(t *testing.T, _ redis.UniversalClient, _ keys.Scheme, e *secEgress, ws *websocket.Conn, _ *conn) {
			go e.stop()
			if code := closeCode(t, ws, 5*time.Second); code != protocol.CloseGoingAway {
				t.Errorf("closed %d, want %d", code, protocol.CloseGoingAway)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			pub, prefix := redistest.Client(t)
			ks := keys.Scheme{Prefix: prefix}
			ids := appendData(t, pub, ks, "wait", []byte("1"), 3)
			rdb := pooledClient(t, 2, 0) // one place among the replay reads
			var removals atomic.Int64    // of connection records: pipelines that begin with their DEL
			recKey := strings.TrimSuffix(ks.Conn(""), "}")
			rdb.AddHook(redistest.NewGate(func(cmds []redis.Cmder) bool {
				if a := cmds[0].Args(); cmds[0].Name() == "del" && len(a) > 1 && strings.HasPrefix(fmt.Sprint(a[1]), recKey) {
					removals.Add(1)
				}
				return false
			}))
			e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true", "PING_INTERVAL": "1m", "PROBE_INTERVAL": "1m"})
			turns := e.s.hub.replayReads
			turns <- struct{}{} // the one place is taken (the storm's other replays)

			ws, c := e.dialConn(t, nil)
			send(t, ws, map[string]any{"type": "subscribe", "channel": "wait", "after": ids[0]})
			testkit.Eventually(t, 5*time.Second, func() error {
				e.s.hub.readsMu.Lock()
				defer e.s.hub.readsMu.Unlock()
				if len(e.s.hub.reads) == 0 {
					return errors.New("the resume's read is not waiting for its turn yet")
				}
				return nil
			})
			tc.end(t, rdb, ks, e, ws, c)
			testkit.Eventually(t, 5*time.Second, func() error {
				if n := e.s.open.Load(); n != 0 {
					return fmt.Errorf("%d sockets open", n)
				}
				return nil
			})
			e.stop() // every removal made
			if n := removals.Load(); n != 1 {
				t.Errorf("the record was removed %d times, want once", n)
			}
			if _, err := e.s.reg.Get(t.Context(), c.id); !errors.Is(err, registry.ErrNotFound) {
				t.Errorf("the record: %v, want it removed", err)
			}
			if err := pub.ZScore(t.Context(), ks.ChannelConns("wait"), c.id).Err(); !errors.Is(err, redis.Nil) {
				t.Errorf("the channel's membership: %v, want it removed", err)
			}
		})
	}
}

// TestReplayJoinsNoReadMade: a replay does not join a read of the same
// position that is already made, only one still waiting its turn. Here
// the first client's read has had Redis's answer when a message is
// published and delivered, and then the second client resumes from the
// same position: that read lacks the message, and the second's live
// buffer does too (it began after the delivery), so a second read is
// made for it, and each client gets the message once.
func TestReplayJoinsNoReadMade(t *testing.T) {
	t.Parallel()
	pub, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	key := ks.Stream("made")
	ids := appendData(t, pub, ks, "made", []byte("1"), 3)
	from := ids[len(ids)-1]
	rdb := pooledClient(t, 2, 0) // one place among the replay reads
	answered, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	rdb.AddHook(aroundCmd{after: func(cmd redis.Cmder) {
		if a := cmd.Args(); strings.EqualFold(cmd.Name(), "xrange") && len(a) > 2 && a[1] == key && a[2] == from {
			once.Do(func() {
				close(answered)
				<-release
			})
		}
	}})
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true", "PING_INTERVAL": "1m", "PROBE_INTERVAL": "1m"})
	first := resumeOn(t, e, "made", from)
	<-answered // the first read is made, its answer on its way
	msg := appendTo(t, pub, ks, "made", ks.Notify("made"), 1)
	h := e.s.hub
	h.mu.Lock()
	cs := h.chans[ks.Notify("made")]
	h.mu.Unlock()
	testkit.Eventually(t, 5*time.Second, func() error {
		cs.mu.Lock()
		defer cs.mu.Unlock()
		if cs.last.String() != msg {
			return fmt.Errorf("the hub delivered %s, want %s", cs.last, msg)
		}
		return nil
	})
	second, c := e.dialConn(t, nil)
	send(t, second, map[string]any{"type": "subscribe", "channel": "made", "after": from})
	testkit.Eventually(t, 5*time.Second, func() error {
		cs.mu.Lock()
		defer cs.mu.Unlock()
		if cs.resuming[c] == nil {
			return errors.New("the second resume has not begun")
		}
		return nil
	})
	time.Sleep(100 * time.Millisecond) // the second's read, joined or waiting its turn
	close(release)
	last := appendTo(t, pub, ks, "made", ks.Notify("made"), 2)
	for i, ws := range []*websocket.Conn{first, second} {
		if got, code := readThrough(ws, 5*time.Second, last); !slices.Equal(got, []string{msg, last}) {
			t.Errorf("client %d: got %v (close %d), want %v", i, got, code, []string{msg, last})
		}
	}
}

// TestReplayFollowerLeaves: a replay that joined another's read
// (hub.reads) and whose connection goes before the read is made is
// taken off it, so the read's maker, alone again, builds no shared
// frames (history.frames) and its client still gets every message.
func TestReplayFollowerLeaves(t *testing.T) {
	t.Parallel()
	pub, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	key := ks.Stream("left")
	ids := appendData(t, pub, ks, "left", []byte("1"), 5)
	rdb := pooledClient(t, 2, 0) // one place among the replay reads
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true", "PING_INTERVAL": "1m", "PROBE_INTERVAL": "1m"})
	turns := e.s.hub.replayReads
	turns <- struct{}{} // the one place is taken
	waiting := func(n int) (*sharedRead, error) { return waitingRead(e.s.hub, key, ids[0], n) }
	var wss []*websocket.Conn
	for i := range 2 {
		ws, _, err := e.dial(t, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ws.Close() })
		next(t, ws, "welcome")
		send(t, ws, map[string]any{"type": "subscribe", "channel": "left", "after": ids[0]})
		testkit.Eventually(t, 5*time.Second, func() error { _, err := waiting(i); return err })
		wss = append(wss, ws)
	}
	_ = wss[1].UnderlyingConn().Close() // the follower goes
	var r *sharedRead
	testkit.Eventually(t, 5*time.Second, func() (err error) { r, err = waiting(0); return err })
	<-turns
	readAllThrough(t, wss[:1], ids[1:])
	<-r.done
	if r.hist.frames != nil {
		t.Errorf("the read's maker built %d shared frames for a follower that had left", len(r.hist.frames))
	}
}

// waitingRead returns h's replay read of the stream key after `after`
// that is waiting for its turn (hub.reads), if n replays have joined it.
func waitingRead(h *hub, key, after string, n int) (*sharedRead, error) {
	h.readsMu.Lock()
	defer h.readsMu.Unlock()
	r := h.reads[readKey{stream: key, after: stream.MustParseID(after)}]
	if r == nil || r.joined != n {
		return nil, fmt.Errorf("read waiting: %v; want one with %d joined", r != nil, n)
	}
	return r, nil
}
