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

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/protocol"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/stream"
)

// TestResumeCatchUpRandomized drives one egress with a small SEND_QUEUE
// (16 or 32, by the seed; 16 is the least it takes) on a real Redis through random rounds on a
// fresh channel each: live publishes, backlogs of random length (some
// many times SEND_QUEUE, some more than a replay batch) appended with
// their notifications lost and then revealed by a publish the hub is
// told of (it catches up from the stream, into the buffers of the
// replays running), live subscribes and resumes from random ids, some
// of them held before or after one of their replay's stream reads while
// the others happen, and clients that stop reading for a few steps and
// then read on (their sockets' receive buffers small, so that the
// egress's queues fill). The stream is never trimmed. Every connection
// is checked against docs/protocol.md (Resume; Slow consumers):
//
//   - a resume is recovered, at its `after`; a live subscribe's position
//     is the last id the hub delivered;
//   - each subscription receives the channel's ids after its position,
//     in order, once: all of them up to the round's last one if its
//     connection is open at the end, a prefix if it was closed;
//   - a connection is closed only with 4002, and only when it deserved
//     it: its client stopped reading at some point, or more than
//     SEND_QUEUE live messages (not a catch-up's) were published while
//     one of its replays ran, or the catch-ups' waiting budget ran out
//     in the round (waitBudget: on a machine so loaded that the writers
//     run late, catch-ups then deliver without waiting, and a client that
//     reads as fast as it can may be closed 4002; counted, overBudget).
//
// Rounds run for WSRELAY_CATCHUP_BUDGET_MS milliseconds (default 3000; at
// most 500 rounds). The seed is logged; WSRELAY_CATCHUP_SEED repeats a
// run's choices, and WSRELAY_CATCHUP_ROUND runs one round of it alone.
func TestResumeCatchUpRandomized(t *testing.T) {
	t.Parallel()
	seed := envUint(t, "WSRELAY_CATCHUP_SEED", uint64(time.Now().UnixNano()))
	budget := 3 * time.Second
	if s := envUint(t, "WSRELAY_CATCHUP_BUDGET_MS", 0); s > 0 {
		budget = time.Duration(s) * time.Millisecond
	}
	only := int(envUint(t, "WSRELAY_CATCHUP_ROUND", 0))
	sendQueue := 16 << (seed % 2)
	rdb, prefix := redistest.Client(t)
	pause := &replayPause{}
	rdb.AddHook(pause)
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true", "MAX_FRAMES_PER_SECOND": "0",
		"SEND_QUEUE": fmt.Sprint(sendQueue), "WRITE_TIMEOUT": "30s"})
	w := &cuWorld{t: t, e: e, ks: keys.Scheme{Prefix: prefix}, store: stream.NewStore(rdb), pause: pause, sendQueue: sendQueue}

	start := time.Now()
	rounds := 0
	for round := 1; round <= 500 && time.Since(start) < budget; round++ {
		if only != 0 && round != only {
			continue
		}
		rounds++
		r := &cuRound{cuWorld: w, n: round, rng: rand.New(rand.NewPCG(seed, uint64(round)))}
		if !r.run() {
			t.Fatalf("seed %d round %d failed (WSRELAY_CATCHUP_SEED=%d WSRELAY_CATCHUP_ROUND=%d repeats it); its steps:\n%s",
				seed, round, seed, round, strings.Join(r.trace, "\n"))
		}
		if only != 0 {
			break
		}
	}
	t.Logf("seed %d (SEND_QUEUE %d): %d rounds in %v; %s", seed, sendQueue, rounds, time.Since(start).Round(time.Millisecond), w.stats)
}

// cuStats counts what the rounds made happen, to show what they covered.
type cuStats struct {
	resumes, live, paused, backlogs, longBacklogs, slow, slowClosed, liveClosed int
	// overBudget: rounds in which the catch-ups' waiting budget ran out;
	// budgetClosed: clients closed 4002 in them that deserved it only so.
	overBudget, budgetClosed int
	// acrossCatchUp: held replays across which the hub caught up a
	// backlog longer than SEND_QUEUE; backedUp: steps after which a slow
	// client's queue in the egress was at least half full.
	acrossCatchUp, backedUp int
}

