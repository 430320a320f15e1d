package client

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/gorilla/websocket"
	"go.uber.org/goleak"

	"github.com/wsrelay/wsrelay/shared/protocol"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// noLeaks checks, when the test ends (after the cleanups registered
// later, which close its servers), that the test left no goroutine.
func noLeaks(t *testing.T) {
	ignore := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, ignore) })
}

// closes calls c.Close and fails t if it has not returned within 10 s.
func closes(t *testing.T, c *Client, what string) {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- c.Close() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("%s: Close: %v", what, err)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: Close has not returned after 10 s", what)
	}
}

// closedForGood checks what a closed client promises: Done closed, state
// closed, Subscribe refused with ErrClosed, and Close again a no-op.
func closedForGood(t *testing.T, c *Client, what string) {
	t.Helper()
	select {
	case <-c.Done():
	default:
		t.Fatalf("%s: Done is open after Close", what)
	}
	if s := c.State(); s != StateClosed {
		t.Errorf("%s: state %v after Close", what, s)
	}
	if _, err := c.Subscribe("after-close", Handler{}); !errors.Is(err, ErrClosed) {
		t.Errorf("%s: Subscribe after Close: %v, want ErrClosed", what, err)
	}
	if err := c.Close(); err != nil {
		t.Errorf("%s: second Close: %v", what, err)
	}
}

