package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/protocol"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/stream"
)

// Tests of the live fan-out outside resume (docs/protocol.md, Ordering
// and delivery; docs/design.md, The log and the live path): what every
// live subscriber gets while its instance's Pub/Sub connection is cut,
// while many connections come and go on one channel, and while one
// connection reads many channels.

// liveReader reads one socket's frames in a goroutine of its own and
// keeps, per channel, the subscription windows it saw: each from a
// subscribed reply (its position) to the unsubscribed one, with the
// message ids in between.
type liveReader struct {
	mu      sync.Mutex
	windows map[string][]*window
	code    int      // the close code, once closed (-1: no close frame)
	refused []string // the error replies' codes
	done    chan struct{}
}

type window struct {
	position string
	ids      []string
	closed   bool // an unsubscribed reply ended it
	after    []string
}

// readLive starts reading ws; subscribed holds, by channel, the
// positions of subscribed replies read already.
func readLive(ws *websocket.Conn, subscribed map[string]string) *liveReader {
	r := &liveReader{windows: map[string][]*window{}, done: make(chan struct{})}
	for ch, pos := range subscribed {
		r.windows[ch] = []*window{{position: pos}}
	}
	go func() {
		defer close(r.done)
		for {
			_, b, err := ws.ReadMessage()
			if err != nil {
				r.mu.Lock()
				r.code = -1
				var ce *websocket.CloseError
				if errors.As(err, &ce) {
					r.code = ce.Code
				}
				r.mu.Unlock()
				return
			}
			var f struct{ Type, Channel, ID, Position, Code string }
			if json.Unmarshal(b, &f) != nil {
				continue
			}
			r.mu.Lock()
			ws := r.windows[f.Channel]
			var cur *window
			if len(ws) > 0 {
				cur = ws[len(ws)-1]
			}
			switch f.Type {
			case "error":
				r.refused = append(r.refused, f.Code)
			case "subscribed":
				r.windows[f.Channel] = append(ws, &window{position: f.Position})
			case "unsubscribed":
				if cur != nil {
					cur.closed = true
				}
			case "message":
				switch {
				case cur == nil:
					r.windows[f.Channel] = append(ws, &window{position: "none", after: []string{f.ID}})
				case cur.closed:
					cur.after = append(cur.after, f.ID)
				default:
					cur.ids = append(cur.ids, f.ID)
				}
			}
			r.mu.Unlock()
		}
	}()
	return r
}

// count is how many messages of ch the current window holds.
func (r *liveReader) count(ch string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	ws := r.windows[ch]
	if len(ws) == 0 {
		return 0
	}
	return len(ws[len(ws)-1].ids)
}

// checkWindow checks that w holds the messages of published after its
// position, in order, once each, and the first `min` of them at least.
func checkWindow(t *testing.T, who string, w *window, published []string, atLeast int) {
	t.Helper()
	if len(w.after) > 0 {
		t.Errorf("%s: messages %v after the unsubscribed reply", who, w.after)
	}
	from := 0
	if w.position != stream.Zero.String() {
		if from = slices.Index(published, w.position) + 1; from == 0 {
			t.Errorf("%s: position %s was never published", who, w.position)
			return
		}
	}
	want := published[from:min(len(published), from+len(w.ids))]
	if !slices.Equal(w.ids, want) || len(w.ids) < atLeast {
		t.Errorf("%s: after %s got %d messages %v, want %d or more: %v", who, w.position, len(w.ids), w.ids, atLeast, want)
	}
}

