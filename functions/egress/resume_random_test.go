package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/protocol"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/stream"
)

// TestResumeRandomized drives one egress on a real Redis through random
// rounds on two fresh channels each: appends whose notifications arrive,
// are lost, or arrive late (held by the test and published later, some
// while a resume waits for them: awaitLive), some trimming as the
// ingress does (MAXLEN ~), trims
// (XTRIM MAXLEN, exact and ~), live subscribers, and resumes of new and
// existing connections from ids the clients held (0-0, ids trimmed
// away, the last one trimmed, the stream's last id, ids from before a
// gap, a full batch or two behind the end), some of them paused before
// or after one of their replay's stream reads while the others happen.
// The test waits for the hub after each notification that arrives, so
// that it knows what the hub delivered, and when (a model of its
// catch-up and gaps, checked against the hub's own position). Every
// connection is checked against docs/protocol.md ("Resume, history and
// `recovered`"):
//
//   - a resume is recovered exactly when nothing after its `after` was
//     trimmed when it read the stream, or when the hub, behind `after`
//     when the resume began, delivered `after` before the resume
//     decided (its notifications were late); otherwise its position is
//     the last id trimmed; a live subscriber's position is the last id
//     the hub delivered;
//   - each subscription receives the channel's ids after its position,
//     in order, once: all of them up to the round's last one, if its
//     connection is open at the end; a prefix, if it was closed;
//   - a connection is closed only with 1011, and only when it lacked a
//     message: one after the last it received that was trimmed and did
//     not reach it live (never delivered by the hub, or delivered before
//     it subscribed); its resume from that id says recovered:false;
//   - nothing comes for a channel before its subscribed reply, or for a
//     channel the connection did not subscribe.
//
// Rounds run for WSRELAY_RESUME_BUDGET_MS milliseconds (default 8000; at
// most 2000 rounds). The seed is logged; WSRELAY_RESUME_SEED repeats a run's
// choices, and WSRELAY_RESUME_ROUND runs one round of it alone.
func TestResumeRandomized(t *testing.T) {
	t.Parallel()
	seed := envUint(t, "WSRELAY_RESUME_SEED", uint64(time.Now().UnixNano()))
	budget := 8 * time.Second
	if s := envUint(t, "WSRELAY_RESUME_BUDGET_MS", 0); s > 0 {
		budget = time.Duration(s) * time.Millisecond
	}
	only := int(envUint(t, "WSRELAY_RESUME_ROUND", 0))
	rdb, prefix := redistest.Client(t)
	pause := &replayPause{}
	rdb.AddHook(pause)
	e := startEgressTuned(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true", "MAX_FRAMES_PER_SECOND": "0",
		// Room for every message of a round in a replay's live buffer
		// and a connection's queue: a 4002 here would be the test's.
		"SEND_QUEUE": "8192"}, io.Discard, func(s *Server) {
		// A resume whose late notifications the round lost waits the
		// whole of it; the ones the round lets arrive while it waits
		// (armed) take milliseconds. TestResumeNotificationsLate
		// checks the default.
		s.hub.lateWait = rsLateWait
	})
	w := &rsWorld{t: t, e: e, rdb: rdb, ks: keys.Scheme{Prefix: prefix}, store: stream.NewStore(rdb), pause: pause}

	start := time.Now()
	rounds := 0
	for round := 1; round <= 2000 && time.Since(start) < budget; round++ {
		if only != 0 && round != only {
			continue
		}
		rounds++
		r := &rsRound{rsWorld: w, n: round, rng: rand.New(rand.NewPCG(seed, uint64(round)))}
		if !r.run() {
			t.Fatalf("seed %d round %d failed (WSRELAY_RESUME_SEED=%d WSRELAY_RESUME_ROUND=%d repeats it); its steps:\n%s",
				seed, round, seed, round, strings.Join(r.trace, "\n"))
		}
		if only != 0 {
			break
		}
	}
	t.Logf("seed %d: %d rounds in %v; %s", seed, rounds, time.Since(start).Round(time.Millisecond), w.stats.String())
}

// rsLateWait is the egress's wait for late notifications (hub.lateWait)
// in TestResumeRandomized.
const rsLateWait = 100 * time.Millisecond

// rsStats counts what the rounds made happen, to show what they covered.
type rsStats struct {
	resumes, notRecovered, live, paused, closed, gaps int
	// gapWhilePaused: the hub found a gap while a replay was paused;
	// trimmedWhilePaused: a paused replay's position was trimmed past.
	gapWhilePaused, trimmedWhilePaused int
	// keptAcross: a paused replay that found its stream trimmed past it
	// or a gap meanwhile, and whose connection stayed open to the end.
	keptAcross int
	// awaited: resumes the test saw wait for the hub (awaitLive) before
	// it let late notifications arrive; recoveredLive: resumes recovered
	// because the hub delivered their `after` (late notifications).
	awaited, recoveredLive int
}

func (s rsStats) String() string {
	return fmt.Sprintf("%d resumes (%d not recovered, %d recovered by the live path, %d seen waiting for it), %d live subscribes, %d replays paused, %d of them across a gap and %d trimmed past (%d of these open to the end), %d gaps, %d connections closed with 1011",
		s.resumes, s.notRecovered, s.recoveredLive, s.awaited, s.live, s.paused, s.gapWhilePaused, s.trimmedWhilePaused, s.keptAcross, s.gaps, s.closed)
}

