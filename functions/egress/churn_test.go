//go:build !wsrelay_lean

package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/url"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/stream"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// Tests of a long-running instance under subscription churn: clients
// subscribing to and leaving many distinct channels, closing while
// subscribed or while their subscribes and resumes are under way, some
// of the channels' reads failing or slow. Once the churn is over and the
// linger (design.md: 10 s after the last local subscriber) has passed,
// the instance must hold, in the hub, in its subscriber and in Redis,
// only the channels its remaining sockets are subscribed to, and no
// goroutine more than before.

// readTrouble is a go-redis hook for the churn: the stream reads of
// channels named bad-* fail while failing is set (switched on and off by
// the churn), those of slow-* take a while, as a loaded node's would.
type readTrouble struct {
	failing atomic.Bool
}

func (*readTrouble) DialHook(next redis.DialHook) redis.DialHook { return next }

func (r *readTrouble) troubled(cmds []redis.Cmder) (fail bool, delay time.Duration) {
	for _, c := range cmds {
		args := c.Args()
		if len(args) < 2 {
			continue
		}
		switch c.Name() {
		case "xrange", "xrevrange", "get":
		default:
			continue
		}
		key, _ := args[1].(string)
		switch {
		case strings.Contains(key, "bad-") && r.failing.Load():
			fail = true
		case strings.Contains(key, "slow-"):
			delay = 50 * time.Millisecond
		}
	}
	return fail, delay
}

func (r *readTrouble) wait(ctx context.Context, d time.Duration) error {
	if d == 0 {
		return nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (r *readTrouble) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		fail, delay := r.troubled([]redis.Cmder{cmd})
		if err := r.wait(ctx, delay); err != nil {
			cmd.SetErr(err)
			return err
		}
		if fail {
			cmd.SetErr(redistest.ErrFailed)
			return redistest.ErrFailed
		}
		return next(ctx, cmd)
	}
}

func (r *readTrouble) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		fail, delay := r.troubled(cmds)
		if err := r.wait(ctx, delay); err != nil {
			for _, c := range cmds {
				c.SetErr(err)
			}
			return err
		}
		if fail {
			for _, c := range cmds {
				c.SetErr(redistest.ErrFailed)
			}
			return redistest.ErrFailed
		}
		return next(ctx, cmds)
	}
}

// TestChurnLeavesNothing: ~15 s of randomized churn on one instance,
// then the checks of what it holds once the linger is over.
func TestChurnLeavesNothing(t *testing.T) {
	srv := redistest.Start(t)
	rdb := redis.NewClient(&redis.Options{Addr: srv.Addr(), PoolSize: 32})
	t.Cleanup(func() { rdb.Close() })
	trouble := &readTrouble{}
	rdb.AddHook(trouble)
	admin := redis.NewClient(&redis.Options{Addr: srv.Addr()})
	t.Cleanup(func() { admin.Close() })
	logs := &testkit.SyncBuffer{}
	const prefix = "churn"
	e := startEgressLogging(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true", "MAX_FRAMES_PER_SECOND": "0",
		"SEND_QUEUE": "64", "WRITE_TIMEOUT": "2s", "PING_INTERVAL": "2s", "MAX_SUBSCRIPTIONS": "200"}, logs)
	<-e.s.hub.inbox.ready
	churnAndCheck(t, e, logs, admin, trouble, keys.Scheme{Prefix: prefix}, 15*time.Second, func() (map[string]int, error) {
		return shardSubs(t.Context(), []*redis.Client{admin}, prefix)
	})
}

// TestClusterChurnLeavesNothing is TestChurnLeavesNothing on a Redis
// Cluster of three masters: the instance's channels spread over a
// Pub/Sub connection per master.
func TestClusterChurnLeavesNothing(t *testing.T) {
	c := redistest.StartCluster(t, 3, 0)
	rdb := c.Client(t)
	trouble := &readTrouble{}
	rdb.AddHook(trouble)
	admin := c.Client(t)
	ce := startClusterEgressWith(t, rdb, c.AddrsEnv(), map[string]string{"MAX_FRAMES_PER_SECOND": "0",
		"SEND_QUEUE": "64", "WRITE_TIMEOUT": "2s", "PING_INTERVAL": "2s", "MAX_SUBSCRIPTIONS": "200"})
	<-ce.s.hub.inbox.ready
	e := &secEgress{s: ce.s, srv: ce.srv}
	nodes := c.NodeClients(t)
	churnAndCheck(t, e, ce.logs, admin, trouble, ce.ks, 15*time.Second, func() (map[string]int, error) {
		return shardSubs(t.Context(), nodes, ce.ks.Prefix)
	})
}