// TestPubSubKilledWhileMessagesFlow: Redis drops the egress's Pub/Sub
// connection (CLIENT KILL TYPE pubsub) again and again while several
// channels are published to. Every live subscriber still gets every
// message after its position, in order, once: the notifications lost
// while the connection was down are read from the streams when Redis
// confirms the subscriptions again.
func TestPubSubKilledWhileMessagesFlow(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	srv := redistest.Start(t) // its own: the kills cut every Pub/Sub client
	rdb := redis.NewClient(srv.Options())
	defer rdb.Close()
	prefix := redistest.Prefix(t)
	ks := keys.Scheme{Prefix: prefix}
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true", "MAX_FRAMES_PER_SECOND": "0"})
	defer e.stop()

	chans := []string{"k-a", "k-b", "k-c"}
	type sub struct {
		ch string
		r  *liveReader
		ws *websocket.Conn
	}
	var subs []sub
	for i := range 6 {
		ch := chans[i%len(chans)]
		ws, r := subscribedTo(t, e, ch)
		subs = append(subs, sub{ch, readLive(ws, map[string]string{ch: r.Position}), ws})
	}
	pubs := map[string]*publisher{}
	for _, ch := range chans {
		pubs[ch] = startPublisher(t, rdb, ks, ch, time.Millisecond)
	}
	admin := redis.NewClient(srv.Options())
	defer admin.Close()
	for range 8 {
		time.Sleep(150 * time.Millisecond)
		if err := admin.ClientKillByFilter(context.Background(), "TYPE", "pubsub").Err(); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(100 * time.Millisecond)
	published := map[string][]string{}
	for ch, p := range pubs {
		published[ch] = p.Stop()
	}
	for _, s := range subs {
		deadline := time.Now().Add(10 * time.Second)
		for s.r.count(s.ch) < len(published[s.ch]) && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
	}
	for i, s := range subs {
		s.ws.Close()
		<-s.r.done
		ws := s.r.windows[s.ch]
		if len(ws) != 1 {
			t.Fatalf("subscriber %d: %d subscriptions to %s, want 1", i, len(ws), s.ch)
		}
		if s.r.code != -1 {
			t.Errorf("subscriber %d: closed %d", i, s.r.code)
		}
		checkWindow(t, fmt.Sprintf("subscriber %d", i), ws[0], published[s.ch], len(published[s.ch])-slices.Index(published[s.ch], ws[0].position)-1)
	}
	if n := e.s.hub.reconnects.Load(); n == 0 {
		t.Fatal("the Pub/Sub connection was never replaced")
	}
	e.stop()
}

// wait waits until cond holds of r's windows of ch, or fails.
func (r *liveReader) wait(t *testing.T, ch string, what string, cond func(ws []*window) bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		r.mu.Lock()
		ok, code := cond(r.windows[ch]), r.code
		r.mu.Unlock()
		if ok {
			return
		}
		if code != 0 {
			t.Errorf("waiting for %s: closed %d", what, code)
			runtime.Goexit()
		}
		if time.Now().After(deadline) {
			t.Errorf("waiting for %s: timed out", what)
			runtime.Goexit()
		}
		time.Sleep(time.Millisecond)
	}
}

