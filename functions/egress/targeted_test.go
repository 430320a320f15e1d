package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
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

// TestRecordChannelsNeverNull: a connection's registry record (what
// GET /v1/connections/{id} and the presence list return) lists its
// channels as an array, [] when it has none, as docs/api.md shows: not
// null, which a client iterating it would trip on.
func TestRecordChannelsNeverNull(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"})
	ws, _, err := e.dial(t, url.Values{"user": {"alice"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	id := next(t, ws, "welcome").ConnectionID
	check := func(when string) {
		t.Helper()
		b, err := rdb.Get(t.Context(), ks.Conn(id)).Bytes()
		if err != nil {
			t.Fatal(err)
		}
		var rec struct{ Channels json.RawMessage }
		if err := json.Unmarshal(b, &rec); err != nil || string(rec.Channels) != "[]" {
			t.Errorf("%s: record %s: channels %s, want []", when, b, rec.Channels)
		}
	}
	check("connected")
	send(t, ws, map[string]string{"type": "subscribe", "channel": "room"})
	next(t, ws, "subscribed")
	send(t, ws, map[string]string{"type": "unsubscribe", "channel": "room"})
	next(t, ws, "unsubscribed")
	check("after an unsubscribe")
	e.s.refreshRegistry(t.Context())
	check("after a refresh")
}

// sendToUser does what the ingress does for POST /v1/users/{user}/messages:
// one append to the inbox of each instance holding a live connection of
// the user. It returns the number of connections found.
func sendToUser(t *testing.T, rdb redis.UniversalClient, ks keys.Scheme, user, data string) int {
	reg := registry.New(rdb, ks, 30*time.Second)
	recs, err := reg.User(context.Background(), user, 10000)
	if err != nil {
		t.Error(err)
		return 0
	}
	seen := map[string]bool{}
	var as []stream.Append
	for _, r := range recs {
		if !seen[r.Instance] {
			seen[r.Instance] = true
			as = append(as, stream.Append{Stream: ks.Inbox(r.Instance), Notify: ks.InboxNotify(r.Instance),
				Msg:    stream.Message{Route: stream.ToUser(user), TS: time.Now().UnixMilli(), Data: []byte(data)},
				Limits: stream.Limits{MaxLen: 10000, MaxAgeMS: 60000, TTLMS: 60000}})
		}
	}
	if len(as) > 0 {
		if _, err := stream.NewStore(rdb).Append(context.Background(), as); err != nil {
			t.Error(err)
		}
	}
	return len(recs)
}

// TestUserSendsWhileConnectionsChurn: a user has steady connections on
// two instances while others of the same user connect and leave all the
// time. Every steady connection gets every message to the user exactly
// once and in order; a connection that comes and goes never gets one
// twice or out of order.
func TestUserSendsWhileConnectionsChurn(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	es := []*secEgress{
		startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"}),
		startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"}),
	}
	q := url.Values{"user": {"alice"}}
	var steady []*websocket.Conn
	for i := range 4 {
		ws, _, err := es[i%2].dial(t, q, nil)
		if err != nil {
			t.Fatal(err)
		}
		next(t, ws, "welcome")
		steady = append(steady, ws)
	}
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ctx.Err() == nil; i++ {
				ws, _, err := websocket.DefaultDialer.Dial(es[(g+i)%2].url(q), nil)
				if err != nil {
					t.Error(err)
					return
				}
				// Every fifth reads nothing: it connects and leaves.
				got, _ := readMessages(ws, time.Duration(i%5)*10*time.Millisecond, nil)
				ws.Close()
				// One instance's inbox: ids only go up, so a repeat at any
				// distance, or a message out of order, shows as one not
				// above the one before.
				for j := 1; j < len(got); j++ {
					prev, ok1 := stream.ParseID(got[j-1])
					cur, ok2 := stream.ParseID(got[j])
					if !ok1 || !ok2 || !prev.Less(cur) {
						t.Errorf("a churning connection got %s after %s: twice or out of order", got[j], got[j-1])
					}
				}
			}
		}()
	}
	const n = 200
	for i := range n {
		if c := sendToUser(t, rdb, ks, "alice", strconv.Itoa(i)); c < 4 {
			t.Errorf("send %d found %d connections, want at least the 4 steady ones", i, c)
		}
	}
	for k, ws := range steady {
		for i := range n {
			if got := nextData(t, ws); got != strconv.Itoa(i) {
				t.Fatalf("steady connection %d: message %d is %s", k, i, got)
			}
		}
	}
	cancel()
	wg.Wait()
}

// TestUserSendsAcrossResubscribes: messages to a user keep arriving once
// and in order while the instance's Pub/Sub connection is replaced again
// and again (the inbox is caught up from its stream each time).
func TestUserSendsAcrossResubscribes(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"})
	ws, _, err := e.dial(t, url.Values{"user": {"alice"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	next(t, ws, "welcome")
	const n = 300
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := range n {
			sendToUser(t, rdb, ks, "alice", strconv.Itoa(i))
			if i%20 == 0 {
				e.s.hub.resubscribe(t.Context())
			}
		}
	}()
	for i := range n {
		if got := nextData(t, ws); got != strconv.Itoa(i) {
			t.Fatalf("message %d is %s", i, got)
		}
	}
	<-done
}

// TestDisconnectDuringRegistration: an operator's disconnect that reaches
// the instance while the connection's registry write is in flight (its
// record already visible) still lets the welcome go first, then 4003.
func TestDisconnectDuringRegistration(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
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
	type dialed struct {
		ws  *websocket.Conn
		err error
	}
	bobc := make(chan dialed, 1)
	go func() {
		ws, _, err := websocket.DefaultDialer.Dial(e.url(url.Values{"user": {"bob"}}), nil)
		bobc <- dialed{ws, err}
	}()
	select {
	case <-hold.Hit():
	case <-time.After(5 * time.Second):
		t.Fatal("bob's connection was not registered")
	}
	var id string
	for _, c := range e.s.hub.snapshotConns() {
		id = c.id
	}
	_, err := stream.NewStore(rdb).Append(t.Context(), []stream.Append{{Stream: ks.Inbox(e.s.instance), Notify: ks.InboxNotify(e.s.instance),
		Msg: stream.Message{Route: stream.Disconnect(id), TS: time.Now().UnixMilli(), Data: []byte("null")}}})
	if err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, 5*time.Second, func() error {
		for _, c := range e.s.hub.snapshotConns() {
			if !c.isClosing() {
				return errors.New("not closing yet")
			}
		}
		return nil
	})
	hold.Release()
	d := <-bobc
	if d.err != nil {
		t.Fatal(d.err)
	}
	defer d.ws.Close()
	var first protocol.Reply
	_ = d.ws.SetReadDeadline(time.Now().Add(5 * time.Second))
	if err := d.ws.ReadJSON(&first); err != nil || first.Type != "welcome" {
		t.Fatalf("first frame: %q, %v; want welcome", first.Type, err)
	}
	if code := closeCode(t, d.ws, 5*time.Second); code != 4003 {
		t.Fatalf("close %d, want 4003", code)
	}
}

// TestUserSendCaughtUpReachesNewerConnection: a send to a user that this
// instance delivers late (its notification lost, so the inbox is caught
// up from its stream at the next one) reaches the user's connections
// open here when it is delivered, one opened after the send included.
// docs/api.md says so: the egress delivers to the user's connections it
// holds, and cannot tell when the send was made (the entry's id is
// Redis's clock, the connection's opening the egress's). Before, the
// docs said a connection opened after the send never got it.
func TestUserSendCaughtUpReachesNewerConnection(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"})
	older, _, err := e.dial(t, url.Values{"user": {"ann"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	w := next(t, older, "welcome")
	toUser := func(notify, data string) string {
		t.Helper()
		ids, err := stream.NewStore(rdb).Append(context.Background(), []stream.Append{{Stream: ks.Inbox(w.Instance), Notify: notify,
			Msg:    stream.Message{Route: stream.ToUser("ann"), TS: time.Now().UnixMilli(), Data: json.RawMessage(`"` + data + `"`)},
			Limits: stream.Limits{MaxLen: 10000, MaxAgeMS: 60000, TTLMS: 60000}}})
		if err != nil {
			t.Fatal(err)
		}
		return ids[0]
	}
	// Sent while ann had one connection here; its notification is lost
	// (as in a Pub/Sub outage).
	late := toUser(ks.InboxNotify("elsewhere"), "late")
	newer, _, err := e.dial(t, url.Values{"user": {"ann"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	next(t, newer, "welcome")
	after := toUser(ks.InboxNotify(w.Instance), "after")
	for name, ws := range map[string]*websocket.Conn{"older": older, "newer": newer} {
		got, code := readMessages(ws, 5*time.Second, func(id string) bool { return id == after })
		if len(got) != 2 || got[0] != late || got[1] != after {
			t.Errorf("%s connection: got %v (close %d), want [%s %s]", name, got, code, late, after)
		}
	}
}

// TestClosingConnectionUnlisted: a connection the server begins to close
// (here an operator's disconnect, 4003, to a client that has stopped
// reading, so that its close frame cannot even be written) leaves the
// registry at once, its record and memberships, while the egress still
// holds it for up to WRITE_TIMEOUT and a second: a send the ingress
// routes meanwhile is answered 404 (or counts one connection fewer for
// its user) instead of 202 and dropped, and presence lists no longer
// show it. A registry refresh does not write it back.
func TestClosingConnectionUnlisted(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	var logs testkit.SyncBuffer
	e := startEgressLogging(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true", "WRITE_TIMEOUT": "30s"}, &logs)
	<-e.s.hub.inbox.ready
	ws, c := smallBuffers(t, e, url.Values{"user": {"gone"}, "channels": {"room"}})
	id := c.id
	next(t, ws, "subscribed")
	listed := func() []string {
		t.Helper()
		var where []string
		if _, err := e.s.reg.Get(t.Context(), id); !errors.Is(err, registry.ErrNotFound) {
			where = append(where, fmt.Sprintf("record (%v)", err))
		}
		for key, set := range map[string]string{"room": ks.ChannelConns("room"), "gone": ks.UserConns("gone")} {
			if err := rdb.ZScore(t.Context(), set, id).Err(); !errors.Is(err, redis.Nil) {
				where = append(where, fmt.Sprintf("%s's set (%v)", key, err))
			}
		}
		return where
	}
	if l := listed(); len(l) != 3 {
		t.Fatalf("before the close, listed in %v, want the record and both sets", l)
	}
	// A younger connection, live: the records-lost probe must look at it.
	_, lc := e.dialConn(t, nil)
	// The client reads nothing more: the writer blocks on a full socket,
	// and the close frame waits behind what it is writing.
	toInbox(t, rdb, ks, e, []byte(`"`+strings.Repeat("x", 16<<10)+`"`), slices.Repeat([]stream.Route{stream.ToConnection(id)}, 40)...)
	testkit.Eventually(t, 10*time.Second, func() error {
		if w := c.writeSince.Load(); w == 0 || time.Since(time.Unix(0, w)) < 200*time.Millisecond {
			return fmt.Errorf("the writer is not stuck yet")
		}
		return nil
	})
	toInbox(t, rdb, ks, e, nil, stream.Disconnect(id))
	waitClosing(t, e, id)
	testkit.Eventually(t, 5*time.Second, func() error {
		if l := listed(); len(l) > 0 {
			return fmt.Errorf("closing connection still listed in %v", l)
		}
		return nil
	})
	e.s.refreshRegistry(t.Context())
	if l := listed(); len(l) > 0 {
		t.Fatalf("after a refresh, the closing connection is listed again in %v", l)
	}
	// Nor is its record, gone on purpose, taken for one Redis lost: the
	// probe passes over it to the oldest connection not closing (once
	// that is older than REDIS_TIMEOUT and a second), and finds its
	// record.
	time.Sleep(time.Until(lc.openedAt.Add(e.s.cfg.Redis.Timeout + time.Second)))
	if lost, known := e.s.recordsLost(t.Context()); lost || !known {
		t.Fatalf("records lost %v (known %v), want the live connection's record found", lost, known)
	}
	held := false
	for _, c := range e.s.hub.snapshotConns() {
		held = held || c.id == id
	}
	if !held {
		t.Fatal("the connection is no longer held: the test needs it closing, not closed", logs.String())
	}
}

// toInbox appends a message with data to e's inbox for each route, in
// one pipeline, in order.
func toInbox(t *testing.T, rdb redis.UniversalClient, ks keys.Scheme, e *secEgress, data []byte, routes ...stream.Route) {
	t.Helper()
	var as []stream.Append
	for _, r := range routes {
		as = append(as, stream.Append{Stream: ks.Inbox(e.s.instance), Notify: ks.InboxNotify(e.s.instance),
			Msg: stream.Message{Route: r, TS: time.Now().UnixMilli(), Data: data}, Limits: stream.Limits{MaxLen: 1000, TTLMS: 60000}})
	}
	if _, err := stream.NewStore(rdb).Append(t.Context(), as); err != nil {
		t.Fatal(err)
	}
}

// waitClosing waits until e holds connection id closing: the server has
// begun its close, and its client has not answered it.
func waitClosing(t *testing.T, e *secEgress, id string) {
	t.Helper()
	testkit.Eventually(t, 5*time.Second, func() error {
		for _, c := range e.s.hub.snapshotConns() {
			if c.id == id && c.isClosing() {
				return nil
			}
		}
		return fmt.Errorf("%s not closing", id)
	})
}

// TestCloseDuringRegistrationUnlisted: a server close that begins while
// the connection's record is being written (a drain, or a burst to the
// user overflowing the queue, before the welcome is out) removes the
// record once that write is done, not only once the client has answered
// the close.
func TestCloseDuringRegistrationUnlisted(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	var armed atomic.Bool
	hold := redistest.NewHoldBefore(func(cmds []redis.Cmder) bool {
		return armed.Load() && isRecordWrite(cmds, prefix)
	})
	t.Cleanup(hold.Release)
	rdb.AddHook(hold)
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"})
	<-e.s.hub.inbox.ready
	armed.Store(true)
	dialed := make(chan *websocket.Conn, 1)
	go func() {
		ws, _, err := websocket.DefaultDialer.Dial(e.url(nil), nil)
		if err != nil {
			t.Error(err)
		}
		dialed <- ws // reads nothing: the close is not answered
	}()
	select {
	case <-hold.Hit():
	case <-time.After(5 * time.Second):
		t.Fatal("the connect's registry write was not seen")
	}
	cs := e.s.hub.snapshotConns()
	if len(cs) != 1 {
		t.Fatalf("%d connections, want the one registering", len(cs))
	}
	c := cs[0]
	c.closeWith(protocol.CloseLifetime, "test: closed while registering", true)
	hold.Release()
	if ws := <-dialed; ws != nil {
		defer ws.Close()
	}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(2 * time.Millisecond) {
		if _, err := e.s.reg.Get(t.Context(), c.id); errors.Is(err, registry.ErrNotFound) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("record still there 5 s after the close")
		}
	}
	held := false
	for _, h := range e.s.hub.snapshotConns() {
		held = held || h == c
	}
	if !held {
		t.Fatal("the record went only as the connection ended, not as its close began")
	}
}

// smallBuffers dials e with q over small socket buffers on both sides (the
// client's receive buffer and the server's send buffer, 16 KiB each and
// fixed: the kernel may not grow them), so that a client that stops
// reading soon stalls the connection's writer. It returns the socket,
// past its welcome, and the server's connection.
func smallBuffers(t *testing.T, e *secEgress, q url.Values) (*websocket.Conn, *conn) {
	t.Helper()
	ws, _, err := smallBufDialer.Dial(e.url(q), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ws.Close() })
	c := e.conn(next(t, ws, "welcome").ConnectionID)
	_ = c.nc.(*net.TCPConn).SetWriteBuffer(16 << 10)
	return ws, c
}

// isRecordWrite reports whether cmds write a connection's registry
// record under prefix.
func isRecordWrite(cmds []redis.Cmder, prefix string) bool {
	for _, c := range cmds {
		if a := c.Args(); strings.EqualFold(c.Name(), "set") && len(a) > 1 && strings.HasPrefix(a[1].(string), prefix+":{r:") {
			return true
		}
	}
	return false
}
