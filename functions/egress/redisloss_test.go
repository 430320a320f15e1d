package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/client"
	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redisconn"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/registry"
	"github.com/wsrelay/wsrelay/shared/stream"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// Tests of what the whole system does, seen from the Go client, when
// Redis loses or rewinds its data while an egress runs: a restart without
// persistence, FLUSHALL, streams or last-id keys expiring, an outage
// longer than REGISTRY_TTL, a restart from an older snapshot.

const lossHistoryTTL = time.Hour

// lossEnv is an egress on a private redis-server the test may restart.
type lossEnv struct {
	t   *testing.T
	srv *redistest.Server
	pub redis.UniversalClient // the test's own client (the "ingress")
	ks  keys.Scheme
	e   *secEgress
	log *testkit.SyncBuffer
}

func startLossEnv(t *testing.T, srv *redistest.Server, env map[string]string) *lossEnv {
	t.Helper()
	if srv == nil {
		srv = redistest.Start(t)
	}
	if env["REDIS_URL"] == "" {
		env["REDIS_URL"] = srv.URL()
	}
	env["ALLOW_ANONYMOUS"] = "true"
	if env["REGISTRY_TTL"] == "" {
		env["REGISTRY_TTL"] = "3s"
	}
	if env["PROBE_INTERVAL"] == "" {
		env["PROBE_INTERVAL"] = "200ms"
	}
	cfg, err := loadConfig(func(k string) string { return env[k] })
	if err != nil {
		t.Fatal(err)
	}
	rdb, err := redisconn.New(cfg.Redis)
	if err != nil {
		t.Fatal(err)
	}
	buf := &testkit.SyncBuffer{}
	s := NewServer(cfg, slog.New(slog.NewJSONHandler(buf, &slog.HandlerOptions{Level: slog.LevelDebug})), rdb)
	hs, stop := startEgress(t, s)
	t.Cleanup(func() { rdb.Close() })
	pub := redis.NewClient(&redis.Options{Addr: srv.Addr(), MaxRetries: -1, DialTimeout: 200 * time.Millisecond})
	t.Cleanup(func() { pub.Close() })
	le := &lossEnv{t: t, srv: srv, pub: pub, ks: keys.Scheme{Prefix: cfg.Redis.KeyPrefix}, e: &secEgress{s: s, srv: hs, stop: stop}, log: buf}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("egress log:\n%s", buf.String())
		}
	})
	return le
}

func (le *lossEnv) wsURL() string { return "ws" + strings.TrimPrefix(le.e.srv.URL, "http") + "/ws" }

// publish appends to ch as the ingress does (its history limits),
// retrying while Redis is not back.
func (le *lossEnv) publish(ch string, n int) string {
	le.t.Helper()
	var id string
	testkit.Eventually(le.t, 10*time.Second, func() error {
		ids, err := stream.NewStore(le.pub).Append(context.Background(), []stream.Append{{
			Stream: le.ks.Stream(ch), Notify: le.ks.Notify(ch),
			Msg:    stream.Message{Channel: ch, TS: time.Now().UnixMilli(), Data: []byte(strconv.Itoa(n))},
			Limits: stream.Limits{MaxLen: 1000, MaxAgeMS: lossHistoryTTL.Milliseconds(), TTLMS: lossHistoryTTL.Milliseconds()},
		}})
		if err != nil {
			return err
		}
		id = ids[0]
		return nil
	})
	return id
}

// sendToUser does what POST /v1/users/{user}/messages does; it returns
// the number of connections the registry listed.
func (le *lossEnv) sendToUser(user string, n int) (int, error) {
	ctx := context.Background()
	ttl := 3 * time.Second
	recs, err := registry.New(le.pub, le.ks, ttl).User(ctx, user, 100)
	if err != nil {
		return 0, err
	}
	seen := map[string]bool{}
	for _, r := range recs {
		if seen[r.Instance] {
			continue
		}
		seen[r.Instance] = true
		_, err := stream.NewStore(le.pub).Append(ctx, []stream.Append{{
			Stream: le.ks.Inbox(r.Instance), Notify: le.ks.InboxNotify(r.Instance),
			Msg:    stream.Message{Route: stream.ToUser(user), TS: time.Now().UnixMilli(), Data: []byte(strconv.Itoa(n))},
			Limits: stream.Limits{MaxLen: 10000, MaxAgeMS: 2 * ttl.Milliseconds(), TTLMS: 2 * ttl.Milliseconds()},
		}})
		if err != nil {
			return 0, err
		}
	}
	return len(recs), nil
}

