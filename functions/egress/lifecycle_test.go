package main

import (
	"context"
	"io"
	"log/slog"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/protocol"
	"github.com/wsrelay/wsrelay/shared/redisconn"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/stream"
)

// TestServerLifecycleLeaksNothing runs an egress through its whole life —
// sockets subscribed live and with resume, targeted and channel messages,
// a server close, shutdown with sockets still open — and checks that every
// goroutine it started (hub, subscriber, maintenance loop, connection
// readers and writers) has ended.
func TestServerLifecycleLeaksNothing(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())

	url := redistest.URL(t)
	o, err := redis.ParseURL(url)
	if err != nil {
		t.Fatal(err)
	}
	rdb := redis.NewClient(o)
	prefix := redistest.Prefix(t)
	defer func() { redistest.Cleanup(rdb, prefix); rdb.Close() }()
	env := map[string]string{"REDIS_URL": url, "REDIS_KEY_PREFIX": prefix, "ALLOW_ANONYMOUS": "true", "PROBE_INTERVAL": "200ms", "SHUTDOWN_GRACE": "2s"}
	cfg, err := loadConfig(func(k string) string { return env[k] })
	if err != nil {
		t.Fatal(err)
	}
	srv, stop := startEgress(t, NewServer(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)), rdb))

	ks := keys.Scheme{Prefix: prefix}
	store := stream.NewStore(rdb)
	publish := func(ch string) string {
		ids, err := store.Append(context.Background(), []stream.Append{{Stream: ks.Stream(ch), Notify: ks.Notify(ch), Msg: stream.Message{Channel: ch, TS: time.Now().UnixMilli(), Data: []byte(`"x"`)}}})
		if err != nil {
			t.Fatal(err)
		}
		return ids[0]
	}
	first := publish("life")
	wsURL := "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws"
	var socks []*websocket.Conn
	for i := range 3 {
		ws, _, err := websocket.DefaultDialer.Dial(wsURL+"?channels=life", nil)
		if err != nil {
			t.Fatal(err)
		}
		socks = append(socks, ws)
		if i == 2 {
			_ = ws.WriteJSON(map[string]any{"type": "subscribe", "channel": "other", "after": first})
		}
		readUntil(t, ws, `"subscribed"`)
	}
	publish("life")
	for _, ws := range socks {
		readUntil(t, ws, `"type":"message"`)
	}
	// One socket closes itself; the others are open at shutdown.
	_ = socks[0].WriteMessage(websocket.CloseMessage, websocket.FormatCloseMessage(1000, "bye"))
	socks[0].Close()

	stop() // before the deferred leak check, which runs ahead of t.Cleanup
	for _, ws := range socks[1:] {
		ws.Close()
	}
}

func readUntil(t *testing.T, ws *websocket.Conn, substr string) {
	t.Helper()
	readUntilWithin(t, ws, substr, 5*time.Second)
}

// readUntilWithin is readUntil, failing if no such frame has come within
// the given time.
func readUntilWithin(t *testing.T, ws *websocket.Conn, substr string, within time.Duration) {
	t.Helper()
	start := time.Now()
	_ = ws.SetReadDeadline(start.Add(within))
	for {
		_, b, err := ws.ReadMessage()
		if err != nil {
			t.Fatalf("waiting for %s (%v): %v", substr, time.Since(start).Round(time.Millisecond), err)
		}
		if strings.Contains(string(b), substr) {
			return
		}
	}
}