// shardSubs is, by shard channel under prefix, how many connections of
// the given Redis nodes are subscribed to it.
func shardSubs(ctx context.Context, nodes []*redis.Client, prefix string) (map[string]int, error) {
	out := map[string]int{}
	for _, n := range nodes {
		all, err := n.PubSubShardChannels(ctx, "*").Result()
		if err != nil {
			return nil, err
		}
		var chans []string
		for _, ch := range all {
			if strings.HasPrefix(ch, prefix+":") {
				chans = append(chans, ch)
			}
		}
		if len(chans) == 0 {
			continue
		}
		counts, err := n.PubSubShardNumSub(ctx, chans...).Result()
		if err != nil {
			return nil, err
		}
		for ch, c := range counts {
			out[ch] += int(c)
		}
	}
	return out, nil
}

// churnAndCheck runs the churn on e for d, then checks, once the linger
// is over, that e holds only the channels of the sockets kept open, and
// that Redis (subs: the shard channels' subscriber counts) has no other
// subscription of e's.
func churnAndCheck(t *testing.T, e *secEgress, logs *testkit.SyncBuffer, admin redis.UniversalClient, trouble *readTrouble,
	ks keys.Scheme, d time.Duration, subs func() (map[string]int, error)) {
	ctx := t.Context()
	store := stream.NewStore(admin)
	data := []byte(`"` + strings.Repeat("h", 2000) + `"`)
	publish := func(ch string, n int) []string {
		as := make([]stream.Append, n)
		for i := range as {
			as[i] = stream.Append{Stream: ks.Stream(ch), Notify: ks.Notify(ch),
				Msg: stream.Message{Channel: ch, TS: time.Now().UnixMilli(), Data: data}}
		}
		ids, err := store.Append(ctx, as)
		if err != nil {
			t.Error(err)
		}
		return ids
	}
	// Histories to resume from, long enough that a replay to a socket
	// that stopped reading is cut mid-way.
	hist := map[string][]string{}
	for i := range 4 {
		ch := "hist-" + strconv.Itoa(i)
		hist[ch] = publish(ch, 300)
	}
	// Streams that can never be read (a key of another type): a
	// subscribe to such a channel stalls its first read.
	for i := range 4 {
		if err := admin.Set(ctx, ks.Stream("wrong-"+strconv.Itoa(i)), "not a stream", 0).Err(); err != nil {
			t.Fatal(err)
		}
	}

	// The sockets kept open, and their channels.
	kept := []string{"keep-0", "keep-1", "keep-2", "hist-0"}
	var keepers []*websocket.Conn
	for i, ch := range kept {
		ws, _, err := e.dial(t, url.Values{"channels": {ch + "," + kept[(i+1)%len(kept)]}}, nil)
		if err != nil {
			t.Fatal(err)
		}
		readUntil(t, ws, `"subscribed"`)
		readUntil(t, ws, `"subscribed"`)
		// Answered by its reader, which runs from then on.
		send(t, ws, map[string]any{"type": "ping"})
		readUntil(t, ws, `"pong"`)
		keepers = append(keepers, ws)
	}
	keptSubs := 2 * len(kept)
	// The keepers read on, so that their queues never fill.
	var readers sync.WaitGroup
	for _, ws := range keepers {
		_ = ws.SetReadDeadline(time.Time{})
		readers.Go(func() {
			for {
				if _, _, err := ws.ReadMessage(); err != nil {
					return
				}
			}
		})
	}
	// What the instance runs whatever its sockets: warmed up above.
	testkit.Eventually(t, 5*time.Second, func() error { return openSockets(e.s, int64(len(keepers))) })
	base := goleak.IgnoreCurrent()

	var fresh atomic.Int64 // distinct channel names
	freshName := func() string { return "u-" + strconv.FormatInt(fresh.Add(1), 36) }
	pooled := func(r *rand.Rand) string {
		switch r.IntN(10) {
		case 0:
			return "bad-" + strconv.Itoa(r.IntN(6))
		case 1:
			return "slow-" + strconv.Itoa(r.IntN(4))
		case 2:
			return "wrong-" + strconv.Itoa(r.IntN(4))
		case 3, 4:
			return "hist-" + strconv.Itoa(r.IntN(4))
		}
		return "pool-" + strconv.Itoa(r.IntN(50))
	}
	name := func(r *rand.Rand) string {
		if r.IntN(2) == 0 {
			return freshName()
		}
		return pooled(r)
	}

	deadline := time.Now().Add(d)
	var workers sync.WaitGroup
	var ops [8]atomic.Int64
	// Publishers, and the read failures switched on and off.
	workers.Go(func() {
		r := rand.New(rand.NewPCG(1, 1))
		for time.Now().Before(deadline) {
			ch := pooled(r)
			if strings.HasPrefix(ch, "wrong-") {
				continue
			}
			publish(ch, 1+r.IntN(3))
			if r.IntN(40) == 0 {
				trouble.failing.Store(!trouble.failing.Load())
			}
			time.Sleep(time.Duration(r.IntN(5)) * time.Millisecond)
		}
	})
	dialer := websocket.Dialer{HandshakeTimeout: 5 * time.Second}
	for w := range 6 {
		workers.Go(func() {
			r := rand.New(rand.NewPCG(uint64(w)+7, uint64(time.Now().UnixNano())))
			for time.Now().Before(deadline) {
				kind := r.IntN(len(ops))
				ops[kind].Add(1)
				churnOnce(t, e, r, kind, dialer, name, freshName, hist)
			}
		})
	}
	workers.Wait()
	trouble.failing.Store(false)
	var counts []string
	for i := range ops {
		counts = append(counts, strconv.FormatInt(ops[i].Load(), 10))
	}
	t.Logf("churn: %d distinct fresh channels; ops by kind %s", fresh.Load(), strings.Join(counts, " "))

	// Every churned socket ends (those cut mid-subscribe within the 5 s
	// a subscribe may wait, those that stopped reading by WRITE_TIMEOUT
	// or 4002), then the channels they left linger 10 s.
	logEnds := func() {
		reasons := map[string]int{}
		for _, l := range logs.JSONLines(t) {
			if r, ok := l["reason"].(string); ok {
				reasons[r]++
			}
			if l["level"] == "WARN" || l["level"] == "ERROR" {
				reasons[l["msg"].(string)]++
			}
		}
		t.Logf("ends and warnings: %v", reasons)
	}
	time.Sleep(time.Second)
	logEnds()
	testkit.Eventually(t, 20*time.Second, func() error { return openSockets(e.s, int64(len(keepers))) })
	time.Sleep(linger)

	h := e.s.hub
	wantChans := map[string]bool{h.inbox.notify: true}
	for _, ch := range kept {
		wantChans[ks.Notify(ch)] = true
	}
	testkit.Eventually(t, 10*time.Second, func() error {
		var errs []string
		h.mu.Lock()
		var held []string
		for k, cs := range h.chans {
			if !wantChans[k] {
				held = append(held, fmt.Sprintf("%s(refs %d)", k, cs.refs))
			}
		}
		nconns := len(h.conns)
		h.mu.Unlock()
		if len(held) > 0 {
			sort.Strings(held)
			errs = append(errs, fmt.Sprintf("hub holds %d channels nobody here subscribes: %v", len(held), head(held)))
		}
		if nconns != len(keepers) {
			errs = append(errs, fmt.Sprintf("hub holds %d connections, want %d", nconns, len(keepers)))
		}
		for _, ch := range kept {
			cs := h.state(ks.Notify(ch))
			if cs == nil {
				errs = append(errs, "kept channel "+ch+" dropped")
				continue
			}
			cs.mu.Lock()
			n, res := len(cs.subs), len(cs.resuming)
			cs.mu.Unlock()
			if n != 2 || res != 0 {
				errs = append(errs, fmt.Sprintf("kept channel %s: %d subscribers, %d resuming; want 2, 0", ch, n, res))
			}
		}
		if sub := h.liveSub(); sub != nil {
			sub.mu.Lock()
			var wanted []string
			for ch := range sub.want {
				if !wantChans[ch] {
					wanted = append(wanted, ch)
				}
			}
			var placed, sent int
			for _, n := range sub.nodes {
				placed += len(n.chans)
				n.mu.Lock()
				sent += len(n.sentAt)
				n.mu.Unlock()
			}
			sub.mu.Unlock()
			if len(wanted) > 0 || placed != len(wantChans) || sent != 0 {
				errs = append(errs, fmt.Sprintf("subscriber wants %d channels nobody here subscribes (%v); %d placed, %d unconfirmed", len(wanted), head(wanted), placed, sent))
			}
		}
		h.readsMu.Lock()
		reads := len(h.reads)
		h.readsMu.Unlock()
		if reads != 0 || h.stalling.Load() != 0 {
			errs = append(errs, fmt.Sprintf("%d replay reads waiting, %d stalled reads retried", reads, h.stalling.Load()))
		}
		got, err := subs()
		if err != nil {
			return err
		}
		var extra []string
		for ch, n := range got {
			if n != 0 && !wantChans[ch] {
				extra = append(extra, ch)
			}
		}
		for ch := range wantChans {
			if got[ch] != 1 {
				errs = append(errs, fmt.Sprintf("redis: %d subscriptions to %s, want 1", got[ch], ch))
			}
		}
		if len(extra) > 0 {
			sort.Strings(extra)
			errs = append(errs, fmt.Sprintf("redis holds %d shard subscriptions nobody here wants: %v", len(extra), head(extra)))
		}
		m, err := scrape(e.srv.URL)
		if err != nil {
			return err
		}
		for _, want := range []string{fmt.Sprintf("wsrelay_egress_connections %d\n", len(keepers)),
			fmt.Sprintf("wsrelay_egress_subscriptions %d\n", keptSubs), fmt.Sprintf("wsrelay_egress_channels %d\n", len(kept))} {
			if !strings.Contains(m, want) {
				errs = append(errs, fmt.Sprintf("metrics: no %q in %q", strings.TrimSpace(want), grepMetrics(m, "wsrelay_egress_")))
			}
		}
		if len(errs) > 0 {
			return fmt.Errorf("after the churn and the linger:\n%s", strings.Join(errs, "\n"))
		}
		return nil
	})
	// The scrapes' keep-alive connections, on both ends.
	http.DefaultClient.CloseIdleConnections()
	if err := goleak.Find(base); err != nil {
		t.Fatalf("goroutines left by the churn: %v", err)
	}
	// The kept sockets still get their channels' messages.
	for _, ws := range keepers {
		ws.Close()
	}
	readers.Wait()
}