// goClient is a Go client (shared/client) subscribed to one channel,
// recording what it is told.
type goClient struct {
	t         *testing.T
	c         *client.Client
	mu        sync.Mutex
	msgs      []client.Message
	targeted  []client.Message
	recovered []bool
	states    []client.State
}

func newGoClient(t *testing.T, url, user, ch, after string) *goClient {
	t.Helper()
	g := &goClient{t: t}
	c, err := client.Dial(client.Options{
		URL: url, User: user, MinBackoff: 50 * time.Millisecond, MaxBackoff: 300 * time.Millisecond,
		OnState: func(s client.State, _ error) {
			g.mu.Lock()
			g.states = append(g.states, s)
			g.mu.Unlock()
		},
		OnMessage: func(m client.Message) {
			g.mu.Lock()
			g.targeted = append(g.targeted, m)
			g.mu.Unlock()
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	g.c = c
	t.Cleanup(func() { c.Close() })
	if ch != "" {
		_, err = c.Subscribe(ch, client.Handler{
			After: after,
			OnMessage: func(m client.Message) {
				g.mu.Lock()
				g.msgs = append(g.msgs, m)
				g.mu.Unlock()
			},
			OnSubscribed: func(rec bool) {
				g.mu.Lock()
				g.recovered = append(g.recovered, rec)
				g.mu.Unlock()
			},
		})
		if err != nil {
			t.Fatal(err)
		}
		testkit.Eventually(t, 10*time.Second, func() error {
			if len(g.subscribed()) == 0 {
				return fmt.Errorf("not subscribed yet")
			}
			return nil
		})
	}
	return g
}

func (g *goClient) subscribed() []bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return append([]bool(nil), g.recovered...)
}

func (g *goClient) data() []string {
	g.mu.Lock()
	defer g.mu.Unlock()
	var out []string
	for _, m := range g.msgs {
		out = append(out, string(m.Data))
	}
	return out
}

func (g *goClient) targetedData() []string {
	g.mu.Lock()
	defer g.mu.Unlock()
	var out []string
	for _, m := range g.targeted {
		out = append(out, string(m.Data))
	}
	return out
}

// waitData waits until the client has received exactly want (message
// data, in order), failing on anything else.
func (g *goClient) waitData(within time.Duration, want ...string) {
	g.t.Helper()
	testkit.Eventually(g.t, within, func() error {
		got := g.data()
		if len(got) < len(want) {
			return fmt.Errorf("received %v, want %v", got, want)
		}
		return nil
	})
	time.Sleep(200 * time.Millisecond) // a duplicate would arrive now
	if got := g.data(); fmt.Sprint(got) != fmt.Sprint(want) {
		g.t.Fatalf("received %v, want %v", got, want)
	}
}

// waitTargeted waits until the client's targeted messages are want (data,
// in order).
func (g *goClient) waitTargeted(within time.Duration, want ...string) {
	g.t.Helper()
	testkit.Eventually(g.t, within, func() error {
		if got := g.targetedData(); fmt.Sprint(got) != fmt.Sprint(want) {
			return fmt.Errorf("targeted %v, want %v", got, want)
		}
		return nil
	})
}

// neverCut fails the test if the client's socket was ever replaced.
func (g *goClient) neverCut() {
	g.t.Helper()
	g.mu.Lock()
	states := fmt.Sprint(g.states)
	g.mu.Unlock()
	if states != "[connecting connected]" {
		g.t.Errorf("client states %s: the socket was cut", states)
	}
}

// waitReadyz waits until the egress's /readyz answers status.
func (le *lossEnv) waitReadyz(within time.Duration, status int) {
	le.t.Helper()
	testkit.Eventually(le.t, within, func() error {
		if st := readyz(le); st != status {
			return fmt.Errorf("/readyz %d, want %d", st, status)
		}
		return nil
	})
}

func readyz(le *lossEnv) int {
	resp, err := http.Get(le.e.srv.URL + "/readyz")
	if err != nil {
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

func strs(n ...int) []string {
	var out []string
	for _, i := range n {
		out = append(out, strconv.Itoa(i))
	}
	return out
}

// TestGoClientAcrossRedisRestart: Redis restarts empty (no persistence)
// under a Go client subscribed through the egress. The client keeps
// receiving new messages, once each; a client resuming from before the
// restart is told recovered:false; targeted sends reach the client again
// once the registry is rewritten; /readyz is 200 again.
func TestGoClientAcrossRedisRestart(t *testing.T) {
	le := startLossEnv(t, nil, map[string]string{})
	a := newGoClient(t, le.wsURL(), "alice", "room", "")
	ids := []string{le.publish("room", 1), le.publish("room", 2), le.publish("room", 3)}
	a.waitData(5*time.Second, strs(1, 2, 3)...)

	le.srv.Restart(t)
	le.waitReadyz(10*time.Second, 200)
	for i := 4; i <= 6; i++ {
		le.publish("room", i)
	}
	a.waitData(5*time.Second, strs(1, 2, 3, 4, 5, 6)...)

	b := newGoClient(t, le.wsURL(), "bob", "room", ids[2])
	if r := b.subscribed(); len(r) != 1 || r[0] {
		t.Fatalf("resume from before the restart: recovered %v, want [false]", r)
	}
	b.waitData(5*time.Second, strs(4, 5, 6)...)

	// The registry was lost with the rest: it is written again.
	testkit.Eventually(t, 5*time.Second, func() error {
		n, err := le.sendToUser("alice", 7)
		if err != nil || n != 1 {
			return fmt.Errorf("send to alice: %d connections, %v", n, err)
		}
		return nil
	})
	a.waitTargeted(5*time.Second, strs(7)...)
	le.publish("room", 8)
	a.waitData(5*time.Second, strs(1, 2, 3, 4, 5, 6, 8)...)
}

// TestGoClientAcrossFlushAll: FLUSHALL while sockets are subscribed (the
// Pub/Sub connection stays up: nothing reconnects).
func TestGoClientAcrossFlushAll(t *testing.T) {
	le := startLossEnv(t, nil, map[string]string{})
	a := newGoClient(t, le.wsURL(), "alice", "room", "")
	ids := []string{le.publish("room", 1), le.publish("room", 2)}
	a.waitData(5*time.Second, strs(1, 2)...)
	if n, err := le.sendToUser("alice", 100); err != nil || n != 1 {
		t.Fatalf("send before flush: %d %v", n, err)
	}
	a.waitTargeted(5*time.Second, strs(100)...)

	if err := le.pub.FlushAll(t.Context()).Err(); err != nil {
		t.Fatal(err)
	}
	for i := 3; i <= 5; i++ {
		le.publish("room", i)
	}
	a.waitData(5*time.Second, strs(1, 2, 3, 4, 5)...)
	b := newGoClient(t, le.wsURL(), "bob", "room", ids[1])
	if r := b.subscribed(); len(r) != 1 || r[0] {
		t.Fatalf("resume from before the flush: recovered %v, want [false]", r)
	}
	b.waitData(5*time.Second, strs(3, 4, 5)...)
	testkit.Eventually(t, 5*time.Second, func() error {
		n, err := le.sendToUser("alice", 101)
		if err != nil || n != 1 {
			return fmt.Errorf("send to alice: %d connections, %v", n, err)
		}
		return nil
	})
	a.waitTargeted(5*time.Second, strs(100, 101)...)
	if st := readyz(le); st != 200 {
		t.Fatalf("readyz %d", st)
	}
}

// TestGoClientAcrossRestartFromSnapshot: Redis restarts from an older
// snapshot (RDB), rewinding the channel: the ids the client holds are
// not in the stream, and the stream goes on from an older one.
func TestGoClientAcrossRestartFromSnapshot(t *testing.T) {
	le := startLossEnv(t, nil, map[string]string{})
	a := newGoClient(t, le.wsURL(), "alice", "room", "")
	le.publish("room", 1)
	a.waitData(5*time.Second, strs(1)...)
	if err := le.pub.Save(t.Context()).Err(); err != nil {
		t.Fatal(err)
	}
	le.publish("room", 2)
	le.publish("room", 3)
	a.waitData(5*time.Second, strs(1, 2, 3)...)
	le.srv.Restart(t) // loads the snapshot: 2 and 3 are gone
	le.waitReadyz(10*time.Second, 200)
	time.Sleep(time.Second)
	le.publish("room", 4)
	le.publish("room", 5)
	testkit.Eventually(t, 10*time.Second, func() error {
		if got := a.data(); len(got) < 5 {
			return fmt.Errorf("received %v", got)
		}
		return nil
	})
	time.Sleep(200 * time.Millisecond)
	if got := a.data(); fmt.Sprint(got) != "[1 2 3 4 5]" {
		t.Fatalf("received %v, want [1 2 3 4 5]", got)
	}
	if r := a.subscribed(); len(r) < 2 || r[len(r)-1] {
		t.Errorf("subscribed %v: want a resume told recovered:false", r)
	}
}

// TestGoClientAcrossRestartWithClockBehind: the client holds ids from a
// Redis whose clock was ahead (XSETID stands for it); Redis restarts
// empty and the new ids are much lower than the client's. The client is
// subscribed all along: it must not drop the new messages as old.
func TestGoClientAcrossRestartWithClockBehind(t *testing.T) {
	le := startLossEnv(t, nil, map[string]string{})
	a := newGoClient(t, le.wsURL(), "alice", "room", "")
	le.publish("room", 1)
	a.waitData(5*time.Second, strs(1)...)
	ahead := fmt.Sprintf("%d-0", time.Now().Add(time.Hour).UnixMilli())
	if err := le.pub.Do(t.Context(), "XSETID", le.ks.Stream("room"), ahead).Err(); err != nil {
		t.Fatal(err)
	}
	ids := []string{le.publish("room", 2), le.publish("room", 3)}
	a.waitData(5*time.Second, strs(1, 2, 3)...)
	le.srv.Restart(t)
	le.waitReadyz(10*time.Second, 200)
	time.Sleep(time.Second)
	le.publish("room", 4)
	le.publish("room", 5)
	// The client either gets them or is told it missed them
	// (recovered:false, on a resume); either way it gets what follows.
	testkit.Eventually(t, 5*time.Second, func() error {
		if got, r := a.data(), a.subscribed(); len(got) < 5 && fmt.Sprint(r) != "[true false]" {
			return fmt.Errorf("received %v (subscribed %v): neither [1 2 3 4 5] nor told recovered:false", got, r)
		}
		return nil
	})
	le.publish("room", 6)
	testkit.Eventually(t, 5*time.Second, func() error {
		if got := a.data(); len(got) == 0 || got[len(got)-1] != "6" {
			return fmt.Errorf("received %v (subscribed %v), want 6 last", got, a.subscribed())
		}
		return nil
	})
	if got := fmt.Sprint(a.data()); got != "[1 2 3 4 5 6]" && got != "[1 2 3 6]" && got != "[1 2 3 4 6]" {
		t.Fatalf("received %s", got)
	}
	// A client resuming from the ahead id is told, and gets what follows.
	b := newGoClient(t, le.wsURL(), "bob", "room", ids[1])
	if r := b.subscribed(); len(r) != 1 || r[0] {
		t.Fatalf("resume: recovered %v, want [false]", r)
	}
	le.publish("room", 7)
	b.waitData(5*time.Second, strs(7)...)
}

// TestGoClientAcrossFlushAllWithClockBehind: as
// TestGoClientAcrossRestartWithClockBehind, but Redis loses its data with
// the connection up (FLUSHALL, or eviction of a stream and its last-id
// key): nothing reconnects, so no catch-up reads the stream, and the new
// chain's notifications, with ids below the ones delivered, are all the
// egress sees. The client must not be left without the new messages, and
// without a word, until Redis's clock passes the old ids (an hour here):
// it gets them or is told it missed them. Targeted messages, whose inbox
// was lost too, reach it again.
func TestGoClientAcrossFlushAllWithClockBehind(t *testing.T) {
	le := startLossEnv(t, nil, map[string]string{})
	a := newGoClient(t, le.wsURL(), "alice", "room", "")
	le.publish("room", 1)
	a.waitData(5*time.Second, strs(1)...)
	if n, err := le.sendToUser("alice", 100); err != nil || n != 1 {
		t.Fatalf("send: %d connections, %v", n, err)
	}
	a.waitTargeted(5*time.Second, strs(100)...)
	ahead := fmt.Sprintf("%d-0", time.Now().Add(time.Hour).UnixMilli())
	for _, k := range []string{le.ks.Stream("room"), le.ks.Inbox(le.e.s.instance)} {
		if err := le.pub.Do(t.Context(), "XSETID", k, ahead).Err(); err != nil {
			t.Fatal(err)
		}
	}
	le.publish("room", 2)
	if n, err := le.sendToUser("alice", 101); err != nil || n != 1 {
		t.Fatalf("send: %d connections, %v", n, err)
	}
	a.waitData(5*time.Second, strs(1, 2)...)
	a.waitTargeted(5*time.Second, strs(100, 101)...)

	if err := le.pub.FlushAll(t.Context()).Err(); err != nil {
		t.Fatal(err)
	}
	le.publish("room", 3)
	le.publish("room", 4)
	// The registry is written again (the probe finds the record gone).
	// Every targeted message sent once it lists the connection lands in
	// a new inbox stream, below the ids delivered too, and arrives: the
	// first of them (its predecessor 0-0) included.
	afterLoss(t, le, a, 4, strs(100, 101))
}

// afterLoss checks alice's client a after Redis lost data with the
// connection up and the messages up to last were published to "room":
// a got them all or was told it missed some (recovered:false), then
// gets the next one, last; and each targeted message sent to alice from
// then on reaches it, after the ones it got before (targeted).
func afterLoss(t *testing.T, le *lossEnv, a *goClient, last int, targeted []string) {
	t.Helper()
	testkit.Eventually(t, 5*time.Second, func() error {
		if got, r := a.data(), a.subscribed(); len(got) < last && fmt.Sprint(r) != "[true false]" {
			return fmt.Errorf("received %v (subscribed %v): neither all %d nor told recovered:false", got, r, last)
		}
		return nil
	})
	le.publish("room", last+1)
	testkit.Eventually(t, 5*time.Second, func() error {
		if got := a.data(); len(got) == 0 || got[len(got)-1] != strconv.Itoa(last+1) {
			return fmt.Errorf("received %v (subscribed %v), want %d last", got, a.subscribed(), last+1)
		}
		return nil
	})
	var sent []string
	testkit.Eventually(t, 5*time.Second, func() error {
		n, err := le.sendToUser("alice", 102+len(sent))
		if err != nil || n != 1 {
			return fmt.Errorf("send to alice: %d connections, %v", n, err)
		}
		sent = append(sent, strconv.Itoa(102+len(sent)))
		if len(sent) < 3 {
			return fmt.Errorf("%d sent", len(sent))
		}
		return nil
	})
	a.waitTargeted(5*time.Second, append(targeted, sent...)...)
}

// TestGoClientAcrossRewindWithClockBehind: as
// TestGoClientAcrossFlushAllWithClockBehind, but Redis goes back to an
// older copy of its data with the connection up: it resyncs in full from
// a replica that lacked its last writes (REPLICAOF, which keeps clients
// connected) and is made master again. The stream then goes on from an
// older entry, not from 0-0, with ids below the ones delivered (the
// replica's clock behind them). The egress dropped every new notification
// as already delivered, without a word, until Redis's clock passed the
// lost ids; the client must get them or be told it missed them, and
// targeted messages reach it again.
func TestGoClientAcrossRewindWithClockBehind(t *testing.T) {
	testRewindWithClockBehind(t, false)
}

// TestGoClientAcrossRewindAfterCatchUp: as
// TestGoClientAcrossRewindWithClockBehind, but the writes Redis loses
// reached the egress only through the catch-up of a Pub/Sub reconnect,
// their notifications lost with the connection. The first notification
// after the rewind is then above the last one received, not below it,
// though at or below the ids delivered, and follows an entry the egress
// delivered: the egress took it for a late notification of an entry the
// catch-up had delivered, and dropped it and the ones after it, without
// a word, until Redis's clock passed the lost ids.
func TestGoClientAcrossRewindAfterCatchUp(t *testing.T) {
	testRewindWithClockBehind(t, true)
}

func testRewindWithClockBehind(t *testing.T, caughtUp bool) {
	a := redistest.Start(t, "--repl-diskless-sync-delay", "0")
	b := redistest.Start(t, "--repl-diskless-sync-delay", "0")
	le := startLossEnv(t, a, map[string]string{})
	ctx := t.Context()
	bc := redis.NewClient(&redis.Options{Addr: b.Addr()})
	t.Cleanup(func() { bc.Close() })
	alice := newGoClient(t, le.wsURL(), "alice", "room", "")
	le.publish("room", 1)
	alice.waitData(5*time.Second, strs(1)...)
	if n, err := le.sendToUser("alice", 100); err != nil || n != 1 {
		t.Fatalf("send: %d connections, %v", n, err)
	}
	alice.waitTargeted(5*time.Second, strs(100)...)
	// b copies a as it is now, then goes its own way: the replica that lags.
	takeDataOf(t, bc, a)
	// a's ids run ahead of b's clock (XSETID stands for it).
	ahead := fmt.Sprintf("%d-0", time.Now().Add(time.Hour).UnixMilli())
	inbox := le.ks.Inbox(le.e.s.instance)
	for _, k := range []string{le.ks.Stream("room"), inbox} {
		if err := le.pub.Do(ctx, "XSETID", k, ahead).Err(); err != nil {
			t.Fatal(err)
		}
	}
	if caughtUp {
		// Their notifications go nowhere, as if lost with the Pub/Sub
		// connection, which then reconnects and catches up.
		appendTo(t, le.pub, le.ks, "room", le.ks.Notify("room")+"-lost", 2)
		appendTo(t, le.pub, le.ks, "room", le.ks.Notify("room")+"-lost", 3)
		if _, err := stream.NewStore(le.pub).Append(ctx, []stream.Append{{
			Stream: inbox, Notify: le.ks.InboxNotify(le.e.s.instance) + "-lost",
			Msg: stream.Message{Route: stream.ToUser("alice"), TS: time.Now().UnixMilli(), Data: []byte("101")},
		}}); err != nil {
			t.Fatal(err)
		}
		if err := le.pub.Do(ctx, "CLIENT", "KILL", "TYPE", "pubsub").Err(); err != nil {
			t.Fatal(err)
		}
	} else {
		le.publish("room", 2)
		le.publish("room", 3)
		if n, err := le.sendToUser("alice", 101); err != nil || n != 1 {
			t.Fatalf("send: %d connections, %v", n, err)
		}
	}
	alice.waitData(5*time.Second, strs(1, 2, 3)...)
	alice.waitTargeted(5*time.Second, strs(100, 101)...)
	// a takes b's data (a full resync: 2, 3 and 101 are gone) and is
	// master again, its clients connected all along.
	takeDataOf(t, le.pub, b)
	le.publish("room", 4)
	le.publish("room", 5)
	afterLoss(t, le, alice, 5, strs(100, 101))
}

// takeDataOf makes c's Redis a replica of src until it holds src's data
// (a full resync), then a master again, its clients connected all along.
func takeDataOf(t *testing.T, c redis.UniversalClient, src *redistest.Server) {
	t.Helper()
	ctx := t.Context()
	if err := c.SlaveOf(ctx, "127.0.0.1", fmt.Sprint(src.Port)).Err(); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, 5*time.Second, func() error {
		info, err := c.Info(ctx, "replication").Result()
		if err != nil || !strings.Contains(info, "master_link_status:up") {
			return fmt.Errorf("not synced: %v", err)
		}
		return nil
	})
	if err := c.SlaveOf(ctx, "NO", "ONE").Err(); err != nil {
		t.Fatal(err)
	}
}

// TestGoClientAcrossLongPartition: the egress cannot reach Redis for
// longer than REGISTRY_TTL (a partition: the ingress side still
// publishes, and the registry records expire). Once it is back: the
// client gets what was published meanwhile and after, once each, without
// being cut; its record is written again so that targeted sends reach it;
// /readyz is 200 again.
func TestGoClientAcrossLongPartition(t *testing.T) {
	srv := redistest.Start(t)
	proxy := newSilentProxy(t, srv.Addr())
	addr := proxy.ln.Addr().String()
	le := startLossEnv(t, srv, map[string]string{"REDIS_URL": "redis://" + addr + "/0"})
	a := newGoClient(t, le.wsURL(), "alice", "room", "")
	le.publish("room", 1)
	a.waitData(5*time.Second, strs(1)...)
	if n, err := le.sendToUser("alice", 100); err != nil || n != 1 {
		t.Fatalf("send before the partition: %d %v", n, err)
	}

	proxy.silent.Store(true)
	proxy.drop()
	cut := time.Now()
	le.publish("room", 2)
	le.publish("room", 3)
	testkit.Eventually(t, 10*time.Second, func() error {
		if st := readyz(le); st != 503 {
			return fmt.Errorf("readyz %d during the partition", st)
		}
		return nil
	})
	testkit.Eventually(t, 10*time.Second, func() error {
		if recs, err := registry.New(le.pub, le.ks, 3*time.Second).User(context.Background(), "alice", 100); err != nil || len(recs) != 0 {
			return fmt.Errorf("registry still lists %d connections (%v)", len(recs), err)
		}
		return nil
	})
	t.Logf("records expired %s after the cut", time.Since(cut).Round(100*time.Millisecond))
	proxy.silent.Store(false)
	healed := time.Now()
	testkit.Eventually(t, 20*time.Second, func() error {
		if st := readyz(le); st != 200 {
			return fmt.Errorf("readyz %d after the partition", st)
		}
		return nil
	})
	t.Logf("ready %s after the heal", time.Since(healed).Round(100*time.Millisecond))
	a.waitData(10*time.Second, strs(1, 2, 3)...)
	le.publish("room", 4)
	a.waitData(5*time.Second, strs(1, 2, 3, 4)...)
	testkit.Eventually(t, 10*time.Second, func() error {
		n, err := le.sendToUser("alice", 101)
		if err != nil || n != 1 {
			return fmt.Errorf("send to alice: %d connections, %v", n, err)
		}
		return nil
	})
	t.Logf("targeted send listed again %s after the heal", time.Since(healed).Round(100*time.Millisecond))
	a.waitTargeted(5*time.Second, strs(100, 101)...)
	a.neverCut()
}

// TestGoClientAcrossExpiry: a quiet channel's stream expires
// (HISTORY_TTL), with its last-id key alive or expired too, and the
// egress's inbox is lost. The subscribed client gets the next messages,
// once each; a resume from the last id is recovered when the last-id key
// kept it; targeted messages still arrive.
func TestGoClientAcrossExpiry(t *testing.T) {
	le := startLossEnv(t, nil, map[string]string{})
	a := newGoClient(t, le.wsURL(), "alice", "room", "")
	ctx := t.Context()
	id1 := le.publish("room", 1)
	a.waitData(5*time.Second, strs(1)...)

	// The stream expires; its last id lives on.
	if err := le.pub.Del(ctx, le.ks.Stream("room")).Err(); err != nil {
		t.Fatal(err)
	}
	if r := newGoClient(t, le.wsURL(), "bob", "room", id1).subscribed(); fmt.Sprint(r) != "[true]" {
		t.Fatalf("resume from the last id after the stream expired: %v", r)
	}
	id2 := le.publish("room", 2)
	a.waitData(5*time.Second, strs(1, 2)...)

	// Both expire (a silence of twice HISTORY_TTL).
	if err := le.pub.Del(ctx, le.ks.Stream("room"), keys.Last(le.ks.Stream("room"))).Err(); err != nil {
		t.Fatal(err)
	}
	le.publish("room", 3)
	a.waitData(5*time.Second, strs(1, 2, 3)...)
	c := newGoClient(t, le.wsURL(), "carol", "room", id2)
	c.waitData(5*time.Second, strs(3)...)

	// The stream is there, its last-id key is not (evicted).
	if err := le.pub.Del(ctx, keys.Last(le.ks.Stream("room"))).Err(); err != nil {
		t.Fatal(err)
	}
	le.publish("room", 4)
	a.waitData(5*time.Second, strs(1, 2, 3, 4)...)
	c.waitData(5*time.Second, strs(3, 4)...)

	// The inbox is lost, with and without its last-id key.
	inbox := le.ks.Inbox(le.e.s.instance)
	for i, del := range [][]string{{inbox}, {inbox, keys.Last(inbox)}} {
		if n, err := le.sendToUser("alice", 100+2*i); err != nil || n != 1 {
			t.Fatalf("send: %d connections, %v", n, err)
		}
		if err := le.pub.Del(ctx, del...).Err(); err != nil {
			t.Fatal(err)
		}
		// A new stream's first id in the same millisecond would be
		// the very id of the entry lost (ms-0): no chain can tell them
		// apart.
		time.Sleep(5 * time.Millisecond)
		if n, err := le.sendToUser("alice", 101+2*i); err != nil || n != 1 {
			t.Fatalf("send after losing the inbox: %d connections, %v", n, err)
		}
	}
	a.waitTargeted(5*time.Second, strs(100, 101, 102, 103)...)
	a.neverCut()
}

// TestRegistryBackSoonAfterRedisRestart: Redis restarts empty with the
// default REGISTRY_TTL (30 s, a refresh every 10 s). The egress knows at
// once (its Pub/Sub connection comes back): its connections must be in
// the registry again soon, not only at the next scheduled refresh, or
// sends to their users are accepted as sent to nobody meanwhile.
//
// Both ways the egress may know: the Pub/Sub confirmations that come
// again (refreshDue, set by the hub), and, PROBE_INTERVAL later, its
// probe finding the oldest connection's record gone (recordsLost). With
// probes an hour apart, the confirmations alone must do: the probe's
// path passed this test without them.
func TestRegistryBackSoonAfterRedisRestart(t *testing.T) {
	for _, probe := range []string{"200ms", "1h"} {
		t.Run("PROBE_INTERVAL="+probe, func(t *testing.T) {
			registryBackSoonAfterRestart(t, map[string]string{"REGISTRY_TTL": "30s", "PROBE_INTERVAL": probe})
		})
	}
}

func registryBackSoonAfterRestart(t *testing.T, env map[string]string) {
	le := startLossEnv(t, nil, env)
	a := newGoClient(t, le.wsURL(), "alice", "room", "")
	if n, err := le.sendToUser("alice", 1); err != nil || n != 1 {
		t.Fatalf("send before the restart: %d %v", n, err)
	}
	a.waitTargeted(5*time.Second, strs(1)...)
	le.srv.Restart(t)
	le.waitReadyz(10*time.Second, 200)
	ready := time.Now()
	testkit.Eventually(t, 3*time.Second, func() error {
		n, err := le.sendToUser("alice", 2)
		if err != nil || n != 1 {
			return fmt.Errorf("send to alice %s after Redis came back: %d connections, %v", time.Since(ready).Round(100*time.Millisecond), n, err)
		}
		return nil
	})
	a.waitTargeted(5*time.Second, strs(1, 2)...)
}

// TestReadyzStaysDownWhileReadPathDead: Redis answers commands but no
// notification comes back (the egress may no longer use Pub/Sub channels:
// its ACL lost them). /readyz says 503 for as long as that lasts, not 200
// for most of each interval after every forced resubscribe, and says
// why: not that Redis does not answer (it answers the PING), but that
// the read path is not live.
func TestReadyzStaysDownWhileReadPathDead(t *testing.T) {
	t.Parallel()
	le := startLossEnv(t, nil, map[string]string{"PROBE_INTERVAL": "100ms"})
	le.waitReadyz(5*time.Second, 200)
	// No channel may be used any more: Redis drops the egress's
	// subscriptions, and refuses its SSUBSCRIBEs and probes (NOPERM);
	// PING still works.
	if err := le.pub.Do(context.Background(), "ACL", "SETUSER", "default", "resetchannels").Err(); err != nil {
		t.Fatal(err)
	}
	le.waitReadyz(5*time.Second, 503)
	// Several forced resubscribes (one per 4 × PROBE_INTERVAL).
	for end := time.Now().Add(2 * time.Second); time.Now().Before(end); time.Sleep(25 * time.Millisecond) {
		a, err := getReadyz(le.e.srv.URL)
		if err != nil {
			t.Fatal(err)
		}
		if a.status != 503 || a.code != "unavailable" || a.retryAfter != "1" || a.message != "the Redis subscription (the read path) is not live" {
			t.Fatalf("/readyz %+v while the read path is still dead, want 503 unavailable, Retry-After 1, the read path not live", a)
		}
	}
	if err := le.pub.Do(context.Background(), "ACL", "SETUSER", "default", "allchannels").Err(); err != nil {
		t.Fatal(err)
	}
	le.waitReadyz(10*time.Second, 200)
}

// TestReadPathSilenceLogsOnce: while the read path stays silent (Redis
// answers, but no probe comes back: here its ACL took the egress's
// channels), the instance resubscribes every 4 × PROBE_INTERVAL, and
// says so once, not at every resubscribe; once a probe comes back, one
// line ends it, with how long it was silent and how many resubscribes
// it took.
func TestReadPathSilenceLogsOnce(t *testing.T) {
	t.Parallel()
	le := startLossEnv(t, nil, map[string]string{"PROBE_INTERVAL": "100ms"})
	le.waitReadyz(5*time.Second, 200)
	if err := le.pub.Do(context.Background(), "ACL", "SETUSER", "default", "resetchannels").Err(); err != nil {
		t.Fatal(err)
	}
	hub := le.e.s.hub
	testkit.Eventually(t, 10*time.Second, func() error {
		if len(le.log.Lines(t, "redis read path silent, resubscribing")) == 0 {
			return errors.New("the silence is not found yet")
		}
		return nil
	})
	const resubscribes = 3
	before := hub.reconnects.Load()
	testkit.Eventually(t, 10*time.Second, func() error {
		if n := hub.reconnects.Load() - before; n < resubscribes {
			return fmt.Errorf("%d more resubscribes, want %d", n, resubscribes)
		}
		return nil
	})
	if err := le.pub.Do(context.Background(), "ACL", "SETUSER", "default", "allchannels").Err(); err != nil {
		t.Fatal(err)
	}
	var back []map[string]any
	testkit.Eventually(t, 10*time.Second, func() error {
		if back = le.log.Lines(t, "redis read path back"); len(back) == 0 {
			return errors.New("no probe back yet")
		}
		return nil
	})
	l := le.log.Lines(t, "redis read path silent, resubscribing")
	if len(l) != 1 {
		t.Fatalf("one silence logged %d times, want once", len(l))
	}
	// It says why: here the probe itself is refused (SPUBLISH to a
	// channel the ACL no longer grants), which at INFO is told nowhere
	// else.
	if why, _ := l[0]["err"].(string); !strings.Contains(why, "NOPERM") {
		t.Fatalf("the silence logged with err %q, want the probe's NOPERM", why)
	}
	if n, _ := back[0]["resubscribes"].(float64); len(back) != 1 || back[0]["silent_for"] == nil || n < resubscribes+1 {
		t.Fatalf("back lines %v, want one with silent_for and resubscribes at least %d", back, resubscribes+1)
	}
}