// TestCloseDuringUpgrade: Close while the upgrade is in flight (the TCP
// connection is open, the server never answers the HTTP request: a stuck
// proxy, a half-open path) returns at once, instead of waiting for the
// Dialer's HandshakeTimeout, and leaves no goroutine behind.
func TestCloseDuringUpgrade(t *testing.T) {
	noLeaks(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	requested := make(chan net.Conn, 1)
	go func() {
		nc, err := ln.Accept()
		if err != nil {
			return
		}
		// The whole upgrade request read: the client waits for the answer.
		r := bufio.NewReader(nc)
		for {
			l, err := r.ReadString('\n')
			if err != nil || l == "\r\n" {
				break
			}
		}
		requested <- nc
	}()
	t.Cleanup(func() { _ = ln.Close() })
	c, err := Dial(Options{URL: "ws://" + ln.Addr().String() + "/ws", Dialer: &websocket.Dialer{HandshakeTimeout: time.Hour}})
	if err != nil {
		t.Fatal(err)
	}
	select {
	case nc := <-requested:
		// Closed last: it would end the upgrade, hiding a Close that waits.
		t.Cleanup(func() { _ = nc.Close() })
	case <-time.After(5 * time.Second):
		t.Fatal("no upgrade request")
	}
	closes(t, c, "upgrade in flight")
	closedForGood(t, c, "upgrade in flight")
}

// TestCloseDuringNetDial: Close while a Dialer's NetDial (a dial func
// without a ctx, so that nothing can end it) is in flight returns
// without waiting for it, and the connection it returns late is closed.
func TestCloseDuringNetDial(t *testing.T) {
	noLeaks(t)
	dialing := make(chan struct{})
	release := make(chan struct{})
	served := make(chan net.Conn, 1)
	var once sync.Once
	t.Cleanup(func() { once.Do(func() { close(release) }) }) // a Close that waited is let go
	d := &websocket.Dialer{NetDial: func(network, addr string) (net.Conn, error) {
		close(dialing)
		<-release
		client, server := net.Pipe()
		served <- server
		return client, nil
	}}
	c, err := Dial(Options{URL: "ws://wsrelay.test/ws", Dialer: d, MinBackoff: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-dialing:
	case <-time.After(5 * time.Second):
		t.Fatal("no dial")
	}
	closes(t, c, "NetDial in flight")
	closedForGood(t, c, "NetDial in flight")
	once.Do(func() { close(release) })
	server := <-served
	defer server.Close()
	// Nothing is written on the late connection, and it is closed: the
	// other end's read ends.
	_ = server.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := server.Read(make([]byte, 1)); n != 0 || !errors.Is(err, io.EOF) {
		t.Fatalf("late connection: read %d bytes, %v; want it closed (EOF)", n, err)
	}
}

// TestCloseSendsNormalClosure: Close closes the connection with 1000, as
// documented (Dial's example: "closes with 1000"), so that the server
// logs a client that left, not one that went away or failed.
func TestCloseSendsNormalClosure(t *testing.T) {
	closed := make(chan error, 1)
	url, _ := scripted(t, func(t *testing.T, ws *websocket.Conn) {
		write(t, ws, `{"type":"welcome","connection_id":"c1","instance":"i"}`)
		_ = ws.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, _, err := ws.ReadMessage()
		closed <- err
	})
	c, err := Dial(Options{URL: url})
	if err != nil {
		t.Fatal(err)
	}
	waitConnected(t, c)
	c.Close()
	select {
	case err := <-closed:
		var ce *websocket.CloseError
		if !errors.As(err, &ce) || ce.Code != websocket.CloseNormalClosure {
			t.Fatalf("the server read %v, want a close with 1000", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the server read nothing")
	}
}

// TestCloseInEveryState: Close returns, leaves the client closed for good
// and leaves no goroutine behind whatever the client is doing: waiting out
// a refusal's Retry-After, waiting for GetToken, waiting for the welcome,
// connected, already stopped by a final close; Close from several
// goroutines at once, and from a handler (go c.Close()).
func TestCloseInEveryState(t *testing.T) {
	t.Run("backoff", func(t *testing.T) {
		noLeaks(t)
		var dials atomic.Int32
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			dials.Add(1)
			w.Header().Set("Retry-After", "300")
			w.WriteHeader(http.StatusServiceUnavailable)
		}))
		t.Cleanup(srv.Close)
		c, err := Dial(Options{URL: "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws"})
		if err != nil {
			t.Fatal(err)
		}
		testkit.Eventually(t, 5*time.Second, func() error {
			if dials.Load() == 0 || c.State() != StateDisconnected {
				return fmt.Errorf("%d dials, state %v", dials.Load(), c.State())
			}
			return nil
		})
		closes(t, c, "backoff")
		closedForGood(t, c, "backoff")
		if err := c.Err(); err != nil {
			t.Errorf("Err after Close: %v, want nil", err)
		}
	})
	t.Run("GetToken", func(t *testing.T) {
		noLeaks(t)
		asked := make(chan struct{})
		ended := make(chan error, 1)
		c, err := Dial(Options{URL: "ws://127.0.0.1:1/ws", GetToken: func(ctx context.Context) (string, error) {
			close(asked)
			<-ctx.Done()
			ended <- ctx.Err()
			return "", ctx.Err()
		}})
		if err != nil {
			t.Fatal(err)
		}
		<-asked
		closes(t, c, "GetToken")
		closedForGood(t, c, "GetToken")
		if err := <-ended; !errors.Is(err, context.Canceled) {
			t.Errorf("GetToken's ctx: %v", err)
		}
	})
	t.Run("GetToken deaf to ctx", func(t *testing.T) {
		// Close does not wait for a GetToken that does not heed its ctx;
		// the token it brings after Close is not used (no dial, no state
		// reported), and its goroutine ends with it.
		url, upgrades := scripted(t, func(t *testing.T, ws *websocket.Conn) {
			write(t, ws, `{"type":"welcome","connection_id":"c1","instance":"i"}`)
			_, _, _ = ws.ReadMessage()
		})
		ignore := goleak.IgnoreCurrent() // the server's, closed at cleanup
		var dials, states atomic.Int32
		closed := make(chan struct{})
		asked := make(chan struct{})
		release := make(chan struct{})
		c, err := Dial(Options{
			URL: url,
			GetToken: func(context.Context) (string, error) {
				close(asked)
				<-release
				return "x.y.z", nil // a good token, too late
			},
			Dialer: &websocket.Dialer{NetDialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				dials.Add(1)
				return (&net.Dialer{}).DialContext(ctx, network, addr)
			}},
			OnState: func(State, error) {
				select {
				case <-closed:
					states.Add(1)
				default:
				}
			},
		})
		if err != nil {
			t.Fatal(err)
		}
		<-asked
		closes(t, c, "GetToken deaf to ctx")
		closedForGood(t, c, "GetToken deaf to ctx")
		close(closed)
		close(release)
		// Once GetToken's goroutine has ended, whatever its token would
		// have set off has happened.
		goleak.VerifyNone(t, ignore)
		if n := dials.Load(); n != 0 {
			t.Errorf("%d dials with the token GetToken brought after Close", n)
		}
		if n := upgrades.Load(); n != 0 {
			t.Errorf("%d upgrades after Close", n)
		}
		if n := states.Load(); n != 0 {
			t.Errorf("OnState called %d times after Close", n)
		}
		if s, err := c.State(), c.Err(); s != StateClosed || err != nil {
			t.Errorf("after the late token: state %v, Err %v; want closed, nil", s, err)
		}
	})
	t.Run("awaiting welcome", func(t *testing.T) {
		noLeaks(t)
		url, upgrades := scripted(t, func(t *testing.T, ws *websocket.Conn) {
			_, _, _ = ws.ReadMessage() // no welcome; until the client goes
		})
		c, err := Dial(Options{URL: url})
		if err != nil {
			t.Fatal(err)
		}
		testkit.Eventually(t, 5*time.Second, func() error {
			if upgrades.Load() == 0 {
				return errors.New("no upgrade")
			}
			return nil
		})
		closes(t, c, "awaiting welcome")
		closedForGood(t, c, "awaiting welcome")
	})
	t.Run("connected", func(t *testing.T) {
		noLeaks(t)
		url, _ := scripted(t, func(t *testing.T, ws *websocket.Conn) {
			write(t, ws, `{"type":"welcome","connection_id":"c1","instance":"i"}`)
			for {
				if _, _, err := ws.ReadMessage(); err != nil {
					return
				}
			}
		})
		c, err := Dial(Options{URL: url})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Subscribe("a", Handler{}); err != nil {
			t.Fatal(err)
		}
		testkit.Eventually(t, 5*time.Second, func() error {
			if s := c.State(); s != StateConnected {
				return fmt.Errorf("state %v", s)
			}
			return nil
		})
		// From several goroutines at once: each returns once it is closed.
		var wg sync.WaitGroup
		for range 4 {
			wg.Go(func() { _ = c.Close() })
		}
		closes(t, c, "connected")
		wg.Wait()
		closedForGood(t, c, "connected")
	})
	t.Run("from a handler", func(t *testing.T) {
		noLeaks(t)
		url, _ := scripted(t, func(t *testing.T, ws *websocket.Conn) {
			write(t, ws, `{"type":"welcome","connection_id":"c1","instance":"i"}`)
			sub := expect(t, ws, protocol.TypeSubscribe)
			write(t, ws, `{"type":"subscribed","channel":"a","position":"1-0","ref":`+string(sub.Ref)+`}`)
			write(t, ws, `{"type":"message","channel":"a","id":"2-0","ts":1,"data":2}`)
			for {
				if _, _, err := ws.ReadMessage(); err != nil {
					return
				}
			}
		})
		c, err := Dial(Options{URL: url})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Subscribe("a", Handler{OnMessage: func(Message) { go c.Close() }}); err != nil {
			t.Fatal(err)
		}
		select {
		case <-c.Done():
		case <-time.After(10 * time.Second):
			t.Fatal("go c.Close() from a handler did not stop the client")
		}
		closedForGood(t, c, "from a handler")
	})
	t.Run("after a final close", func(t *testing.T) {
		noLeaks(t)
		url, _ := scripted(t, func(t *testing.T, ws *websocket.Conn) {
			write(t, ws, `{"type":"welcome","connection_id":"c1","instance":"i"}`)
			_ = ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(protocol.CloseDisconnected, "bye"), time.Now().Add(time.Second))
			_, _, _ = ws.ReadMessage()
		})
		c, err := Dial(Options{URL: url})
		if err != nil {
			t.Fatal(err)
		}
		select {
		case <-c.Done():
		case <-time.After(10 * time.Second):
			t.Fatal("the client did not stop after 4003")
		}
		closes(t, c, "after a final close")
		closedForGood(t, c, "after a final close")
		var ce *CloseError
		if !errors.As(c.Err(), &ce) || ce.Code != protocol.CloseDisconnected {
			t.Errorf("Err after Close: %v, want the 4003 close", c.Err())
		}
	})
}

