package main

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"strings"
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

// TestGapFillRetries: a notification is lost (published to another shard
// channel) and the stream read that would fill the gap fails for a while.
// The live subscriber still gets every message, in order: the hub retries
// the read instead of delivering past the gap.
func TestGapFillRetries(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	// XRANGE fails while failing is set, as a Redis read that times out;
	// failed counts the reads failed.
	var failing atomic.Bool
	var failed atomic.Int64
	rdb.AddHook(redistest.Fail{Cmd: func(cmd redis.Cmder) bool {
		if failing.Load() && strings.EqualFold(cmd.Name(), "xrange") {
			failed.Add(1)
			return true
		}
		return false
	}})
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"})
	ws, _, err := websocket.DefaultDialer.Dial("ws"+strings.TrimPrefix(e.srv.URL, "http")+"/ws?channels=room", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	next(t, ws, "subscribed")

	ks := keys.Scheme{Prefix: prefix}
	publish := func(notify string, n int) string { return appendTo(t, rdb, ks, "room", notify, n) }
	want := []string{publish(ks.Notify("room"), 1)}
	want = append(want, publish(ks.Notify("room")+"-elsewhere", 2)) // its notification is lost
	failing.Store(true)
	want = append(want, publish(ks.Notify("room"), 3)) // shows the gap; filling it fails
	testkit.Eventually(t, 5*time.Second, func() error {
		if failed.Load() == 0 {
			return errors.New("the gap read has not failed yet")
		}
		return nil
	})
	failing.Store(false)

	var got []string
	readUpTo := func(n int) {
		t.Helper()
		_ = ws.SetReadDeadline(time.Now().Add(5 * time.Second))
		for len(got) < n {
			var m struct{ Type, ID string }
			_, b, err := ws.ReadMessage()
			if err != nil {
				t.Fatalf("got %v, want %v: %v", got, want[:n], err)
			}
			if json.Unmarshal(b, &m) == nil && m.Type == "message" {
				got = append(got, m.ID)
			}
		}
	}
	// Nothing more is published until 1-3 arrived: only a retry of the
	// failed read can deliver 2 and 3 (a later notification would show
	// the gap again and fill it without any retry).
	readUpTo(len(want))
	want = append(want, publish(ks.Notify("room"), 4))
	readUpTo(len(want))
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("got %v, want %v", got, want)
	}
}

