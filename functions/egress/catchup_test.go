package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/protocol"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/stream"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// catchUpBacklog is how many messages the catch-up tests publish while
// the egress's notifications are lost: five stream reads' worth, and
// many times the smallest SEND_QUEUE.
const catchUpBacklog = 5 * replayBatch

// appendLost appends n messages holding data to ch's stream (to the
// inbox's, routed by route, when ch is empty) in one pipeline,
// announcing each on a shard channel nobody listens to: the egress's
// notifications of them are lost. It returns their ids.
func appendLost(t *testing.T, rdb redis.UniversalClient, ks keys.Scheme, instance, ch string, route stream.Route, data []byte, n int) []string {
	t.Helper()
	key, notify := ks.Stream(ch), ks.Notify(ch)
	if ch == "" {
		key, notify = ks.Inbox(instance), ks.InboxNotify(instance)
	}
	as := make([]stream.Append, n)
	for i := range as {
		as[i] = stream.Append{Stream: key, Notify: notify + "-lost",
			Msg: stream.Message{Channel: ch, Route: route, TS: time.Now().UnixMilli(), Data: data}}
	}
	ids, err := stream.NewStore(rdb).Append(t.Context(), as)
	if err != nil {
		t.Fatal(err)
	}
	return ids
}

// TestCatchUpLongerThanSendQueue: while the egress's notifications are
// lost, more messages are published than SEND_QUEUE holds, five stream
// reads' worth; the hub catches up from the stream when the next
// notification shows the gap, or when Redis confirms its Pub/Sub
// subscriptions again after the connection was cut. A client that reads
// as fast as it can gets every message, in order, and stays open: the
// catch-up waits for room in its queue, as a replay does, instead of
// filling it faster than any client could read and closing it 4002.
func TestCatchUpLongerThanSendQueue(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name     string
		targeted bool // messages to the connection (the inbox), not a channel
		kill     bool // the Pub/Sub connection is cut, not a notification lost
	}{
		{"channel, the next notification shows the gap", false, false},
		{"channel, Pub/Sub connection cut", false, true},
		{"targeted, the next notification shows the gap", true, false},
		{"targeted, Pub/Sub connection cut", true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			srv := redistest.Start(t) // its own: the kill cuts every Pub/Sub client
			rdb := redis.NewClient(srv.Options())
			defer rdb.Close()
			prefix := redistest.Prefix(t)
			ks := keys.Scheme{Prefix: prefix}
			e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true", "SEND_QUEUE": "16"})
			defer e.stop()
			instance := e.s.hub.instance

			ws, _, err := e.dial(t, url.Values{"channels": {"room"}}, nil)
			if err != nil {
				t.Fatal(err)
			}
			id := next(t, ws, "welcome").ConnectionID
			next(t, ws, "subscribed")
			ch, route := "room", stream.Route("")
			if tc.targeted {
				ch, route = "", stream.ToConnection(id)
			}
			ids := appendLost(t, rdb, ks, instance, ch, route, []byte(`"x"`), catchUpBacklog)
			if tc.kill {
				if err := rdb.ClientKillByFilter(t.Context(), "TYPE", "pubsub").Err(); err != nil {
					t.Fatal(err)
				}
			} else {
				n := len(ids) + 1
				if tc.targeted {
					ids = append(ids, appendInbox(t, rdb, ks, instance, route, n))
				} else {
					ids = append(ids, appendTo(t, rdb, ks, "room", ks.Notify("room"), n))
				}
			}
			got, code := readMessages(ws, 10*time.Second, func(id string) bool { return id == ids[len(ids)-1] })
			if code != 0 || !slices.Equal(got, ids) {
				t.Fatalf("got %d of %d messages (close %d), want all in order and no close", len(got), len(ids), code)
			}
		})
	}
}