// rsWorld is what the rounds share: one egress and its Redis.
type rsWorld struct {
	t     *testing.T
	e     *secEgress
	rdb   redis.UniversalClient
	ks    keys.Scheme
	store *stream.Store
	pause *replayPause
	stats rsStats
	gaps  int64 // the hub's gaps the model expects (hub.gaps)
}

// rsChan is the model of one channel: every id appended, how many of the
// oldest are trimmed, and what the hub delivered.
type rsChan struct {
	name, key string
	cs        *chanState
	ids       []string
	trimmed   int   // the oldest trimmed entries: ids[:trimmed] are gone
	hub       int   // index of the hub's last id (cs.last); -1: 0-0
	delivered []int // by index: the step the hub delivered it at; -1: never
	heldIDs   []string
	// lateSub receives the notifications the test holds back (appended
	// with the channel's notify key + "-late"); late are those not yet
	// published to the hub, oldest first.
	lateSub *redis.PubSub
	late    []rsLate
}

// rsLate is a notification held back: the index of its message and the
// payload to publish later.
type rsLate struct {
	x       int
	payload string
}

func (ch *rsChan) id(i int) string {
	if i < 0 {
		return stream.Zero.String()
	}
	return ch.ids[i]
}

func (ch *rsChan) index(id string) int {
	if id == stream.Zero.String() {
		return -1
	}
	i := slices.Index(ch.ids, id)
	if i < 0 {
		return len(ch.ids) // not an id of the channel: nothing follows it
	}
	return i
}

// rsRound is one round: its channels, clients and steps.
type rsRound struct {
	*rsWorld
	n       int
	rng     *rand.Rand
	chans   []*rsChan
	clients []*rsClient
	step    int
	trace   []string
	failed  bool
	paused  *rsPaused
	// batchBehind makes the next resume's `after` a full batch behind
	// the stream's end, held before its second read.
	batchBehind bool
	// noLoss: the next append's notifications all arrive.
	noLoss bool
	// afterID, when set, is the next resume's `after`.
	afterID string
}

// releaseLate publishes the first n of ch's notifications held back, in
// order, as Redis would deliver them late, and waits for the hub.
func (r *rsRound) releaseLate(ch *rsChan, n int) {
	n = min(n, len(ch.late))
	if n == 0 {
		return
	}
	r.logf("late notifications of %s arrive: %d of %d, from %s", ch.name, n, len(ch.late), ch.id(ch.late[0].x))
	for _, l := range ch.late[:n] {
		if err := r.rdb.SPublish(context.Background(), r.ks.Notify(ch.name), l.payload).Err(); err != nil {
			r.fail("publish late: %v", err)
			return
		}
		r.hubTold(ch, l.x)
	}
	ch.late = ch.late[n:]
	r.syncHub(ch)
}

// rsPaused is a replay held in the hook.
type rsPaused struct {
	c     *rsClient
	sub   *rsSub
	ch    *rsChan
	read  int  // which of its reads (1-based)
	after bool // held after that read, else before it
	// decidesLater: the read that decides its reply (recovered,
	// position) is made after the hold.
	decidesLater bool
	sentUpTo     int // index of the last id its replay sent before the hold; -2: none (held at its first read)
	point        *pausePoint
	gapSeen      bool
	trimmedBy    bool
	// atEnd: held before the read after a full batch that reached the
	// stream's end, which the hub had delivered.
	atEnd bool
}

func (r *rsRound) logf(format string, args ...any) {
	r.trace = append(r.trace, fmt.Sprintf("%3d: ", r.step)+fmt.Sprintf(format, args...))
}

func (r *rsRound) fail(format string, args ...any) {
	r.failed = true
	r.t.Errorf("round %d step %d: %s", r.n, r.step, fmt.Sprintf(format, args...))
}

func (r *rsRound) run() bool {
	defer func() {
		if r.paused != nil {
			r.paused.point.release()
		}
		for _, c := range r.clients {
			c.ws.Close()
			<-c.done
		}
		for _, ch := range r.chans {
			r.e.s.hub.release(ch.cs)
			ch.lateSub.Close()
		}
	}()
	for _, name := range []string{"a", "b"} {
		name = fmt.Sprintf("r%d-%s", r.n, name)
		// Held by the test for the round, so that the channel stays the
		// same chanState whoever subscribes or is closed.
		cs, err := r.e.s.hub.acquire(r.t.Context(), name)
		if err != nil {
			r.fail("acquire %s: %v", name, err)
			return false
		}
		ps := r.rdb.SSubscribe(r.t.Context(), r.ks.Notify(name)+"-late")
		if _, err := ps.Receive(r.t.Context()); err != nil {
			r.fail("subscribe %s-late: %v", name, err)
			return false
		}
		r.chans = append(r.chans, &rsChan{name: name, key: r.ks.Stream(name), cs: cs, hub: -1, lateSub: ps})
	}
	steps := 15 + r.rng.IntN(30)
	for r.step = 1; r.step <= steps && !r.failed; r.step++ {
		r.randomStep()
	}
	if r.failed {
		return false
	}
	r.step++
	if r.paused != nil {
		r.release()
	}
	return !r.failed && r.finish()
}