// TestSubscribeChurnOnOneChannel: many connections subscribe to and
// unsubscribe from one busy channel, over and over, while the linger
// sweep runs against them (each time as if the channel had been idle for
// longer than the linger). Each subscription gets the channel's messages
// after its position, in order, once, and none after its unsubscribed
// reply; once all have left, the sweep releases the channel here and in
// Redis, and a subscriber coming back gets it again.
func TestSubscribeChurnOnOneChannel(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	srv := redistest.Start(t) // its own, to count SSUBSCRIBEs and SUNSUBSCRIBEs
	rdb := redis.NewClient(srv.Options())
	defer rdb.Close()
	prefix := redistest.Prefix(t)
	ks := keys.Scheme{Prefix: prefix}
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true", "MAX_FRAMES_PER_SECOND": "0"})
	defer e.stop()
	const ch = "hot"
	pub := startPublisher(t, rdb, ks, ch, 200*time.Microsecond)

	stopSweep := make(chan struct{})
	var sweeps sync.WaitGroup
	sweeps.Go(func() {
		for {
			select {
			case <-stopSweep:
				return
			case <-time.After(300 * time.Microsecond):
			}
			e.s.hub.sweepIdle(context.Background(), time.Now().Add(2*linger))
		}
	})
	before := commandCalls(t, rdb)

	const conns, rounds = 6, 25
	readers := make([]*liveReader, conns)
	var wg sync.WaitGroup
	for i := range conns {
		ws, _, err := e.dial(t, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		next(t, ws, "welcome")
		r := readLive(ws, nil)
		readers[i] = r
		wg.Go(func() {
			for round := range rounds {
				if err := ws.WriteJSON(map[string]any{"type": "subscribe", "channel": ch}); err != nil {
					t.Error(err)
					return
				}
				r.wait(t, ch, fmt.Sprintf("conn %d round %d: subscribed", i, round), func(ws []*window) bool { return len(ws) == round+1 })
				want := 1 + (i+round)%4
				r.wait(t, ch, fmt.Sprintf("conn %d round %d: %d messages", i, round, want), func(ws []*window) bool { return len(ws[round].ids) >= want })
				if err := ws.WriteJSON(map[string]any{"type": "unsubscribe", "channel": ch}); err != nil {
					t.Error(err)
					return
				}
				r.wait(t, ch, fmt.Sprintf("conn %d round %d: unsubscribed", i, round), func(ws []*window) bool { return ws[round].closed })
				time.Sleep(time.Duration(i*round%5) * 100 * time.Microsecond)
			}
		})
	}
	wg.Wait()
	// A message published now reaches nobody: a connection that got it
	// got it after its unsubscribed reply.
	time.Sleep(50 * time.Millisecond)
	published := pub.Stop()
	time.Sleep(50 * time.Millisecond)
	close(stopSweep)
	sweeps.Wait()
	if t.Failed() {
		return
	}
	for i, r := range readers {
		r.mu.Lock()
		for round, w := range r.windows[ch] {
			checkWindow(t, fmt.Sprintf("conn %d round %d", i, round), w, published, 1)
		}
		r.mu.Unlock()
	}

	// Nobody here listens to the channel: the sweep releases it, here and
	// in Redis.
	e.s.hub.sweepIdle(context.Background(), time.Now().Add(2*linger))
	notify := ks.Notify(ch)
	if e.s.hub.state(notify) != nil {
		t.Fatal("the hub still holds the channel nobody listens to")
	}
	if n, err := rdb.PubSubShardNumSub(context.Background(), notify).Result(); err != nil || n[notify] != 0 {
		t.Fatalf("redis still has %v subscribers to the channel (%v)", n, err)
	}
	after := commandCalls(t, rdb)
	t.Logf("%d SSUBSCRIBEs, %d SUNSUBSCRIBEs", after["ssubscribe"]-before["ssubscribe"], after["sunsubscribe"]-before["sunsubscribe"])
	if after["sunsubscribe"] == before["sunsubscribe"] {
		t.Fatal("the sweep never dropped the channel")
	}

	// A subscriber coming back gets the channel afresh.
	ws, r := subscribedTo(t, e, ch)
	id := appendTo(t, rdb, ks, ch, ks.Notify(ch), 1)
	if r.Position != published[len(published)-1] {
		t.Fatalf("subscribed again at %s, want %s", r.Position, published[len(published)-1])
	}
	if got, code := readMessages(ws, 5*time.Second, func(string) bool { return true }); code != 0 || !slices.Equal(got, []string{id}) {
		t.Fatalf("subscribed again: got %v (close %d), want [%s]", got, code, id)
	}
	ws.Close()
	e.stop()
}

// TestManyChannelsOneConnection: one connection subscribes to as many
// channels as MAX_SUBSCRIPTIONS allows, in one frame, while messages are
// published to all of them interleaved; one subscription more is refused
// with too_many_subscriptions. Each channel's messages after its position
// arrive in order, once, and nothing else.
func TestManyChannelsOneConnection(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	const limit = 100
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true", "MAX_FRAMES_PER_SECOND": "0",
		"MAX_SUBSCRIPTIONS": strconv.Itoa(limit)})
	defer e.stop()
	chans := make([]string, limit+1)
	for i := range chans {
		chans[i] = fmt.Sprintf("many-%03d", i)
	}
	// Traffic on every channel before, during and after the subscribes.
	store := stream.NewStore(rdb)
	var mu sync.Mutex
	published := map[string][]string{}
	stop, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		for round := 0; ; round++ {
			select {
			case <-stop:
				return
			default:
			}
			as := make([]stream.Append, 0, len(chans))
			for i := range chans {
				ch := chans[(i*7+round)%len(chans)]
				as = append(as, stream.Append{Stream: ks.Stream(ch), Notify: ks.Notify(ch),
					Msg: stream.Message{Channel: ch, TS: time.Now().UnixMilli(), Data: []byte(strconv.Itoa(round))}})
			}
			ids, err := store.Append(context.Background(), as)
			if err != nil {
				t.Error(err)
				return
			}
			mu.Lock()
			for i, a := range as {
				published[a.Msg.Channel] = append(published[a.Msg.Channel], ids[i])
			}
			mu.Unlock()
			time.Sleep(2 * time.Millisecond)
		}
	}()
	ws, _, err := e.dial(t, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	next(t, ws, "welcome")
	var frame []byte
	for i, ch := range chans {
		b, _ := json.Marshal(map[string]any{"type": "subscribe", "channel": ch, "ref": i})
		frame = append(append(frame, b...), '\n')
	}
	if err := ws.WriteMessage(websocket.TextMessage, frame); err != nil {
		t.Fatal(err)
	}
	// The replies come in order: the one past the limit is refused.
	r := readLive(ws, nil)
	r.wait(t, chans[limit-1], "the last subscribed", func(ws []*window) bool { return len(ws) == 1 })
	time.Sleep(300 * time.Millisecond)
	close(stop)
	<-done
	mu.Lock()
	defer mu.Unlock()
	for _, ch := range chans[:limit] {
		r.wait(t, ch, ch+": every message", func(ws []*window) bool {
			return len(ws) == 1 && slices.Index(published[ch], ws[0].position)+1+len(ws[0].ids) >= len(published[ch])
		})
	}
	ws.Close()
	<-r.done
	for _, ch := range chans[:limit] {
		checkWindow(t, ch, r.windows[ch][0], published[ch], 1)
	}
	if !slices.Equal(r.refused, []string{protocol.CodeTooManySubs}) {
		t.Errorf("refused %v, want one %s", r.refused, protocol.CodeTooManySubs)
	}
	if w := r.windows[chans[limit]]; len(w) != 0 {
		t.Errorf("%s, over the limit: %d subscriptions, %d messages", chans[limit], len(w), len(w[0].ids)+len(w[0].after))
	}
	e.stop()
}
