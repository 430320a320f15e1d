package client

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/wsrelay/wsrelay/shared/protocol"
)

// scripted runs an egress stand-in: each upgraded socket is handed to
// script, which plays the server's side.
func scripted(t *testing.T, script func(t *testing.T, ws *websocket.Conn)) (url string, upgrades *atomic.Int32) {
	t.Helper()
	upgrades = new(atomic.Int32)
	var wg sync.WaitGroup
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ws, err := (&websocket.Upgrader{}).Upgrade(w, r, nil)
		if err != nil {
			return
		}
		upgrades.Add(1)
		wg.Add(1)
		defer wg.Done()
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
	c, err := Dial(Options{URL: url})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
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
	got := make(chan string, 10)
	subscribed := make(chan bool, 10)
	if _, err := c.Subscribe("a", Handler{After: s1.LastID(),
		OnMessage:    func(m Message) { got <- m.ID },
		OnSubscribed: func(recovered bool) { subscribed <- recovered }}); err != nil {
		t.Fatal(err)
	}
	var ids []string
	for len(ids) < 2 {
		select {
		case id := <-got:
			ids = append(ids, id)
		case <-time.After(5 * time.Second):
			t.Fatalf("the new subscription got %v, want [3-0 4-0]", ids)
		}
	}
	if strings.Join(ids, " ") != "3-0 4-0" {
		t.Fatalf("the new subscription got %v, want [3-0 4-0]", ids)
	}
	if n := len(subscribed); n != 1 {
		t.Fatalf("OnSubscribed called %d times, want once (the earlier reply is not its)", n)
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
	c, err := Dial(Options{URL: url})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
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

// TestSubscribeChecksNames: a channel name the server would refuse is
// refused by Subscribe, not sent on every connect (ten refusals in a row
// close the connection for good).
func TestSubscribeChecksNames(t *testing.T) {
	url, _ := scripted(t, func(t *testing.T, ws *websocket.Conn) {
		write(t, ws, `{"type":"welcome","connection_id":"c1","instance":"i"}`)
		_, _, _ = ws.ReadMessage() // until the client closes
	})
	c, err := Dial(Options{URL: url})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for _, ch := range []string{"", "bad name", "-x", strings.Repeat("a", 129)} {
		if _, err := c.Subscribe(ch, Handler{}); err == nil {
			t.Errorf("Subscribe(%q) accepted", ch)
		}
	}
	if _, err := c.Subscribe("ok:1", Handler{After: "bogus"}); err == nil {
		t.Error("After \"bogus\" accepted")
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

// TestTokenTravelsAsSubprotocol: the token is offered as the
// "token.<jwt>" subprotocol beside "wsrelay", and is not in the URL.
func TestTokenTravelsAsSubprotocol(t *testing.T) {
	got := make(chan *http.Request, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case got <- r:
		default:
		}
		ws, err := (&websocket.Upgrader{Subprotocols: []string{"wsrelay"}}).Upgrade(w, r, nil)
		if err != nil {
			return
		}
		defer ws.Close()
		_ = ws.WriteMessage(websocket.TextMessage, []byte(`{"type":"welcome","connection_id":"c1","instance":"i"}`))
		_, _, _ = ws.ReadMessage()
	}))
	defer srv.Close()
	c, err := Dial(Options{URL: "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws", Token: "tok1"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
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
