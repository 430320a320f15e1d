package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/protocol"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/stream"
)

// TestPingsAndMissedPongs: the maintenance sweep pings every socket each
// PING_INTERVAL (an idle socket gets the ping from the sweep itself, with
// no writer goroutine); a client that answers stays connected, and one
// that goes silent is dropped once it has sent nothing for 2×PING_INTERVAL.
func TestPingsAndMissedPongs(t *testing.T) {
	e := startSecEgress(t, map[string]string{"ALLOW_ANONYMOUS": "true", "PING_INTERVAL": "200ms"})
	<-e.s.hub.inbox.ready
	dial := func() *websocket.Conn {
		ws, _, err := websocket.DefaultDialer.Dial(e.url(url.Values{"channels": {"keepalive"}}), nil)
		if err != nil {
			t.Fatal(err)
		}
		readUntil(t, ws, `"subscribed"`)
		_ = ws.SetReadDeadline(time.Time{})
		return ws
	}
	readAll := func(ws *websocket.Conn) <-chan error {
		done := make(chan error, 1)
		go func() {
			for {
				if _, _, err := ws.ReadMessage(); err != nil {
					done <- err
					return
				}
			}
		}()
		return done
	}
	alive := dial()
	defer alive.Close()
	var pings atomic.Int32
	alive.SetPingHandler(func(data string) error {
		pings.Add(1)
		return alive.WriteControl(websocket.PongMessage, []byte(data), time.Now().Add(time.Second))
	})
	// Read (and so answer pings) before the second socket is dialled: a
	// client that sent nothing since its upgrade is dropped 2×PING_INTERVAL
	// (400 ms) later, and a dial and subscribe that took longer (a loaded
	// machine) had the answering client dropped before it read anything.
	aliveDone := readAll(alive)
	connected := time.Now() // the silent socket's last read is no earlier
	silent := dial()
	defer silent.Close()
	var silentPings atomic.Int32
	silent.SetPingHandler(func(string) error { silentPings.Add(1); return nil })
	silentDone := readAll(silent)

	select {
	case <-silentDone:
		if d := time.Since(connected); d < 400*time.Millisecond {
			t.Fatalf("silent client dropped %v after connecting, before 2×PING_INTERVAL", d)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a client that answers no ping was not dropped")
	}
	if silentPings.Load() == 0 {
		t.Fatal("the silent client was never pinged")
	}
	time.Sleep(time.Second)
	select {
	case err := <-aliveDone:
		t.Fatalf("a client answering pings was dropped: %v", err)
	default:
	}
	if n := pings.Load(); n < 3 {
		t.Fatalf("%d pings in %v at PING_INTERVAL=200ms", n, time.Since(connected))
	}
}

// TestPongsDoNotPileUp: while the writer is busy (a client that pings and
// does not read keeps it stuck on a full socket), each ping's pong
// replaces the one still waiting (RFC 6455 §5.5.3 allows answering only
// the latest ping) instead of joining it: one such socket took an egress
// to gigabytes. A server ping or a part-written frame waiting ahead of it
// stays.
func TestPongsDoNotPileUp(t *testing.T) {
	t.Parallel()
	c := &conn{writing: true}                   // a writer is running
	c.ctrl = [][]byte{pingFrame[1:], pingFrame} // the rest of a ping, a ping
	for i := range 10000 {
		c.pong([]byte(strconv.Itoa(i)))
	}
	want := [][]byte{pingFrame[1:], pingFrame, wsFrame(opPong, []byte("9999"))}
	if len(c.ctrl) != len(want) {
		t.Fatalf("%d control frames waiting, want %d", len(c.ctrl), len(want))
	}
	for i := range want {
		if !bytes.Equal(c.ctrl[i], want[i]) {
			t.Errorf("control frame %d: %x, want %x", i, c.ctrl[i], want[i])
		}
	}
}

// TestHalfPingBeforeClose: the sweep's ping got one byte of its frame
// into the socket (the send buffer had room for no more) just as the
// server closed the connection and the reader ended: the rest of the ping
// goes out ahead of the close frame, which would otherwise be read as the
// ping's payload, and the client would never see the close code.
func TestHalfPingBeforeClose(t *testing.T) {
	t.Parallel()
	server, client := tcpPair(t)
	c := &conn{s: &Server{cfg: Config{SendQueue: 16, WriteTimeout: time.Second}}, nc: server, done: make(chan struct{})}
	// ping, as the writer for its one non-blocking write (see ping).
	c.mu.Lock()
	c.writing = true
	c.writers.Add(1)
	c.mu.Unlock()
	if _, err := server.Write(pingFrame[:1]); err != nil {
		t.Fatal(err)
	}
	// Meanwhile the server closes the connection (no writer starts: the
	// ping's write holds it back) and the reader ends.
	c.closeWith(protocol.CloseSlowConsumer, "slow consumer", true)
	finished := make(chan struct{})
	go func() {
		c.finishWrites()
		_ = server.Close()
		close(finished)
	}()
	for ended := false; !ended; {
		time.Sleep(time.Millisecond)
		c.mu.Lock()
		ended = c.ended
		c.mu.Unlock()
	}
	c.pingWritten(1)
	<-finished
	_ = client.SetReadDeadline(time.Now().Add(5 * time.Second))
	got, err := io.ReadAll(client)
	if err != nil {
		t.Fatal(err)
	}
	want := append(slices.Clone(pingFrame), wsFrame(opClose, closePayload(protocol.CloseSlowConsumer, "slow consumer"))...)
	if !bytes.Equal(got, want) {
		t.Fatalf("the client read %x, want the whole ping then the close frame, %x", got, want)
	}
}

// TestIdlePingAfterWriteDeadline: the sweep's ping to an idle socket is
// its own non-blocking write, with no writer goroutine (docs/design.md,
// Liveness), also once the write deadline the writer armed for its last
// write has passed, as with the defaults (WRITE_TIMEOUT 10s,
// PING_INTERVAL 25s) it always has by the next ping. The write went
// through RawConn.Write, which fails without writing once the deadline
// has passed: every ping to an idle socket started a writer.
func TestIdlePingAfterWriteDeadline(t *testing.T) {
	t.Parallel()
	const timeout = 100 * time.Millisecond
	server, client := tcpPair(t)
	c := &conn{s: &Server{cfg: Config{SendQueue: 16, WriteTimeout: timeout}}, nc: server, done: make(chan struct{})}
	c.fr.init(server, 1<<16)
	frame := wsFrame(opText, []byte(`{"type":"welcome"}`))
	c.enqueue(&queued{frame: frame})
	c.writers.Wait()
	armed := c.writeDeadline
	time.Sleep(2 * timeout) // idle: the deadline passes
	c.ping()
	c.writers.Wait()
	if c.writeDeadline != armed {
		t.Fatal("the ping to an idle socket started the writer, which armed a deadline: the sweep's own write wrote nothing")
	}
	want := append(slices.Clone(frame), pingFrame...)
	got := make([]byte, len(want))
	_ = client.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(client, got); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("the client read %x, %v; want the frame then a ping, %x", got, err, want)
	}
}