func (s cuStats) String() string {
	return fmt.Sprintf("%d resumes (%d held, %d of them across a backlog longer than SEND_QUEUE), %d live subscribes, %d backlogs caught up (%d longer than SEND_QUEUE), %d clients slowed (%d steps left one's queue half full), closed 4002: %d slowed, %d for live messages during their replay, %d in the %d rounds whose catch-ups ran out of waiting budget",
		s.resumes, s.paused, s.acrossCatchUp, s.live, s.backlogs, s.longBacklogs, s.slow, s.backedUp, s.slowClosed, s.liveClosed, s.budgetClosed, s.overBudget)
}

// cuWorld is what the rounds share: one egress and its Redis.
type cuWorld struct {
	t         *testing.T
	e         *secEgress
	ks        keys.Scheme
	store     *stream.Store
	pause     *replayPause
	sendQueue int
	stats     cuStats
}

// cuRound is one round: its channel, clients and steps.
type cuRound struct {
	*cuWorld
	n       int
	rng     *rand.Rand
	name    string
	key     string
	cs      *chanState
	ids     []string // every id appended; the hub delivered them all after each step
	clients []*cuClient
	step    int
	trace   []string
	failed  bool
	paused  *cuPaused
	// overAt is the hub's count of catch-up waits over budget when the
	// round began.
	overAt int64
}

// cuPaused is a replay held in the hook.
type cuPaused struct {
	c     *cuClient
	point *pausePoint
	// caughtUp: how many messages the hub caught up while it was held.
	caughtUp int
}

func (r *cuRound) logf(format string, args ...any) {
	r.trace = append(r.trace, fmt.Sprintf("%3d: ", r.step)+fmt.Sprintf(format, args...))
}

func (r *cuRound) fail(format string, args ...any) {
	r.failed = true
	r.t.Errorf("round %d step %d: %s", r.n, r.step, fmt.Sprintf(format, args...))
}

func (r *cuRound) run() bool {
	defer func() {
		if r.paused != nil {
			r.paused.point.release()
		}
		for _, c := range r.clients {
			c.setSlow(false)
			c.ws.Close()
			<-c.done
		}
		if r.cs != nil {
			r.e.s.hub.release(r.cs)
		}
	}()
	r.name = fmt.Sprintf("cu%d", r.n)
	r.key = r.ks.Stream(r.name)
	r.overAt = r.e.s.hub.pacing.overBudget.Load()
	// Held by the test for the round, so that the channel stays the same
	// chanState whoever subscribes or is closed.
	cs, err := r.e.s.hub.acquire(r.t.Context(), r.name)
	if err != nil {
		r.fail("acquire %s: %v", r.name, err)
		return false
	}
	r.cs = cs
	steps := 10 + r.rng.IntN(25)
	for r.step = 1; r.step <= steps && !r.failed; r.step++ {
		r.randomStep()
		r.noteReplays()
	}
	if r.failed {
		return false
	}
	r.step++
	return r.finish()
}

func (r *cuRound) randomStep() {
	switch x := r.rng.IntN(100); {
	case x < 20:
		r.publish(1 + r.rng.IntN(3))
	case x < 40:
		r.backlog()
	case x < 50:
		r.subscribe(false)
	case x < 75:
		r.subscribe(true)
	case x < 87:
		r.toggleSlow()
	default:
		if r.paused != nil {
			r.release()
		} else {
			r.publish(1)
		}
	}
}

// publish appends n messages, each announced, and waits for the hub to
// have delivered them: live messages, to each replay running a message
// its buffer takes.
func (r *cuRound) publish(n int) {
	r.logf("publish %d", n)
	r.append(n, "")
	for _, c := range r.clients {
		for _, s := range c.subs {
			if s.replaying {
				s.liveWhileReplaying += n
			}
		}
	}
}

// backlog appends messages whose notifications are lost, and one the hub
// is told of: it catches them all up from the stream.
func (r *cuRound) backlog() {
	n := 1 + r.rng.IntN(3*r.sendQueue)
	slow := slices.ContainsFunc(r.clients, (*cuClient).isSlow)
	if r.rng.IntN(4) == 0 || slow && r.rng.IntN(2) == 0 {
		// Longer than a batch; more often while a client does not read,
		// so that its queue in the egress backs up.
		n = replayBatch + r.rng.IntN(2*replayBatch)
	}
	r.logf("backlog of %d, then one announced", n)
	r.append(n, "-lost")
	r.append(1, "")
	r.stats.backlogs++
	if n+1 > r.sendQueue {
		r.stats.longBacklogs++
		if r.paused != nil {
			r.paused.caughtUp += n + 1
		}
	}
}