// TestReadTimeoutSparesHandlers: ReadTimeout is how long the server may
// stay silent, not how long the application's handlers may take. A
// handler slower than ReadTimeout (a stall, a slow disk) on a connection
// the server keeps pinging does not get the connection taken for dead.
func TestReadTimeoutSparesHandlers(t *testing.T) {
	noLeaks(t)
	url, upgrades := scripted(t, func(t *testing.T, ws *websocket.Conn) {
		write(t, ws, `{"type":"welcome","connection_id":"c1","instance":"i"}`)
		sub := expect(t, ws, protocol.TypeSubscribe)
		write(t, ws, `{"type":"subscribed","channel":"a","position":"1-0","ref":`+string(sub.Ref)+`}`)
		write(t, ws, `{"type":"message","channel":"a","id":"2-0","ts":1,"data":2}`)
		go func() { _, _, _ = ws.ReadMessage() }() // reads the pongs, until the client goes
		for i := 0; ; i++ {
			if i == 20 { // the handler is blocked by now
				write(t, ws, `{"type":"message","channel":"a","id":"3-0","ts":1,"data":3}`)
			}
			time.Sleep(50 * time.Millisecond)
			if ws.WriteControl(websocket.PingMessage, nil, time.Now().Add(time.Second)) != nil {
				return
			}
		}
	})
	var lost atomic.Int32
	c, err := Dial(Options{URL: url, ReadTimeout: time.Second, MinBackoff: time.Millisecond, MaxBackoff: time.Millisecond,
		OnState: func(s State, _ error) {
			if s == StateDisconnected {
				lost.Add(1)
			}
		}})
	if err != nil {
		t.Fatal(err)
	}
	defer closes(t, c, "end")
	got := make(chan string, 10)
	if _, err := c.Subscribe("a", Handler{OnMessage: func(m Message) {
		if m.ID == "2-0" {
			time.Sleep(3 * time.Second) // three times ReadTimeout
		}
		got <- m.ID
	}}); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"2-0", "3-0"} {
		select {
		case id := <-got:
			if id != want {
				t.Fatalf("got %s, want %s", id, want)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("no message %s", want)
		}
	}
	if n, l := upgrades.Load(), lost.Load(); n != 1 || l != 0 {
		t.Fatalf("%d upgrades, %d disconnects: a slow handler got a pinged connection taken for dead", n, l)
	}
}

