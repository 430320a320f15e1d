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
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/gorilla/websocket"

	"github.com/wsrelay/wsrelay/shared/protocol"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// recorded subscribes c to ch after the id after ("" for none), and
// returns the ids of the messages it is handed and the recovered flag of
// each subscribed reply, in order (10 of each at most).
func recorded(t *testing.T, c *Client, ch, after string) (got <-chan string, subscribed <-chan bool) {
	t.Helper()
	ids, flags := make(chan string, 10), make(chan bool, 10)
	if _, err := c.Subscribe(ch, Handler{After: after,
		OnMessage:    func(m Message) { ids <- m.ID },
		OnSubscribed: func(recovered bool) { flags <- recovered }}); err != nil {
		t.Fatal(err)
	}
	return ids, flags
}

// dialed dials o (Dial), failing the test on an error, and closes the
// client when the test ends.
func dialed(t *testing.T, o Options) *Client {
	t.Helper()
	c, err := Dial(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// scripted runs an egress stand-in: each upgraded socket is handed to
// script, which plays the server's side.
func scripted(t *testing.T, script func(t *testing.T, ws *websocket.Conn)) (url string, upgrades *atomic.Int32) {
	t.Helper()
	upgrades = new(atomic.Int32)
	var wg sync.WaitGroup
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// Counted before the upgrade is: a test that saw the upgrade
		// (upgrades) has the handler's wg.Add before its cleanup's Wait.
		wg.Add(1)
		defer wg.Done()
		ws, err := (&websocket.Upgrader{}).Upgrade(w, r, nil)
		if err != nil {
			return
		}
		upgrades.Add(1)
		defer ws.Close()
		script(t, ws)
	}))
	t.Cleanup(func() { srv.CloseClientConnections(); srv.Close(); wg.Wait() })
	return "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws", upgrades
}

// expect reads the client's next frame and checks its type (and ref).
func expect(t *testing.T, ws *websocket.Conn, typ string) protocol.Request {
	t.Helper()
	var r protocol.Request
	_ = ws.SetReadDeadline(time.Now().Add(5 * time.Second))
	if err := ws.ReadJSON(&r); err != nil || r.Type != typ {
		t.Errorf("server read %+v, %v; want %s", r, err, typ)
	}
	return r
}

func write(t *testing.T, ws *websocket.Conn, frame string) {
	t.Helper()
	if err := ws.WriteMessage(websocket.TextMessage, []byte(frame)); err != nil {
		t.Error(err)
	}
}

// TestDuplicatesReported: a message whose id is not above the last one
// delivered on its subscription (the server sent it again, or out of
// order) is dropped, not handed to OnMessage, and reported to
// OnDuplicate with the id the subscription held; the messages after it
// are delivered as before.
func TestDuplicatesReported(t *testing.T) {
	url, _ := scripted(t, func(t *testing.T, ws *websocket.Conn) {
		write(t, ws, `{"type":"welcome","connection_id":"c1","instance":"i"}`)
		sub := expect(t, ws, protocol.TypeSubscribe)
		write(t, ws, `{"type":"subscribed","channel":"a","position":"1-0","ref":`+string(sub.Ref)+`}`)
		for _, id := range []string{"2-0", "3-0", "3-0", "2-0", "1-0", "4-0"} {
			write(t, ws, `{"type":"message","channel":"a","id":"`+id+`","ts":1,"data":0}`)
		}
		_, _, _ = ws.ReadMessage() // until the client closes
	})
	c := dialed(t, Options{URL: url})
	var mu sync.Mutex
	var got, dups []string
	done := make(chan struct{})
	if _, err := c.Subscribe("a", Handler{
		OnMessage: func(m Message) {
			mu.Lock()
			defer mu.Unlock()
			got = append(got, m.ID)
			if m.ID == "4-0" {
				close(done)
			}
		},
		OnDuplicate: func(m Message, last string) {
			mu.Lock()
			defer mu.Unlock()
			dups = append(dups, m.ID+"<="+last)
		},
	}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("4-0 never delivered")
	}
	mu.Lock()
	defer mu.Unlock()
	if strings.Join(got, " ") != "2-0 3-0 4-0" || strings.Join(dups, " ") != "3-0<=3-0 2-0<=3-0 1-0<=3-0" {
		t.Fatalf("delivered %v, reported %v; want [2-0 3-0 4-0] and [3-0<=3-0 2-0<=3-0 1-0<=3-0]", got, dups)
	}
}