// appendInbox appends one message to the instance's inbox, routed by
// route and announced as the ingress does, and returns its id.
func appendInbox(t *testing.T, rdb redis.UniversalClient, ks keys.Scheme, instance string, route stream.Route, n int) string {
	t.Helper()
	ids, err := stream.NewStore(rdb).Append(t.Context(), []stream.Append{{Stream: ks.Inbox(instance), Notify: ks.InboxNotify(instance),
		Msg: stream.Message{Route: route, TS: time.Now().UnixMilli(), Data: []byte(strconv.Itoa(n))}}})
	if err != nil {
		t.Fatal(err)
	}
	return ids[0]
}

// TestCatchUpSlowConsumer: a catch-up's wait for room does not wait for
// a client that stopped reading. Of two subscribers, the one that reads
// gets the whole backlog; the one that does not is closed 4002 as a slow
// consumer (its frames are larger than the socket buffers hold), as a
// live burst would close it.
func TestCatchUpSlowConsumer(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true", "SEND_QUEUE": "16", "WRITE_TIMEOUT": "30s"})
	fast, _ := subscribedTo(t, e, "room")
	stuck, _ := subscribedTo(t, e, "room")

	data := []byte(`"` + string(bytes.Repeat([]byte("x"), 32<<10)) + `"`)
	ids := appendLost(t, rdb, ks, e.s.hub.instance, "room", "", data, 2*replayBatch)
	ids = append(ids, appendTo(t, rdb, ks, "room", ks.Notify("room"), len(ids)+1))
	got, code := readMessages(fast, 20*time.Second, func(id string) bool { return id == ids[len(ids)-1] })
	if code != 0 || !slices.Equal(got, ids) {
		t.Fatalf("the reading subscriber got %d of %d messages (close %d), want all in order and no close", len(got), len(ids), code)
	}
	got, code = readMessages(stuck, 20*time.Second, nil)
	if code != protocol.CloseSlowConsumer || len(got) >= len(ids) {
		t.Fatalf("the subscriber that did not read: %d messages, close %d; want fewer than %d and %d", len(got), code, len(ids), protocol.CloseSlowConsumer)
	}
	if fmt.Sprint(got) != fmt.Sprint(ids[:len(got)]) {
		t.Errorf("the subscriber that did not read got %v, not a prefix of the messages", got)
	}
}

// TestResumeAcrossCatchUp: a client is in the middle of a resume's
// replay (held just before or just after one of its stream reads) when
// the hub catches up, from the stream, a backlog longer than SEND_QUEUE
// whose notifications were lost: it delivers the whole backlog into the
// replay's buffer of live messages in a few milliseconds, far faster
// than any client reads. The catch-up's pacer does not wait for a
// replaying connection; the buffer's messages are in the stream, and
// the replay reads them from there at the client's pace. A client that
// reads as fast as it can gets every message after its position once,
// in order, the backlog included, and stays open: it is not closed 4002
// as a slow consumer.
func TestResumeAcrossCatchUp(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name    string
		history int  // messages after the resume position
		read    int  // the replay's read held: from ids[read]
		after   bool // held after the read ran, else before it
	}{
		// Its only read has run: the replay ends before the backlog,
		// which it must then read past its buffer.
		{"held after its last read", 5, 0, true},
		// Its second read reads into the backlog.
		{"held before its second read", replayBatch + 10, replayBatch, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e, rdb, ks, pause := pausedEgress(t, nil)
			ids := appendData(t, rdb, ks, "room", []byte(`"h"`), tc.history+1)

			p := &pausePoint{key: ks.Stream("room"), start: ids[tc.read], after: tc.after, reached: make(chan struct{}), released: make(chan struct{})}
			pause.arm(p)
			defer p.release()
			ws := resumeOn(t, e, "room", ids[0])
			p.await(t, "the replay never made the read")
			// The backlog, its notifications lost; the next notification
			// shows the gap, and the hub catches up while the replay is
			// held.
			backlog := appendLost(t, rdb, ks, e.s.hub.instance, "room", "", []byte(`"x"`), catchUpBacklog)
			backlog = append(backlog, appendTo(t, rdb, ks, "room", ks.Notify("room"), -1))
			last := backlog[len(backlog)-1]
			cs := e.s.hub.state(ks.Notify("room"))
			hubReaches(t, cs, last)
			p.release()

			if r := next(t, ws, "subscribed"); r.Recovered == nil || !*r.Recovered {
				t.Fatalf("recovered %v, want true", deref(r.Recovered))
			}
			got, code := readMessages(ws, 10*time.Second, func(id string) bool { return id == last })
			// Then live.
			then := appendTo(t, rdb, ks, "room", ks.Notify("room"), -2)
			if code == 0 {
				var more []string
				more, code = readMessages(ws, 5*time.Second, func(id string) bool { return id == then })
				got = append(got, more...)
			}
			if more, _ := readMessages(ws, 200*time.Millisecond, nil); len(more) > 0 {
				got = append(got, more...) // a duplicate would come now
			}
			want := append(append(slices.Clone(ids[1:]), backlog...), then)
			if code != 0 || !slices.Equal(got, want) {
				t.Fatalf("got %d of %d messages (close %d), want all once, in order, and no close", len(got), len(want), code)
			}
		})
	}
}