func (r *rsRound) randomStep() {
	// Where the connections closed so far stopped: ids clients hold.
	for _, c := range r.clients {
		if code, held := c.snapshot(); code != 0 && !c.noted {
			c.noted = true
			for ch, id := range held {
				r.chanNamed(ch).heldIDs = append(r.chanNamed(ch).heldIDs, id)
			}
		}
	}
	ch := r.chans[r.rng.IntN(len(r.chans))]
	if p := r.paused; p != nil && p.atEnd && r.rng.IntN(2) == 0 {
		// Held at the end of the stream: what follows is published (the
		// hub delivers it to the replay's buffer), then trimmed past
		// where the replay is.
		if len(p.ch.ids)-1 == p.sentUpTo {
			r.noLoss = true
			r.appendMessages(p.ch)
			r.noLoss = false
		} else {
			r.trimPast(p.ch, p.sentUpTo)
		}
		return
	}
	if p := r.paused; p != nil && r.rng.IntN(10) < 7 {
		// Most steps while a replay is held make its channel's stream
		// move under it: trimmed to it or past it, messages whose
		// notifications are lost, and one that shows the hub the gap.
		x := r.rng.IntN(20)
		if p.sentUpTo >= 0 && x >= 13 && x < 16 {
			x = 0 // held between batches: trimmed past more often
		}
		switch {
		case len(p.ch.late) > 0 && r.rng.IntN(5) == 0:
			r.releaseLate(p.ch, 1+r.rng.IntN(len(p.ch.late)))
		case x < 7:
			r.trim(p.ch)
		case x < 13:
			r.appendMessages(p.ch)
		case x < 17:
			r.makeGap(p.ch)
		default:
			r.release()
		}
		return
	}
	switch x := r.rng.IntN(100); {
	case len(ch.late) > 0 && x < 8:
		r.releaseLate(ch, 1+r.rng.IntN(len(ch.late)))
	case len(ch.late) > 0 && ch.late[len(ch.late)-1].x > ch.hub && x < 30:
		// A client that got a message from another instance (one whose
		// notification is late here) resumes from it, the stream trimmed
		// past it: awaitLive's case.
		i := ch.late[r.rng.IntN(len(ch.late))].x
		if i <= ch.hub {
			i = ch.late[len(ch.late)-1].x
		}
		r.trimPast(ch, i)
		r.afterID = ch.id(i)
		r.subscribe(ch, true)
		r.afterID = ""
	case x < 5:
		r.makeGap(ch)
	case x < 30:
		r.appendMessages(ch)
	case x < 42:
		r.trim(ch)
	case x < 52:
		r.subscribe(ch, false)
	case x < 60 && r.paused == nil && len(ch.ids) > replayBatch:
		// A replay of a full batch up to the end, held before the read
		// after it while the stream moves on (stream.Resume's read
		// from the batch's end; conn.resume's live case).
		r.batchBehind = true
		r.subscribe(ch, true)
		r.batchBehind = false
	case x < 80:
		r.subscribe(ch, true)
	default:
		if r.paused != nil {
			r.release()
		} else {
			r.appendMessages(ch)
		}
	}
}

// appendMessages appends a burst to ch, each message's notification lost
// or not, and waits for the hub to have read those it was told of.
func (r *rsRound) appendMessages(ch *rsChan) {
	n := 1 + r.rng.IntN(4)
	if r.rng.IntN(4) == 0 {
		n = 90 + r.rng.IntN(40)
	}
	lostAll := r.rng.IntN(3) == 0
	if p := r.paused; p != nil && p.ch == ch && r.rng.IntN(2) == 0 {
		lostAll = true // for a gap the hub finds while the replay is held
	}
	mixed := !lostAll && r.rng.IntN(4) == 0
	// Late: held back until a later step (releaseLate), after the
	// notifications still held; the others of a burst arrive or are
	// lost as above, after them.
	late := r.rng.IntN(4) == 0
	if r.noLoss {
		lostAll, mixed, late = false, false, false
	}
	var limit int64
	if r.rng.IntN(6) == 0 {
		limit = int64(1 + r.rng.IntN(150)) // as the ingress trims: MAXLEN ~ on each append
	}
	as := make([]stream.Append, n)
	lost := make([]bool, n)
	held := 0
	if late {
		held = 1 + r.rng.IntN(n)
	}
	for i := range as {
		lost[i] = lostAll || mixed && r.rng.IntN(2) == 0
		notify := r.ks.Notify(ch.name)
		switch {
		case i < held:
			notify += "-late"
			lost[i] = true // not told now
		case lost[i]:
			notify += "-lost"
		}
		as[i] = stream.Append{Stream: ch.key, Notify: notify, Limits: stream.Limits{MaxLen: limit},
			Msg: stream.Message{Channel: ch.name, TS: time.Now().UnixMilli(), Data: []byte("1")}}
	}
	r.logf("append %d to %s (late %d; lost: all %v, mixed %v; maxlen ~%d)", n, ch.name, held, lostAll, mixed, limit)
	if limit > 0 {
		// The trims of a burst and the hub's reads would race: one at a
		// time, so that the model knows what each read found.
		for i := range as {
			r.appendOne(ch, as[i:i+1], lost[i:i+1])
		}
		return
	}
	r.appendOne(ch, as, lost)
}