// TestResubscribeIgnoresEarlierFrames: a channel unsubscribed and
// subscribed again at once, after its last id, while a message of the
// earlier subscription is still on the wire. That message and the earlier
// subscribed reply must not count for the new subscription, or its last
// id would pass messages its replay brings, and they would be dropped as
// duplicates.
func TestResubscribeIgnoresEarlierFrames(t *testing.T) {
	url, _ := scripted(t, func(t *testing.T, ws *websocket.Conn) {
		write(t, ws, `{"type":"welcome","connection_id":"c1","instance":"i"}`)
		first := expect(t, ws, protocol.TypeSubscribe)
		write(t, ws, `{"type":"subscribed","channel":"a","position":"1-0","ref":`+string(first.Ref)+`}`)
		write(t, ws, `{"type":"message","channel":"a","id":"2-0","ts":1,"data":2}`)
		expect(t, ws, protocol.TypeUnsubscribe)
		again := expect(t, ws, protocol.TypeSubscribe)
		if again.After == nil || *again.After != "2-0" {
			t.Errorf("resubscribed after %v, want 2-0", again.After)
		}
		// Written for the earlier subscription before the server saw the
		// unsubscribe: a later message, and a stale reply.
		write(t, ws, `{"type":"message","channel":"a","id":"4-0","ts":1,"data":4}`)
		write(t, ws, `{"type":"subscribed","channel":"a","position":"4-0","ref":`+string(first.Ref)+`}`)
		write(t, ws, `{"type":"unsubscribed","channel":"a"}`)
		write(t, ws, `{"type":"subscribed","channel":"a","recovered":true,"position":"2-0","ref":`+string(again.Ref)+`}`)
		write(t, ws, `{"type":"message","channel":"a","id":"3-0","ts":1,"data":3}`)
		write(t, ws, `{"type":"message","channel":"a","id":"4-0","ts":1,"data":4}`)
		_, _, _ = ws.ReadMessage() // until the client closes
	})
	c := dialed(t, Options{URL: url})
	gotFirst := make(chan string, 10)
	s1, err := c.Subscribe("a", Handler{OnMessage: func(m Message) { gotFirst <- m.ID }})
	if err != nil {
		t.Fatal(err)
	}
	select {
	case id := <-gotFirst:
		if id != "2-0" {
			t.Fatalf("first subscription got %s", id)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no message on the first subscription")
	}
	s1.Unsubscribe()
	got, subscribed := recorded(t, c, "a", s1.LastID())
	wantIDs(t, got, "3-0", "4-0")
	if n := len(subscribed); n != 1 {
		t.Fatalf("OnSubscribed called %d times, want once (the earlier reply is not its)", n)
	}
}

// TestEarlierSubscribedIgnored: a subscription made at the live end,
// unsubscribed at once and made again from an older stored position
// (Handler.After). The server answered the first subscribe, and sent it a
// live message, before it read the unsubscribe. That answer is not the
// new subscription's (its ref is the earlier one's): taken for it, the
// live message would be delivered and the replay that follows dropped as
// duplicates.
func TestEarlierSubscribedIgnored(t *testing.T) {
	url, _ := scripted(t, func(t *testing.T, ws *websocket.Conn) {
		write(t, ws, `{"type":"welcome","connection_id":"c1","instance":"i"}`)
		first := expect(t, ws, protocol.TypeSubscribe)
		expect(t, ws, protocol.TypeUnsubscribe)
		again := expect(t, ws, protocol.TypeSubscribe)
		if again.After == nil || *again.After != "1-0" {
			t.Errorf("resubscribed after %v, want 1-0", again.After)
		}
		write(t, ws, `{"type":"subscribed","channel":"a","position":"5-0","ref":`+string(first.Ref)+`}`)
		write(t, ws, `{"type":"message","channel":"a","id":"6-0","ts":1,"data":6}`)
		write(t, ws, `{"type":"unsubscribed","channel":"a"}`)
		write(t, ws, `{"type":"subscribed","channel":"a","recovered":true,"position":"1-0","ref":`+string(again.Ref)+`}`)
		for i := 2; i <= 6; i++ {
			write(t, ws, fmt.Sprintf(`{"type":"message","channel":"a","id":"%d-0","ts":1,"data":%d}`, i, i))
		}
		_, _, _ = ws.ReadMessage() // until the client closes
	})
	c := dialed(t, Options{URL: url})
	waitConnected(t, c)
	s1, err := c.Subscribe("a", Handler{})
	if err != nil {
		t.Fatal(err)
	}
	s1.Unsubscribe()
	got, subscribed := recorded(t, c, "a", "1-0")
	wantIDs(t, got, "2-0", "3-0", "4-0", "5-0", "6-0")
	if n := len(subscribed); n != 1 {
		t.Fatalf("OnSubscribed called %d times, want once", n)
	}
}

// TestUnrecoveredResumeTakesPosition: a resume that was not recovered
// goes on from the position the server gives, which can be behind the id
// the client held (one from a Redis that failed over): the messages after
// that position are delivered, not dropped as older than the held id.
func TestUnrecoveredResumeTakesPosition(t *testing.T) {
	url, _ := scripted(t, func(t *testing.T, ws *websocket.Conn) {
		write(t, ws, `{"type":"welcome","connection_id":"c1","instance":"i"}`)
		sub := expect(t, ws, protocol.TypeSubscribe)
		if sub.After == nil || *sub.After != "90-0" {
			t.Errorf("subscribed after %v, want 90-0", sub.After)
		}
		write(t, ws, `{"type":"subscribed","channel":"a","recovered":false,"position":"5-0","ref":`+string(sub.Ref)+`}`)
		write(t, ws, `{"type":"message","channel":"a","id":"6-0","ts":1,"data":6}`)
		_, _, _ = ws.ReadMessage() // until the client closes
	})
	c := dialed(t, Options{URL: url})
	got := make(chan string, 10)
	s, err := c.Subscribe("a", Handler{After: "90-0", OnMessage: func(m Message) { got <- m.ID }})
	if err != nil {
		t.Fatal(err)
	}
	select {
	case id := <-got:
		if id != "6-0" || s.LastID() != "6-0" {
			t.Fatalf("got %s, last id %s; want 6-0", id, s.LastID())
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("the message after the position was dropped (last id %s)", s.LastID())
	}
}

// TestResumeAcrossReconnect: after a reconnect the subscription resumes
// after its last id, and the new connection's answer is its answer: its
// recovered flag reaches OnSubscribed, and an unrecovered resume's older
// position (a Redis that failed over) is taken, so the messages after it
// are delivered rather than dropped as not after the id held.
func TestResumeAcrossReconnect(t *testing.T) {
	var n atomic.Int32
	url, _ := scripted(t, func(t *testing.T, ws *websocket.Conn) {
		write(t, ws, `{"type":"welcome","connection_id":"c1","instance":"i"}`)
		sub := expect(t, ws, protocol.TypeSubscribe)
		if n.Add(1) == 1 {
			write(t, ws, `{"type":"subscribed","channel":"a","position":"1-0","ref":`+string(sub.Ref)+`}`)
			write(t, ws, `{"type":"message","channel":"a","id":"20-0","ts":1,"data":20}`)
			_ = ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(protocol.CloseInternal, "bye"), time.Now().Add(time.Second))
			_, _, _ = ws.ReadMessage() // the client's answer
			return
		}
		if sub.After == nil || *sub.After != "20-0" {
			t.Errorf("resubscribed after %v, want 20-0", sub.After)
		}
		write(t, ws, `{"type":"subscribed","channel":"a","recovered":false,"position":"5-0","ref":`+string(sub.Ref)+`}`)
		write(t, ws, `{"type":"message","channel":"a","id":"6-0","ts":1,"data":6}`)
		_, _, _ = ws.ReadMessage() // until the client closes
	})
	c := dialed(t, Options{URL: url, MinBackoff: time.Millisecond, MaxBackoff: time.Millisecond})
	got, subscribed := recorded(t, c, "a", "")
	wantIDs(t, got, "20-0", "6-0")
	var flags []bool
	for len(flags) < 2 {
		select {
		case r := <-subscribed:
			flags = append(flags, r)
		case <-time.After(5 * time.Second):
			t.Fatalf("OnSubscribed got %v, want [true false]", flags)
		}
	}
	if !flags[0] || flags[1] {
		t.Fatalf("OnSubscribed got %v, want [true false]", flags)
	}
}

// TestFreshSubscriptionResumesFromPosition: a subscription made without
// After starts from the position the server answers with: LastID is that
// position, and a connection lost before its first message resumes after
// it, so that what was published meanwhile is not skipped.
func TestFreshSubscriptionResumesFromPosition(t *testing.T) {
	var n atomic.Int32
	resumed := make(chan string, 1)
	url, _ := scripted(t, func(t *testing.T, ws *websocket.Conn) {
		write(t, ws, `{"type":"welcome","connection_id":"c1","instance":"i"}`)
		sub := expect(t, ws, protocol.TypeSubscribe)
		if n.Add(1) == 1 {
			if sub.After != nil {
				t.Errorf("a fresh subscription subscribed after %q", *sub.After)
			}
			write(t, ws, `{"type":"subscribed","channel":"a","position":"5-0","ref":`+string(sub.Ref)+`}`)
			_, _, _ = ws.ReadMessage() // until the test lets it go
			return
		}
		after := "none"
		if sub.After != nil {
			after = *sub.After
		}
		resumed <- after
		_, _, _ = ws.ReadMessage() // until the client closes
	})
	c := dialed(t, Options{URL: url, MinBackoff: time.Millisecond, MaxBackoff: time.Millisecond})
	subscribed := make(chan bool, 1)
	s, err := c.Subscribe("a", Handler{OnSubscribed: func(recovered bool) { subscribed <- recovered }})
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-subscribed:
	case <-time.After(5 * time.Second):
		t.Fatal("not subscribed")
	}
	if id := s.LastID(); id != "5-0" {
		t.Errorf("LastID %q after the subscribed reply, want the position 5-0", id)
	}
	c.mu.Lock()
	ws := c.ws
	c.mu.Unlock()
	_ = ws.NetConn().Close() // lost before any message
	select {
	case after := <-resumed:
		if after != "5-0" {
			t.Fatalf("resubscribed after %s, want 5-0", after)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("not resubscribed")
	}
}

// TestSecondSubscribedIgnored: a server that answers one subscribe twice
// (a bug, or a proxy that replays frames) does not move the subscription:
// a second, unrecovered answer with an older position would otherwise
// take the subscription back and deliver its messages again, and the
// application would hear of the subscription (and a gap) twice.
func TestSecondSubscribedIgnored(t *testing.T) {
	url, _ := scripted(t, func(t *testing.T, ws *websocket.Conn) {
		write(t, ws, `{"type":"welcome","connection_id":"c1","instance":"i"}`)
		sub := expect(t, ws, protocol.TypeSubscribe)
		write(t, ws, `{"type":"subscribed","channel":"a","position":"1-0","ref":`+string(sub.Ref)+`}`)
		write(t, ws, `{"type":"message","channel":"a","id":"2-0","ts":1,"data":2}`)
		write(t, ws, `{"type":"subscribed","channel":"a","recovered":false,"position":"1-0","ref":`+string(sub.Ref)+`}`)
		write(t, ws, `{"type":"message","channel":"a","id":"2-0","ts":1,"data":2}`)
		write(t, ws, `{"type":"message","channel":"a","id":"3-0","ts":1,"data":3}`)
		_, _, _ = ws.ReadMessage() // until the client closes
	})
	c := dialed(t, Options{URL: url})
	got := make(chan string, 10)
	if _, err := c.Subscribe("a", Handler{
		OnMessage:    func(m Message) { got <- m.ID },
		OnSubscribed: func(recovered bool) { got <- fmt.Sprint("subscribed ", recovered) }}); err != nil {
		t.Fatal(err)
	}
	var events []string
	for len(events) == 0 || events[len(events)-1] != "3-0" {
		select {
		case e := <-got:
			events = append(events, e)
		case <-time.After(5 * time.Second):
			t.Fatalf("got %q, then nothing", events)
		}
	}
	if s := strings.Join(events, ", "); s != "subscribed true, 2-0, 3-0" {
		t.Fatalf("got %s, want subscribed true, 2-0, 3-0", s)
	}
}

// TestSecondWelcomeIgnored: a second welcome on one connection (a server
// bug) is not news: OnWelcome is called once per connection, as the
// JavaScript client emits one welcome event, and nothing is sent again.
func TestSecondWelcomeIgnored(t *testing.T) {
	url, _ := scripted(t, func(t *testing.T, ws *websocket.Conn) {
		write(t, ws, `{"type":"welcome","connection_id":"c1","instance":"i"}`)
		sub := expect(t, ws, protocol.TypeSubscribe)
		write(t, ws, `{"type":"welcome","connection_id":"c2","instance":"i","max_frame_bytes":65536}`)
		write(t, ws, `{"type":"subscribed","channel":"a","position":"1-0","ref":`+string(sub.Ref)+`}`)
		expect(t, ws, protocol.TypeUnsubscribe) // not a second subscribe
		_, _, _ = ws.ReadMessage()              // until the client closes
	})
	welcomes := make(chan string, 10)
	c := dialed(t, Options{URL: url, OnWelcome: func(w Welcome) { welcomes <- w.ConnectionID }})
	subscribed := make(chan struct{})
	s, err := c.Subscribe("a", Handler{OnSubscribed: func(bool) { close(subscribed) }})
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-subscribed:
	case <-time.After(5 * time.Second):
		t.Fatal("not subscribed")
	}
	s.Unsubscribe()
	if n := len(welcomes); n != 1 || <-welcomes != "c1" {
		t.Fatalf("OnWelcome called %d times, want once, with c1", n)
	}
}