// TestResumeLiveAfterCatchUpLeftBufferFull: a catch-up delivers a
// backlog longer than SEND_QUEUE into a held replay's buffer, emptying
// it each time it finds it full, and leaves it all but full (SEND_QUEUE
// 16: 30 messages leave 13); then 4 live messages are published. They
// are far fewer than SEND_QUEUE, no sign of a slow client (docs/
// protocol.md, Resume: 4002 is for more than SEND_QUEUE live messages
// while the client replayed), and every message the buffer holds is in
// the stream: the buffer is emptied as a catch-up empties it, not
// overflowed, and the client, which reads as fast as it can, gets every
// message once, in order, and stays open.
func TestResumeLiveAfterCatchUpLeftBufferFull(t *testing.T) {
	t.Parallel()
	e, rdb, ks, pause := pausedEgress(t, nil)
	ids := appendData(t, rdb, ks, "room", []byte(`"h"`), 6)
	p := &pausePoint{key: ks.Stream("room"), start: ids[0], after: true, reached: make(chan struct{}), released: make(chan struct{})}
	pause.arm(p)
	defer p.release()
	ws := resumeOn(t, e, "room", ids[0])
	p.await(t, "the resume never read the stream")
	// The catch-up: the buffer is full after 16, emptied by the 17th,
	// and holds the last 13.
	backlog := appendLost(t, rdb, ks, e.s.hub.instance, "room", "", []byte(`"x"`), 29)
	backlog = append(backlog, appendTo(t, rdb, ks, "room", ks.Notify("room"), -1))
	var live []string
	for i := range 4 {
		live = append(live, appendTo(t, rdb, ks, "room", ks.Notify("room"), i))
	}
	last := live[len(live)-1]
	cs := e.s.hub.state(ks.Notify("room"))
	hubReaches(t, cs, last)
	p.release()
	next(t, ws, "subscribed")
	got, code := readMessages(ws, 5*time.Second, func(id string) bool { return id == last })
	want := append(append(slices.Clone(ids[1:]), backlog...), live...)
	if code != 0 || !slices.Equal(got, want) {
		t.Fatalf("got %d of %d messages (close %d), want all once, in order, and no close:\n%v\nwant %v", len(got), len(want), code, got, want)
	}
}

