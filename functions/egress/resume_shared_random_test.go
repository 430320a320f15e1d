package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
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

// TestSharedReadsRandomized: clients resume two channels from a mix of
// the same positions (a reconnect storm's) and others, at random
// moments, while messages go on being published and the replays' turns
// (hub.replayReads) are taken and given back at random, so that reads
// wait, are joined, and are abandoned by clients that go before their
// turn. Each client that stays gets every message after its position
// once, in order, and then the live ones; no waiting read is left behind
// (hub.reads) and no connection holds replayed bytes once it has read
// them all (replaying). The seed is logged.
func TestSharedReadsRandomized(t *testing.T) {
	t.Parallel()
	seed := rand.Uint64()
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, seed>>1))
	pub, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	chans := []string{"sa", "sb"}
	history := map[string][]string{}
	streamOf := map[string]string{}
	for _, ch := range chans {
		history[ch] = appendData(t, pub, ks, ch, []byte("1"), 2*replayBatch+rng.IntN(replayBatch))
		streamOf[ks.Stream(ch)] = ch
	}
	rdb := pooledClient(t, 4, 0) // two places among the replay reads
	var hookMu sync.Mutex
	var reads, timeouts int
	hookRng := rand.New(rand.NewPCG(seed+1, seed))
	// Reads take a while before and after Redis answers them: they
	// overlap and wait for their turn, and messages are published and
	// delivered while a read's answer is on its way.
	pause := func(cmd redis.Cmder, count bool) {
		if a := cmd.Args(); strings.EqualFold(cmd.Name(), "xrange") && len(a) > 1 && streamOf[fmt.Sprint(a[1])] != "" {
			hookMu.Lock()
			d := time.Duration(hookRng.IntN(5000)) * time.Microsecond
			if count {
				reads++
			}
			hookMu.Unlock()
			time.Sleep(d)
		}
	}
	rdb.AddHook(aroundCmd{
		before: func(cmd redis.Cmder) { pause(cmd, true) },
		after:  func(cmd redis.Cmder) { pause(cmd, false) },
	})
	// Some reads find no pooled connection free in time: they are made
	// again, and so are the replays' that joined them.
	rdb.AddHook(poolTimeouts{fail: func(cmd redis.Cmder) bool {
		if a := cmd.Args(); !strings.EqualFold(cmd.Name(), "xrange") || len(a) < 2 || streamOf[fmt.Sprint(a[1])] == "" {
			return false
		}
		hookMu.Lock()
		defer hookMu.Unlock()
		if hookRng.IntN(8) != 0 {
			return false
		}
		timeouts++
		return true
	}})
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true", "PING_INTERVAL": "1m", "PROBE_INTERVAL": "1m"})
	h := e.s.hub

	// The storm's other reads: take the turns and give them back.
	stopHog := make(chan struct{})
	hogDone := make(chan struct{})
	hogRng := rand.New(rand.NewPCG(seed+2, seed))
	go func() {
		defer close(hogDone)
		for {
			held := 0
			for range hogRng.IntN(3) {
				select {
				case h.replayReads <- struct{}{}:
					held++
				case <-time.After(5 * time.Millisecond):
				}
			}
			select {
			case <-stopHog:
			case <-time.After(time.Duration(hogRng.IntN(30)) * time.Millisecond):
			}
			for range held {
				<-h.replayReads
			}
			select {
			case <-stopHog:
				return
			case <-time.After(time.Duration(hogRng.IntN(5)) * time.Millisecond):
			}
		}
	}()
	pubs := map[string]*publisher{}
	for _, ch := range chans {
		pubs[ch] = startPublisher(t, pub, ks, ch, 3*time.Millisecond)
	}

	type client struct {
		ch, after string
		leaves    bool
		ws        *websocket.Conn
		delay     time.Duration
		stay      time.Duration // how long one that leaves waits first
		head      bool          // after is the newest message as it subscribes
	}
	const clients = 40
	var cls []*client
	for range clients {
		ch := chans[rng.IntN(len(chans))]
		ids := history[ch]
		var after string
		head := false
		switch k := rng.IntN(10); {
		case k < 3: // the storm's position, far back
			after = ids[0]
		case k < 5: // another shared one, a batch boundary
			after = ids[replayBatch]
		case k < 7: // near the stream's end: a short first read
			after = ids[len(ids)-1]
		case k < 8: // the newest message when the client subscribes
			head = true
		default:
			after = ids[rng.IntN(len(ids))]
		}
		cls = append(cls, &client{ch: ch, after: after, head: head, leaves: rng.IntN(6) == 0,
			delay: time.Duration(rng.IntN(300)) * time.Millisecond, stay: time.Duration(rng.IntN(20)) * time.Millisecond})
	}
	var wg sync.WaitGroup
	for _, c := range cls {
		wg.Go(func() {
			time.Sleep(c.delay)
			ws, _, err := e.dial(t, nil, nil)
			if err != nil {
				t.Error(err)
				return
			}
			_ = ws.SetReadDeadline(time.Now().Add(5 * time.Second))
			var w struct{ Type string }
			if err := ws.ReadJSON(&w); err != nil || w.Type != "welcome" {
				t.Errorf("first frame %q (%v), want welcome", w.Type, err)
				return
			}
			if c.head {
				p := pubs[c.ch]
				p.mu.Lock()
				if n := len(p.ids); n > 0 {
					c.after = p.ids[n-1]
				} else {
					c.after = history[c.ch][len(history[c.ch])-1]
				}
				p.mu.Unlock()
			}
			if err := ws.WriteJSON(map[string]any{"type": "subscribe", "channel": c.ch, "after": c.after}); err != nil {
				t.Error(err)
				return
			}
			if c.leaves {
				time.Sleep(c.stay)
				_ = ws.UnderlyingConn().Close()
				return
			}
			c.ws = ws
		})
	}
	wg.Wait()
	time.Sleep(100 * time.Millisecond) // publishing goes on while replays run
	close(stopHog)
	<-hogDone
	last := map[string]string{}
	for _, ch := range chans {
		pubs[ch].Stop()
		last[ch] = appendTo(t, pub, ks, ch, ks.Notify(ch), -1)
	}
	for i, c := range cls {
		if c.ws == nil {
			continue
		}
		wg.Go(func() {
			msgs, err := pub.XRange(t.Context(), ks.Stream(c.ch), "("+c.after, last[c.ch]).Result()
			if err != nil {
				t.Error(err)
				return
			}
			want := make([]string, len(msgs))
			for j, m := range msgs {
				want[j] = m.ID
			}
			got, replies, code := readRecording(c.ws, 10*time.Second, last[c.ch])
			if !slices.Equal(replies, []string{"subscribed recovered=true"}) {
				t.Errorf("client %d (%s after %s): replies %v, want subscribed, recovered", i, c.ch, c.after, replies)
			}
			if !slices.Equal(got, want) {
				t.Errorf("client %d (%s after %s): got %d messages (close %d), want %d once each in order\n got %v\nwant %v", i, c.ch, c.after, len(got), code, len(want), got, want)
			}
		})
	}
	wg.Wait()
	hookMu.Lock()
	t.Logf("%d stream reads for %d replays, %d of them without a pooled connection", reads, clients, timeouts)
	hookMu.Unlock()
	testkit.Eventually(t, 5*time.Second, func() error {
		h.readsMu.Lock()
		n := len(h.reads)
		h.readsMu.Unlock()
		if n != 0 {
			return fmt.Errorf("%d reads still waiting for their turn, with every replay done", n)
		}
		for _, c := range h.snapshotConns() {
			c.mu.Lock()
			held := c.replaying
			c.mu.Unlock()
			if held != 0 {
				return fmt.Errorf("connection %s holds %d replayed bytes, all of them written", c.id, held)
			}
		}
		return nil
	})
}