// TestDrainCutsSocketsLeft: at shutdown, a socket whose client never
// answers the close is cut when SHUTDOWN_GRACE is over, and its registry
// record is removed before Run returns (after it, run closes the Redis
// client, and the record would stay for REGISTRY_TTL).
func TestDrainCutsSocketsLeft(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true", "SHUTDOWN_GRACE": "200ms", "WRITE_TIMEOUT": "10s"})
	ws, _, err := websocket.DefaultDialer.Dial("ws"+strings.TrimPrefix(e.srv.URL, "http")+"/ws", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	id := next(t, ws, "welcome").ConnectionID
	ks := keys.Scheme{Prefix: prefix}
	if n, err := rdb.Exists(t.Context(), ks.Conn(id)).Result(); err != nil || n != 1 {
		t.Fatalf("record of %s: %d, %v", id, n, err)
	}
	// The client reads nothing more, so it never answers the close frame.
	e.stop()
	if n, err := rdb.Exists(t.Context(), ks.Conn(id)).Result(); err != nil || n != 0 {
		t.Fatalf("after shutdown, the record of %s is still there (%d, %v)", id, n, err)
	}
}

// TestRefreshDoesNotUndoLeave: a channel left while the registry refresh
// is on its way to Redis with the connection's record copied before is
// not listed afterwards: the refresh would otherwise write the left
// channel's membership back, which nothing removes until it expires.
func TestRefreshDoesNotUndoLeave(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	var armed atomic.Bool
	// The refresh's pipeline (it re-adds the connection to b) waits
	// before it is sent: the one with b's ZADD that prunes no set, which
	// a connection's first write and a join do (registry's pruneCmd).
	hold := redistest.NewHoldBefore(func(cmds []redis.Cmder) bool {
		if !armed.Load() {
			return false
		}
		addsB := false
		for _, c := range cmds {
			if strings.EqualFold(c.Name(), "zremrangebyscore") {
				return false
			}
			if a := c.Args(); strings.EqualFold(c.Name(), "zadd") && len(a) > 1 && a[1] == ks.ChannelConns("b") {
				addsB = true
			}
		}
		return addsB
	})
	t.Cleanup(hold.Release)
	rdb.AddHook(hold)
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"})
	ws, _, err := e.dial(t, url.Values{"channels": {"a,b"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	id := next(t, ws, protocol.TypeWelcome).ConnectionID
	next(t, ws, protocol.TypeSubscribed)
	next(t, ws, protocol.TypeSubscribed)
	armed.Store(true)
	refreshed := make(chan struct{})
	go func() { e.s.refreshRegistry(context.Background()); close(refreshed) }()
	select {
	case <-hold.Hit(): // the refresh has copied the record (a, b)
	case <-time.After(10 * time.Second):
		t.Fatal("the refresh's pipeline never came")
	}
	send(t, ws, map[string]any{"type": "unsubscribe", "channel": "b"})
	time.Sleep(100 * time.Millisecond) // the leave, if not held back, lands first
	hold.Release()
	<-refreshed
	next(t, ws, protocol.TypeUnsubscribed)
	recs, err := e.s.reg.Channel(t.Context(), "b", 10)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range recs {
		if r.ID == id {
			t.Fatalf("connection %s is listed in b after leaving it: %+v", id, r)
		}
	}
	rec, err := e.s.reg.Get(t.Context(), id)
	if err != nil || strings.Join(rec.Channels, ",") != "a" {
		t.Fatalf("record %+v, %v; want channels [a]", rec, err)
	}
}

// TestRefreshBusyConnectionLast: a connection whose own registry write is
// under way (its regMu held) does not hold up the refresh of the others,
// and is refreshed once its write is done, not skipped (skipped in every
// refresh, a connection that keeps subscribing lost its user membership).
func TestRefreshBusyConnectionLast(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"})
	for range 2 {
		ws, _, err := e.dial(t, url.Values{"channels": {"a"}}, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer ws.Close()
		next(t, ws, protocol.TypeSubscribed)
	}
	ctx := t.Context()
	ks := keys.Scheme{Prefix: prefix}
	conns := e.s.hub.snapshotConns()
	busy, idle := conns[0], conns[1]
	for _, c := range conns {
		if err := rdb.PExpire(ctx, ks.Conn(c.id), 5*time.Second).Err(); err != nil {
			t.Fatal(err)
		}
	}
	renewed := func(c *conn) bool {
		ttl, err := rdb.PTTL(ctx, ks.Conn(c.id)).Result()
		if err != nil {
			t.Fatal(err)
		}
		return ttl > 10*time.Second // REGISTRY_TTL is 30 s
	}
	busy.regMu.Lock() // as a subscribe waiting for Redis would
	done := make(chan struct{})
	go func() { e.s.refreshRegistry(context.Background()); close(done) }()
	for deadline := time.Now().Add(5 * time.Second); !renewed(idle); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			busy.regMu.Unlock()
			t.Fatal("the refresh of the other connection waits for a busy one")
		}
	}
	if renewed(busy) {
		t.Error("the busy connection's record was written while its own write held regMu")
	}
	busy.regMu.Unlock()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("the refresh did not end once the busy connection's write was done")
	}
	if !renewed(busy) {
		t.Error("the busy connection was not refreshed once its write was done")
	}
}

// slowRecords delays, while on, each pipeline that writes a connection
// record, after Redis has run it: a Redis that answers every batch in
// time, but slowly.
type slowRecords struct {
	prefix string
	delay  time.Duration
	on     atomic.Bool
}

func (h *slowRecords) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h *slowRecords) ProcessHook(next redis.ProcessHook) redis.ProcessHook { return next }

func (h *slowRecords) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		err := next(ctx, cmds)
		if h.on.Load() && len(cmds) > 0 && cmds[0].Name() == "set" {
			if key, _ := cmds[0].Args()[1].(string); strings.HasPrefix(key, strings.TrimSuffix((keys.Scheme{Prefix: h.prefix}).Conn(""), "}")) {
				time.Sleep(h.delay)
			}
		}
		return err
	}
}