// TestFailedWriteReplacesConnection: a request that cannot be written (the
// server stopped reading: the write times out) leaves the socket unable to
// send anything again (gorilla fails every later write) while its reads go
// on. The client replaces that connection at once, and the next one sends
// the subscriptions, instead of staying connected with subscriptions that
// never go out until the server (or ReadTimeout) ends it.
func TestFailedWriteReplacesConnection(t *testing.T) {
	noLeaks(t)
	second := make(chan int, 1)
	var conns atomic.Int32
	release := make(chan struct{})
	url, upgrades := scripted(t, func(t *testing.T, ws *websocket.Conn) {
		if conns.Add(1) == 1 {
			// Takes the client's frames slowly, then not at all.
			_ = ws.NetConn().(*net.TCPConn).SetReadBuffer(4096)
			write(t, ws, `{"type":"welcome","connection_id":"c1","instance":"i"}`)
			<-release
			return
		}
		write(t, ws, `{"type":"welcome","connection_id":"c2","instance":"i","max_frame_bytes":65536}`)
		n := 0
		for {
			_ = ws.SetReadDeadline(time.Now().Add(2 * time.Second))
			_, b, err := ws.ReadMessage()
			if err != nil {
				break
			}
			n += strings.Count(string(b), `"subscribe"`)
		}
		second <- n
		_, _, _ = ws.ReadMessage()
	})
	t.Cleanup(func() { close(release) }) // before scripted's, which waits for the script
	c, err := Dial(Options{URL: url, ReadTimeout: -1, MinBackoff: time.Millisecond, MaxBackoff: time.Millisecond,
		Dialer: smallWriteBufDialer})
	if err != nil {
		t.Fatal(err)
	}
	defer closes(t, c, "end")
	waitConnected(t, c)
	// Subscribes while connected, each a frame: far more than the socket
	// buffers hold, so that one cannot go out (writeTimeout, 10 s).
	long := strings.Repeat("x", 120)
	subs := 0
	for ; subs < 5000 && upgrades.Load() < 2; subs++ {
		if _, err := c.Subscribe(fmt.Sprintf("%s%d", long, subs), Handler{}); err != nil {
			t.Fatal(err)
		}
	}
	testkit.Eventually(t, 30*time.Second, func() error {
		if upgrades.Load() < 2 {
			return fmt.Errorf("still on the first connection after %d subscribes, the last ones never sent", subs)
		}
		return nil
	})
	select {
	case n := <-second:
		if n != subs {
			t.Fatalf("the next connection sent %d subscribes, want %d", n, subs)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the next connection sent nothing")
	}
}

// TestBlockedWriteHoldsNothing: a server that stops reading leaves a
// request's write blocked for up to writeTimeout (10 s), and to an older
// server the resubscribes are one frame each, each with 10 s of its own.
// Meanwhile State, LastID and Err answer at once, and Close returns
// within about a second (it closes the socket under the write), instead
// of waiting for the write, and all that wait with it, to give up.
func TestBlockedWriteHoldsNothing(t *testing.T) {
	noLeaks(t)
	release := make(chan struct{})
	url, _ := scripted(t, func(t *testing.T, ws *websocket.Conn) {
		_ = ws.NetConn().(*net.TCPConn).SetReadBuffer(4096)
		write(t, ws, `{"type":"welcome","connection_id":"c1","instance":"i"}`)
		<-release // reads nothing
	})
	t.Cleanup(func() { close(release) }) // before scripted's, which waits for the script
	c, err := Dial(Options{URL: url, ReadTimeout: -1,
		Dialer: smallWriteBufDialer})
	if err != nil {
		t.Fatal(err)
	}
	waitConnected(t, c)
	first, err := c.Subscribe("first", Handler{})
	if err != nil {
		t.Fatal(err)
	}
	// Subscribes, each a frame, until one cannot go out.
	var returned atomic.Int64
	returned.Store(time.Now().UnixNano())
	subscribing := make(chan struct{})
	go func() {
		defer close(subscribing)
		long := strings.Repeat("x", 120)
		for i := 0; i < 5000; i++ {
			if _, err := c.Subscribe(fmt.Sprintf("%s%d", long, i), Handler{}); err != nil {
				return
			}
			returned.Store(time.Now().UnixNano())
		}
	}()
	testkit.Eventually(t, 10*time.Second, func() error {
		if d := time.Since(time.Unix(0, returned.Load())); d < 500*time.Millisecond {
			return fmt.Errorf("no Subscribe blocked yet (last returned %v ago)", d)
		}
		return nil
	})
	start := time.Now()
	queried := make(chan time.Duration, 1)
	go func() {
		_, _, _ = c.State(), first.LastID(), c.Err()
		queried <- time.Since(start)
	}()
	closes(t, c, "a write blocked")
	if d := <-queried; d > 500*time.Millisecond {
		t.Errorf("State, LastID and Err took %v behind a blocked write", d)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("Close took %v behind a blocked write", d)
	}
	closedForGood(t, c, "a write blocked")
	select {
	case <-subscribing:
	case <-time.After(5 * time.Second):
		t.Error("Subscribe still blocked after Close")
	}
}

// TestCloseRacesReconnects: Close at any moment of a client that
// reconnects all the time (servers that drop it before the welcome,
// rotate it with 1001 right after, or answer unavailable, which has the
// client close the socket itself), with a Subscribe in flight from
// another goroutine, returns, leaves the client closed for good and
// leaves no goroutine behind (run with -race).
func TestCloseRacesReconnects(t *testing.T) {
	noLeaks(t)
	var n atomic.Int32
	url, _ := scripted(t, func(t *testing.T, ws *websocket.Conn) {
		// Errors not reported: the client may be gone at any point.
		send := func(f string) { _ = ws.WriteMessage(websocket.TextMessage, []byte(f)) }
		switch n.Add(1) % 3 {
		case 0:
			return
		case 1:
			send(`{"type":"welcome","connection_id":"c1","instance":"i","max_frame_bytes":65536}`)
			_ = ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(protocol.CloseGoingAway, "drain"), time.Now().Add(time.Second))
		case 2:
			send(`{"type":"welcome","connection_id":"c1","instance":"i"}`)
			send(`{"type":"error","code":"unavailable","message":"redis","ref":1}`)
		}
		_, _, _ = ws.ReadMessage()
	})
	for i := range 100 {
		c, err := Dial(Options{URL: url, MinBackoff: time.Microsecond, MaxBackoff: time.Microsecond})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Subscribe("a", Handler{}); err != nil {
			t.Fatal(err)
		}
		subscribed := make(chan struct{})
		go func() {
			defer close(subscribed)
			_, _ = c.Subscribe("b", Handler{})
		}()
		time.Sleep(time.Duration(i%7) * 300 * time.Microsecond)
		closes(t, c, "reconnecting")
		closedForGood(t, c, "reconnecting")
		<-subscribed
	}
}