// TestReplayToSteadyReader: a client reading a long replay steadily, a
// little slower than the socket could go, and sending a pong every 50 ms
// (a heartbeat RFC 6455 §5.5.3 allows), is not dropped as silent: the
// reader goroutine is busy with the replay and reads none of its frames
// meanwhile, which is no sign of a dead peer.
func TestReplayToSteadyReader(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true", "PING_INTERVAL": "200ms", "SEND_QUEUE": "16"})
	<-e.s.hub.inbox.ready
	ks := keys.Scheme{Prefix: prefix}
	data := []byte(`"` + strings.Repeat("x", 16<<10) + `"`)
	const n = 300
	var as []stream.Append
	for range n + 1 {
		as = append(as, stream.Append{Stream: ks.Stream("big"), Notify: ks.Notify("big"),
			Msg: stream.Message{Channel: "big", TS: time.Now().UnixMilli(), Data: data}})
	}
	ids, err := stream.NewStore(rdb).Append(t.Context(), as)
	if err != nil {
		t.Fatal(err)
	}
	// A small receive buffer, so that the replay waits for the reader.
	d := websocket.Dialer{NetDialContext: rcvBufDialer(32 << 10).DialContext}
	ws, _, err := d.Dial(e.url(nil), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	readUntil(t, ws, `"welcome"`)
	send(t, ws, map[string]any{"type": "subscribe", "channel": "big", "after": ids[0]})
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
				if ws.WriteControl(websocket.PongMessage, nil, time.Now().Add(time.Second)) != nil {
					return
				}
			}
		}
	}()
	start := time.Now()
	for got := 0; got < n; {
		_ = ws.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, b, err := ws.ReadMessage()
		if err != nil {
			t.Fatalf("after %d of %d replayed messages, %v: %v", got, n, time.Since(start), err)
		}
		if bytes.Contains(b, []byte(`"message"`)) {
			got++
			time.Sleep(5 * time.Millisecond)
		}
	}
}