// readRecording reads ws's frames until the message last, then those
// that come within 200 ms more; it returns the messages' ids, the other
// frames (type, and recovered for a subscribed), and the close code (0
// when the socket did not close, -1 when it ended without a close
// frame).
func readRecording(ws *websocket.Conn, within time.Duration, last string) (ids, replies []string, code int) {
	_ = ws.SetReadDeadline(time.Now().Add(within))
	seen := false
	for {
		_, b, err := ws.ReadMessage()
		if err != nil {
			var ce *websocket.CloseError
			if errors.As(err, &ce) {
				return ids, replies, ce.Code
			}
			if seen {
				return ids, replies, 0
			}
			return ids, replies, -1
		}
		var f struct {
			Type, ID  string
			Recovered *bool
		}
		if json.Unmarshal(b, &f) != nil {
			replies = append(replies, "not json: "+string(b))
			continue
		}
		switch {
		case f.Type == "message":
			ids = append(ids, f.ID)
		case f.Recovered != nil:
			replies = append(replies, fmt.Sprintf("%s recovered=%v", f.Type, *f.Recovered))
		default:
			replies = append(replies, f.Type)
		}
		if f.ID == last && !seen {
			seen = true
			_ = ws.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		}
	}
}

// poolTimeouts is a go-redis hook that fails the single commands fail
// picks with redis.ErrPoolTimeout, unsent.
type poolTimeouts struct{ fail func(cmd redis.Cmder) bool }

func (h poolTimeouts) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h poolTimeouts) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if h.fail(cmd) {
			cmd.SetErr(redis.ErrPoolTimeout)
			return redis.ErrPoolTimeout
		}
		return next(ctx, cmd)
	}
}

func (h poolTimeouts) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}