// TestUnansweredCloseEndsConnection: after an unavailable error the
// client closes the connection (1000) to retry its subscriptions on the
// next one. A server that does not answer that close (one that stopped
// reading, a proxy that lost it) while it goes on pinging does not keep
// the client on a socket it can no longer send on: the wait for the
// answer is bounded, and the client reconnects.
func TestUnansweredCloseEndsConnection(t *testing.T) {
	noLeaks(t)
	var conns atomic.Int32
	resubscribed := make(chan struct{})
	url, _ := scripted(t, func(t *testing.T, ws *websocket.Conn) {
		if conns.Add(1) > 1 {
			write(t, ws, `{"type":"welcome","connection_id":"c2","instance":"i"}`)
			expect(t, ws, protocol.TypeSubscribe)
			close(resubscribed)
			_, _, _ = ws.ReadMessage() // until the client closes
			return
		}
		write(t, ws, `{"type":"welcome","connection_id":"c1","instance":"i"}`)
		sub := expect(t, ws, protocol.TypeSubscribe)
		write(t, ws, `{"type":"error","code":"unavailable","message":"redis","ref":`+string(sub.Ref)+`}`)
		// Reads nothing more (the close stays unanswered), pings on.
		for range 200 {
			if ws.WriteControl(websocket.PingMessage, nil, time.Now().Add(time.Second)) != nil {
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
	})
	c, err := Dial(Options{URL: url, MinBackoff: time.Millisecond, MaxBackoff: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer closes(t, c, "end")
	if _, err := c.Subscribe("a", Handler{}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-resubscribed:
	case <-time.After(15 * time.Second):
		t.Fatal("still on the connection whose close the server never answered")
	}
}

// smallWriteBufDialer dials with a small send buffer, so that a server
// that stops reading blocks the client's writes soon.
var smallWriteBufDialer = &websocket.Dialer{NetDialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
	nc, err := (&net.Dialer{}).DialContext(ctx, network, addr)
	if err == nil {
		_ = nc.(*net.TCPConn).SetWriteBuffer(4096)
	}
	return nc, err
}}

// TestBackoffStartsOver: the backoff starts over (attempt 0) after a
// planned rotation (4000, 4001, 1001) and after a connection that lasted StableAfter,
// both only for a connection that got its welcome; a close before the
// welcome, a planned one or one after StableAfter included, and an early
// close after it let the backoff grow. StableAfter counts from the
// welcome: a welcome that came late (a slow upgrade) followed by a close
// at once let the backoff start over, as the dial was long enough ago.
func TestBackoffStartsOver(t *testing.T) {
	const stable = 500 * time.Millisecond
	welcome := `{"type":"welcome","connection_id":"c1","instance":"i"}`
	type step struct {
		what    string
		late    time.Duration // before the welcome
		welcome bool
		stay    time.Duration
		code    int
		attempt int // the backoff's attempt after this connection
	}
	steps := []step{
		{"no welcome, 1011", 0, false, 0, 1011, 0},
		{"no welcome, 1011 again", 0, false, 0, 1011, 1},
		{"welcome, 4000", 0, true, 0, 4000, 0},
		{"no welcome, 4000", 0, false, 0, 4000, 1},
		{"welcome, 4001", 0, true, 0, 4001, 0},
		{"no welcome, 1011 after 4001", 0, false, 0, 1011, 1},
		{"welcome, 1001", 0, true, 0, 1001, 0},
		{"no welcome, 1011 after 1001", 0, false, 0, 1011, 1},
		{"welcome, 1011 at once", 0, true, 0, 1011, 2},
		{"welcome after StableAfter, 1011 at once", stable + 200*time.Millisecond, true, 0, 1011, 3},
		{"welcome, 1011 after StableAfter", 0, true, stable + 200*time.Millisecond, 1011, 0},
		{"no welcome, 1011 after StableAfter", 0, false, stable + 200*time.Millisecond, 1011, 1},
		{"welcome, 4003 (final)", 0, true, 0, 4003, -1},
	}
	var n atomic.Int32
	url, _ := scripted(t, func(t *testing.T, ws *websocket.Conn) {
		i := int(n.Add(1)) - 1
		if i >= len(steps) {
			return
		}
		s := steps[i]
		time.Sleep(s.late)
		if s.welcome {
			write(t, ws, welcome)
		}
		time.Sleep(s.stay)
		_ = ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(s.code, s.what), time.Now().Add(time.Second))
		_, _, _ = ws.ReadMessage() // the client's answer, or its going
	})
	c, err := newClient(Options{URL: url, StableAfter: stable})
	if err != nil {
		t.Fatal(err)
	}
	var (
		mu       sync.Mutex
		attempts []int
	)
	c.backoff = func(n int) time.Duration {
		mu.Lock()
		attempts = append(attempts, n)
		mu.Unlock()
		return time.Millisecond
	}
	go c.run()
	defer c.Close()
	select {
	case <-c.Done():
	case <-time.After(10 * time.Second):
		t.Fatalf("not closed by the final 4003 (state %v)", c.State())
	}
	mu.Lock()
	defer mu.Unlock()
	for i, s := range steps[:len(steps)-1] {
		if i >= len(attempts) {
			t.Fatalf("%d backoffs %v, want %d", len(attempts), attempts, len(steps)-1)
		}
		if attempts[i] != s.attempt {
			t.Errorf("after %s: backoff attempt %d, want %d", s.what, attempts[i], s.attempt)
		}
	}
	if len(attempts) != len(steps)-1 {
		t.Errorf("%d backoffs %v, want %d", len(attempts), attempts, len(steps)-1)
	}
}

// TestPingsDoNotStandForWelcome: a server that pings (within ReadTimeout)
// but never sends its welcome has the connection dropped after
// ConnectTimeout, with an error that says so, and dialled again: the
// pings extend ReadTimeout, not the wait for the welcome.
func TestPingsDoNotStandForWelcome(t *testing.T) {
	url, upgrades := scripted(t, func(t *testing.T, ws *websocket.Conn) {
		go func() { _, _, _ = ws.ReadMessage() }() // reads the pongs
		for range 40 {
			if ws.WriteControl(websocket.PingMessage, nil, time.Now().Add(time.Second)) != nil {
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
	})
	errs := make(chan error, 16)
	c, err := Dial(Options{URL: url, ReadTimeout: 200 * time.Millisecond, ConnectTimeout: 400 * time.Millisecond,
		MinBackoff: time.Millisecond, MaxBackoff: time.Millisecond,
		OnState: func(s State, err error) {
			if s == StateDisconnected {
				select {
				case errs <- err:
				default:
				}
			}
		}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	select {
	case err := <-errs:
		if err == nil || !strings.Contains(err.Error(), "no welcome within ConnectTimeout (400ms) of the dial") {
			t.Fatalf("disconnected with %v, want no welcome", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("a connection pinged but never welcomed was kept (%d upgrades)", upgrades.Load())
	}
	testkit.Eventually(t, 5*time.Second, func() error {
		if n := upgrades.Load(); n < 2 {
			return fmt.Errorf("%d upgrades: not dialled again", n)
		}
		return nil
	})
}

// TestLateTokenTaken: a GetToken given up after ConnectTimeout that
// returns a token while the client waits out the backoff is not called
// again: the next attempt takes that token (Options.GetToken: "takes its
// token if it brings one").
func TestLateTokenTaken(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		protocols := make(chan string, 10)
		d := pipeDialer(func(conn net.Conn) {
			defer conn.Close()
			br := bufio.NewReader(conn)
			r, err := http.ReadRequest(br)
			if err != nil {
				return
			}
			protocols <- r.Header.Get("Sec-WebSocket-Protocol")
			ws, err := (&websocket.Upgrader{}).Upgrade(pipeHijacker{conn: conn, brw: bufio.NewReadWriter(br, bufio.NewWriter(conn))}, r, nil)
			if err != nil {
				return
			}
			_, _, _ = ws.ReadMessage() // until the client goes
		})
		var asked atomic.Int32
		release := make(chan struct{})
		var once sync.Once
		c, err := Dial(Options{URL: "ws://egress.test/ws", Dialer: d, ConnectTimeout: time.Second,
			MinBackoff: 10 * time.Second, MaxBackoff: 10 * time.Second,
			GetToken: func(context.Context) (string, error) {
				n := asked.Add(1)
				if n == 1 {
					<-release // deaf to ctx, answers late
				}
				return fmt.Sprintf("tok%d", n), nil
			},
			OnState: func(s State, err error) {
				if s == StateDisconnected && err != nil && strings.Contains(err.Error(), "get token") {
					once.Do(func() { close(release) }) // given up: its answer comes during the backoff
				}
			},
		})
		if err != nil {
			t.Fatal(err)
		}
		p := <-protocols
		c.Close()
		if p != "wsrelay, token.tok1" || asked.Load() != 1 {
			t.Fatalf("dialled with subprotocols %q after %d GetToken calls, want token.tok1 after 1", p, asked.Load())
		}
	})
}

// TestTokenErrorsBackOff: GetToken's errors are retried after the
// backoff, which grows with each consecutive one, as after failed dials.
func TestTokenErrorsBackOff(t *testing.T) {
	c, err := newClient(Options{URL: "ws://127.0.0.1:1/ws",
		GetToken: func(context.Context) (string, error) { return "", errors.New("token endpoint down") }})
	if err != nil {
		t.Fatal(err)
	}
	attempts := make(chan int, 10)
	c.backoff = func(n int) time.Duration {
		select {
		case attempts <- n:
		default:
		}
		return time.Millisecond
	}
	go c.run()
	defer closes(t, c, "GetToken failing")
	for want := range 3 {
		select {
		case n := <-attempts:
			if n != want {
				t.Fatalf("backoff after GetToken error %d: attempt %d, want %d", want+1, n, want)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("no backoff after GetToken error %d", want+1)
		}
	}
}

// TestGetTokenBounded: a GetToken that does not return (a token endpoint
// that never answers) is given up after ConnectTimeout, as a dial without
// a welcome is: its ctx is cancelled, the client reports a get token error
// and asks again after the backoff, instead of staying in connecting for
// ever. A GetToken that does not heed its ctx is not called again while
// it runs: the next attempt waits for that same call, whose token, when
// it comes, is used.
func TestGetTokenBounded(t *testing.T) {
	t.Run("heeds ctx", func(t *testing.T) {
		noLeaks(t)
		srv := welcomeServer(t, func(*http.Request) {})
		var asked atomic.Int32
		ended := make(chan error, 1)
		errs := make(chan error, 10)
		c, err := Dial(Options{
			URL:            "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws",
			ConnectTimeout: 200 * time.Millisecond,
			MinBackoff:     time.Millisecond, MaxBackoff: time.Millisecond,
			GetToken: func(ctx context.Context) (string, error) {
				if asked.Add(1) == 1 {
					<-ctx.Done() // the token endpoint never answers
					ended <- ctx.Err()
					return "", ctx.Err()
				}
				return "x.y.z", nil
			},
			OnState: func(s State, err error) {
				if err != nil {
					select {
					case errs <- err:
					default:
					}
				}
			},
		})
		if err != nil {
			t.Fatal(err)
		}
		defer closes(t, c, "GetToken bounded")
		testkit.Eventually(t, 10*time.Second, func() error {
			if c.State() != StateConnected {
				return fmt.Errorf("state %v after %d GetToken calls", c.State(), asked.Load())
			}
			return nil
		})
		if err := <-ended; err == nil {
			t.Errorf("the GetToken given up: its ctx not cancelled")
		}
		if n := asked.Load(); n != 2 {
			t.Errorf("GetToken asked %d times, want 2", n)
		}
		if err := <-errs; !strings.Contains(err.Error(), "get token") || !strings.Contains(err.Error(), "ConnectTimeout") {
			t.Errorf("the GetToken given up was reported as %v", err)
		}
	})
	t.Run("ignores ctx", func(t *testing.T) {
		noLeaks(t)
		srv := welcomeServer(t, func(*http.Request) {})
		var asked, givenUp atomic.Int32
		release := make(chan struct{})
		c, err := Dial(Options{
			URL:            "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws",
			ConnectTimeout: 50 * time.Millisecond,
			MinBackoff:     time.Millisecond, MaxBackoff: time.Millisecond,
			GetToken: func(ctx context.Context) (string, error) {
				asked.Add(1)
				<-release // deaf to ctx
				return "x.y.z", nil
			},
			OnState: func(s State, err error) {
				if err != nil && strings.Contains(err.Error(), "get token") {
					givenUp.Add(1)
				}
			},
		})
		if err != nil {
			t.Fatal(err)
		}
		defer closes(t, c, "GetToken deaf to ctx")
		testkit.Eventually(t, 10*time.Second, func() error {
			if givenUp.Load() < 3 {
				return fmt.Errorf("given up %d times, state %v", givenUp.Load(), c.State())
			}
			return nil
		})
		if n := asked.Load(); n != 1 {
			t.Errorf("GetToken called %d times while its first call ran, want 1", n)
		}
		close(release)
		testkit.Eventually(t, 10*time.Second, func() error {
			if c.State() != StateConnected {
				return fmt.Errorf("state %v after %d GetToken calls", c.State(), asked.Load())
			}
			return nil
		})
		if n := asked.Load(); n != 1 {
			t.Errorf("GetToken called %d times, want 1 (the late token used)", n)
		}
	})
}

// waitConnected waits, up to 5 s, for c to be connected.
func waitConnected(t *testing.T, c *Client) {
	t.Helper()
	testkit.Eventually(t, 5*time.Second, func() error {
		if s := c.State(); s != StateConnected {
			return fmt.Errorf("state %v", s)
		}
		return nil
	})
}