// TestLifetimeSpread: MAX_LIFETIME closes each connection (4001) within
// the last tenth of the limit, never after it, and at a time of its own:
// sockets opened together are not all cut together (they would all
// reconnect together, every limit).
func TestLifetimeSpread(t *testing.T) {
	const limit = 2 * time.Second
	// PING_INTERVAL 100ms: the sweep that closes runs every 50 ms.
	e := startSecEgress(t, map[string]string{"ALLOW_ANONYMOUS": "true", "MAX_LIFETIME": limit.String(), "PING_INTERVAL": "100ms"})
	<-e.s.hub.inbox.ready
	const n = 12
	type closed struct {
		after time.Duration
		code  int
	}
	ends := make(chan closed, n)
	for i := 0; i < n; i++ {
		ws, _, err := websocket.DefaultDialer.Dial(e.url(url.Values{"channels": {"lifetime"}}), nil)
		if err != nil {
			t.Fatal(err)
		}
		defer ws.Close()
		opened := time.Now() // the server's openedAt is no earlier
		go func() {
			for {
				if _, _, err := ws.ReadMessage(); err != nil {
					var ce *websocket.CloseError
					code := -1
					if errors.As(err, &ce) {
						code = ce.Code
					}
					ends <- closed{time.Since(opened), code}
					return
				}
			}
		}()
	}
	first, last := time.Hour, time.Duration(0)
	for i := 0; i < n; i++ {
		select {
		case c := <-ends:
			if c.code != 4001 {
				t.Fatalf("connection closed with %d, want 4001", c.code)
			}
			if c.after < limit*9/10-50*time.Millisecond {
				t.Fatalf("closed %v after opening: before nine tenths of MAX_LIFETIME %v", c.after, limit)
			}
			// The close frame's way to the client, and a sweep or reader
			// woken late on a loaded machine: 200 ms at most.
			if c.after > limit+200*time.Millisecond {
				t.Fatalf("closed %v after opening: past MAX_LIFETIME %v", c.after, limit)
			}
			first, last = min(first, c.after), max(last, c.after)
		case <-time.After(2 * limit):
			t.Fatal("MAX_LIFETIME closed no connection")
		}
	}
	if last-first < 40*time.Millisecond {
		t.Fatalf("%d connections opened together closed within %v of each other (%v–%v): no jitter", n, last-first, first, last)
	}
}

func TestLifetimeOf(t *testing.T) {
	if lifetimeOf(0, time.Second) != 0 {
		t.Fatal("MAX_LIFETIME 0 must mean no lifetime")
	}
	for _, tc := range []struct{ limit, tick time.Duration }{
		{870 * time.Second, time.Second},
		{time.Second, 50 * time.Millisecond}, // the shortest MAX_LIFETIME, and its sweep
	} {
		limit, tick := tc.limit, tc.tick
		if got := sweepEvery(Config{PingInterval: 25 * time.Second, MaxLifetime: limit}); got != tick {
			t.Fatalf("MAX_LIFETIME %v: sweep every %v, want %v", limit, got, tick)
		}
		lo, hi := limit, time.Duration(0)
		for i := 0; i < 1000; i++ {
			d := lifetimeOf(limit, tick)
			// Closed at the first sweep past d: never after limit.
			if d+tick > limit || d < limit-limit/10 {
				t.Fatalf("lifetime %v outside %v–%v", d, limit-limit/10, limit-tick)
			}
			lo, hi = min(lo, d), max(hi, d)
		}
		if hi-lo < limit/40 {
			t.Fatalf("1000 lifetimes span only %v–%v", lo, hi)
		}
	}
}