// TestOneSubscriptionPerChannel: a second Subscribe of a channel is
// refused while the first lasts, and accepted once it is unsubscribed; an
// Unsubscribe of the earlier subscription, called again after that (a
// deferred cleanup), leaves the new one alone.
func TestOneSubscriptionPerChannel(t *testing.T) {
	c, err := Dial(Options{URL: "ws://127.0.0.1:1/ws", MinBackoff: time.Hour}) // never connected
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s1, err := c.Subscribe("a", Handler{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Subscribe("a", Handler{}); err == nil || !strings.Contains(err.Error(), "already subscribed") {
		t.Fatalf("a second Subscribe of a: %v, want already subscribed", err)
	}
	s1.Unsubscribe()
	s2, err := c.Subscribe("a", Handler{After: "7-0"})
	if err != nil {
		t.Fatalf("Subscribe after Unsubscribe: %v", err)
	}
	s1.Unsubscribe()
	if _, err := c.Subscribe("a", Handler{}); err == nil || !strings.Contains(err.Error(), "already subscribed") {
		t.Fatalf("the earlier subscription's second Unsubscribe ended the new one: Subscribe of a: %v", err)
	}
	if id := s2.LastID(); id != "7-0" {
		t.Fatalf("LastID %q, want 7-0", id)
	}
}

// TestSubscribeChecksNames: a channel name the server would refuse is
// refused by Subscribe, not sent on every connect (ten refusals in a row
// close the connection for good).
func TestSubscribeChecksNames(t *testing.T) {
	url, _ := scripted(t, func(t *testing.T, ws *websocket.Conn) {
		// Not write: the test checks names before any network, and the
		// client may have closed by the time this handler runs (a
		// broken pipe in a CI run).
		_ = ws.WriteMessage(websocket.TextMessage, []byte(`{"type":"welcome","connection_id":"c1","instance":"i"}`))
		_, _, _ = ws.ReadMessage() // until the client closes
	})
	c := dialed(t, Options{URL: url})
	for _, ch := range []string{"", "bad name", "-x", strings.Repeat("a", 129)} {
		if _, err := c.Subscribe(ch, Handler{}); err == nil {
			t.Errorf("Subscribe(%q) accepted", ch)
		}
	}
	if _, err := c.Subscribe("ok:1", Handler{After: "bogus"}); err == nil {
		t.Error("After \"bogus\" accepted")
	}
}

// TestSilentConnection: a connection that goes silent without a close
// (no frame, not even the server's pings) is taken for dead after
// ReadTimeout and replaced; a server that pings keeps it.
func TestSilentConnection(t *testing.T) {
	url, upgrades := scripted(t, func(t *testing.T, ws *websocket.Conn) {
		// Not write: on a loaded machine this handler can start after
		// the client's 200 ms have run out, and the client, which keeps
		// reconnecting until the end of the test, has gone already.
		_ = ws.WriteMessage(websocket.TextMessage, []byte(`{"type":"welcome","connection_id":"c1","instance":"i"}`))
		_, _, _ = ws.ReadMessage() // silent until the client goes
	})
	c := dialed(t, Options{URL: url, ReadTimeout: 200 * time.Millisecond, MinBackoff: time.Millisecond, MaxBackoff: time.Millisecond})
	testkit.Eventually(t, 5*time.Second, func() error {
		if n := upgrades.Load(); n < 2 {
			return fmt.Errorf("%d upgrades: the silent connection was kept", n)
		}
		return nil
	})
	c.Close() // no more reconnects beside the second half (Close is idempotent)

	pinged, pingedUpgrades := scripted(t, func(t *testing.T, ws *websocket.Conn) {
		write(t, ws, `{"type":"welcome","connection_id":"c1","instance":"i"}`)
		go func() { _, _, _ = ws.ReadMessage() }() // reads the pongs
		// Until the client goes, not for the 800 ms the test watches: a
		// handler that returned after 8 pings closed the connection just
		// as the test's sleep ended, and a test woken late on a loaded
		// machine saw the client's reconnect (a jitter of 0 to 500 ms).
		for {
			time.Sleep(100 * time.Millisecond)
			if ws.WriteControl(websocket.PingMessage, nil, time.Now().Add(time.Second)) != nil {
				return
			}
		}
	})
	c2, err := Dial(Options{URL: pinged, ReadTimeout: 300 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	time.Sleep(800 * time.Millisecond)
	if n := pingedUpgrades.Load(); n != 1 {
		t.Fatalf("%d upgrades: a connection the server pings was taken for dead", n)
	}
}

// TestFinalRefusals: a refusal a retry cannot change ends the client,
// with the refusal (and the egress's error code) as its Err, instead of
// being retried for ever: 400 (the request is wrong) and 403 (origin not
// allowed) always, 401 (the token is bad) without GetToken. Other
// statuses, and a 401 with GetToken to ask for a fresh token, are retried.
func TestFinalRefusals(t *testing.T) {
	for _, tc := range []struct {
		status   int
		getToken bool
		final    bool
	}{
		{400, false, true}, {400, true, true},
		{401, false, true}, {401, true, false},
		{403, false, true}, {403, true, true},
		{404, false, false}, {429, false, false}, {503, false, false},
	} {
		var n atomic.Int32
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			n.Add(1)
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(tc.status)
			fmt.Fprintf(w, `{"error":{"code":"c%d","message":"m"}}`+"\n", tc.status)
		}))
		opts := Options{URL: "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws", Token: "x.y.z", MinBackoff: time.Millisecond, MaxBackoff: time.Millisecond}
		if tc.getToken {
			opts.Token = ""
			opts.GetToken = func(context.Context) (string, error) { return "x.y.z", nil }
		}
		c, err := Dial(opts)
		if err != nil {
			t.Fatal(err)
		}
		if tc.final {
			select {
			case <-c.Done():
			case <-time.After(5 * time.Second):
				t.Fatalf("%d (GetToken %v): still retrying after %d refusals", tc.status, tc.getToken, n.Load())
			}
			var re *RefusedError
			if !errors.As(c.Err(), &re) || re.Status != tc.status || re.Code != fmt.Sprint("c", tc.status) || re.Message != "m" || n.Load() != 1 {
				t.Errorf("%d: Err %v (%+v) after %d dials", tc.status, c.Err(), re, n.Load())
			}
		} else {
			testkit.Eventually(t, 5*time.Second, func() error {
				if n.Load() < 3 {
					return fmt.Errorf("%d dials", n.Load())
				}
				return nil
			})
		}
		c.Close()
		srv.Close()
	}
	for _, bad := range []string{"http://127.0.0.1/ws", "127.0.0.1:80/ws", "ws:///ws"} {
		if _, err := Dial(Options{URL: bad}); err == nil {
			t.Errorf("Dial(%q) accepted", bad)
		}
	}
}

// TestStates: OnState reports every state from the first, connecting,
// to the last, closed.
func TestStates(t *testing.T) {
	url, _ := scripted(t, func(t *testing.T, ws *websocket.Conn) {
		write(t, ws, `{"type":"welcome","connection_id":"c1","instance":"i"}`)
		_, _, _ = ws.ReadMessage() // until the client closes
	})
	states := make(chan State, 10)
	c, err := Dial(Options{URL: url, OnState: func(s State, _ error) { states <- s }})
	if err != nil {
		t.Fatal(err)
	}
	var got []State
	for len(got) < 2 {
		select {
		case s := <-states:
			got = append(got, s)
		case <-time.After(5 * time.Second):
			t.Fatalf("states %v", got)
		}
	}
	c.Close()
	if got[0] != StateConnecting || got[1] != StateConnected {
		t.Fatalf("states %v, want [connecting connected]", got)
	}
	// Close goes straight to closed (Close has returned: every OnState
	// call is made), not through disconnected, which says a reconnect is
	// scheduled.
	got = got[:0]
	for len(states) > 0 {
		got = append(got, <-states)
	}
	if len(got) != 1 || got[0] != StateClosed {
		t.Fatalf("states after Close %v, want [closed]", got)
	}
}

// TestFinalCloseCodes: the client does not reconnect after the codes the
// protocol marks final (docs/protocol.md), 1007 among them.
func TestFinalCloseCodes(t *testing.T) {
	for _, code := range []int{protocol.CloseDisconnected, protocol.CloseProtocolError, protocol.CloseInvalidData, protocol.ClosePolicy, protocol.CloseTooBig} {
		url, upgrades := scripted(t, func(t *testing.T, ws *websocket.Conn) {
			write(t, ws, `{"type":"welcome","connection_id":"c1","instance":"i"}`)
			_ = ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(code, "final"), time.Now().Add(time.Second))
			_, _, _ = ws.ReadMessage()
		})
		c, err := Dial(Options{URL: url, MinBackoff: time.Millisecond, MaxBackoff: 5 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		select {
		case <-c.Done():
		case <-time.After(5 * time.Second):
			t.Fatalf("close %d: the client is still running (%d upgrades)", code, upgrades.Load())
		}
		var ce *CloseError
		if err := c.Err(); !errors.As(err, &ce) || ce.Code != code || upgrades.Load() != 1 {
			t.Fatalf("close %d: Err %v after %d upgrades, want a CloseError after 1", code, err, upgrades.Load())
		}
		c.Close()
	}
}

// TestReconnectingCloseCodes: a server close the client reconnects after
// (a drain's 1001, the egress's idle and lifetime closes, 1011) is given
// to OnState with StateDisconnected as a *DisconnectError with its code
// and reason, so that an application can tell them from a lost
// connection without reading the error's text.
func TestReconnectingCloseCodes(t *testing.T) {
	for _, code := range []int{protocol.CloseGoingAway, protocol.CloseIdleTimeout, protocol.CloseLifetime, protocol.CloseInternal} {
		url, _ := scripted(t, func(t *testing.T, ws *websocket.Conn) {
			write(t, ws, `{"type":"welcome","connection_id":"c1","instance":"i"}`)
			_ = ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(code, "go elsewhere"), time.Now().Add(time.Second))
			_, _, _ = ws.ReadMessage()
		})
		c, lost := dialDisconnects(t, url)
		select {
		case err := <-lost:
			var de *DisconnectError
			if !errors.As(err, &de) || de.Code != code || de.Reason != "go elsewhere" {
				t.Errorf("close %d: OnState(disconnected, %#v), want a *DisconnectError with the code and reason", code, err)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("close %d: no disconnected state", code)
		}
		c.Close()
	}
}

// TestLostWithoutClose: a connection that ends without a close frame is a
// lost connection, not a server close, however the TCP connection ended:
// with a FIN (which gorilla reports as a close with 1006, a code no
// close frame carries) as with a reset. OnState gets the same kind of
// error for both, not a *DisconnectError for one of them.
func TestLostWithoutClose(t *testing.T) {
	for _, reset := range []bool{false, true} {
		url, _ := scripted(t, func(t *testing.T, ws *websocket.Conn) {
			write(t, ws, `{"type":"welcome","connection_id":"c1","instance":"i"}`)
			if reset {
				_ = ws.NetConn().(*net.TCPConn).SetLinger(0)
			}
			ws.NetConn().Close()
		})
		c, lost := dialDisconnects(t, url)
		select {
		case err := <-lost:
			var de *DisconnectError
			if errors.As(err, &de) || err == nil || !strings.Contains(err.Error(), "connection lost") {
				t.Errorf("reset %v: OnState(disconnected, %#v), want a lost connection", reset, err)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("reset %v: no disconnected state", reset)
		}
		c.Close()
	}
}

// dialDisconnects dials url with a second's backoff, and returns the
// client and the errors OnState is given with StateDisconnected.
func dialDisconnects(t *testing.T, url string) (*Client, <-chan error) {
	t.Helper()
	lost := make(chan error, 10)
	c, err := Dial(Options{URL: url, MinBackoff: time.Second, MaxBackoff: time.Second, OnState: func(s State, err error) {
		if s == StateDisconnected {
			lost <- err
		}
	}})
	if err != nil {
		t.Fatal(err)
	}
	return c, lost
}

// TestReadLimit: a server frame over ReadLimit (by default
// DefaultReadLimit, which a message at SCF's 256 KB cap is well within)
// is not read: the client closes the connection with 1009 and stops for
// good, as after the server's 1009 (a resume would bring the same message
// again), with Err a *CloseError the client made and OnState told; what
// came before it was delivered. A negative ReadLimit sets no limit.
func TestReadLimit(t *testing.T) {
	t.Parallel()
	frameOf := func(size int) string { // a message frame of size bytes
		head := `{"type":"message","channel":"a","id":"2-0","ts":1,"data":"`
		return head + strings.Repeat("x", size-len(head)-2) + `"}`
	}
	for _, tc := range []struct {
		name  string
		limit int64
		size  int // of the second message's frame
		over  bool
	}{
		{"option", 4096, 4097, true},
		{"option, at the limit", 4096, 4096, false},
		{"default, SCF's largest message", 0, 256<<10 + 512, false},
		{"default", 0, DefaultReadLimit + 1, true},
		{"no limit", -1, 2 * DefaultReadLimit, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			closed := make(chan int, 1)
			url, upgrades := scripted(t, func(t *testing.T, ws *websocket.Conn) {
				write(t, ws, `{"type":"welcome","connection_id":"c1","instance":"i"}`)
				r := expect(t, ws, protocol.TypeSubscribe)
				write(t, ws, `{"type":"subscribed","channel":"a","position":"0-0","ref":`+string(r.Ref)+`}`)
				write(t, ws, `{"type":"message","channel":"a","id":"1-0","ts":1,"data":1}`)
				// Over the limit, the client may close before all of it
				// is written.
				if err := ws.WriteMessage(websocket.TextMessage, []byte(frameOf(tc.size))); err != nil && !tc.over {
					t.Error(err)
				}
				_ = ws.SetReadDeadline(time.Now().Add(5 * time.Second))
				_, _, err := ws.ReadMessage()
				var ce *websocket.CloseError
				if errors.As(err, &ce) {
					closed <- ce.Code
				} else {
					closed <- 0
				}
			})
			states := make(chan error, 10)
			c, err := Dial(Options{URL: url, ReadLimit: tc.limit, MinBackoff: time.Millisecond, MaxBackoff: 5 * time.Millisecond,
				OnState: func(s State, err error) {
					if s == StateClosed {
						states <- err
					}
				}})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			got := make(chan Message, 2)
			if _, err := c.Subscribe("a", Handler{OnMessage: func(m Message) { got <- m }}); err != nil {
				t.Fatal(err)
			}
			if m := <-got; m.ID != "1-0" {
				t.Fatalf("first message %s", m.ID)
			}
			if !tc.over {
				select {
				case m := <-got:
					if len(m.Data) != tc.size-len(`{"type":"message","channel":"a","id":"2-0","ts":1,"data":}`) {
						t.Fatalf("message %s of %d bytes of data", m.ID, len(m.Data))
					}
				case <-time.After(5 * time.Second):
					t.Fatalf("the frame of %d bytes was not delivered (Err %v)", tc.size, c.Err())
				}
				return
			}
			select {
			case <-c.Done():
			case <-time.After(5 * time.Second):
				t.Fatalf("the client is still running (%d upgrades, Err %v)", upgrades.Load(), c.Err())
			}
			var ce *CloseError
			if err := c.Err(); !errors.As(err, &ce) || ce.Code != protocol.CloseTooBig || !ce.ByClient || upgrades.Load() != 1 {
				t.Fatalf("Err %v after %d upgrades, want the client's own 1009 after 1", err, upgrades.Load())
			}
			if err := <-states; err != c.Err() {
				t.Errorf("OnState(closed) got %v, want Err", err)
			}
			if code := <-closed; code != protocol.CloseTooBig {
				t.Errorf("the server read close %d, want 1009", code)
			}
			select {
			case m := <-got:
				t.Errorf("message %s delivered", m.ID)
			default:
			}
		})
	}
}

// welcomeServer is an egress stand-in that hands each upgrade request to
// seen, welcomes the socket and waits for one frame from the client. It
// is closed when the test ends.
func welcomeServer(t *testing.T, seen func(*http.Request)) *httptest.Server {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		seen(r)
		ws, err := (&websocket.Upgrader{Subprotocols: []string{"wsrelay"}}).Upgrade(w, r, nil)
		if err != nil {
			return
		}
		defer ws.Close()
		_ = ws.WriteMessage(websocket.TextMessage, []byte(`{"type":"welcome","connection_id":"c1","instance":"i"}`))
		_, _, _ = ws.ReadMessage()
	}))
	t.Cleanup(srv.Close)
	return srv
}