// cuData is each message's payload: a socket whose client stops reading
// (its receive buffer small, smallBufDialer) fills in some dozens.
var cuData = []byte(`"` + strings.Repeat("x", 4<<10) + `"`)

func (r *cuRound) append(n int, notifySuffix string) {
	as := make([]stream.Append, n)
	for i := range as {
		as[i] = stream.Append{Stream: r.key, Notify: r.ks.Notify(r.name) + notifySuffix,
			Msg: stream.Message{Channel: r.name, TS: time.Now().UnixMilli(), Data: cuData}}
	}
	ids, err := r.store.Append(context.Background(), as)
	if err != nil {
		r.fail("append: %v", err)
		return
	}
	r.ids = append(r.ids, ids...)
	if notifySuffix == "" {
		r.syncHub()
	}
}

// syncHub waits until the hub has delivered the last id.
func (r *cuRound) syncHub() {
	want := r.ids[len(r.ids)-1]
	deadline := time.Now().Add(5 * time.Second)
	for {
		r.cs.mu.Lock()
		got := r.cs.last.String()
		r.cs.mu.Unlock()
		if got == want {
			return
		}
		if time.Now().After(deadline) {
			r.fail("the hub is at %s, the model expects %s", got, want)
			return
		}
		time.Sleep(100 * time.Microsecond)
	}
}

// replaying reports whether c's connection is still replaying the
// channel (registered as resuming).
func (r *cuRound) replaying(c *cuClient) bool {
	r.cs.mu.Lock()
	defer r.cs.mu.Unlock()
	_, ok := r.cs.resuming[c.conn]
	return ok
}

// noteReplays notes the replays that have ended since the last step,
// and the slow clients' queues that are backed up.
func (r *cuRound) noteReplays() {
	for _, c := range r.clients {
		if c.isSlow() && c.conn.backlogged() {
			r.stats.backedUp++
		}
		for _, s := range c.subs {
			if s.replaying && !r.replaying(c) {
				s.replaying = false
				r.logf("  client %d's replay has ended (%d live messages while it ran)", c.n, s.liveWhileReplaying)
			}
		}
	}
}

// waitReplay waits for c's replay to end, unless c is slow, closed, or
// held; at most 10 s.
func (r *cuRound) waitReplay(c *cuClient) {
	deadline := time.Now().Add(10 * time.Second)
	for r.replaying(c) && c.open() && !c.isSlow() && (r.paused == nil || r.paused.c != c) {
		if time.Now().After(deadline) {
			r.fail("client %d: its replay has not ended", c.n)
			return
		}
		time.Sleep(100 * time.Microsecond)
	}
}

// subscribe dials a client and subscribes it, live or resuming from a
// random id; a resume may be held at one of its replay's reads.
func (r *cuRound) subscribe(resume bool) {
	c := r.dial()
	if c == nil {
		return
	}
	s := &cuSub{step: r.step, pos: len(r.ids) - 1}
	req := map[string]any{"type": "subscribe", "channel": r.name}
	var point *pausePoint
	if resume {
		a := r.rng.IntN(len(r.ids)+1) - 1
		if r.rng.IntN(3) == 0 {
			a = max(-1, len(r.ids)-1-r.rng.IntN(3*r.sendQueue))
		}
		s.after, s.pos, s.replaying = true, a, true
		after := r.id(a)
		req["after"] = after
		if r.paused == nil && r.rng.IntN(2) == 0 && r.noReplay() {
			// Held before or after its first read, or the read after a
			// full batch, which starts at the batch's last id.
			read := r.rng.IntN(1 + (len(r.ids)-1-a)/replayBatch)
			start := after
			if read > 0 {
				start = r.id(a + read*replayBatch)
			}
			point = &pausePoint{key: r.key, start: start, after: r.rng.IntN(2) == 0, reached: make(chan struct{}), released: make(chan struct{})}
			r.pause.arm(point)
		}
	}
	c.mu.Lock()
	c.subs = append(c.subs, s)
	c.mu.Unlock()
	r.logf("client %d subscribes after %s (resume %v, held at %v)", c.n, r.id(s.pos), resume, point)
	if err := c.ws.WriteJSON(req); err != nil {
		r.fail("client %d: %v", c.n, err)
		return
	}
	if !resume {
		r.stats.live++
		r.waitReply(c)
		return
	}
	r.stats.resumes++
	if point != nil {
		select {
		case <-point.reached:
		case <-time.After(5 * time.Second):
			r.pause.arm(nil)
			r.fail("client %d: the replay never reached the read from %s", c.n, point.start)
			return
		}
		r.stats.paused++
		r.paused = &cuPaused{c: c, point: point}
		return
	}
	r.waitReply(c)
	r.waitReplay(c)
}