func (r *rsRound) appendOne(ch *rsChan, as []stream.Append, lost []bool) {
	ids, err := r.store.Append(context.Background(), as)
	if err != nil {
		r.fail("append: %v", err)
		return
	}
	first := len(ch.ids)
	ch.ids = append(ch.ids, ids...)
	for i := range ids {
		ch.delivered = append(ch.delivered, -1)
		if strings.HasSuffix(as[i].Notify, "-late") {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			m, err := ch.lateSub.ReceiveMessage(ctx)
			cancel()
			if err != nil {
				r.fail("late notification of %s: %v", ids[i], err)
				return
			}
			ch.late = append(ch.late, rsLate{x: first + i, payload: m.Payload})
		}
	}
	r.readLen(ch)
	// The hub, told of each message that was not lost, in order.
	for i := range ids {
		if !lost[i] {
			r.hubTold(ch, first+i)
		}
	}
	r.syncHub(ch)
}

// makeGap appends messages whose notifications are lost, trims the
// stream past some of them, and appends one the hub is told of: it finds
// the gap.
func (r *rsRound) makeGap(ch *rsChan) {
	n := 1 + r.rng.IntN(4)
	as := make([]stream.Append, n)
	for i := range as {
		as[i] = stream.Append{Stream: ch.key, Notify: r.ks.Notify(ch.name) + "-lost",
			Msg: stream.Message{Channel: ch.name, TS: time.Now().UnixMilli(), Data: []byte("1")}}
	}
	r.logf("gap in %s: append %d lost", ch.name, n)
	lost := make([]bool, n)
	for i := range lost {
		lost[i] = true
	}
	r.appendOne(ch, as, lost)
	keep := int64(r.rng.IntN(n))
	r.logf("gap in %s: trim to %d", ch.name, keep)
	if err := r.rdb.XTrimMaxLen(context.Background(), ch.key, keep).Err(); err != nil {
		r.fail("trim: %v", err)
		return
	}
	r.readLen(ch)
	r.logf("gap in %s: append 1", ch.name)
	r.appendOne(ch, []stream.Append{{Stream: ch.key, Notify: r.ks.Notify(ch.name),
		Msg: stream.Message{Channel: ch.name, TS: time.Now().UnixMilli(), Data: []byte("1")}}}, []bool{false})
}

// hubTold is the model of the hub receiving the notification of ids[x]
// (onMessage): delivered at once if it follows the last it delivered,
// else after reading the stream from there (catchUp), where a break in
// the chain is a gap.
func (r *rsRound) hubTold(ch *rsChan, x int) {
	if ch.hub >= x {
		return
	}
	if ch.hub == x-1 {
		ch.delivered[x] = r.step
		ch.hub = x
		return
	}
	from := ch.hub + 1
	if ch.trimmed > ch.hub+1 { // the chain from the hub's last id is broken
		r.gaps++
		r.stats.gaps++
		through := ch.trimmed - 1
		r.logf("  the hub finds a gap in %s after %s through %s", ch.name, ch.id(ch.hub), ch.id(through))
		ch.heldIDs = append(ch.heldIDs, ch.id(ch.hub))
		if p := r.paused; p != nil && p.ch == ch {
			p.gapSeen = true
		}
		from = ch.trimmed
		ch.hub = through
	}
	for i := from; i <= x; i++ {
		ch.delivered[i] = r.step
		ch.hub = i
	}
}

// readLen updates ch.trimmed from the stream's length.
func (r *rsRound) readLen(ch *rsChan) {
	n, err := r.rdb.XLen(context.Background(), ch.key).Result()
	if err != nil {
		r.fail("xlen: %v", err)
		return
	}
	ch.trimmed = len(ch.ids) - int(n)
	if p := r.paused; p != nil && p.ch == ch && p.sentUpTo >= 0 && ch.trimmed > p.sentUpTo+1 && !p.trimmedBy {
		p.trimmedBy = true
		r.logf("  the paused replay is trimmed past (%d trimmed, it sent up to %d)", ch.trimmed, p.sentUpTo)
	}
}

// syncHub waits until the hub's position is the model's.
func (r *rsRound) syncHub(ch *rsChan) {
	want := ch.id(ch.hub)
	deadline := time.Now().Add(5 * time.Second)
	for {
		ch.cs.mu.Lock()
		got := ch.cs.last.String()
		ch.cs.mu.Unlock()
		if got == want && r.e.s.hub.gaps.Load() == r.gaps {
			return
		}
		if time.Now().After(deadline) {
			r.fail("%s: the hub is at %s (%d gaps), the model expects %s (%d gaps)", ch.name, got, r.e.s.hub.gaps.Load(), want, r.gaps)
			return
		}
		time.Sleep(100 * time.Microsecond)
	}
}

// trimPast trims ch's stream exactly, past ids[i] by one or two entries.
func (r *rsRound) trimPast(ch *rsChan, i int) {
	keep := int64(max(0, len(ch.ids)-(i+1)-1-r.rng.IntN(2)))
	r.logf("trim %s to %d, past %d", ch.name, keep, i)
	if err := r.rdb.XTrimMaxLen(context.Background(), ch.key, keep).Err(); err != nil {
		r.fail("trim: %v", err)
		return
	}
	r.readLen(ch)
}