// TestResumeCatchUpDuringHandOver: a replay ends with its buffer holding
// live messages and the client's queue backed up (the client reads
// nothing: its socket is already full with another channel's
// messages); the hand-over queues part of the buffer and waits for room
// when a catch-up of a backlog longer than SEND_QUEUE empties the rest.
// The replay reads on from the stream, but from the last message the
// hand-over queued, not from where the replay had stopped: the client
// gets each message once.
func TestResumeCatchUpDuringHandOver(t *testing.T) {
	t.Parallel()
	e, rdb, ks, pause := pausedEgress(t, map[string]string{"WRITE_TIMEOUT": "30s"})
	<-e.s.hub.inbox.ready
	data := []byte(`"` + strings.Repeat("x", 64<<10) + `"`)
	hist := appendData(t, rdb, ks, "ho", data, 4)
	p := &pausePoint{key: ks.Stream("ho"), start: hist[0], after: true, reached: make(chan struct{}), released: make(chan struct{})}
	pause.arm(p)
	defer p.release()
	ws, _, err := smallBufDialer.Dial(e.url(nil), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	id := next(t, ws, "welcome").ConnectionID
	// A channel whose messages fill the socket and back its queue up.
	send(t, ws, map[string]any{"type": "subscribe", "channel": "fill"})
	cs := e.s.hub.state(ks.Notify("fill"))
	testkit.Eventually(t, 5*time.Second, func() error {
		if cs == nil {
			cs = e.s.hub.state(ks.Notify("fill"))
			return errors.New("not subscribed yet")
		}
		cs.mu.Lock()
		defer cs.mu.Unlock()
		if len(cs.subs) != 1 {
			return errors.New("not subscribed")
		}
		return nil
	})
	c := e.conn(id)
	// Small buffers both ends, fixed (a send buffer the kernel may grow
	// would let the writer drain the queue after it looked full, and
	// the hand-over queue the whole buffer at once).
	_ = c.nc.(*net.TCPConn).SetWriteBuffer(16 << 10)
	send(t, ws, map[string]any{"type": "subscribe", "channel": "ho", "after": hist[0]})
	p.await(t, "the resume never read the stream")
	fill := map[string]bool{}
	for n := 0; ; n++ {
		c.mu.Lock()
		q := len(c.queue)
		c.mu.Unlock()
		if q >= 2 {
			break
		}
		if n > 1000 {
			t.Fatal("the socket never filled")
		}
		id := appendData(t, rdb, ks, "fill", data, 1)[0]
		fill[id] = true
		hubReaches(t, cs, id)
	}
	cs = e.s.hub.state(ks.Notify("ho"))
	// Live messages, into the held replay's buffer.
	live := appendData(t, rdb, ks, "ho", data, 12)
	testkit.Eventually(t, 5*time.Second, func() error {
		cs.mu.Lock()
		defer cs.mu.Unlock()
		for _, r := range cs.resuming {
			if len(r.buf) == len(live) {
				return nil
			}
			return fmt.Errorf("the replay's buffer holds %d messages, want %d", len(r.buf), len(live))
		}
		return errors.New("the replay has ended")
	})
	p.release()
	// The hand-over queued part of the buffer and waits for room.
	testkit.Eventually(t, 5*time.Second, func() error {
		cs.mu.Lock()
		defer cs.mu.Unlock()
		for _, r := range cs.resuming {
			if n := len(r.buf); n > 0 && n < len(live) {
				return nil
			}
			return fmt.Errorf("the replay's buffer holds %d messages, want some of %d", len(r.buf), len(live))
		}
		return errors.New("the replay has ended")
	})
	backlog := appendLost(t, rdb, ks, e.s.hub.instance, "ho", "", []byte(`"x"`), 2*e.s.cfg.SendQueue)
	backlog = append(backlog, appendTo(t, rdb, ks, "ho", ks.Notify("ho"), -1))
	last := backlog[len(backlog)-1]
	hubReaches(t, cs, last)
	got, code := readThrough(ws, 20*time.Second, last)
	got = slices.DeleteFunc(got, func(id string) bool { return fill[id] })
	want := append(append(slices.Clone(hist[1:]), live...), backlog...)
	if code != 0 || !slices.Equal(got, want) {
		t.Fatalf("got %d of %d messages (close %d), want all once, in order, and no close:\n%v\nwant %v", len(got), len(want), code, got, want)
	}
}

// TestCatchUpsStuckReadersInManyChannels: the Pub/Sub connection is cut
// while each of many channels has a backlog whose notifications are
// lost and a subscriber that reads nothing (its frames are larger than
// the socket buffers hold, and WRITE_TIMEOUT is long, so that nothing
// else drops it). Every channel catches up, one after the other, on the
// receive loop, and each catch-up finds its stuck reader's queue full.
// Waiting catchUpWait for each would hold the loop, and every channel's
// live deliveries, for as many times catchUpWait as there are channels:
// the catch-ups' waits in all stay within the hub's budget (waitBurst at
// once, a waitShare-th of the time beyond), however many channels there
// are. The bound is on what the loop's catch-ups waited (hub.pacing),
// against the time the test saw pass: a slow machine makes it looser,
// never tighter.
func TestCatchUpsStuckReadersInManyChannels(t *testing.T) {
	t.Parallel()
	rdb, e := stuckReadersEgress(t, io.Discard, nil)
	h := e.s.hub
	const channels = 12
	elapsed := catchUpStuckReaders(t, rdb, e, channels)
	// A wait ends up to a poll past its deadline: catchUpWait of slack
	// covers a loaded machine's.
	waited := time.Duration(h.pacing.waited.Load())
	if bound := waitBurst + elapsed/waitShare + catchUpWait; waited > bound {
		t.Fatalf("the catch-ups of %d channels with a stuck reader each waited %v in all (in %v), want at most %v", channels, waited, elapsed, bound)
	}
	t.Logf("the catch-ups of %d channels waited %v in all, in %v", channels, waited, elapsed)
}

// stuckReadersEgress starts an egress on a Redis of its own (the kill
// of catchUpStuckReaders cuts every Pub/Sub client), with a small
// SEND_QUEUE and a WRITE_TIMEOUT long enough that nothing but a
// catch-up's backlog drops a reader that stopped, logging to logs.
func stuckReadersEgress(t *testing.T, logs io.Writer, tune func(*Server)) (redis.UniversalClient, *secEgress) {
	t.Helper()
	srv := redistest.Start(t)
	rdb := redis.NewClient(srv.Options())
	t.Cleanup(func() { rdb.Close() })
	prefix := redistest.Prefix(t)
	e := startEgressTuned(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true", "SEND_QUEUE": "16", "WRITE_TIMEOUT": "30s"}, logs, tune)
	return rdb, e
}

// catchUpStuckReaders cuts e's Pub/Sub connection while each of channels
// channels has a backlog whose notifications are lost and a subscriber
// that reads nothing (its frames are larger than the socket buffers
// hold), and returns once every channel has caught up, with how long
// that took from the cut. Every channel catches up, one after the
// other, on the receive loop, and each catch-up finds its stuck reader's
// queue full: a dozen of them spend the catch-ups' wait budget
// (waitBudget), which holds two catchUpWait.
func catchUpStuckReaders(t *testing.T, rdb redis.UniversalClient, e *secEgress, channels int) time.Duration {
	t.Helper()
	h := e.s.hub
	ks := keys.Scheme{Prefix: e.s.cfg.Redis.KeyPrefix}
	data := []byte(`"` + string(bytes.Repeat([]byte("x"), 32<<10)) + `"`)
	lasts := make([]string, channels)
	for i := range lasts {
		ch := "room" + strconv.Itoa(i)
		ws, _, err := smallBufDialer.Dial(e.url(url.Values{"channels": {ch}}), nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ws.Close() })
		id := next(t, ws, "welcome").ConnectionID
		next(t, ws, "subscribed") // and nothing more
		h.mu.Lock()
		c := h.conns[id]
		h.mu.Unlock()
		// Small buffers both ends, so that a few frames hold the writer.
		_ = c.nc.(*net.TCPConn).SetWriteBuffer(16 << 10)
		ids := appendLost(t, rdb, ks, h.instance, ch, "", data, 32)
		lasts[i] = ids[len(ids)-1]
	}
	start := time.Now()
	if err := rdb.ClientKillByFilter(t.Context(), "TYPE", "pubsub").Err(); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, 30*time.Second, func() error {
		for i, last := range lasts {
			cs := h.state(ks.Notify("room" + strconv.Itoa(i)))
			cs.mu.Lock()
			at := cs.last.String()
			cs.mu.Unlock()
			if at != last {
				return fmt.Errorf("room%d is at %s, not yet at %s", i, at, last)
			}
		}
		return nil
	})
	return time.Since(start)
}