// TestHeaderRefused: a Header that gorilla's dial refuses every time
// (a header the handshake sets, or Sec-WebSocket-Protocol beside the
// subprotocols the client sets) is refused by Dial, not retried for good
// as a lost connection; one it sends is accepted and sent.
func TestHeaderRefused(t *testing.T) {
	seen := make(chan http.Header, 10)
	srv := welcomeServer(t, func(r *http.Request) { seen <- r.Header })
	url := "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws"
	getToken := func(context.Context) (string, error) { return "tok", nil }
	for _, tc := range []struct {
		name   string
		header http.Header
		opts   Options
	}{
		{"Upgrade", http.Header{"Upgrade": {"websocket"}}, Options{}},
		{"Connection", http.Header{"Connection": {"Upgrade"}}, Options{}},
		{"Sec-WebSocket-Key", http.Header{"Sec-Websocket-Key": {"x"}}, Options{}},
		{"Sec-WebSocket-Version", http.Header{"Sec-Websocket-Version": {"13"}}, Options{}},
		{"Sec-WebSocket-Extensions", http.Header{"Sec-Websocket-Extensions": {"permessage-deflate"}}, Options{}},
		{"protocol beside Token", http.Header{"Sec-Websocket-Protocol": {"wsrelay"}}, Options{Token: "tok"}},
		{"protocol beside GetToken", http.Header{"Sec-Websocket-Protocol": {"wsrelay"}}, Options{GetToken: getToken}},
		{"protocol beside Subprotocols", http.Header{"Sec-Websocket-Protocol": {"wsrelay"}}, Options{Dialer: &websocket.Dialer{Subprotocols: []string{"x"}}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := tc.opts
			o.URL, o.Header = url, tc.header
			if c, err := Dial(o); err == nil {
				c.Close()
				t.Fatal("Dial accepted it")
			} else if !strings.Contains(err.Error(), "Header sets") {
				t.Fatalf("Dial: %v, want the Header named", err)
			}
			// gorilla refuses it indeed, as the client would dial it.
			d := &websocket.Dialer{}
			if o.Dialer != nil {
				d = o.Dialer
			}
			if o.Token != "" || o.GetToken != nil {
				d.Subprotocols = []string{"wsrelay", "token.tok"}
			}
			if ws, _, err := d.Dial(url, tc.header); err == nil {
				ws.Close()
				t.Fatal("gorilla's dial accepted it: the client need not refuse it")
			}
		})
	}
	// A subprotocol of the caller's own, with no token, and an Origin
	// beside a token are sent.
	for _, o := range []Options{
		{Header: http.Header{"Sec-Websocket-Protocol": {"wsrelay"}}},
		{Header: http.Header{"Origin": {"https://app.example"}}, Token: "tok"},
	} {
		o.URL = url
		c := dialed(t, o)
		for k, v := range o.Header {
			if got := (<-seen)[k]; !slices.Equal(got, v) {
				t.Errorf("the server got %s: %q, want %q", k, got, v)
			}
		}
		c.Close()
	}
}