// trim trims ch's stream, exactly or as Redis likes (~).
func (r *rsRound) trim(ch *rsChan) {
	left := len(ch.ids) - ch.trimmed
	if left == 0 {
		return
	}
	keep := int64(r.rng.IntN(left))
	if p := r.paused; p != nil && p.ch == ch && r.rng.IntN(3) > 0 {
		// To what the paused replay sent, or a little past it; else to
		// the hub's position or past it (a gap, once the hub is told).
		to := p.sentUpTo
		if to < 0 || r.rng.IntN(4) == 0 {
			to = ch.hub
		}
		keep = int64(max(0, min(left, len(ch.ids)-(to+1)-r.rng.IntN(3))))
	}
	approx := r.rng.IntN(3) == 0
	r.logf("trim %s to %d (~ %v)", ch.name, keep, approx)
	var err error
	if approx {
		err = r.rdb.XTrimMaxLenApprox(context.Background(), ch.key, keep, 0).Err()
	} else {
		err = r.rdb.XTrimMaxLen(context.Background(), ch.key, keep).Err()
	}
	if err != nil {
		r.fail("trim: %v", err)
		return
	}
	r.readLen(ch)
}

// pickAfter picks an id a client could hold.
func (r *rsRound) pickAfter(ch *rsChan) string {
	n := len(ch.ids)
	if n == 0 {
		return stream.Zero.String()
	}
	switch r.rng.IntN(9) {
	case 0:
		return stream.Zero.String()
	case 1:
		return ch.id(n - 1) // the stream's last id
	case 2:
		return ch.id(ch.trimmed - 1) // the last one trimmed (0-0 when none is)
	case 3:
		return ch.id(max(-1, n-1-replayBatch)) // a full batch behind the end
	case 4:
		return ch.id(max(-1, n-1-replayBatch-r.rng.IntN(5)))
	case 5:
		if len(ch.heldIDs) > 0 { // from before a gap, or where a client was closed
			return ch.heldIDs[r.rng.IntN(len(ch.heldIDs))]
		}
		fallthrough
	case 6:
		if ch.hub >= 0 { // the hub's position, or near it
			return ch.id(max(-1, ch.hub-r.rng.IntN(3)))
		}
		fallthrough
	default:
		return ch.id(r.rng.IntN(n+1) - 1)
	}
}

// subscribe subscribes a client (a new one, or one open and not yet on
// ch) to ch, live or resuming; a resume may be paused at one of its
// replay's reads.
func (r *rsRound) subscribe(ch *rsChan, resume bool) {
	var c *rsClient
	if r.rng.IntN(3) == 0 {
		for _, x := range r.clients {
			if x.open() && x.sub(ch.name) == nil && (r.paused == nil || r.paused.c != x) {
				c = x
				break
			}
		}
	}
	if c == nil {
		c = r.dial()
		if c == nil {
			return
		}
	}
	s := &rsSub{channel: ch.name, step: r.step, live: ch.hub}
	req := map[string]any{"type": "subscribe", "channel": ch.name}
	var point *pausePoint
	var paused *rsPaused
	if resume {
		s.after = r.pickAfter(ch)
		if r.batchBehind {
			s.after = ch.id(len(ch.ids) - 1 - replayBatch)
		}
		if r.afterID != "" {
			s.after = r.afterID
		}
		req["after"] = s.after
		a := ch.index(s.after)
		// What its first read will find, and so the batches after.
		if a+1 < ch.trimmed {
			a = ch.trimmed - 1
		}
		full := (len(ch.ids) - 1 - a) / replayBatch // the reads after the first one
		if r.paused == nil && (r.batchBehind || r.afterID == "" && r.rng.IntN(2) == 0 || r.rng.IntN(4) == 0) && r.noReplayOn(ch) {
			read := 1 + r.rng.IntN(full+1)
			if full > 0 && (r.batchBehind || r.rng.IntN(2) == 0) {
				read = 2 // between a full batch and the read after it
			}
			after := !r.batchBehind && r.rng.IntN(2) == 0
			// Read 1 starts at `after`; each later one at the last id
			// of the batch before, which is what the replay sent when
			// held there.
			start, sent := s.after, -2
			if read > 1 {
				sent = a + replayBatch*(read-1)
				start = ch.id(sent)
			}
			point = &pausePoint{key: ch.key, start: start, after: after, reached: make(chan struct{}), released: make(chan struct{})}
			paused = &rsPaused{c: c, sub: s, ch: ch, read: read, after: after, sentUpTo: sent, point: point,
				atEnd: read > 1 && !after && sent == len(ch.ids)-1 && ch.hub == sent}
			// Held after a first XRANGE that finds nothing at or after
			// `after`, Resume's answer comes from the read it makes
			// next (with the stream's last id), after the hold.
			paused.decidesLater = read == 1 && (!after || max(ch.index(s.after), ch.trimmed) >= len(ch.ids))
			r.pause.arm(point)
		}
		if paused == nil || !paused.decidesLater {
			r.expectReply(ch, s)
		}
	} else {
		s.expectPos = ch.id(ch.hub)
		s.expectSet = true
	}
	c.addSub(s)
	r.logf("client %d subscribes %s after %q (paused at %v)", c.n, ch.name, s.after, paused)
	if err := c.ws.WriteJSON(req); err != nil {
		// Closed meanwhile (the client answered a close the reader
		// has not reported yet): not subscribed.
		r.logf("  client %d: %v", c.n, err)
		c.mu.Lock()
		c.subs = c.subs[:len(c.subs)-1]
		c.mu.Unlock()
		if paused != nil {
			r.pause.arm(nil)
		}
		return
	}
	if resume {
		r.stats.resumes++
	} else {
		r.stats.live++
	}
	if paused != nil {
		select {
		case <-point.reached:
		case <-c.done:
			// Closed (for another channel's gap) before it read the
			// subscribe.
			r.pause.arm(nil)
			r.logf("  client %d closed", c.n)
			return
		case <-time.After(5 * time.Second):
			r.pause.arm(nil)
			r.fail("client %d: the replay never reached its read %d (start %s)", c.n, paused.read, point.start)
			return
		}
		r.stats.paused++
		r.paused = paused
		return
	}
	if resume && len(ch.late) > 0 && ch.awaitsLive(s.after) && r.rng.IntN(4) > 0 {
		// The resume waits for the hub: the notifications held back
		// arrive meanwhile, some or all of them.
		for deadline := time.Now().Add(5 * time.Second); !ch.armed(); time.Sleep(100 * time.Microsecond) {
			if !c.open() {
				r.logf("  client %d closed", c.n)
				return
			}
			if time.Now().After(deadline) {
				r.fail("client %d: its resume of %s after %s never waited for the hub", c.n, ch.name, s.after)
				return
			}
		}
		r.stats.awaited++
		r.releaseLate(ch, 1+r.rng.IntN(len(ch.late)))
		r.expectLive(ch, s)
	}
	r.waitReply(c, s)
}

