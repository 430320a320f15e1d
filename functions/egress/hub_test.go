package main

import (
	"context"
	"encoding/json"
	"errors"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/registry"
	"github.com/wsrelay/wsrelay/shared/stream"
)

// failXRange makes XRANGE fail while on is set, as a Redis read that
// times out.
type failXRange struct{ on atomic.Bool }

func (f *failXRange) DialHook(next redis.DialHook) redis.DialHook { return next }

func (f *failXRange) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if f.on.Load() && strings.EqualFold(cmd.Name(), "xrange") {
			err := errors.New("i/o timeout (test)")
			cmd.SetErr(err)
			return err
		}
		return next(ctx, cmd)
	}
}

func (f *failXRange) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

// TestGapFillRetries: a notification is lost (published to another shard
// channel) and the stream read that would fill the gap fails for a while.
// The live subscriber still gets every message, in order: the hub retries
// the read instead of delivering past the gap.
func TestGapFillRetries(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	hook := &failXRange{}
	rdb.AddHook(hook)
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"})
	ws, _, err := websocket.DefaultDialer.Dial("ws"+strings.TrimPrefix(e.srv.URL, "http")+"/ws?channels=room", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	next(t, ws, "subscribed")

	ks := keys.Scheme{Prefix: prefix}
	store := stream.NewStore(rdb)
	publish := func(notify string, n int) string {
		t.Helper()
		ids, err := store.Append(t.Context(), []stream.Append{{Stream: ks.Stream("room"), Notify: notify,
			Msg: stream.Message{Channel: "room", TS: time.Now().UnixMilli(), Data: []byte(strconv.Itoa(n))}}})
		if err != nil {
			t.Fatal(err)
		}
		return ids[0]
	}
	want := []string{publish(ks.Notify("room"), 1)}
	want = append(want, publish(ks.Notify("room")+"-elsewhere", 2)) // its notification is lost
	hook.on.Store(true)
	want = append(want, publish(ks.Notify("room"), 3)) // shows the gap; filling it fails
	time.Sleep(300 * time.Millisecond)
	hook.on.Store(false)
	want = append(want, publish(ks.Notify("room"), 4))

	var got []string
	_ = ws.SetReadDeadline(time.Now().Add(5 * time.Second))
	for len(got) < len(want) {
		var m struct{ Type, ID string }
		_, b, err := ws.ReadMessage()
		if err != nil {
			t.Fatalf("got %v, want %v: %v", got, want, err)
		}
		if json.Unmarshal(b, &m) == nil && m.Type == "message" {
			got = append(got, m.ID)
		}
	}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("got %v, want %v", got, want)
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
	c.lastRead.Store(time.Now().UnixNano())
	c.lastPing.Store(time.Now().UnixNano())
	c.rec = registry.Record{ID: c.id, Instance: s.instance, Channels: []string{}}
	s.hub.addConn(c)
	close(c.done)
	if err := s.reg.Remove(t.Context(), c.recordCopy()); err != nil { // as its end does
		t.Fatal(err)
	}
	s.refreshRegistry(t.Context())
	s.hub.removeConn(c)
	if rec, err := s.reg.Get(t.Context(), c.id); !errors.Is(err, registry.ErrNotFound) {
		t.Fatalf("registry holds %+v, %v for a connection that has ended", rec, err)
	}
}