// noReplay waits until no connection replays the channel (at most a
// second), so that the XRANGE the pause holds is the next replay's, and
// reports whether none does.
func (r *cuRound) noReplay() bool {
	for deadline := time.Now().Add(time.Second); ; time.Sleep(100 * time.Microsecond) {
		r.cs.mu.Lock()
		n := len(r.cs.resuming)
		r.cs.mu.Unlock()
		if n == 0 {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
	}
}

// release lets the held replay go on.
func (r *cuRound) release() {
	p := r.paused
	r.paused = nil
	r.logf("release client %d (%d messages caught up meanwhile)", p.c.n, p.caughtUp)
	if p.caughtUp > 0 {
		r.stats.acrossCatchUp++
	}
	p.point.release()
	r.waitReply(p.c)
	r.waitReplay(p.c)
}

// toggleSlow makes an open client stop reading, or one that stopped read
// on.
func (r *cuRound) toggleSlow() {
	var open []*cuClient
	for _, c := range r.clients {
		if c.open() && len(c.subs) > 0 {
			open = append(open, c)
		}
	}
	if len(open) == 0 {
		r.publish(1)
		return
	}
	c := open[r.rng.IntN(len(open))]
	slow := !c.isSlow()
	r.logf("client %d: slow %v", c.n, slow)
	if slow {
		c.slowEver = true
		r.stats.slow++
	}
	c.setSlow(slow)
	if !slow {
		r.waitReplay(c)
	}
}

func (r *cuRound) id(i int) string {
	if i < 0 {
		return stream.Zero.String()
	}
	return r.ids[i]
}

func (r *cuRound) waitReply(c *cuClient) {
	if c.isSlow() {
		return
	}
	if !c.wait(5*time.Second, func() bool { return c.subs[len(c.subs)-1].replied || c.code != 0 }) {
		r.fail("client %d: no subscribed reply", c.n)
	}
}

// finish releases the held replay and the slow clients, publishes a last
// message, waits for every open connection to have it, and checks them
// all.
func (r *cuRound) finish() bool {
	if r.paused != nil {
		r.release()
	}
	for _, c := range r.clients {
		if c.isSlow() {
			r.logf("client %d: slow false", c.n)
			c.setSlow(false)
		}
	}
	r.publish(1)
	if r.failed {
		return false
	}
	last := r.ids[len(r.ids)-1]
	for _, c := range r.clients {
		c.wait(10*time.Second, func() bool {
			for _, s := range c.subs {
				if !s.replied || len(s.got) == 0 || s.got[len(s.got)-1] != last {
					return c.code != 0
				}
			}
			return true
		})
	}
	r.noteReplays()
	over := r.e.s.hub.pacing.overBudget.Load() > r.overAt
	if over {
		r.stats.overBudget++
	}
	for _, c := range r.clients {
		r.check(c, over)
	}
	return !r.failed
}

// check checks what c received against the model; over says the
// catch-ups' waiting budget ran out in the round.
func (r *cuRound) check(c *cuClient, over bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.strays) > 0 {
		r.fail("client %d: messages before its subscribed reply: %v", c.n, c.strays)
	}
	deserved := c.slowEver
	for _, s := range c.subs {
		if s.liveWhileReplaying > r.sendQueue {
			deserved = true
		}
	}
	switch {
	case c.code == 0:
	case c.code == protocol.CloseSlowConsumer && deserved:
		if c.slowEver {
			r.stats.slowClosed++
		} else {
			r.stats.liveClosed++
		}
	case c.code == protocol.CloseSlowConsumer && over:
		r.stats.budgetClosed++
	default:
		r.fail("client %d: closed %d (%s); slowed %v, live messages while its replay ran %v (SEND_QUEUE %d)",
			c.n, c.code, c.reason, c.slowEver, c.liveCounts(), r.sendQueue)
	}
	for _, s := range c.subs {
		if !s.replied {
			if c.code == 0 {
				r.fail("client %d: no subscribed reply", c.n)
			}
			continue
		}
		pos := r.id(s.pos)
		if s.position != pos || s.after != (s.recovered != nil) || s.recovered != nil && !*s.recovered {
			r.fail("client %d: position %s, recovered %v; want %s, %v", c.n, s.position, deref(s.recovered), pos, s.after)
		}
		want := r.ids[s.pos+1:]
		if c.code != 0 {
			want = want[:min(len(want), len(s.got))]
		}
		if !slices.Equal(s.got, want) {
			r.fail("client %d after %s (close %d): got %s\nwant %s", c.n, pos, c.code, r.idRange(s.got), r.idRange(want))
		}
	}
}