// noReplayOn waits until no connection replays ch (at most a second),
// so that the XRANGE the pause holds is the next replay's: a replay
// still running could read from the same id. It reports whether none
// does.
func (r *rsRound) noReplayOn(ch *rsChan) bool {
	deadline := time.Now().Add(time.Second)
	for {
		ch.cs.mu.Lock()
		n := len(ch.cs.resuming)
		ch.cs.mu.Unlock()
		if n == 0 {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(100 * time.Microsecond)
	}
}

// expectReply sets what a resume's first read, made now, will answer.
func (r *rsRound) expectReply(ch *rsChan, s *rsSub) {
	a := ch.index(s.after)
	rec := a+1 >= ch.trimmed
	s.expectRec = &rec
	s.expectPos = s.after
	if !rec {
		s.expectPos = ch.id(ch.trimmed - 1)
	}
	s.expectSet = true
}

// expectLive amends what expectReply set for a resume whose stream read
// was not continuous: recovered after all, at `after`, if the hub was
// behind `after` when the resume began and has delivered it since
// (awaitLive: its notifications were late). Called when the resume
// decides.
func (r *rsRound) expectLive(ch *rsChan, s *rsSub) {
	a := ch.index(s.after)
	if !s.expectSet || *s.expectRec || a < 0 || a >= len(ch.ids) || a <= s.live || ch.delivered[a] < 0 {
		return
	}
	rec := true
	s.expectRec, s.expectPos = &rec, s.after
	r.stats.recoveredLive++
}

// awaitsLive reports whether a resume of ch from after, made now, waits
// for the hub (awaitLive): its stream read is not continuous, and the
// hub is behind `after`.
func (ch *rsChan) awaitsLive(after string) bool {
	a := ch.index(after)
	return a >= 0 && a < len(ch.ids) && a+1 < ch.trimmed && a > ch.hub
}

// armed reports whether a connection replaying ch waits in awaitLive.
func (ch *rsChan) armed() bool {
	ch.cs.mu.Lock()
	defer ch.cs.mu.Unlock()
	for _, x := range ch.cs.resuming {
		if x.arrived != nil {
			return true
		}
	}
	return false
}

func (r *rsRound) waitReply(c *rsClient, s *rsSub) {
	if !c.wait(5*time.Second, func() bool { return s.replied || c.code != 0 }) {
		r.fail("client %d: no subscribed reply for %s", c.n, s.channel)
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	// Closed before it (for another channel's gap): checked at the end.
	if s.replied && s.recovered != nil && !*s.recovered {
		r.stats.notRecovered++
	}
}

// release lets the paused replay go on, and waits for its reply if it
// had not been sent.
func (r *rsRound) release() {
	p := r.paused
	r.paused = nil
	r.logf("release client %d (gap meanwhile %v, trimmed past %v)", p.c.n, p.gapSeen, p.trimmedBy)
	if p.gapSeen {
		r.stats.gapWhilePaused++
	}
	if p.trimmedBy {
		r.stats.trimmedWhilePaused++
	}
	if p.sentUpTo >= 0 {
		// Let the client read what the replay sent, so that where it
		// stops, if closed, is where the replay was.
		want := p.ch.ids[p.sentUpTo]
		p.c.wait(5*time.Second, func() bool { return slices.Contains(p.sub.got, want) || p.c.code != 0 })
	}
	if p.decidesLater {
		r.expectReply(p.ch, p.sub) // the read that decides is made now
	}
	if p.read == 1 {
		r.expectLive(p.ch, p.sub) // the hub may have delivered `after` meanwhile
	}
	p.point.release()
	p.sub.pausedAcross = p.gapSeen || p.trimmedBy
	if p.read == 1 {
		r.waitReply(p.c, p.sub)
	}
}

// finish publishes a last message on each channel, which the hub is told
// of (and so finds any gap left), waits for every open connection to
// have it, resumes each connection closed from the last id it got, and
// checks them all.
func (r *rsRound) finish() bool {
	for _, ch := range r.chans {
		r.logf("flush %s", ch.name)
		r.appendOne(ch, []stream.Append{{Stream: ch.key, Notify: r.ks.Notify(ch.name),
			Msg: stream.Message{Channel: ch.name, TS: time.Now().UnixMilli(), Data: []byte("1")}}}, []bool{false})
	}
	if r.failed {
		return false
	}
	r.waitAll(r.clients)
	var again []*rsClient
	for _, c := range slices.Clone(r.clients) {
		r.check(c)
		code, held := c.snapshot()
		if code != protocol.CloseInternal {
			continue
		}
		// Resumed from what it got: told whether it missed something.
		for name, id := range held {
			ch := r.chanNamed(name)
			n := r.dial()
			if n == nil {
				return false
			}
			ns := &rsSub{channel: ch.name, step: r.step, after: id}
			r.expectReply(ch, ns)
			n.addSub(ns)
			r.logf("client %d resumes %s after %s, where client %d was closed", n.n, ch.name, ns.after, c.n)
			if err := n.ws.WriteJSON(map[string]any{"type": "subscribe", "channel": ch.name, "after": ns.after}); err != nil {
				r.fail("send: %v", err)
				return false
			}
			r.stats.resumes++
			r.waitReply(n, ns)
			again = append(again, n)
		}
	}
	r.waitAll(again)
	for _, c := range again {
		r.check(c)
	}
	return !r.failed
}

func (r *rsRound) chanNamed(name string) *rsChan {
	for _, ch := range r.chans {
		if ch.name == name {
			return ch
		}
	}
	return nil
}

// waitAll waits until each of cs is closed or has every id of its
// channels.
func (r *rsRound) waitAll(cs []*rsClient) {
	for _, c := range cs {
		c.wait(5*time.Second, func() bool {
			if c.code != 0 {
				return true
			}
			for _, s := range c.subs {
				ch := r.chanNamed(s.channel)
				if s.held() != ch.ids[len(ch.ids)-1] {
					return false
				}
			}
			return true
		})
	}
}

// check checks what c received against the model.
func (r *rsRound) check(c *rsClient) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.strays) > 0 {
		r.fail("client %d: messages for channels it had no subscribed reply for: %v", c.n, c.strays)
	}
	if c.code != 0 && c.code != protocol.CloseInternal {
		r.fail("client %d: closed with %d (%s)", c.n, c.code, c.reason)
	}
	justified := false
	for _, s := range c.subs {
		ch := r.chanNamed(s.channel)
		// Closed for a reason if a message after the last it got was
		// trimmed without reaching it live.
		for i := ch.index(s.held()) + 1; i < ch.trimmed; i++ {
			if ch.delivered[i] <= s.step {
				justified = true
			}
		}
		if !s.replied {
			if c.code == 0 {
				r.fail("client %d: no subscribed reply for %s", c.n, s.channel)
			}
			continue
		}
		if s.expectSet && (s.position != s.expectPos || fmt.Sprint(deref(s.recovered)) != fmt.Sprint(deref(s.expectRec))) {
			r.fail("client %d, %s after %q: recovered %v, position %s; want %v, %s",
				c.n, s.channel, s.after, deref(s.recovered), s.position, deref(s.expectRec), s.expectPos)
		}
		from := ch.index(s.position) + 1
		if from > len(ch.ids) {
			r.fail("client %d, %s: position %s is no id of the channel", c.n, s.channel, s.position)
			continue
		}
		want := ch.ids[from:]
		if c.code != 0 {
			want = want[:min(len(want), len(s.got))]
		}
		if !slices.Equal(s.got, want) {
			r.fail("client %d, %s after %q (recovered %v, position %s, close %d): got %s\nwant %s",
				c.n, s.channel, s.after, deref(s.recovered), s.position, c.code, idRange(ch, s.got), idRange(ch, want))
		}
		if c.code == 0 && s.pausedAcross {
			r.stats.keptAcross++
		}
		if c.code != 0 {
			ch.heldIDs = append(ch.heldIDs, s.held())
		}
	}
	if c.code == protocol.CloseInternal {
		r.stats.closed++
		if !justified {
			for _, s := range c.subs {
				ch := r.chanNamed(s.channel)
				r.t.Logf("client %d, %s after %q (step %d, position %s): got %s; trimmed %d of %d; delivered at steps %v",
					c.n, s.channel, s.after, s.step, s.position, idRange(ch, s.got), ch.trimmed, len(ch.ids), ch.delivered)
			}
			r.fail("client %d: closed with 1011 (%s) though every message it lacked reached it live or is still in the stream", c.n, c.reason)
		}
	}
}