// TestCatchUpsOverBudgetLogged: when the catch-ups' wait budget is spent
// (a dozen channels with a stuck reader each, after a reconnect), the
// catch-ups that go on without waiting, or give up before catchUpWait,
// say so: one warning however many there are, and one line when they
// are over that counts them, so that an operator can tell the 4002
// closes of readers that a backlog reached meanwhile, however fast they
// read, from slow consumers'.
func TestCatchUpsOverBudgetLogged(t *testing.T) {
	t.Parallel()
	var logs testkit.SyncBuffer
	rdb, e := stuckReadersEgress(t, &logs, func(s *Server) { s.hub.pacing.spent.Quiet = time.Second })
	h := e.s.hub
	catchUpStuckReaders(t, rdb, e, 12)
	var back []map[string]any
	testkit.Eventually(t, 10*time.Second, func() error {
		if back = logs.Lines(t, "catch-ups paced again"); len(back) == 0 {
			return errors.New("no end line yet")
		}
		return nil
	})
	warns := logs.Lines(t, "catch-ups delivering without waiting: wait budget spent")
	if len(warns) != 1 || warns[0]["level"] != "WARN" || warns[0]["err"] == nil || warns[0]["then"] == nil || warns[0]["stream"] == nil {
		t.Fatalf("over-budget warnings: %v, want one, with err, then and the stream", warns)
	}
	over := h.pacing.overBudget.Load()
	if len(back) != 1 || back[0]["level"] != "INFO" || back[0]["failures"] != float64(over) || over == 0 {
		t.Fatalf("end lines: %v, want one counting the %d waits over budget", back, over)
	}
}