// TestLifetimeNeverPastLimit: MAX_LIFETIME closes a connection at most
// that long after it opened (docs/protocol.md, Timeouts), with the sweep
// at its usual pace (once a second at the default PING_INTERVAL), not up
// to a sweep later: at MAX_LIFETIME=1s, a close up to a second late was
// a lifetime up to twice as long.
func TestLifetimeNeverPastLimit(t *testing.T) {
	const limit = time.Second
	e := startSecEgress(t, map[string]string{"ALLOW_ANONYMOUS": "true", "MAX_LIFETIME": limit.String()})
	<-e.s.hub.inbox.ready
	const n = 8
	ends := make(chan time.Duration, n)
	for i := 0; i < n; i++ {
		// Opened at different points of the sweep's second.
		time.Sleep(limit / n)
		start := time.Now() // the server's openedAt is no earlier
		ws, _, err := websocket.DefaultDialer.Dial(e.url(nil), nil)
		if err != nil {
			t.Fatal(err)
		}
		defer ws.Close()
		go func() {
			for {
				if _, _, err := ws.ReadMessage(); err != nil {
					var ce *websocket.CloseError
					if !errors.As(err, &ce) || ce.Code != 4001 {
						t.Errorf("connection ended with %v, want close 4001", err)
					}
					ends <- time.Since(start)
					return
				}
			}
		}()
	}
	for i := 0; i < n; i++ {
		select {
		case after := <-ends:
			// The close frame's way to the client, and a sweep or reader
			// woken late on a loaded machine: 200 ms at most. A close up
			// to a sweep (a second) late, the bug, still shows in one of
			// the eight.
			if after > limit+200*time.Millisecond {
				t.Errorf("closed %v after opening: past MAX_LIFETIME %v", after, limit)
			}
			if after < limit*9/10 {
				t.Errorf("closed %v after opening: before nine tenths of MAX_LIFETIME %v", after, limit)
			}
		case <-time.After(5 * limit):
			t.Fatal("MAX_LIFETIME closed no connection")
		}
	}
}