func deref(b *bool) any {
	if b == nil {
		return nil
	}
	return *b
}

// idRange shows ids as their indexes in ch, runs joined: [3..9 12].
func idRange(ch *rsChan, ids []string) string {
	var parts []string
	for i := 0; i < len(ids); {
		a := slices.Index(ch.ids, ids[i])
		j := i + 1
		for a >= 0 && j < len(ids) && slices.Index(ch.ids, ids[j]) == a+(j-i) {
			j++
		}
		switch {
		case a < 0:
			parts = append(parts, ids[i])
		case j-i == 1:
			parts = append(parts, fmt.Sprint(a))
		default:
			parts = append(parts, fmt.Sprintf("%d..%d", a, a+j-i-1))
		}
		i = j
	}
	return "[" + strings.Join(parts, " ") + "]"
}

// dial opens a client and waits for its welcome.
func (r *rsRound) dial() *rsClient {
	ws, _, err := r.e.dial(r.t, nil, nil)
	if err != nil {
		r.fail("dial: %v", err)
		return nil
	}
	c := &rsClient{n: len(r.clients) + 1, ws: ws, done: make(chan struct{}), changed: make(chan struct{})}
	r.clients = append(r.clients, c)
	go c.read()
	if !c.wait(5*time.Second, func() bool { return c.welcomed || c.code != 0 }) || !c.welcomed {
		r.fail("client %d: no welcome (close %d)", c.n, c.code)
		return nil
	}
	return c
}