// TestCatchUpsOneStuckReaderInManyChannels: a subscriber of several
// channels stops reading, its queue half full, and the Pub/Sub
// connection is cut while each of its channels has a message whose
// notification was lost. Each channel's catch-up leaves its queue at
// least half full; the first waits for it in vain, and no other waits
// for it again (its writer has taken nothing since): it holds up the
// receive loop once, not once per channel.
func TestCatchUpsOneStuckReaderInManyChannels(t *testing.T) {
	t.Parallel()
	srv := redistest.Start(t) // its own: the kill cuts every Pub/Sub client
	rdb := redis.NewClient(srv.Options())
	defer rdb.Close()
	prefix := redistest.Prefix(t)
	ks := keys.Scheme{Prefix: prefix}
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true", "SEND_QUEUE": "16", "WRITE_TIMEOUT": "30s"})
	h := e.s.hub

	// The live channel fills its queue to half (8 of 16) and a message
	// lost in each of the others takes it to 14: it is
	// not closed 4002, so each catch-up finds it backlogged.
	const lost = 6
	names := []string{"live"}
	for i := range lost {
		names = append(names, "room"+strconv.Itoa(i))
	}
	ws, _, err := smallBufDialer.Dial(e.url(url.Values{"channels": names}), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ws.Close() })
	id := next(t, ws, "welcome").ConnectionID
	for range names {
		next(t, ws, "subscribed") // and nothing more
	}
	h.mu.Lock()
	c := h.conns[id]
	h.mu.Unlock()
	_ = c.nc.(*net.TCPConn).SetWriteBuffer(16 << 10)

	// One at a time, each delivered before the next, until the writer
	// is held and half the queue waits behind it (a writer that started
	// late takes all that is queued in one batch).
	data := []byte(`"` + string(bytes.Repeat([]byte("x"), 32<<10)) + `"`)
	live := h.state(ks.Notify("live"))
	for i := 0; queuedFrames(c) < 8; i++ {
		if i == 64 {
			t.Fatalf("%d frames queued after %d messages: the writer is not held", queuedFrames(c), i)
		}
		hubReaches(t, live, appendData(t, rdb, ks, "live", data, 1)[0])
	}
	lasts := make([]string, lost)
	for i := range lasts {
		lasts[i] = appendLost(t, rdb, ks, h.instance, names[i+1], "", data, 1)[0]
	}
	if err := rdb.ClientKillByFilter(t.Context(), "TYPE", "pubsub").Err(); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, 30*time.Second, func() error {
		for i, last := range lasts {
			cs := h.state(ks.Notify(names[i+1]))
			cs.mu.Lock()
			at := cs.last.String()
			cs.mu.Unlock()
			if at != last {
				return fmt.Errorf("%s is at %s, not yet at %s", names[i+1], at, last)
			}
		}
		return nil
	})
	if n := queuedFrames(c); n != 8+lost {
		t.Fatalf("%d frames queued, want the %d messages lost on top of 8 (the writer took nothing)", n, lost)
	}
	if n := h.pacing.gaveUp.Load(); n != 1 {
		t.Fatalf("the catch-ups gave up waiting for the stuck reader %d times, want once", n)
	}
	// It was waited for catchUpWait, within budget: a slow consumer, not
	// a wait the budget cut short.
	if n := h.pacing.overBudget.Load(); n != 0 {
		t.Fatalf("%d catch-up waits over budget, want none", n)
	}
}