// TestRefreshRenewsEveryBatch: a refresh of many batches, each answered
// well within REDIS_TIMEOUT, renews every record, however long the whole
// refresh takes (one deadline for all of it failed the later batches of a
// large instance).
func TestRefreshRenewsEveryBatch(t *testing.T) {
	t.Parallel()
	prefix := redistest.Prefix(t)
	env := map[string]string{"ALLOW_ANONYMOUS": "true", "REDIS_TIMEOUT": "300ms", "REDIS_URL": redistest.URL(t), "REDIS_KEY_PREFIX": prefix}
	cfg, err := loadConfig(func(k string) string { return env[k] })
	if err != nil {
		t.Fatal(err)
	}
	// The client the egress makes for itself: its deadlines come from the
	// context (redistest's client ignores them).
	rdb, err := redisconn.New(cfg.Redis)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { redistest.Cleanup(rdb, prefix); rdb.Close() })
	slow := &slowRecords{prefix: prefix, delay: 200 * time.Millisecond}
	rdb.AddHook(slow)
	s := NewServer(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)), rdb)
	s.refreshBatch = 1 // a batch per connection: 12 batches of 200 ms
	srv, _ := startEgress(t, s)
	e := &secEgress{s: s, srv: srv}
	const n = 12
	for range n {
		ws, _, err := e.dial(t, url.Values{"channels": {"a"}}, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer ws.Close()
		next(t, ws, protocol.TypeSubscribed)
	}
	ctx := context.Background()
	ks := keys.Scheme{Prefix: prefix}
	conns := s.hub.snapshotConns()
	for _, c := range conns {
		if err := rdb.PExpire(ctx, ks.Conn(c.id), 5*time.Second).Err(); err != nil {
			t.Fatal(err)
		}
	}
	slow.on.Store(true)
	s.refreshRegistry(ctx)
	slow.on.Store(false)
	for _, c := range conns {
		ttl, err := rdb.PTTL(ctx, ks.Conn(c.id)).Result()
		if err != nil {
			t.Fatal(err)
		}
		if ttl < 10*time.Second { // REGISTRY_TTL is 30 s
			t.Errorf("the record of %s was not refreshed: TTL %v", c.id, ttl)
		}
	}
}

// TestRefreshDoesNotHoldPings: while a registry refresh waits on Redis,
// the maintenance loop goes on pinging sockets.
func TestRefreshDoesNotHoldPings(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	var on atomic.Bool
	conn := strings.TrimSuffix((keys.Scheme{Prefix: prefix}).Conn(""), "}")
	hold := redistest.NewHold(func(cmds []redis.Cmder) bool {
		key, _ := cmds[0].Args()[1].(string)
		return on.Load() && cmds[0].Name() == "set" && strings.HasPrefix(key, conn)
	})
	defer hold.Release()
	rdb.AddHook(hold)
	// A refresh every second (REGISTRY_TTL/3), a ping every 200 ms.
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true", "REGISTRY_TTL": "3s", "PING_INTERVAL": "200ms", "REDIS_TIMEOUT": "5s"})
	ws, _, err := e.dial(t, url.Values{"channels": {"a"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	next(t, ws, protocol.TypeSubscribed)
	var pings atomic.Int32
	ws.SetPingHandler(func(data string) error {
		pings.Add(1)
		return ws.WriteControl(websocket.PongMessage, []byte(data), time.Now().Add(time.Second))
	})
	_ = ws.SetReadDeadline(time.Time{})
	read := make(chan error, 1)
	go func() {
		for {
			if _, _, err := ws.ReadMessage(); err != nil {
				read <- err
				return
			}
		}
	}()
	on.Store(true)
	select {
	case <-hold.Hit():
	case err := <-read:
		t.Fatalf("socket closed: %v", err)
	case <-time.After(5 * time.Second):
		t.Fatal("no registry refresh within 5 s")
	}
	before := pings.Load()
	select {
	case err := <-read:
		t.Fatalf("socket closed while a refresh was stalled: %v", err)
	case <-time.After(time.Second):
	}
	if n := pings.Load() - before; n < 2 {
		t.Errorf("%d pings in the second after a refresh stalled, want 2 or more (one per 200 ms)", n)
	}
	hold.Release()
	ws.Close()
	<-read
}
