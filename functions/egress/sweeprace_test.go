//go:build !wsrelay_lean

package main

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// TestSweepRacesResubscribe: the sweep drops channels the instant they
// are idle (sweepIdle with a clock a linger ahead, as
// TestIdleChannelLingers drives it) while clients subscribe to and leave
// the same few channels as fast as they can. A subscribe's own Redis
// subscribe (acquire's goroutine) then often comes after the channel
// was confirmed by the sweep's, left and dropped; it must not subscribe
// the channel again behind the hub's back. Every channel a client holds
// must be subscribed in Redis and deliver, and once the clients have
// left and the channels are swept, the instance holds none of them, in
// the hub, in its subscriber or in Redis. (With the real 10 s linger the
// same order needs that goroutine to run 10 s late.)
func TestSweepRacesResubscribe(t *testing.T) {
	srv := redistest.Start(t)
	rdb := redis.NewClient(&redis.Options{Addr: srv.Addr()})
	t.Cleanup(func() { rdb.Close() })
	const prefix = "race"
	ks := keys.Scheme{Prefix: prefix}
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true", "MAX_FRAMES_PER_SECOND": "0"})
	<-e.s.hub.inbox.ready
	h := e.s.hub
	chans := []string{"r0", "r1", "r2", "r3", "r4"}
	stop := make(chan struct{})
	var sweeper sync.WaitGroup
	sweeper.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			h.sweepIdle(t.Context(), time.Now().Add(linger))
		}
	})
	defer func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		sweeper.Wait()
	}()
	var clients []*websocket.Conn
	var wg sync.WaitGroup
	for i := range 4 {
		ws, _, err := e.dial(t, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		next(t, ws, "welcome")
		clients = append(clients, ws)
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(i), 3))
			deadline := time.Now().Add(5 * time.Second)
			for n := 0; time.Now().Before(deadline); n++ {
				var frame strings.Builder
				for range 1 + r.IntN(4) {
					ch := chans[r.IntN(len(chans))]
					fmt.Fprintf(&frame, `{"type":"subscribe","channel":%q}{"type":"unsubscribe","channel":%q}`, ch, ch)
				}
				fmt.Fprintf(&frame, `{"type":"ping","ref":%d}`, n)
				if err := ws.WriteMessage(websocket.TextMessage, []byte(frame.String())); err != nil {
					t.Error(err)
					return
				}
				if !awaitRef(t, ws, fmt.Sprintf(`"ref":%d`, n), h) {
					return
				}
				time.Sleep(time.Duration(r.IntN(2000)) * time.Microsecond)
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	// Each client now holds every channel, and the sweep goes on: each
	// is subscribed in Redis, and delivers.
	for _, ws := range clients {
		for _, ch := range chans {
			send(t, ws, map[string]any{"type": "subscribe", "channel": ch, "ref": ch})
			if !awaitRef(t, ws, `"ref":"`+ch+`"`, h) {
				t.FailNow()
			}
		}
	}
	subs, err := shardSubs(t.Context(), []*redis.Client{rdb}, prefix)
	if err != nil {
		t.Fatal(err)
	}
	for _, ch := range chans {
		if subs[ks.Notify(ch)] != 1 {
			t.Errorf("channel %s held by every client: %d Redis subscriptions, want 1", ch, subs[ks.Notify(ch)])
		}
		appendTo(t, rdb, ks, ch, ks.Notify(ch), 1)
	}
	for i, ws := range clients {
		seen := map[string]bool{}
		_ = ws.SetReadDeadline(time.Now().Add(5 * time.Second))
		for len(seen) < len(chans) {
			_, b, err := ws.ReadMessage()
			if err != nil {
				t.Fatalf("client %d got messages of %d channels of %d: %v", i, len(seen), len(chans), err)
			}
			var f struct{ Type, Channel string }
			if json.Unmarshal(b, &f) == nil && f.Type == "message" {
				seen[f.Channel] = true
			}
		}
	}
	// The clients leave; the sweeper drops the channels.
	for _, ws := range clients {
		ws.Close()
	}
	testkit.Eventually(t, 5*time.Second, func() error { return openSockets(e.s, 0) })
	close(stop)
	sweeper.Wait()
	h.sweepIdle(t.Context(), time.Now().Add(linger))
	testkit.Eventually(t, 5*time.Second, func() error {
		var errs []string
		h.mu.Lock()
		for k := range h.chans {
			if k != h.inbox.notify {
				errs = append(errs, "hub holds "+k)
			}
		}
		h.mu.Unlock()
		sub := h.liveSub()
		sub.mu.Lock()
		for k := range sub.want {
			if k != h.inbox.notify {
				errs = append(errs, "subscriber wants "+k)
			}
		}
		sub.mu.Unlock()
		subs, err := shardSubs(t.Context(), []*redis.Client{rdb}, prefix)
		if err != nil {
			return err
		}
		for k := range subs {
			if k != h.inbox.notify {
				errs = append(errs, "redis holds a subscription to "+k)
			}
		}
		if len(errs) > 0 {
			return fmt.Errorf("once every client left and the channels were swept:\n%s", strings.Join(errs, "\n"))
		}
		return nil
	})
}

// awaitRef reads ws up to a frame holding ref; on a stall it dumps what
// the hub and the subscriber hold.
func awaitRef(t *testing.T, ws *websocket.Conn, ref string, h *hub) bool {
	_ = ws.SetReadDeadline(time.Now().Add(3 * time.Second))
	for {
		_, b, err := ws.ReadMessage()
		if err != nil {
			var sb strings.Builder
			h.mu.Lock()
			for k, cs := range h.chans {
				select {
				case <-cs.ready:
					fmt.Fprintf(&sb, "hub %s refs %d ready confirmed %v stalled %v\n", k, cs.refs, cs.confirmed, cs.stalled)
				default:
					fmt.Fprintf(&sb, "hub %s refs %d NOT READY\n", k, cs.refs)
				}
			}
			h.mu.Unlock()
			sub := h.liveSub()
			sub.mu.Lock()
			for ch, n := range sub.want {
				if n == nil {
					fmt.Fprintf(&sb, "sub %s unplaced\n", ch)
					continue
				}
				n.mu.Lock()
				m, ok := n.sentAt[ch]
				n.mu.Unlock()
				_, in := n.chans[ch]
				fmt.Fprintf(&sb, "sub %s in node %v sent %v %v failing %v\n", ch, in, ok, m.at, n.failing.Load())
			}
			sub.mu.Unlock()
			buf := make([]byte, 1<<20)
			nb := runtime.Stack(buf, true)
			var stacks []string
			for _, g := range strings.Split(string(buf[:nb]), "\n\n") {
				if strings.Contains(g, "egress.") && !strings.Contains(g, "testing.tRunner") {
					stacks = append(stacks, g)
				}
			}
			t.Errorf("waiting for %s: %v\n%s\n%s", ref, err, sb.String(), strings.Join(stacks, "\n\n"))
			return false
		}
		if strings.Contains(string(b), ref) {
			return true
		}
		if strings.Contains(string(b), `"error"`) {
			t.Logf("error frame: %s", b)
		}
	}
}
