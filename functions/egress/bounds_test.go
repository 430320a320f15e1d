package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/protocol"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/stream"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// Tests of what one client can make a running egress hold: goroutines
// and memory after its sockets end, however they end.

// smallBufDialer dials with a small receive buffer, so that a client
// that stops reading holds the server's writes up soon.
var smallBufDialer = websocket.Dialer{HandshakeTimeout: 5 * time.Second, NetDialContext: rcvBufDialer(16 << 10).DialContext}

// rcvBufDialer dials sockets whose receive buffer is size bytes, set
// before the connection is made, so that what the client has not read
// waits in the server's socket.
func rcvBufDialer(size int) *net.Dialer {
	return &net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) { serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, size) })
		return errors.Join(err, serr)
	}}
}

// queuedFrames is how many frames wait in c's queue.
func queuedFrames(c *conn) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.queue)
}

// TestSocketsEndLeaveNothing: sockets ended every way a client or the
// server ends one — a close frame, the TCP connection cut, a missed pong,
// a frame left half-sent, a reader that stopped reading (4002 and the
// write timeout), a replay cut mid-way, requests held by
// MAX_FRAMES_PER_SECOND, 1008 and 1009 — leave no goroutine behind and
// nothing in the hub, while the egress goes on running (the lifecycle
// test checks the goroutines once the whole egress has stopped).
func TestSocketsEndLeaveNothing(t *testing.T) {
	rdb, prefix := redistest.Client(t)
	logs := &testkit.SyncBuffer{}
	e := startEgressLogging(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true", "PING_INTERVAL": "200ms",
		"WRITE_TIMEOUT": "500ms", "SEND_QUEUE": "16", "MAX_FRAME_BYTES": "1024"}, logs)
	<-e.s.hub.inbox.ready
	ks := keys.Scheme{Prefix: prefix}
	store := stream.NewStore(rdb)
	data := []byte(`"` + strings.Repeat("x", 16<<10) + `"`)
	publish := func(ch string, n int) []string {
		var as []stream.Append
		for range n {
			as = append(as, stream.Append{Stream: ks.Stream(ch), Notify: ks.Notify(ch),
				Msg: stream.Message{Channel: ch, TS: time.Now().UnixMilli(), Data: data}})
		}
		ids, err := store.Append(t.Context(), as)
		if err != nil {
			t.Fatal(err)
		}
		return ids
	}
	hist := publish("hist", 300)
	// Warm up what the egress starts once, not per socket (a channel's
	// subscription is on the instance's one Pub/Sub connection).
	warm, _ := subscribedTo(t, e, "live")
	warm.Close()
	testkit.Eventually(t, 5*time.Second, func() error { return openSockets(e.s, 0) })
	base := goleak.IgnoreCurrent()

	dial := func(d websocket.Dialer, q url.Values) *websocket.Conn {
		ws, _, err := d.Dial(e.url(q), nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ws.Close() })
		readUntil(t, ws, `"welcome"`)
		if q.Has("channels") {
			readUntil(t, ws, `"subscribed"`)
		}
		return ws
	}
	live := url.Values{"channels": {"live"}}
	// A close frame.
	ws := dial(websocket.Dialer{}, live)
	_ = ws.WriteMessage(websocket.CloseMessage, websocket.FormatCloseMessage(1000, ""))
	// The TCP connection cut.
	dial(websocket.Dialer{}, live).NetConn().Close()
	// Silent: pings unanswered (dropped after two intervals).
	dial(websocket.Dialer{}, nil)
	// A frame header promising more than is sent.
	_, _ = dial(websocket.Dialer{}, nil).NetConn().Write([]byte{0x81, 0xfe, 0x01, 0x00, 1, 2, 3, 4, 'x'})
	// Ten bad requests (1008), and a frame over MAX_FRAME_BYTES (1009).
	ws = dial(websocket.Dialer{}, nil)
	_ = ws.WriteMessage(websocket.TextMessage, []byte(strings.Repeat("{}", 10)))
	ws = dial(websocket.Dialer{}, nil)
	_ = ws.WriteMessage(websocket.TextMessage, []byte(strings.Repeat(" ", 2000)))
	// Requests held by MAX_FRAMES_PER_SECOND, then the TCP connection cut.
	ws = dial(websocket.Dialer{}, nil)
	_ = ws.WriteMessage(websocket.TextMessage, []byte(strings.Repeat(`{"type":"ping"}`, 60)))
	ws.NetConn().Close()
	// A replay cut mid-way, and a replay to a client that stopped reading.
	for _, cut := range []bool{true, false} {
		ws = dial(smallBufDialer, nil)
		send(t, ws, map[string]any{"type": "subscribe", "channel": "hist", "after": hist[0]})
		readUntil(t, ws, `"message"`)
		if cut {
			ws.NetConn().Close()
		}
	}
	// Live readers that stopped reading: 4002 or the write timeout. (The
	// frame of pings above no longer ends 4002: a frame's replies wait
	// for room in the queue, TestFrameRepliesToReadingClient.) More than
	// the queue and the sockets hold, in one go, so that the queue fills
	// before WRITE_TIMEOUT even on a loaded machine.
	for range 2 {
		dial(smallBufDialer, live)
	}
	publish("live", 300)

	testkit.Eventually(t, 10*time.Second, func() error { return openSockets(e.s, 0) })
	// Each way of ending was taken.
	for _, reason := range []string{"client closed", "connection lost", "missed pong", "too many invalid frames",
		"frame too large", "slow consumer: resume from your last id", "write failed"} {
		if !strings.Contains(logs.String(), `"reason":"`+reason+`"`) {
			t.Errorf("no socket ended with %q", reason)
		}
	}
	if err := goleak.Find(base); err != nil {
		t.Fatal(err)
	}
	// The metrics agree with the log (the default build's).
	checkEndMetrics(t, e, logs.String(), 12)
	e.s.hub.mu.Lock()
	conns, users := len(e.s.hub.conns), len(e.s.hub.users)
	var refs, subs int
	for _, cs := range e.s.hub.chans {
		if cs != e.s.hub.inbox {
			cs.mu.Lock()
			refs, subs = refs+cs.refs, subs+len(cs.subs)+len(cs.resuming)
			cs.mu.Unlock()
		}
	}
	e.s.hub.mu.Unlock()
	if conns != 0 || users != 0 || refs != 0 || subs != 0 {
		t.Fatalf("after every socket ended, the hub holds %d connections, %d users, %d channel references, %d subscribers", conns, users, refs, subs)
	}
}