// idRange shows ids as their indexes, runs joined: [3..9 12].
func (r *cuRound) idRange(ids []string) string {
	return idRange(&rsChan{ids: r.ids}, ids)
}

// dial opens a client with a small receive buffer and waits for its
// welcome.
func (r *cuRound) dial() *cuClient {
	ws, _, err := smallBufDialer.Dial(r.e.url(nil), nil)
	if err != nil {
		r.fail("dial: %v", err)
		return nil
	}
	c := &cuClient{n: len(r.clients) + 1, ws: ws, done: make(chan struct{}), changed: make(chan struct{})}
	r.clients = append(r.clients, c)
	go c.read()
	if !c.wait(5*time.Second, func() bool { return c.id != "" || c.code != 0 }) || c.id == "" {
		r.fail("client %d: no welcome (close %d)", c.n, c.code)
		return nil
	}
	c.conn = r.e.conn(c.id)
	return c
}

// cuClient is one WebSocket connection, subscribed to the round's
// channel once (subs has one entry), and what it received.
type cuClient struct {
	n        int
	ws       *websocket.Conn
	conn     *conn // the egress's
	done     chan struct{}
	slowEver bool // test goroutine

	mu      sync.Mutex
	changed chan struct{} // closed and replaced on each frame
	gate    chan struct{} // while not nil, the client does not read
	id      string
	subs    []*cuSub
	strays  []string
	code    int // close code; -1: ended without one
	reason  string
}

// cuSub is a subscription and what came for it.
type cuSub struct {
	step  int
	after bool // a resume
	pos   int  // index of its expected position; -1: 0-0
	// replaying: its replay has not been seen to end; liveWhileReplaying
	// counts the live messages published meanwhile (test goroutine).
	replaying          bool
	liveWhileReplaying int

	replied   bool
	recovered *bool
	position  string
	got       []string
}

func (c *cuClient) liveCounts() []int {
	var n []int
	for _, s := range c.subs {
		n = append(n, s.liveWhileReplaying)
	}
	return n
}

func (c *cuClient) setSlow(slow bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case slow && c.gate == nil:
		c.gate = make(chan struct{})
	case !slow && c.gate != nil:
		close(c.gate)
		c.gate = nil
	}
}

func (c *cuClient) isSlow() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.gate != nil
}

func (c *cuClient) open() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.code == 0
}

// wait waits until cond, called with c.mu held, is true; false on
// timeout.
func (c *cuClient) wait(within time.Duration, cond func() bool) bool {
	t := time.NewTimer(within)
	defer t.Stop()
	for {
		c.mu.Lock()
		ok, ch := cond(), c.changed
		c.mu.Unlock()
		if ok {
			return true
		}
		select {
		case <-ch:
		case <-t.C:
			return false
		}
	}
}

func (c *cuClient) read() {
	defer close(c.done)
	for {
		c.mu.Lock()
		gate := c.gate
		c.mu.Unlock()
		if gate != nil {
			<-gate
		}
		_, b, err := c.ws.ReadMessage()
		c.mu.Lock()
		if err != nil {
			var ce *websocket.CloseError
			if errors.As(err, &ce) {
				c.code, c.reason = ce.Code, ce.Text
			} else {
				c.code = -1
			}
			close(c.changed)
			c.mu.Unlock()
			return
		}
		var f struct {
			Type, ID, Position string
			ConnectionID       string `json:"connection_id"`
			Recovered          *bool
		}
		_ = json.Unmarshal(b, &f)
		var s *cuSub
		if len(c.subs) > 0 {
			s = c.subs[0]
		}
		switch f.Type {
		case "welcome":
			c.id = f.ConnectionID
		case "subscribed":
			if s != nil {
				s.replied, s.recovered, s.position = true, f.Recovered, f.Position
			}
		case "message":
			if s == nil || !s.replied {
				c.strays = append(c.strays, f.ID)
			} else {
				s.got = append(s.got, f.ID)
			}
		}
		close(c.changed)
		c.changed = make(chan struct{})
		c.mu.Unlock()
	}
}