// TestTokenTravelsAsSubprotocol: the token is offered as the
// "token.<jwt>" subprotocol beside "wsrelay", and is not in the URL.
func TestTokenTravelsAsSubprotocol(t *testing.T) {
	got := make(chan *http.Request, 1)
	srv := welcomeServer(t, func(r *http.Request) {
		select {
		case got <- r:
		default:
		}
	})
	dialed(t, Options{URL: "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws", Token: "tok1"})
	var r *http.Request
	select {
	case r = <-got:
	case <-time.After(5 * time.Second):
		t.Fatal("no upgrade request")
	}
	if r.URL.Query().Has("token") {
		t.Errorf("token in the URL: %s", r.URL)
	}
	if p := r.Header.Get("Sec-WebSocket-Protocol"); p != "wsrelay, token.tok1" {
		t.Errorf("subprotocols %q, want %q", p, "wsrelay, token.tok1")
	}
}

// TestFreshTokenWhenExpired: GetToken is asked again after a 4004 close
// (token expired) and after a 401 at the upgrade, and the next dial
// carries its new token; after another close (1011) the token held is
// used again.
func TestFreshTokenWhenExpired(t *testing.T) {
	var (
		mu     sync.Mutex
		tokens []string
	)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		tokens = append(tokens, strings.TrimPrefix(r.Header.Get("Sec-WebSocket-Protocol"), "wsrelay, token."))
		i := len(tokens) - 1
		mu.Unlock()
		if i == 1 {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusUnauthorized)
			_, _ = io.WriteString(w, `{"error":{"code":"token_expired","message":"expired"}}`)
			return
		}
		ws, err := (&websocket.Upgrader{Subprotocols: []string{"wsrelay"}}).Upgrade(w, r, nil)
		if err != nil {
			return
		}
		defer ws.Close()
		_ = ws.WriteMessage(websocket.TextMessage, []byte(`{"type":"welcome","connection_id":"c1","instance":"i"}`))
		switch i {
		case 0:
			_ = ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(protocol.CloseTokenExpired, "token expired"), time.Now().Add(time.Second))
		case 2:
			_ = ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(protocol.CloseInternal, "oops"), time.Now().Add(time.Second))
		}
		_, _, _ = ws.ReadMessage() // the client's answer, or its going
	}))
	t.Cleanup(srv.Close)
	var calls atomic.Int32
	c, err := Dial(Options{URL: "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws", MinBackoff: time.Millisecond, MaxBackoff: time.Millisecond,
		GetToken: func(context.Context) (string, error) { return fmt.Sprintf("t%d", calls.Add(1)), nil }})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	testkit.Eventually(t, 10*time.Second, func() error {
		mu.Lock()
		defer mu.Unlock()
		if len(tokens) < 4 {
			return fmt.Errorf("%d dials, tokens %v", len(tokens), tokens)
		}
		return nil
	})
	c.Close()
	mu.Lock()
	defer mu.Unlock()
	if got := strings.Join(tokens[:4], " "); got != "t1 t2 t3 t3" {
		t.Fatalf("dials carried tokens %s, want t1 t2 t3 t3 (new after 4004 and after 401, not after 1011)", got)
	}
}