// rsClient is one WebSocket connection and what it received.
type rsClient struct {
	n     int
	ws    *websocket.Conn
	done  chan struct{}
	noted bool // its held ids were noted after it closed (test goroutine)

	mu       sync.Mutex
	changed  chan struct{} // closed and replaced on each frame
	welcomed bool
	subs     []*rsSub
	strays   []string
	code     int // close code; -1: ended without one
	reason   string
}

// rsSub is one subscription of a client and what came for it.
type rsSub struct {
	channel string
	after   string // "" for a live subscribe
	step    int    // the step it subscribed at
	// expected reply, when known
	expectSet bool
	expectRec *bool
	expectPos string
	// live: the index of the hub's last id when it subscribed (the
	// resumer's live; -1: 0-0).
	live int
	// pausedAcross: its replay was held while a gap or a trim passed it.
	pausedAcross bool

	replied   bool
	recovered *bool
	position  string
	got       []string
}

// held is the last id the subscription got, or its position.
func (s *rsSub) held() string {
	if len(s.got) > 0 {
		return s.got[len(s.got)-1]
	}
	if s.replied {
		return s.position
	}
	return s.after
}

func (c *rsClient) sub(channel string) *rsSub {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, s := range c.subs {
		if s.channel == channel {
			return s
		}
	}
	return nil
}

// snapshot returns c's close code and, by channel, the last id it got
// (or its position).
func (c *rsClient) snapshot() (int, map[string]string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	held := make(map[string]string, len(c.subs))
	for _, s := range c.subs {
		if s.replied || s.after != "" { // a live subscribe not answered holds nothing
			held[s.channel] = s.held()
		}
	}
	return c.code, held
}

func (c *rsClient) addSub(s *rsSub) {
	c.mu.Lock()
	c.subs = append(c.subs, s)
	c.mu.Unlock()
}

func (c *rsClient) open() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.code == 0
}

// wait waits until cond, called with c.mu held, is true; false on
// timeout.
func (c *rsClient) wait(within time.Duration, cond func() bool) bool {
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

func (c *rsClient) read() {
	defer close(c.done)
	for {
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
			Type, Channel, ID, Position string
			Recovered                   *bool
		}
		_ = json.Unmarshal(b, &f)
		var s *rsSub
		for _, x := range c.subs {
			if x.channel == f.Channel {
				s = x
			}
		}
		switch f.Type {
		case "welcome":
			c.welcomed = true
		case "subscribed":
			if s != nil {
				s.replied, s.recovered, s.position = true, f.Recovered, f.Position
			}
		case "message":
			if s == nil || !s.replied {
				c.strays = append(c.strays, f.Channel+"/"+f.ID)
			} else {
				s.got = append(s.got, f.ID)
			}
		}
		close(c.changed)
		c.changed = make(chan struct{})
		c.mu.Unlock()
	}
}

// replayPause is a go-redis hook that holds one replay's XRANGE (a
// connection's: the hub's reads have a deadline, REDIS_TIMEOUT's) at the
// point armed.
type replayPause struct {
	mu    sync.Mutex
	point *pausePoint
}

// pausedEgress starts an egress (anonymous, SEND_QUEUE 16, then env) on a
// Redis client of its own, whose replay reads pause can hold.
func pausedEgress(t *testing.T, env map[string]string) (*secEgress, redis.UniversalClient, keys.Scheme, *replayPause) {
	rdb, prefix := redistest.Client(t)
	pause := &replayPause{}
	rdb.AddHook(pause)
	vars := map[string]string{"ALLOW_ANONYMOUS": "true", "SEND_QUEUE": "16"}
	maps.Copy(vars, env)
	return startEgressOn(t, rdb, prefix, vars), rdb, keys.Scheme{Prefix: prefix}, pause
}

// pausePoint is an XRANGE of key from start to hold, before or after it
// runs, until released.
type pausePoint struct {
	key, start string
	after      bool
	reached    chan struct{}
	released   chan struct{}
	once       sync.Once
}

func (p *pausePoint) release() { p.once.Do(func() { close(p.released) }) }

// await waits, 5 s at most, until the replay is held at p; failure says
// why it was not (fatal).
func (p *pausePoint) await(t *testing.T, failure string) {
	t.Helper()
	select {
	case <-p.reached:
	case <-time.After(5 * time.Second):
		t.Fatal(failure)
	}
}

func (h *replayPause) arm(p *pausePoint) {
	h.mu.Lock()
	h.point = p
	h.mu.Unlock()
}

func (h *replayPause) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h *replayPause) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

func (h *replayPause) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		var p *pausePoint
		if a := cmd.Args(); strings.EqualFold(cmd.Name(), "xrange") && len(a) > 2 {
			if _, bounded := ctx.Deadline(); !bounded {
				h.mu.Lock()
				if h.point != nil && a[1] == h.point.key && a[2] == h.point.start {
					p, h.point = h.point, nil
				}
				h.mu.Unlock()
			}
		}
		if p != nil && !p.after {
			close(p.reached)
			<-p.released
		}
		err := next(ctx, cmd)
		if p != nil && p.after {
			close(p.reached)
			<-p.released
		}
		return err
	}
}