// head is the first few of s, for a failure message.
func head(s []string) []string {
	return s[:min(len(s), 8)]
}

// churnOnce runs one randomly chosen client behaviour of kind.
func churnOnce(t *testing.T, e *secEgress, r *rand.Rand, kind int, dialer websocket.Dialer, name func(*rand.Rand) string,
	freshName func() string, hist map[string][]string) {
	q := url.Values{}
	if r.IntN(3) == 0 {
		var chs []string
		for range 1 + r.IntN(5) {
			chs = append(chs, name(r))
		}
		slices.Sort(chs)
		q.Set("channels", strings.Join(slices.Compact(chs), ","))
	}
	if kind == 6 {
		dialer = smallBufDialer
	}
	ws, _, err := dialer.Dial(e.url(q), nil)
	if err != nil {
		t.Errorf("dial: %v", err)
		return
	}
	stopped := false // left open, unread: the server ends it
	defer func() {
		if stopped {
			t.Cleanup(func() { ws.Close() })
		} else {
			ws.Close()
		}
	}()
	_ = ws.SetReadDeadline(time.Now().Add(15 * time.Second))
	var frame strings.Builder
	sub := func(ch string) { fmt.Fprintf(&frame, `{"type":"subscribe","channel":%q}`, ch) }
	unsub := func(ch string) { fmt.Fprintf(&frame, `{"type":"unsubscribe","channel":%q}`, ch) }
	resume := func(ch, after string) {
		fmt.Fprintf(&frame, `{"type":"subscribe","channel":%q,"after":%q}`, ch, after)
	}
	flush := func() bool {
		if frame.Len() == 0 {
			return true
		}
		err := ws.WriteMessage(websocket.TextMessage, []byte(frame.String()))
		frame.Reset()
		return err == nil
	}
	// drain reads for up to d, or until a frame holding substr.
	drain := func(d time.Duration, substr string) {
		_ = ws.SetReadDeadline(time.Now().Add(d))
		for {
			_, b, err := ws.ReadMessage()
			if err != nil || substr != "" && strings.Contains(string(b), substr) {
				return
			}
		}
	}
	histCh := func() (string, string) {
		ch := "hist-" + strconv.Itoa(r.IntN(len(hist)))
		ids := hist[ch]
		return ch, ids[r.IntN(len(ids)/2)]
	}
	switch kind {
	case 0: // subscribes and unsubscribes in one frame, read to the end, close frame
		var mine []string
		for range 1 + r.IntN(20) {
			ch := name(r)
			sub(ch)
			mine = append(mine, ch)
		}
		for _, ch := range mine {
			if r.IntN(2) == 0 {
				unsub(ch)
			}
		}
		fmt.Fprintf(&frame, `{"type":"ping","ref":"end"}`)
		flush()
		drain(10*time.Second, `"end"`)
		_ = ws.WriteMessage(websocket.CloseMessage, websocket.FormatCloseMessage(1000, ""))
		drain(time.Second, "")
	case 1: // subscribes, then the TCP connection cut while they are handled
		for range 1 + r.IntN(10) {
			sub(name(r))
		}
		flush()
		time.Sleep(time.Duration(r.IntN(3)) * time.Millisecond)
		ws.NetConn().Close()
	case 2: // many fresh channels, each left at once
		for range 50 + r.IntN(100) {
			ch := freshName()
			sub(ch)
			unsub(ch)
		}
		fmt.Fprintf(&frame, `{"type":"ping","ref":"end"}`)
		flush()
		drain(10*time.Second, `"end"`)
		ws.NetConn().Close()
	case 3: // a resume, left mid-replay by an unsubscribe or a cut
		ch, after := histCh()
		resume(ch, after)
		if r.IntN(2) == 0 {
			unsub(ch)
		}
		flush()
		drain(time.Duration(r.IntN(20))*time.Millisecond, "")
		if r.IntN(2) == 0 {
			ws.NetConn().Close()
		}
	case 4: // a subscribe to a channel whose reads fail or are slow, left before it is answered
		sub([]string{"bad-", "wrong-", "slow-"}[r.IntN(3)] + strconv.Itoa(r.IntN(4)))
		sub(name(r))
		flush()
		time.Sleep(time.Duration(r.IntN(200)) * time.Millisecond)
		ws.NetConn().Close()
	case 5: // subscribed for a while to a few channels, then a close frame or a cut
		for range 1 + r.IntN(5) {
			sub(name(r))
		}
		flush()
		drain(time.Duration(50+r.IntN(300))*time.Millisecond, "")
		if r.IntN(2) == 0 {
			_ = ws.WriteMessage(websocket.CloseMessage, websocket.FormatCloseMessage(1000, ""))
		} else {
			ws.NetConn().Close()
		}
	case 6: // resumes to a client that stops reading: 4002 or the write timeout ends it
		for range 1 + r.IntN(3) {
			ch, after := histCh()
			resume(ch, after)
		}
		sub(name(r))
		flush()
		time.Sleep(time.Duration(r.IntN(100)) * time.Millisecond)
		stopped = r.IntN(2) == 0
	case 7: // the same channels subscribed and left over and over
		ch := name(r)
		for range 1 + r.IntN(30) {
			sub(ch)
			unsub(ch)
		}
		sub(ch)
		flush()
		if r.IntN(2) == 0 {
			drain(time.Duration(r.IntN(50))*time.Millisecond, "")
		}
		ws.NetConn().Close()
	}
}