// TestUnsendableToken: the token travels as a subprotocol, an HTTP token
// (RFC 6455 §4.1): a comma would split it in two, a space or a control
// character makes a header the egress (or the client's own net/http)
// refuses on every dial. Dial refuses such a Token; such a token from
// GetToken is an error of GetToken's, which is asked again, and no dial
// carries it.
func TestUnsendableToken(t *testing.T) {
	for _, bad := range []string{"a,b", "a b", "a\nb", "t\x00k", "tök", "(x)", "a/b", "a=b"} {
		if _, err := Dial(Options{URL: "ws://127.0.0.1:1/ws", Token: bad}); err == nil || !strings.Contains(err.Error(), "Token") {
			t.Errorf("Dial with Token %q: %v", bad, err)
		}
	}
	var dials atomic.Int32
	srv := welcomeServer(t, func(r *http.Request) {
		dials.Add(1)
		if p := r.Header.Get("Sec-WebSocket-Protocol"); p != "wsrelay, token.x.y-z_9" {
			t.Errorf("dialled with subprotocols %q", p)
		}
	})
	var asked atomic.Int32
	errs := make(chan error, 10)
	c, err := Dial(Options{
		URL: "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws",
		GetToken: func(context.Context) (string, error) {
			if asked.Add(1) == 1 {
				return "x.y z", nil
			}
			return "x.y-z_9", nil
		},
		MinBackoff: time.Millisecond, MaxBackoff: time.Millisecond,
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
	defer c.Close()
	testkit.Eventually(t, 5*time.Second, func() error {
		if c.State() != StateConnected {
			return fmt.Errorf("state %v after %d tokens", c.State(), asked.Load())
		}
		return nil
	})
	if n := asked.Load(); n != 2 {
		t.Fatalf("GetToken asked %d times, want 2", n)
	}
	if n := dials.Load(); n != 1 {
		t.Fatalf("%d dials, want 1 (none with the unsendable token)", n)
	}
	select {
	case err := <-errs:
		if !strings.Contains(err.Error(), "get token") {
			t.Fatalf("the unsendable token was reported as %v", err)
		}
	default:
		t.Fatal("the unsendable token was not reported")
	}
}

// TestURLQuery: Dial refuses a URL whose query would fight the client.
// channels= would be subscribed by the server with no ref on every
// connect, without resume: the client would drop its messages, a
// Subscribe of the same channel would be refused already_subscribed, and
// each reconnect would start the channel over. A token= beside Token or
// GetToken would be used instead of the client's (fresh) token, a user=
// beside User would be replaced, and a repeated or malformed (a ';' or a
// bad %-escape, which Go's parser drops) token=, user= or channels= is
// refused by the egress with 400 on every dial. What does not conflict
// is sent as written: user= (anonymous mode) or token= alone, and other
// parameters, User's user= added after them.
func TestURLQuery(t *testing.T) {
	// queries starts a server that reports the query of each upgrade.
	queries := func(t *testing.T) (url string, got <-chan string) {
		ch := make(chan string, 10)
		srv := welcomeServer(t, func(r *http.Request) { ch <- r.URL.RawQuery })
		return "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws", ch
	}
	getToken := func(context.Context) (string, error) { return "tok", nil }
	for _, tc := range []struct {
		name  string
		query string  // the URL's
		opts  Options // URL set from query
		sent  string  // the query the server sees; "" for a refusal
		err   string  // in Dial's error
	}{
		{"channels", "?channels=a,b", Options{}, "", "Subscribe"},
		{"empty channels", "?channels=", Options{}, "", "Subscribe"},
		{"repeated channels", "?channels=a&channels=b", Options{User: "ada"}, "", "Subscribe"},
		{"token beside Token", "?token=old", Options{Token: "tok"}, "", "token"},
		{"token beside GetToken", "?token=old", Options{GetToken: getToken}, "", "token"},
		{"repeated token", "?token=a&token=b", Options{}, "", "token"},
		{"user beside User", "?user=bob", Options{User: "ada"}, "", "user"},
		{"same user beside User", "?user=ada", Options{User: "ada"}, "", "user"},
		{"repeated user", "?user=a&user=b", Options{}, "", "user"},
		{"user alone", "?user=bob", Options{}, "user=bob", ""},
		{"User", "?x=1", Options{User: "ada"}, "x=1&user=ada", ""},
		{"User with an escape", "", Options{User: "a+b"}, "user=a%2Bb", ""},
		{"malformed user", "?user=a;b", Options{}, "", "user parameter is malformed"},
		{"malformed user escape", "?user=%zz", Options{}, "", "user parameter is malformed"},
		{"malformed token", "?x=1&token=a;b", Options{}, "", "token parameter is malformed"},
		{"malformed channels", "?channels=a;b", Options{}, "", "channels parameter is malformed"},
		{"others as written", "?b=2&a=%41&z=1;2", Options{}, "b=2&a=%41&z=1;2", ""},
		{"others as written beside User", "?b=2&a=%41&z=1;2", Options{User: "ada"}, "b=2&a=%41&z=1;2&user=ada", ""},
		// Bytes a request line cannot carry, encoded as a browser does
		// (sent raw, the upgrade was refused 400 on every dial).
		{"a space and non-ASCII", "?app=my app&n=é", Options{}, "app=my%20app&n=%C3%A9", ""},
		{"a space beside User", "?app=my app", Options{User: "ada"}, "app=my%20app&user=ada", ""},
		{"token alone", "?token=tok", Options{}, "token=tok", ""},
		// An empty token= is no token (docs/protocol.md): the server
		// takes Token's subprotocol, so nothing conflicts.
		{"empty token beside Token", "?token=", Options{Token: "tok"}, "token=", ""},
		{"empty token beside GetToken", "?token=", Options{GetToken: getToken}, "token=", ""},
		{"user beside Token", "?user=bob", Options{Token: "tok"}, "user=bob", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			url, got := queries(t)
			tc.opts.URL = url + tc.query
			c, err := Dial(tc.opts)
			if tc.sent == "" {
				if err == nil {
					c.Close()
					t.Fatalf("Dial(%q) accepted", tc.opts.URL)
				}
				if !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("Dial error %q does not mention %s", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatalf("Dial: %v", err)
			}
			defer c.Close()
			select {
			case q := <-got:
				if q != tc.sent {
					t.Errorf("the server saw ?%s, want ?%s", q, tc.sent)
				}
			case <-time.After(5 * time.Second):
				t.Error("no upgrade")
			}
		})
	}
}

// TestURLUserInfo: a URL with user information (ws://user:password@host)
// is refused by Dial, as the publisher refuses it: gorilla's dial refuses
// it (malformed ws or wss URL) every time, so the client would retry it
// for good as a lost connection. The error does not show the password.
func TestURLUserInfo(t *testing.T) {
	srv := welcomeServer(t, func(*http.Request) {})
	url := "ws://ada:s3cret@" + strings.TrimPrefix(srv.URL, "http://") + "/ws"
	states := make(chan error, 10)
	c, err := Dial(Options{URL: url, OnState: func(s State, err error) {
		if s == StateDisconnected {
			select {
			case states <- err:
			default:
			}
		}
	}})
	if err == nil {
		defer c.Close()
		select {
		case err := <-states:
			t.Fatalf("Dial(%q) accepted; the dial: %v", url, err)
		case <-time.After(5 * time.Second):
			t.Fatalf("Dial(%q) accepted", url)
		}
	}
	if !strings.Contains(err.Error(), "user information") || strings.Contains(err.Error(), "s3cret") {
		t.Fatalf("Dial error %q: want one that names the user information, without the password", err)
	}
}

// TestBadURLShowsNoSecret: a URL Dial refuses for its scheme, host or
// syntax is not quoted with its password (or a piece of it, which net/url
// quotes when it cannot read it), nor with a token in its query.
func TestBadURLShowsNoSecret(t *testing.T) {
	for _, url := range []string{
		"ws://ada:s3cret@127.0.0.1:x/ws",
		"ws://ada:s3cret%zz@127.0.0.1:1/ws",
		"http://127.0.0.1:1/ws?token=s3cret",
		"wss:///ws?token=s3cret",
		"ftp://127.0.0.1:1/ws?token=s3cret#x",
	} {
		c, err := Dial(Options{URL: url})
		if err == nil {
			c.Close()
			t.Errorf("Dial(%q) accepted", url)
			continue
		}
		if strings.Contains(err.Error(), "s3cret") {
			t.Errorf("Dial(%q): the error shows the secret: %v", url, err)
		}
	}
}

// TestRetryAfter: a refusal's Retry-After (503 while draining or full) is
// the least the client waits before the next dial, however short its
// backoff; a refusal without one waits the backoff only.
func TestRetryAfter(t *testing.T) {
	var mu sync.Mutex
	var dials []time.Time
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		dials = append(dials, time.Now())
		first := len(dials) == 1
		mu.Unlock()
		if first {
			w.Header().Set("Retry-After", "1")
		}
		w.WriteHeader(http.StatusServiceUnavailable)
	}))
	defer srv.Close()
	c, err := Dial(Options{URL: "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws", MinBackoff: time.Millisecond, MaxBackoff: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	testkit.Eventually(t, 10*time.Second, func() error {
		mu.Lock()
		defer mu.Unlock()
		if len(dials) < 3 {
			return fmt.Errorf("%d dials", len(dials))
		}
		return nil
	})
	mu.Lock()
	defer mu.Unlock()
	if gap := dials[1].Sub(dials[0]); gap < time.Second {
		t.Errorf("dialled again %v after a Retry-After of 1 s", gap)
	}
}

// TestRefusedParsesRetryAfter: delay-seconds and HTTP dates, capped at
// MaxRetryAfter; anything else is no Retry-After.
func TestRefusedParsesRetryAfter(t *testing.T) {
	for v, want := range map[string]time.Duration{
		"":                        0,
		"0":                       0,
		"3":                       3 * time.Second,
		"86400":                   MaxRetryAfter,
		"99999999999999999999999": MaxRetryAfter,
		"-1":                      0,
		"1.5":                     0,
		"soon":                    0,
		time.Now().Add(-time.Hour).UTC().Format(http.TimeFormat): 0,
		time.Now().Add(time.Hour).UTC().Format(http.TimeFormat):  MaxRetryAfter,
	} {
		resp := &http.Response{StatusCode: 503, Header: http.Header{}}
		if v != "" {
			resp.Header.Set("Retry-After", v)
		}
		if got := refused(resp).RetryAfter; got != want {
			t.Errorf("Retry-After %q: %v, want %v", v, got, want)
		}
	}
	resp := &http.Response{StatusCode: 503, Header: http.Header{"Retry-After": {time.Now().Add(time.Minute).UTC().Format(http.TimeFormat)}}}
	if got := refused(resp).RetryAfter; got < 58*time.Second || got > time.Minute {
		t.Errorf("Retry-After a minute from now: %v", got)
	}
}

// pipeDialer dials in-memory pipes, each served by serve on a goroutine
// of its own: no socket, so that a synctest bubble's clock runs while
// the client waits between dials.
func pipeDialer(serve func(net.Conn)) *websocket.Dialer {
	return &websocket.Dialer{NetDialContext: func(context.Context, string, string) (net.Conn, error) {
		client, server := net.Pipe()
		go serve(server)
		return client, nil
	}}
}

// pipeHijacker is the ResponseWriter of an upgrade request read off a
// pipe: gorilla's Upgrader takes the connection over at once.
type pipeHijacker struct {
	http.ResponseWriter // nil: only Header and Hijack are used
	conn                net.Conn
	brw                 *bufio.ReadWriter
}

func (h pipeHijacker) Header() http.Header { return http.Header{} }

func (h pipeHijacker) Hijack() (net.Conn, *bufio.ReadWriter, error) { return h.conn, h.brw, nil }

// pipeUpgrade plays the server's side of an upgrade on a pipeDialer's
// connection.
func pipeUpgrade(conn net.Conn) (*websocket.Conn, error) {
	br := bufio.NewReader(conn)
	r, err := http.ReadRequest(br)
	if err != nil {
		return nil, err
	}
	return (&websocket.Upgrader{}).Upgrade(pipeHijacker{conn: conn, brw: bufio.NewReadWriter(br, bufio.NewWriter(conn))}, r, nil)
}

// TestReadTimeoutBound: a welcomed connection on which the server goes
// silent is taken for dead after ReadTimeout, not later, and dialled
// again after the backoff.
func TestReadTimeoutBound(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var mu sync.Mutex
		var welcomed []time.Time
		d := pipeDialer(func(conn net.Conn) {
			defer conn.Close()
			ws, err := pipeUpgrade(conn)
			if err != nil {
				t.Error(err)
				return
			}
			if ws.WriteMessage(websocket.TextMessage, []byte(`{"type":"welcome","connection_id":"c1","instance":"i"}`)) != nil {
				return
			}
			mu.Lock()
			welcomed = append(welcomed, time.Now())
			mu.Unlock()
			_, _, _ = ws.ReadMessage() // silent until the client goes
		})
		const readTimeout = 30 * time.Second
		c, err := Dial(Options{URL: "ws://egress.test/ws", Dialer: d, ReadTimeout: readTimeout,
			MinBackoff: time.Millisecond, MaxBackoff: time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		for {
			mu.Lock()
			n := len(welcomed)
			mu.Unlock()
			if n >= 3 {
				break
			}
			time.Sleep(time.Second) // the bubble's clock: no real wait
		}
		c.Close()
		mu.Lock()
		defer mu.Unlock()
		for i := 1; i < 3; i++ {
			// The bubble's clock moves only by the waits: ReadTimeout and
			// the backoff (1 ms at most).
			if gap := welcomed[i].Sub(welcomed[i-1]); gap < readTimeout || gap > readTimeout+time.Millisecond {
				t.Errorf("connection %d welcomed %v after the one before, want ReadTimeout (%v) and up to 1 ms", i, gap, readTimeout)
			}
		}
	})
}

// TestRetryAfterBounds: the wait after a refusal with Retry-After is that
// plus up to half again (not more: a draining instance's clients spread
// over it, not past it), and a Retry-After over MaxRetryAfter, the
// documented 5 min, waits 5 min, not what the header says.
func TestRetryAfterBounds(t *testing.T) {
	for _, tc := range []struct {
		header   string
		min, max time.Duration
	}{
		{"10", 10 * time.Second, 15 * time.Second},
		{"86400", 5 * time.Minute, 7*time.Minute + 30*time.Second},
	} {
		t.Run(tc.header, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				var mu sync.Mutex
				var dials []time.Time
				d := pipeDialer(func(conn net.Conn) {
					defer conn.Close()
					if _, err := http.ReadRequest(bufio.NewReader(conn)); err != nil {
						return
					}
					mu.Lock()
					dials = append(dials, time.Now())
					mu.Unlock()
					_, _ = io.WriteString(conn, "HTTP/1.1 503 Service Unavailable\r\nRetry-After: "+tc.header+
						"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
				})
				c, err := Dial(Options{URL: "ws://egress.test/ws", Dialer: d, MinBackoff: time.Millisecond, MaxBackoff: time.Millisecond})
				if err != nil {
					t.Fatal(err)
				}
				const want = 10
				for {
					mu.Lock()
					n := len(dials)
					mu.Unlock()
					if n >= want {
						break
					}
					time.Sleep(time.Second) // the bubble's clock: no real wait
				}
				c.Close()
				mu.Lock()
				defer mu.Unlock()
				// The bubble's clock moves only by the waits: exact.
				for i := 1; i < want; i++ {
					if gap := dials[i].Sub(dials[i-1]); gap < tc.min || gap > tc.max {
						t.Errorf("dial %d came %v after the refusal with Retry-After %s, want %v–%v", i, gap, tc.header, tc.min, tc.max)
					}
				}
			})
		})
	}
}