// openSockets reports an error unless s holds n sockets.
func openSockets(s *Server, n int64) error {
	if got := s.open.Load(); got != n {
		return fmt.Errorf("%d sockets open, want %d", got, n)
	}
	return nil
}

// TestChurnIsNotRedisChurn: a client subscribing to and unsubscribing
// from one channel over and over costs the instance one SSUBSCRIBE in
// all, not a Redis subscription change each time (the linger,
// design.md).
func TestChurnIsNotRedisChurn(t *testing.T) {
	t.Parallel()
	srv := redistest.Start(t)
	rdb := redis.NewClient(&redis.Options{Addr: srv.Addr()})
	t.Cleanup(func() { rdb.Close() })
	e := startEgressOn(t, rdb, "churn", map[string]string{"ALLOW_ANONYMOUS": "true", "MAX_FRAMES_PER_SECOND": "0"})
	<-e.s.hub.inbox.ready
	before := commandCalls(t, rdb)
	ws, _, err := e.dial(t, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	next(t, ws, protocol.TypeWelcome)
	const n = 200
	var frame strings.Builder
	for i := range n {
		fmt.Fprintf(&frame, `{"type":"subscribe","channel":"flap"}{"type":"unsubscribe","channel":"flap","ref":%d}`, i)
	}
	if err := ws.WriteMessage(websocket.TextMessage, []byte(frame.String())); err != nil {
		t.Fatal(err)
	}
	for {
		if r := next(t, ws, protocol.TypeUnsubscribed); string(r.Ref) == strconv.Itoa(n-1) {
			break
		}
	}
	after := commandCalls(t, rdb)
	if d := after["ssubscribe"] - before["ssubscribe"]; d != 1 {
		t.Errorf("%d subscribes and unsubscribes: %d SSUBSCRIBE, want 1", n, d)
	}
	if d := after["sunsubscribe"] - before["sunsubscribe"]; d != 0 {
		t.Errorf("%d subscribes and unsubscribes: %d SUNSUBSCRIBE, want 0 (the linger)", n, d)
	}
	var total int64
	for k, v := range after {
		total += v - before[k]
	}
	t.Logf("%d subscribe+unsubscribe pairs: %d Redis commands", n, total)
}

// TestIdleChannelLingers: an instance stays subscribed to a channel for
// linger (10 s) after its last local subscriber leaves (design.md,
// Linger), so that a client that leaves and comes back, or a channel
// whose subscribers come and go, costs no Redis subscription change:
// the maintenance loop's sweep (every second) leaves the channel alone
// until then, and unsubscribes it after. TestChurnIsNotRedisChurn's
// churn is over before a sweep runs, and passes without the linger.
func TestIdleChannelLingers(t *testing.T) {
	t.Parallel()
	srv := redistest.Start(t)
	rdb := redis.NewClient(&redis.Options{Addr: srv.Addr()})
	t.Cleanup(func() { rdb.Close() })
	e := startEgressOn(t, rdb, "linger", map[string]string{"ALLOW_ANONYMOUS": "true"})
	<-e.s.hub.inbox.ready
	ws, _, err := e.dial(t, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	next(t, ws, protocol.TypeWelcome)
	send(t, ws, map[string]any{"type": "subscribe", "channel": "linger"})
	next(t, ws, protocol.TypeSubscribed)
	send(t, ws, map[string]any{"type": "unsubscribe", "channel": "linger"})
	next(t, ws, protocol.TypeUnsubscribed)
	notify := e.s.hub.keys.Notify("linger")
	before := commandCalls(t, rdb)
	// A sweep just after the last subscriber left, and one just short of
	// the linger after: the channel stays.
	e.s.hub.sweepIdle(t.Context(), time.Now())
	e.s.hub.mu.Lock()
	cs := e.s.hub.chans[notify]
	idleAt := time.Time{}
	if cs != nil {
		idleAt = cs.idleAt
	}
	e.s.hub.mu.Unlock()
	if cs == nil {
		t.Fatal("the channel was dropped by a sweep right after its last subscriber left, before the linger")
	}
	e.s.hub.sweepIdle(t.Context(), idleAt.Add(linger-time.Second))
	if e.s.hub.state(notify) == nil {
		t.Fatal("the channel was dropped a second before the linger was over")
	}
	if d := commandCalls(t, rdb)["sunsubscribe"] - before["sunsubscribe"]; d != 0 {
		t.Fatalf("%d SUNSUBSCRIBE during the linger, want none", d)
	}
	// Once the linger is over, the sweep unsubscribes it.
	e.s.hub.sweepIdle(t.Context(), idleAt.Add(linger))
	if e.s.hub.state(notify) != nil {
		t.Fatal("the channel is still subscribed after the linger")
	}
	testkit.Eventually(t, 5*time.Second, func() error {
		if d := commandCalls(t, rdb)["sunsubscribe"] - before["sunsubscribe"]; d != 1 {
			return fmt.Errorf("%d SUNSUBSCRIBE after the linger, want 1", d)
		}
		return nil
	})
}

// commandCalls is Redis's count of calls per command (INFO commandstats).
func commandCalls(t *testing.T, rdb *redis.Client) map[string]int64 {
	t.Helper()
	info, err := rdb.Info(t.Context(), "commandstats").Result()
	if err != nil {
		t.Fatal(err)
	}
	calls := map[string]int64{}
	for _, line := range strings.Split(info, "\n") {
		name, rest, ok := strings.Cut(strings.TrimPrefix(strings.TrimSpace(line), "cmdstat_"), ":calls=")
		if !ok {
			continue
		}
		v, _, _ := strings.Cut(rest, ",")
		calls[name], _ = strconv.ParseInt(v, 10, 64)
	}
	return calls
}

// TestInitialChannelsStopAtClose: the names of ?channels= are handled
// one by one at the upgrade, each answered as a subscribe frame would
// be, at MAX_FRAMES_PER_SECOND; once the connection is closed (here by
// the server, as an operator's disconnect does) the names left are not
// subscribed, in Redis or in the registry, for a socket that has ended,
// as the rest of a frame's requests are not.
func TestInitialChannelsStopAtClose(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true", "MAX_FRAMES_PER_SECOND": "10", "MAX_SUBSCRIPTIONS": "101"})
	<-e.s.hub.inbox.ready
	names := channelNames(100)
	ws, _, err := e.dial(t, url.Values{"channels": {strings.Join(names, ",") + ",late"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	welcome := next(t, ws, protocol.TypeWelcome)
	next(t, ws, protocol.TypeSubscribed) // the list is being handled
	c := e.conn(welcome.ConnectionID)
	c.closeWith(protocol.CloseGoingAway, "test: closed by the server", true)
	// Not the ten seconds the rest of the list would take.
	testkit.Eventually(t, 3*time.Second, func() error { return openSockets(e.s, 0) })
	if e.s.hub.state(e.s.hub.keys.Notify("late")) != nil {
		t.Fatal("a name after the close was subscribed")
	}
}

// TestReplayHeldByReaderHoldsUpNoOne: a client resuming from far back in
// a long history and not reading its replay holds no more of it than its
// queue, read from Redis in pages, while the channel's live messages
// reach its other subscribers as they are published; the write timeout
// then drops it.
func TestReplayHeldByReaderHoldsUpNoOne(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true", "SEND_QUEUE": "64", "WRITE_TIMEOUT": "2s"})
	<-e.s.hub.inbox.ready
	ks := keys.Scheme{Prefix: prefix}
	data := []byte(`"` + strings.Repeat("x", 8<<10) + `"`)
	ids := appendData(t, rdb, ks, "long", data, 2000)
	live, _ := subscribedTo(t, e, "long")
	stalled, _, err := smallBufDialer.Dial(e.url(nil), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer stalled.Close()
	readUntil(t, stalled, `"welcome"`)
	send(t, stalled, map[string]any{"type": "subscribe", "channel": "long", "after": ids[0]})
	readUntil(t, stalled, `"subscribed"`)
	time.Sleep(100 * time.Millisecond) // the replay fills what the socket takes, then waits

	var held int
	for range 10 {
		e.s.hub.mu.Lock()
		for _, c := range e.s.hub.conns {
			c.mu.Lock()
			held = max(held, len(c.queue))
			c.mu.Unlock()
		}
		e.s.hub.mu.Unlock()
		start := time.Now()
		id := appendData(t, rdb, ks, "long", data, 1)
		got, _ := readMessages(live, 5*time.Second, func(got string) bool { return got == id[0] })
		if len(got) == 0 || got[len(got)-1] != id[0] {
			t.Fatalf("live subscriber: %v, want up to %s", got, id[0])
		}
		if d := time.Since(start); d > time.Second {
			t.Fatalf("live message took %v while a replay waited for its reader", d)
		}
	}
	// The replay waits for the queue to be half empty before it adds to it.
	if held > 64/2 {
		t.Fatalf("the replay queued %d frames, over half SEND_QUEUE", held)
	}
	// The write timeout drops the stalled one, leaving the live
	// subscriber's socket (it counts from the last data the server's
	// socket took, and the kernel grows its send buffer for a while).
	testkit.Eventually(t, 20*time.Second, func() error { return openSockets(e.s, 1) })
}

// TestConnectionSlotsComeBack: MAX_CONNECTIONS counts the sockets open,
// whoever opened them; an upgrade over it is refused with 503 (a JSON
// too_many_connections and Retry-After), and a socket's slot is free
// again once it has ended, however it ended.
func TestConnectionSlotsComeBack(t *testing.T) {
	t.Parallel()
	e := startSecEgress(t, map[string]string{"ALLOW_ANONYMOUS": "true", "MAX_CONNECTIONS": "2"})
	var socks []*websocket.Conn
	for range 2 {
		ws, _, err := e.dial(t, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		next(t, ws, protocol.TypeWelcome)
		socks = append(socks, ws)
	}
	full := func() {
		t.Helper()
		_, resp, err := e.dial(t, nil, nil)
		if err == nil || resp == nil || resp.StatusCode != 503 || resp.Header.Get("Retry-After") == "" {
			t.Fatalf("over MAX_CONNECTIONS: %v %+v", err, resp)
		}
		var body struct{ Error struct{ Code string } }
		if err := json.NewDecoder(resp.Body).Decode(&body); err != nil || body.Error.Code != "too_many_connections" {
			t.Fatalf("over MAX_CONNECTIONS: %+v, %v", body, err)
		}
	}
	full()
	// One socket cut without a close frame, the other closed properly:
	// each frees its slot.
	for i, ws := range socks {
		if i == 0 {
			ws.NetConn().Close()
		} else {
			_ = ws.WriteMessage(websocket.CloseMessage, websocket.FormatCloseMessage(1000, ""))
		}
		testkit.Eventually(t, 5*time.Second, func() error {
			ws, _, err := e.dial(t, nil, nil)
			if err != nil {
				return err
			}
			next(t, ws, protocol.TypeWelcome)
			socks[i] = ws
			return nil
		})
	}
	full()
}

// TestInitialChannelsEndWithTheSocket: with Redis unreachable each name
// of ?channels= waits up to 5 s for its subscription before it is
// answered unavailable; a client that gave up meanwhile does not keep
// its socket (and its MAX_CONNECTIONS slot) for 5 s per name left.
func TestInitialChannelsEndWithTheSocket(t *testing.T) {
	t.Parallel()
	srv := redistest.Start(t)
	rdb := redis.NewClient(&redis.Options{Addr: srv.Addr()})
	t.Cleanup(func() { rdb.Close() })
	e := startEgressOn(t, rdb, "gone", map[string]string{"ALLOW_ANONYMOUS": "true", "REDIS_TIMEOUT": "200ms"})
	<-e.s.hub.inbox.ready
	names := channelNames(20)
	ws, _, err := e.dial(t, url.Values{"channels": {strings.Join(names, ",")}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	next(t, ws, protocol.TypeWelcome)
	srv.Stop()
	// Cut (a reset), so that the first reply written fails: the egress
	// learns of it then, since nothing reads the socket yet.
	_ = ws.NetConn().(*net.TCPConn).SetLinger(0)
	ws.Close()
	// One name's wait, not twenty.
	testkit.Eventually(t, 15*time.Second, func() error { return openSockets(e.s, 0) })
}

// TestBacklogMemoryReturned: a connection whose queue once held a
// backlog (a replay, a burst it fell behind on) goes back to an idle
// connection's memory once the backlog is written: the queue's storage,
// 8 bytes a frame up to SEND_QUEUE (twice, for the writer's batch), is
// not kept for the rest of its life.
func TestBacklogMemoryReturned(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"})
	<-e.s.hub.inbox.ready
	ks := keys.Scheme{Prefix: prefix}
	var as []stream.Append
	for range 1001 {
		as = append(as, stream.Append{Stream: ks.Stream("backlog"), Notify: ks.Notify("backlog"),
			Msg: stream.Message{Channel: "backlog", TS: time.Now().UnixMilli(), Data: []byte(`"x"`)}})
	}
	ids, err := stream.NewStore(rdb).Append(t.Context(), as)
	if err != nil {
		t.Fatal(err)
	}
	ws := resumeOn(t, e, "backlog", ids[0])
	if got, _ := readMessages(ws, 10*time.Second, func(id string) bool { return id == ids[len(ids)-1] }); len(got) != len(ids)-1 {
		t.Fatalf("replayed %d of %d", len(got), len(ids)-1)
	}
	testkit.Eventually(t, 5*time.Second, func() error {
		for _, c := range e.s.hub.snapshotConns() {
			c.mu.Lock()
			writing, held := c.writing, cap(c.queue)+cap(c.spare)
			c.mu.Unlock()
			if writing || held > 2*keepQueue {
				return fmt.Errorf("idle after its replay, the connection keeps room for %d frames (writer running: %v)", held, writing)
			}
		}
		return nil
	})
}

// channelNames is n channel names, c0 to c<n-1>, for a ?channels= list.
func channelNames(n int) []string {
	names := make([]string, n)
	for i := range names {
		names[i] = "c" + strconv.Itoa(i)
	}
	return names
}