// TestSendDuringRegistration: a message to a user sent as soon as a new
// connection of the user is in the registry reaches that connection,
// after its welcome, even when it reaches the hub before the registry
// write has returned to the egress.
func TestSendDuringRegistration(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	// The registry write that adds bob's connection to his set returns
	// only when released: the record is visible to senders meanwhile.
	hold := redistest.NewHold(func(cmds []redis.Cmder) bool {
		for _, c := range cmds {
			if a := c.Args(); strings.EqualFold(c.Name(), "zadd") && len(a) > 1 && a[1] == ks.UserConns("bob") {
				return true
			}
		}
		return false
	})
	t.Cleanup(hold.Release)
	rdb.AddHook(hold)
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"})
	url := "ws" + strings.TrimPrefix(e.srv.URL, "http") + "/ws?user="
	alice, _, err := websocket.DefaultDialer.Dial(url+"alice", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer alice.Close()
	next(t, alice, "welcome")

	type dialed struct {
		ws  *websocket.Conn
		err error
	}
	bobc := make(chan dialed, 1)
	go func() {
		ws, _, err := websocket.DefaultDialer.Dial(url+"bob", nil)
		bobc <- dialed{ws, err}
	}()
	select {
	case <-hold.Hit():
	case <-time.After(5 * time.Second):
		t.Fatal("bob's connection was not registered")
	}
	// bob's record is in: a message to bob, then one to alice. When
	// alice has hers, the hub has handled bob's (the inbox is in order).
	store := stream.NewStore(rdb)
	msg := func(user, data string) stream.Append {
		return stream.Append{Stream: ks.Inbox(e.s.instance), Notify: ks.InboxNotify(e.s.instance),
			Msg: stream.Message{Route: stream.ToUser(user), TS: time.Now().UnixMilli(), Data: []byte(data)}}
	}
	_, err = store.Append(t.Context(), []stream.Append{msg("bob", `"to bob"`), msg("alice", `"to alice"`)})
	if err != nil {
		t.Fatal(err)
	}
	if got := nextData(t, alice); got != `"to alice"` {
		t.Errorf("alice got %s", got)
	}
	hold.Release()

	d := <-bobc
	if d.err != nil {
		t.Fatal(d.err)
	}
	defer d.ws.Close()
	var first protocol.Reply
	_ = d.ws.SetReadDeadline(time.Now().Add(5 * time.Second))
	if err := d.ws.ReadJSON(&first); err != nil || first.Type != "welcome" {
		t.Fatalf("bob's first frame: %q, %v; want welcome", first.Type, err)
	}
	if got := nextData(t, d.ws); got != `"to bob"` {
		t.Errorf("bob got %s", got)
	}
}

// nextData reads up to the next message frame and returns its data.
func nextData(t *testing.T, ws *websocket.Conn) string {
	t.Helper()
	_ = ws.SetReadDeadline(time.Now().Add(5 * time.Second))
	for {
		var m struct {
			Type string
			Data json.RawMessage
		}
		if err := ws.ReadJSON(&m); err != nil {
			t.Fatalf("waiting for a message: %v", err)
		}
		if m.Type == "message" {
			return string(m.Data)
		}
	}
}

// TestWelcomeIsFirst: the first frame on a connection is the welcome,
// even while messages to its user are being delivered as it connects.
func TestWelcomeIsFirst(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"})
	s, srv := e.s, e.srv
	ks := keys.Scheme{Prefix: prefix}
	store := stream.NewStore(rdb)

	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	done := make(chan struct{})
	go func() { // messages to alice, without pause
		defer close(done)
		as := make([]stream.Append, 20)
		for i := range as {
			as[i] = stream.Append{Stream: ks.Inbox(s.instance), Notify: ks.InboxNotify(s.instance),
				Msg: stream.Message{Route: stream.ToUser("alice"), Data: []byte("1")}}
		}
		for ctx.Err() == nil {
			_, _ = store.Append(ctx, as)
		}
	}()
	url := "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws?user=alice"
	for i, end := 0, time.Now().Add(2*time.Second); time.Now().Before(end); i++ {
		ws, _, err := websocket.DefaultDialer.Dial(url, nil)
		if err != nil {
			t.Fatal(err)
		}
		var r struct{ Type string }
		_ = ws.SetReadDeadline(time.Now().Add(5 * time.Second))
		err = ws.ReadJSON(&r)
		ws.Close()
		if err != nil || r.Type != "welcome" {
			t.Fatalf("connection %d: first frame %q, %v; want welcome", i, r.Type, err)
		}
	}
	cancel()
	<-done
}

// TestRefreshKeepsNoEndedConnection: a registry refresh that overlaps a
// connection's end does not leave its record behind (it would outlive
// the socket by REGISTRY_TTL, with sends to it accepted and dropped).
func TestRefreshKeepsNoEndedConnection(t *testing.T) {
	t.Parallel()
	e := startSecEgress(t, map[string]string{"ALLOW_ANONYMOUS": "true"})
	s := e.s
	// A connection in the hub's snapshot that ends (done is closed first
	// thing when it ends) before the refresh writes its record.
	// A real socket and fresh liveness times, for the maintenance sweep
	// should it run meanwhile.
	server, _ := tcpPair(t)
	c := &conn{s: s, nc: server, id: "ended-conn", done: make(chan struct{})}
	c.lastRead.Store(mono(time.Now()))
	c.lastPing.Store(mono(time.Now()))
	c.rec = registry.Record{ID: c.id, Instance: s.instance, Channels: []string{}}
	// Its record was written (openConn): the refresh takes only such
	// connections, and without this took none, writing nothing back, and
	// the test passed whether or not the refresh removed the records of
	// connections that ended meanwhile.
	c.listed.Store(true)
	s.hub.addConn(c)
	close(c.done)
	if err := s.reg.Remove(t.Context(), c.recordCopy()); err != nil { // as its end does
		t.Fatal(err)
	}
	if err := s.refreshRegistry(t.Context()); err != nil {
		t.Fatal(err)
	}
	s.hub.removeConn(c)
	if rec, err := s.reg.Get(t.Context(), c.id); !errors.Is(err, registry.ErrNotFound) {
		t.Fatalf("registry holds %+v, %v for a connection that has ended", rec, err)
	}
}

// TestSubscribeBeforeRun: a channel wanted before the hub's loop has
// started (a socket that subscribes in the instant between the listener
// opening and the loop starting, as an SCF instance started by that very
// connection may see) is subscribed once the loop starts, instead of
// waiting out acquire's 5 s and failing unavailable. Nothing failed, so
// nothing is logged or counted as a Redis error: this logged "redis read
// path failing" with err "subscriber closed", the start of a read-path
// episode, at every such start. Nor is a channel wanted after the hub
// stopped, which no Redis failure refused either.
func TestSubscribeBeforeRun(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	cfg, err := loadConfig(func(k string) string {
		return map[string]string{"JWT_SECRET": testSecret, "REDIS_URL": redistest.URL(t), "REDIS_KEY_PREFIX": prefix}[k]
	})
	if err != nil {
		t.Fatal(err)
	}
	var logs testkit.SyncBuffer
	s := NewServer(cfg, slog.New(slog.NewJSONHandler(&logs, nil)), rdb)
	h := s.hub
	ks := keys.Scheme{Prefix: prefix}
	type result struct {
		cs  *chanState
		err error
	}
	acquired := make(chan result, 1)
	go func() {
		cs, err := h.acquire(t.Context(), "early")
		acquired <- result{cs, err}
	}()
	// The loop has not started: acquire found no subscriber (it looks
	// under the lock it adds the channel under).
	testkit.Eventually(t, 5*time.Second, func() error {
		if h.state(ks.Notify("early")) == nil {
			return errors.New("acquire has not added the channel yet")
		}
		return nil
	})
	_, stop := startEgress(t, s)
	r := <-acquired
	if r.err != nil || r.cs == nil || !r.cs.confirmed {
		t.Fatalf("acquire before the loop started: %+v, %v", r.cs, r.err)
	}
	h.release(r.cs)
	stop()
	// Refused (the hub has stopped), within the context's time.
	ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
	defer cancel()
	if cs, err := h.acquire(ctx, "late"); !errors.Is(err, errUnavailable) {
		t.Fatalf("acquire after the hub stopped: %+v, %v", cs, err)
	}
	for _, l := range logs.JSONLines(t) {
		if l["level"] != "INFO" {
			t.Errorf("logged %v", l)
		}
	}
	if n := h.redisErrors.Load(); n != 0 {
		t.Errorf("%d redis errors counted", n)
	}
}