// TestHandshakeTimeoutBounded: a Dialer without a HandshakeTimeout (no
// limit, for gorilla) gets DefaultHandshakeTimeout, on a copy: an upgrade
// nobody answers must not hold the client for good.
func TestHandshakeTimeoutBounded(t *testing.T) {
	d := &websocket.Dialer{}
	c := dialed(t, Options{URL: "ws://127.0.0.1:1/ws", Dialer: d, MinBackoff: time.Hour})
	if got := c.opts.Dialer.HandshakeTimeout; got != DefaultHandshakeTimeout {
		t.Errorf("HandshakeTimeout %v, want %v", got, DefaultHandshakeTimeout)
	}
	if d.HandshakeTimeout != 0 {
		t.Errorf("the caller's Dialer was changed")
	}
	own := &websocket.Dialer{HandshakeTimeout: time.Second}
	c2, err := Dial(Options{URL: "ws://127.0.0.1:1/ws", Dialer: own, MinBackoff: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if c2.opts.Dialer != own {
		t.Errorf("a Dialer with its own HandshakeTimeout was replaced")
	}
}

// TestUnsubscribeRefusedIsQuiet: unsubscribing a subscription the server
// refused gets not_subscribed from the server, which is the state the
// client asked for: it reaches no OnError, while the refusal itself
// reached the subscription's.
func TestUnsubscribeRefusedIsQuiet(t *testing.T) {
	url, _ := scripted(t, func(t *testing.T, ws *websocket.Conn) {
		write(t, ws, `{"type":"welcome","connection_id":"c1","instance":"i"}`)
		sub := expect(t, ws, protocol.TypeSubscribe)
		write(t, ws, `{"type":"error","code":"forbidden","message":"not allowed","ref":`+string(sub.Ref)+`}`)
		expect(t, ws, protocol.TypeUnsubscribe)
		write(t, ws, `{"type":"error","code":"not_subscribed","message":"not subscribed to a"}`)
		// A targeted message after it: once it is delivered, the error
		// before it has been dispatched.
		write(t, ws, `{"type":"message","target":"connection","id":"1-0","ts":1,"data":1}`)
		_, _, _ = ws.ReadMessage() // until the client closes
	})
	errs := make(chan string, 10)
	delivered := make(chan struct{})
	var once sync.Once
	c, err := Dial(Options{URL: url,
		OnError:   func(e *ServerError) { errs <- "client: " + e.Code },
		OnMessage: func(Message) { once.Do(func() { close(delivered) }) }})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s, err := c.Subscribe("a", Handler{OnError: func(e *ServerError) { errs <- "subscription: " + e.Code }})
	if err != nil {
		t.Fatal(err)
	}
	select {
	case e := <-errs:
		if e != "subscription: forbidden" {
			t.Fatalf("got %q, want the subscription's forbidden", e)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the refusal reached no OnError")
	}
	s.Unsubscribe()
	select {
	case <-delivered:
	case <-time.After(5 * time.Second):
		t.Fatal("the message after not_subscribed was not delivered")
	}
	if len(errs) != 0 {
		t.Fatalf("OnError after the unsubscribe: %q", <-errs)
	}
}

// TestNoErrorHandlerAfterUnsubscribe: a refusal of a subscribe that
// crossed its Unsubscribe on the wire (the server refused it before it
// read the unsubscribe) reaches no handler of the subscription: no
// handler call starts after Unsubscribe has returned.
func TestNoErrorHandlerAfterUnsubscribe(t *testing.T) {
	url, _ := scripted(t, func(t *testing.T, ws *websocket.Conn) {
		write(t, ws, `{"type":"welcome","connection_id":"c1","instance":"i"}`)
		sub := expect(t, ws, protocol.TypeSubscribe)
		expect(t, ws, protocol.TypeUnsubscribe)
		write(t, ws, `{"type":"error","code":"forbidden","message":"not allowed","ref":`+string(sub.Ref)+`}`)
		// Once this is delivered, the error before it has been dispatched.
		write(t, ws, `{"type":"message","target":"connection","id":"1-0","ts":1,"data":1}`)
		_, _, _ = ws.ReadMessage() // until the client closes
	})
	delivered := make(chan struct{})
	var once sync.Once
	c := dialed(t, Options{URL: url, OnMessage: func(Message) { once.Do(func() { close(delivered) }) }})
	waitConnected(t, c)
	var calls atomic.Int32
	s, err := c.Subscribe("a", Handler{OnError: func(*ServerError) { calls.Add(1) }})
	if err != nil {
		t.Fatal(err)
	}
	s.Unsubscribe()
	select {
	case <-delivered:
	case <-time.After(5 * time.Second):
		t.Fatal("the message after the refusal was not delivered")
	}
	if n := calls.Load(); n != 0 {
		t.Fatalf("the unsubscribed subscription's OnError called %d times", n)
	}
}

// TestSubscriptionErrorWithoutHandler: a refusal of a subscription that
// has no OnError of its own reaches Options.OnError, as the JS client
// emits it as an "error" event, rather than no one.
func TestSubscriptionErrorWithoutHandler(t *testing.T) {
	url, _ := scripted(t, func(t *testing.T, ws *websocket.Conn) {
		write(t, ws, `{"type":"welcome","connection_id":"c1","instance":"i"}`)
		sub := expect(t, ws, protocol.TypeSubscribe)
		write(t, ws, `{"type":"error","code":"forbidden","message":"not allowed","ref":`+string(sub.Ref)+`}`)
		_, _, _ = ws.ReadMessage() // until the client closes
	})
	errs := make(chan string, 10)
	c := dialed(t, Options{URL: url, OnError: func(e *ServerError) { errs <- e.Code }})
	if _, err := c.Subscribe("a", Handler{}); err != nil {
		t.Fatal(err)
	}
	select {
	case e := <-errs:
		if e != "forbidden" {
			t.Fatalf("OnError got %q, want forbidden", e)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the refusal of a subscription without OnError reached no one")
	}
}

// wantIDs receives len(want) message ids from got, each within 5 s, and
// fails unless they are want, in order.
func wantIDs(t *testing.T, got <-chan string, want ...string) {
	t.Helper()
	var ids []string
	for len(ids) < len(want) {
		select {
		case id := <-got:
			ids = append(ids, id)
		case <-time.After(5 * time.Second):
			t.Fatalf("got %v, want %v", ids, want)
		}
	}
	if !slices.Equal(ids, want) {
		t.Fatalf("got %v, want %v", ids, want)
	}
}