// TestSlowRequestIsNotSilence: while the reader carries out a request
// that waits on Redis longer than 2×PING_INTERVAL (here a resume's
// first stream read, held; a subscribe may wait 5 s for an unreachable
// Redis), the client's pongs wait unread in the socket: it is busy, not
// silent, and the sweep must not drop it as "missed pong". Once the
// request is done it gets its reply and its messages.
func TestSlowRequestIsNotSilence(t *testing.T) {
	t.Parallel()
	e, rdb, ks, pause := pausedEgress(t, map[string]string{"PING_INTERVAL": "200ms"})
	<-e.s.hub.inbox.ready
	hist := appendData(t, rdb, ks, "slow", []byte(`1`), 3)
	p := &pausePoint{key: ks.Stream("slow"), start: hist[0], reached: make(chan struct{}), released: make(chan struct{})}
	pause.arm(p)
	defer p.release()
	ws, _, err := websocket.DefaultDialer.Dial(e.url(nil), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	next(t, ws, "welcome")
	send(t, ws, map[string]any{"type": "subscribe", "channel": "slow", "after": hist[0]})
	p.await(t, "the resume never read the stream")
	// Read all along, which answers the pings (gorilla's default ping
	// handler runs within a read).
	type frame struct {
		Type, ID string
	}
	frames, ended := make(chan frame, 16), make(chan error, 1)
	go func() {
		for {
			_, b, err := ws.ReadMessage()
			if err != nil {
				ended <- err
				return
			}
			var f frame
			_ = json.Unmarshal(b, &f)
			frames <- f
		}
	}()
	// Five times 2×PING_INTERVAL while the request waits.
	select {
	case err := <-ended:
		t.Fatalf("dropped while a request waited on Redis: %v", err)
	case f := <-frames:
		t.Fatalf("%+v while the request waited, want nothing until it is done", f)
	case <-time.After(2 * time.Second):
	}
	p.release()
	var got []string
	for len(got) < 2 {
		select {
		case err := <-ended:
			t.Fatalf("after the request: %v (got %v)", err, got)
		case f := <-frames:
			if f.Type == "message" {
				got = append(got, f.ID)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("after the request: got %v, want %v", got, hist[1:])
		}
	}
	if !slices.Equal(got, hist[1:]) {
		t.Fatalf("got %v, want %v", got, hist[1:])
	}
}

// TestSweepThresholds: the sweep's timers close at the limits
// docs/protocol.md (Timeouts) gives them, not later: a peer silent for
// 2×PING_INTERVAL is dropped (1006, "missed pong"), a connection with no
// data frame either way for IDLE_TIMEOUT is closed 4000, and neither
// before; a connection the writer is in the middle of writing to is
// neither idle nor silent, its idle time counting from the write's end.
// TestPingsAndMissedPongs and TestBusyWriteIsNotSilence bound these from
// one side only, or by timing a burst's write: a sweep that waited
// 3×PING_INTERVAL or 2×IDLE_TIMEOUT, or closed as idle a connection in
// the middle of a write that came in batches, passed them. The
// connection's timers are set back here (the sweep judges by them), with
// intervals long enough that the egress's own sweep, meanwhile, closes
// nothing these do not.
func TestSweepThresholds(t *testing.T) {
	t.Parallel()
	const ping, idle = 20 * time.Second, 30 * time.Second
	const margin = 5 * time.Second // a sweep's period and a loaded machine's stall, and more
	e := startSecEgress(t, map[string]string{"ALLOW_ANONYMOUS": "true", "PING_INTERVAL": "20s", "IDLE_TIMEOUT": "30s"})
	<-e.s.hub.inbox.ready
	closed := func(c *conn) (code int, reason string, ok bool) {
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.closeCode, c.reason, c.closeStarted.Load()
	}
	open := func(t *testing.T) *conn {
		t.Helper()
		_, c := e.dialConn(t, url.Values{})
		waitWritten(t, c)
		return c
	}
	back := func(d time.Duration) int64 { return monoNow() - int64(d) }
	for _, tc := range []struct {
		name       string
		set        func(c *conn)
		code       int // 0: left open
		wantReason string
	}{
		{"silent just under 2×PING_INTERVAL", func(c *conn) { c.lastRead.Store(back(2*ping - margin)) }, 0, ""},
		{"silent 2×PING_INTERVAL", func(c *conn) { c.lastRead.Store(back(2*ping + margin)) }, 1006, "missed pong"},
		{"idle just under IDLE_TIMEOUT", func(c *conn) { c.lastData.Store(back(idle - margin)) }, 0, ""},
		{"idle IDLE_TIMEOUT", func(c *conn) { c.lastData.Store(back(idle + margin)) }, protocol.CloseIdleTimeout, ""},
		{"idle and silent, in the middle of a write", func(c *conn) {
			c.writeSince.Store(time.Now().UnixNano()) // first: the egress's own sweep sees a write under way
			c.lastData.Store(back(idle + margin))
			c.lastRead.Store(back(2*ping + margin))
		}, 0, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := open(t)
			tc.set(c)
			e.s.sweepConns(time.Now())
			code, reason, ok := closed(c)
			switch {
			case tc.code == 0 && ok:
				t.Fatalf("closed %d (%s), want it left open", code, reason)
			case tc.code != 0 && !ok:
				t.Fatalf("left open, want closed %d", tc.code)
			case tc.code != 0 && (code != tc.code || tc.wantReason != "" && reason != tc.wantReason):
				t.Fatalf("closed %d (%s), want %d %s", code, reason, tc.code, tc.wantReason)
			}
			if c.busyWrite() {
				// The write is over: idle since before it, by the
				// timers as they were, the connection is closed 4000.
				c.writeSince.Store(0)
				e.s.sweepConns(time.Now())
				if code, reason, ok := closed(c); !ok || code != protocol.CloseIdleTimeout {
					t.Fatalf("after the write: closed %v, %d (%s); want 4000", ok, code, reason)
				}
			}
		})
	}
}