// TestResumeReadOnTrimmed: a catch-up empties a held replay's buffer
// (TestResumeAcrossCatchUp), and the stream is trimmed past the replay's
// position before its read-on reads it: the messages the buffer held
// are then nowhere, and the client is not handed the rest past them. It
// gets the history the replay sent before its read-on, in order, then
// nothing more but 1011, and its resume from there is told
// recovered:false.
func TestResumeReadOnTrimmed(t *testing.T) {
	t.Parallel()
	e, rdb, ks, pause := pausedEgress(t, nil)
	key := ks.Stream("room")
	ids := appendData(t, rdb, ks, "room", []byte(`"h"`), 6)
	// Held after its only read, then before its read-on's.
	p := &pausePoint{key: key, start: ids[0], after: true, reached: make(chan struct{}), released: make(chan struct{})}
	pause.arm(p)
	defer p.release()
	ws := resumeOn(t, e, "room", ids[0])
	p.await(t, "the replay never made its read")
	readOn := &pausePoint{key: key, start: ids[len(ids)-1], reached: make(chan struct{}), released: make(chan struct{})}
	pause.arm(readOn)
	defer readOn.release()
	backlog := appendLost(t, rdb, ks, e.s.hub.instance, "room", "", []byte(`"x"`), catchUpBacklog)
	backlog = append(backlog, appendTo(t, rdb, ks, "room", ks.Notify("room"), -1))
	last := backlog[len(backlog)-1]
	cs := e.s.hub.state(ks.Notify("room"))
	hubReaches(t, cs, last)
	p.release()
	readOn.await(t, "the replay never read on")
	// What the replay sent before its read-on, read now: a 1011 drops
	// what is still queued (keepsQueue).
	if r := next(t, ws, "subscribed"); r.Recovered == nil || !*r.Recovered {
		t.Fatalf("recovered %v, want true", deref(r.Recovered))
	}
	if got, code := readMessages(ws, 5*time.Second, func(id string) bool { return id == ids[len(ids)-1] }); code != 0 || !slices.Equal(got, ids[1:]) {
		t.Fatalf("got %v, close %d; want %v", got, code, ids[1:])
	}
	if err := rdb.XTrimMaxLen(t.Context(), key, 10).Err(); err != nil {
		t.Fatal(err)
	}
	readOn.release()
	if got, code := readMessages(ws, 5*time.Second, nil); code != protocol.CloseInternal || len(got) != 0 {
		t.Fatalf("then got %v, close %d; want nothing more, then %d", got, code, protocol.CloseInternal)
	}
	again := resumeOn(t, e, "room", ids[len(ids)-1])
	if r := next(t, again, "subscribed"); r.Recovered == nil || *r.Recovered {
		t.Fatalf("resumed again: recovered %v, want false", deref(r.Recovered))
	}
}

// hubReaches waits until the hub has delivered cs up to id (its last id
// is id).
func hubReaches(t *testing.T, cs *chanState, id string) {
	t.Helper()
	testkit.Eventually(t, 5*time.Second, func() error {
		cs.mu.Lock()
		defer cs.mu.Unlock()
		if cs.last.String() != id {
			return fmt.Errorf("the hub is at %s, not yet at %s", cs.last, id)
		}
		return nil
	})
}
