package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/logging"
	"github.com/wsrelay/wsrelay/shared/protocol"
	"github.com/wsrelay/wsrelay/shared/redisconn"
	"github.com/wsrelay/wsrelay/shared/stream"
)

// replayBatch bounds every stream read (resume and catch-up).
const replayBatch = 100

// linger is how long the instance stays subscribed to a channel nobody
// local listens to any more, so that churn does not become Redis churn.
const linger = 10 * time.Second

// chanState is one channel (or the instance inbox) this instance reads.
//
// The receive loop is the only writer of confirmed and last, and closes
// ready; while the channel is stalled, the goroutine retrying its read
// takes the loop's place for last (see stall). subs and resuming are
// guarded by mu, which the fan-out holds while it enqueues (and while it
// advances last), so that a subscriber added under mu gets exactly the
// messages fanned out after it, and reads the id of the last one it does
// not get.
type chanState struct {
	name   string // channel name; empty for the inbox
	stream string // stream key
	notify string // shard channel

	ready     chan struct{} // closed once the Redis subscription is live
	confirmed bool          // receive loop only
	last      stream.ID     // newest id delivered; written by the receive loop (under mu once ready)
	// stalled (receive loop only): a read of the stream failed and a
	// goroutine of its own retries it (stall); the loop leaves the
	// channel to it until it reports back, and notes in missed that it
	// set a notification or confirmation aside meanwhile.
	stalled, missed bool
	// notified (receive loop only) is the id of the last notification
	// received for the channel. Notifications arrive in the order of
	// their appends (one script, one Pub/Sub connection at a time), so
	// one at or below it means the stream went back: Redis lost its
	// last writes with the connection up (onMessage).
	notified stream.ID
	// caught (receive loop only) tells that a read of the stream (the
	// first position, a catch-up) took last past notified, and that no
	// notification came since. The next one, if at or below last, is as
	// a rule a late notification of an entry the read delivered, but
	// may be a new entry of a stream that went back to an older copy of
	// its data, its lost writes known here only from the read (their
	// notifications lost with a Pub/Sub connection): its id is then
	// above notified and its predecessor an entry delivered, and only
	// the stream's position tells (onMessage). The notifications after
	// it arrive in the order of their appends: a routine late one
	// follows the one before it up to last, a new one is not above it.
	caught bool
	// floor, when not zero, is the last id delivered before the stream
	// started again at 0-0 (restarted), until the next delivery: the
	// subscribers hold it as their position. Guarded by mu.
	floor stream.ID

	mu       sync.Mutex
	subs     map[*conn]stream.ID // value: skip messages up to this id (0: none)
	resuming map[*conn]*resumer
	refs     int       // guarded by hub.mu
	idleAt   time.Time // guarded by hub.mu: when refs dropped to 0
	// endStall, guarded by hub.mu, ends the goroutine retrying the
	// channel's read (stall) when sweepIdle drops the channel; nil until
	// a read of it first stalled, which only a channel Redis confirmed
	// does (so sweepIdle may drop it before its position is read).
	endStall context.CancelFunc
}

// resumer buffers live messages for a connection while it replays.
// buf and the fields below it are guarded by the channel's mu.
type resumer struct {
	// live is the last id the channel delivered when the replay began:
	// every message after it reaches buf (or the connection, once
	// live), unless a gap takes it (below) or a catch-up drops it
	// (dropped), so that the replay needs the stream only up to live.
	// Set by startResume, never changed after.
	live stream.ID

	// buf holds the messages delivered since the replay began (since
	// dropped, when set), at most the hub's maxBuf. overflow: a live
	// message found it full of live messages, published faster than the
	// client replays (finishResume closes the connection 4002).
	buf      []*queued
	overflow bool
	// dropped, when not zero, is the last id of the messages a catch-up
	// found buf full for: it emptied buf instead of overflowing it
	// (deliver), since each of its messages is in the stream, and the
	// replay reads them from there at the client's pace (finishResume
	// sends it back to the stream while it has not read that far). A
	// live message that finds buf full does the same while buf holds
	// messages a catch-up put there (caught, the last of them, is not
	// older than buf's first): only live messages overflow it.
	dropped, caught stream.ID
	// gap, when not zero, is the last id of the messages a gap took
	// while the connection replayed (closeMissingLocked), which buf
	// lacks: finishResume closes the connection unless its replay read
	// that far. Guarded by the channel's mu.
	gap stream.ID
	// awaited, while arrived is not nil, is the position of a resume
	// whose stream read was not continuous while the hub was behind it
	// (awaitLive): the hub closes arrived once it delivers that id or
	// passes it, and sets hasAwaited if it was delivered into buf.
	// Guarded by the channel's mu.
	awaited    stream.ID
	arrived    chan struct{}
	hasAwaited bool
}

// sawLocked notes that the hub delivered id (into buf when kept) or
// passed past it, for awaitLive. cs.mu is held.
func (r *resumer) sawLocked(id stream.ID, kept bool) {
	if r.arrived == nil || id.Less(r.awaited) {
		return
	}
	r.hasAwaited = kept && id == r.awaited
	close(r.arrived)
	r.arrived = nil
}

// hub owns this instance's Redis subscriptions and fans messages out.
type hub struct {
	log      *slog.Logger
	rdb      redis.UniversalClient
	keys     keys.Scheme
	store    *stream.Store
	instance string
	maxBuf   int

	mu         sync.Mutex
	chans      map[string]*chanState // by notify key
	inbox      *chanState
	conns      map[string]*conn              // by connection id
	users      map[string]map[*conn]struct{} // by user
	sub        *subscriber                   // set by run before its first use; see pubsub.go
	psMu       sync.Mutex                    // guards sub; taken under mu (acquire), never the other way
	lastRecv   atomic.Int64                  // the last probe seen by the receive loop, on the monotonic clock (mono; readSilence)
	reconnects atomic.Int64
	// redisErrors counts failed Redis commands and pipelines (redisHook)
	// and failed Pub/Sub subscribes, which go-redis runs outside its
	// hooks (metrics).
	redisErrors atomic.Int64
	// readFail logs the failing stream reads and subscribes of the read
	// path once per outage, not once per retry.
	readFail *logging.Episode
	// loginRefused logs, once while it lasts and at error level, Redis
	// refusing the egress's login (redisconn.LoginRefused) wherever it
	// is seen: the Pub/Sub connections, the probe, registry writes,
	// stream reads. Every retry gets the same answer until an operator
	// fixes REDIS_URL or the user. Only a login Redis accepts ends it
	// (redisconn.AddLoginHook): Redis goes on serving the connections,
	// Pub/Sub ones included, logged in before.
	loginRefused *logging.Episode
	// stalling counts the goroutines of stall still retrying: when the
	// last of them gives up (its channel dropped), readFail is ended as
	// given up, since no read is left whose success would end it.
	stalling atomic.Int64
	// badNotify logs the notifications this egress cannot parse.
	badNotify *logging.Episode
	// badRoute logs the inbox entries whose route this egress does not
	// know (another release's, or a renamed field), which reach nobody.
	badRoute *logging.Episode
	// undecodable logs the stream entries read back (catch-up, resume)
	// and the notifications whose frame no client could read
	// (Entry.Sendable, Notification.Sendable), which are skipped.
	undecodable *logging.Episode
	// gaps counts breaks found in a stream's chain while catching up:
	// messages trimmed or expired before this instance delivered them
	// (metrics).
	gaps atomic.Int64
	// undelivered counts targeted messages for a connection or user this
	// instance no longer holds (it closed or moved after the ingress read
	// the registry), for one it is closing, and those a server close
	// dropped from a connection's queue: answered 202, delivered nowhere
	// (metrics).
	undelivered atomic.Int64
	// refreshDue asks the maintenance loop for a registry refresh now:
	// set when Redis confirms a subscription again (its connection came
	// back), since a Redis that restarted empty, or that was out of reach
	// for longer than REGISTRY_TTL, no longer holds this instance's
	// records, and sends to its connections would find nobody until the
	// next scheduled refresh.
	refreshDue atomic.Bool
	// readLag, when set, observes publish-to-receipt time of each
	// message delivered, got from its notification or read by a
	// catch-up: how far the read path runs behind (metrics).
	readLag func(seconds float64)
	// recovered carries a stalled channel back to the receive loop once
	// its read succeeded (stall).
	recovered chan recovery
	// readTimeout, when positive, bounds each stream read of the hub
	// (2×REDIS_TIMEOUT): go-redis bounds each try by REDIS_TIMEOUT, but a
	// cluster client sends a timed-out read again, up to MaxRedirects
	// times, to a node that stopped answering, while the receive loop
	// waits for its first try (see stall).
	readTimeout time.Duration
	// stalls are the goroutines retrying stalled reads: run waits for
	// them before it returns, so that none of them reads Redis or
	// delivers after the receive loop has ended.
	stalls sync.WaitGroup
	// lateWait is how long a resume waits for late notifications
	// (awaitLive): lateNotice. Set before the hub serves connections,
	// never changed after; tests that are not about that wait shorten
	// it, so that each resume whose notifications they lost does not
	// take a second.
	lateWait time.Duration
	// replayReads bounds the replays' stream reads in flight (readHistory)
	// to half the Redis pool, so that in a reconnect storm they leave the
	// other half to the handshakes' registry writes (bounded by
	// REDIS_TIMEOUT, pool wait included: 1013 when it runs out) and to the
	// receive loop's reads. Nil: unbounded (tests that build a hub).
	replayReads chan struct{}
	// reads holds the replays' stream reads still waiting for their turn
	// (readHistory), by stream and position: a replay from the same
	// position of the same channel joins one instead of making its own.
	// Guarded by readsMu; created on first use.
	readsMu sync.Mutex
	reads   map[readKey]*sharedRead
	// pacing is what the receive loop's catch-ups may still wait for
	// room in their subscribers' queues, all of them together
	// (waitBudget). Receive loop only, but for its counters and log.
	pacing waitBudget
}

// recovery is a stalled channel's read done: for a channel not yet
// confirmed, its position.
type recovery struct {
	cs       *chanState
	position stream.ID
}

func newHub(log *slog.Logger, rdb redis.UniversalClient, ks keys.Scheme, instance string, maxBuf int) *hub {
	h := &hub{
		log:       log,
		rdb:       rdb,
		keys:      ks,
		store:     stream.NewStore(rdb),
		instance:  instance,
		maxBuf:    maxBuf,
		chans:     make(map[string]*chanState),
		conns:     make(map[string]*conn),
		users:     make(map[string]map[*conn]struct{}),
		recovered: make(chan recovery),
		lateWait:  lateNotice,
	}
	h.replayReads = make(chan struct{}, max(1, poolSize(rdb)/2))
	h.readFail = &logging.Episode{Log: log, Msg: "redis read path failing", Back: "redis reads back",
		Then: "the channels' messages wait in their streams and are read once Redis answers (retried with backoff up to 1s, nothing is lost unless the history is trimmed meanwhile); logged again every 30s while it lasts and once when reads succeed again, or are given up because nobody here listens to those channels any more",
		Gone: "redis reads abandoned"}
	h.loginRefused = &logging.Episode{Log: log, Msg: "redis refused the login", Back: "redis accepts the login again", Error: true,
		Then: "the user or password the functions log in with (REDIS_URL's, or REDIS_CLUSTER_USERNAME and REDIS_CLUSTER_PASSWORD) is wrong or missing, or that ACL user does not exist or is disabled (err: WRONGPASS for a wrong password or user, NOAUTH or unauthenticated for none): until an operator fixes the setting or the user (docs/deployment.md, TLS and ACL users), /readyz answers 503, new sockets are closed with 1013 and the channels' messages wait in their streams (the Pub/Sub connection retries with backoff up to 1s); logged again every 30s while it lasts and once when Redis accepts the login again"}
	h.badNotify = &logging.Episode{Log: log, Msg: "unreadable notifications", Back: "notifications readable again",
		Then: "each is taken as news that its channel's stream grew, which is read from Redis at once (another release's notification format during a rolling upgrade, or something else published on the channel); logged again every 30s while it lasts"}
	h.badRoute = &logging.Episode{Log: log, Msg: "targeted messages with an unknown route", Back: "targeted messages routable again",
		Then: "each is dropped" + counted(" and counted in wsrelay_egress_targeted_undelivered_total") + ": an ingress of another release writes routes this one does not know (docs/deployment.md, Upgrading), or something else writes to the instance's inbox stream; logged again every 30s while it lasts"}
	h.undecodable = &logging.Episode{Log: log, Msg: "undecodable stream entries", Back: "stream entries decodable again",
		Then: "entries read from a stream (a resume, a catch-up) and notifications that are no message frame a client could read are skipped, and their messages lost to the clients here: another release's format (docs/deployment.md, Upgrading), or another application writing under REDIS_KEY_PREFIX or publishing on its channels; logged again every 30s while they come"}
	h.pacing.spent = &logging.Episode{Log: log, Msg: "catch-ups delivering without waiting: wait budget spent", Back: "catch-ups paced again",
		Then: "the channels' backlogs read from their streams (after lost notifications or a Redis reconnect) are delivered as live messages are, without waiting for subscribers whose queues are half full to read: a client that such a backlog longer than SEND_QUEUE reaches is closed 4002 however fast it reads" + counted(" (wsrelay_egress_slow_consumer_closes_total)") + " and resumes from its last id, losing nothing; the waits for clients that stopped reading, in each of many channels, spent the budget;" + counted(" counted in wsrelay_egress_catchup_waits_over_budget_total;") + " logged again every 30s while it lasts and once when the catch-ups are over"}
	h.inbox = &chanState{stream: ks.Inbox(instance), notify: ks.InboxNotify(instance), ready: make(chan struct{}), refs: 1}
	h.chans[h.inbox.notify] = h.inbox
	return h
}

// start subscribes the inbox and runs the receive loop until ctx is done.
func (h *hub) run(ctx context.Context) {
	sub := newSubscriber(h.log, h.rdb, h.loginRefused)
	h.psMu.Lock()
	h.sub = sub
	h.psMu.Unlock()
	defer h.stalls.Wait() // they end with ctx
	defer sub.Close()
	// Errors are retried inside the subscriber (the inbox stays wanted).
	_ = sub.Subscribe(ctx, h.inbox.notify)
	// Channels a socket wanted before the subscriber existed (acquire
	// found none: a connection in the instant between the listener
	// opening and this loop starting, as an SCF instance started by that
	// connection can see). Read after h.sub is set, so that a channel
	// acquired later finds the subscriber itself; Subscribe ignores one
	// already wanted.
	h.mu.Lock()
	early := make([]string, 0, len(h.chans))
	for notify := range h.chans {
		early = append(early, notify)
	}
	h.mu.Unlock()
	for _, notify := range early {
		_ = sub.Subscribe(ctx, notify)
	}
	for {
		select {
		case <-ctx.Done():
			return
		case ev := <-sub.Events():
			if ev.confirmed {
				h.onConfirmed(ctx, ev.channel)
			} else {
				h.onMessage(ctx, ev.channel, ev.payload)
			}
		case r := <-h.recovered:
			h.onRecovered(ctx, r)
		}
	}
}

// liveSub returns the subscriber, or nil before run started.
func (h *hub) liveSub() *subscriber {
	h.psMu.Lock()
	defer h.psMu.Unlock()
	return h.sub
}

// resubscribe replaces the Pub/Sub connection the probes go through (the
// inbox's node's; on a single Redis the only one): used when probes show
// the read path is dead although the connection looks open. The
// subscriber keeps the set of wanted channels; it resolves the node of
// each one that was on it again.
func (h *hub) resubscribe(ctx context.Context) {
	if sub := h.liveSub(); sub != nil {
		sub.Reconnect(ctx, h.inbox.notify)
	}
	h.reconnects.Add(1)
}

func (h *hub) state(notify string) *chanState {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.chans[notify]
}

// onConfirmed runs when Redis confirms a subscription: the first time,
// the channel's position is read and waiting subscribers are released;
// after a reconnect, everything published meanwhile is read from the
// stream and delivered.
func (h *hub) onConfirmed(ctx context.Context, notify string) {
	cs := h.state(notify)
	if cs == nil {
		return
	}
	if cs.stalled {
		// Confirmed again (the connection came back): a reconnect like
		// below, whose catch-up waits for the stall to end.
		h.reconnects.Add(1)
		h.refreshDue.Store(true)
		cs.missed = true
		return
	}
	if !cs.confirmed {
		// The subscription is live: read the stream's position. If that
		// fails it is retried (stall): nothing else would confirm the
		// channel again while the Pub/Sub connection stays up.
		if last, ok := h.position(ctx, cs); ok {
			h.confirm(cs, last)
		}
		return
	}
	h.reconnects.Add(1)
	h.refreshDue.Store(true)
	h.catchUp(ctx, cs, stream.Max)
}

// confirm makes cs live at position last and releases the subscribers
// waiting for it. Receive loop only.
func (h *hub) confirm(cs *chanState, last stream.ID) {
	cs.last = last
	cs.caught = cs.notified.Less(last)
	cs.confirmed = true
	close(cs.ready)
}

// catchUp delivers every stream entry after cs.last up to and including
// upto, in bounded batches. It reports whether it got there. A read that
// fails stalls the channel (false): giving up would let the next
// delivery move cs.last past the gap, and the gap would be lost for every
// subscriber here without any of them knowing. Entries that are gone from
// the stream (trimmed or expired while the notifications were lost) break
// its chain: see gap.
func (h *hub) catchUp(ctx context.Context, cs *chanState, upto stream.ID) bool {
	err := h.readUpTo(ctx, cs, upto, &h.pacing)
	h.pacing.spent.OK() // its waits are over (a stall's are not budgeted)
	cs.caught = cs.notified.Less(cs.last)
	if err != nil {
		h.stall(ctx, cs, "catch up from stream", err)
		return false
	}
	h.readFail.OK()
	return true
}

// readUpTo is catchUp's reading and delivering, which stops at the first
// read that fails (what it delivered before stays delivered). It paces
// its deliveries by the subscribers' queues (pacer), within budget when
// it runs on the receive loop (nil: in a goroutine of its own, stall).
func (h *hub) readUpTo(ctx context.Context, cs *chanState, upto stream.ID, budget *waitBudget) error {
	p := pacer{budget: budget, stream: cs.stream}
	for {
		rctx, cancel := h.bounded(ctx)
		b, err := h.store.Resume(rctx, cs.stream, cs.last, replayBatch)
		cancel()
		if err != nil {
			return err
		}
		switch {
		case b.Continuous:
		case b.From.IsZero():
			h.restarted(cs, stream.Zero)
		default:
			h.gap(cs, b.From)
		}
		for i := range b.Entries {
			id := stream.MustParseID(b.Entries[i].ID)
			if upto.Less(id) {
				return nil
			}
			if !h.sendable(cs, &b.Entries[i]) {
				h.pass(cs, id)
				continue
			}
			p.full = p.full[:0]
			h.observeReadLag(b.Entries[i].TS)
			h.deliver(cs, id, b.Entries[i].Route, entryFrame(&b.Entries[i]), b.Entries[i].TS, &p.full)
			p.wait(ctx)
		}
		if len(b.Entries) < replayBatch {
			return nil
		}
	}
}

// catchUpWait bounds each wait of a catch-up for room in its
// subscribers' queues (pacer).
const catchUpWait = 250 * time.Millisecond

// The receive loop's catch-ups wait, all of them together, at most
// waitBurst at once and a waitShare-th of the time beyond (catchUpWait a
// second): see waitBudget.
const (
	waitBurst = 2 * catchUpWait
	waitShare = 4
)

// pacer paces a catch-up by its subscribers' queues. The live path
// delivers each message as its notification arrives, no faster than it
// was published; a catch-up delivers a backlog from the stream as fast
// as Redis answers, hundreds of messages in a few milliseconds, which
// would overflow the queue (SEND_QUEUE) of a client reading as fast as
// it can and close it 4002. So after a message that left queues at
// least half full, the catch-up waits, as a replay does (waitRoom), for
// their writers to take them; but for catchUpWait at most, and on the
// receive loop within its budget. A connection still without room then
// is a slow consumer, which the next messages close 4002 as before: no
// catch-up, of this channel or another, waits for it again until its
// writer has taken its queue (conn.giveUpPacing), so that a reader that
// stopped holds up the receive loop once, not once per channel it is
// subscribed to. A connection replaying a resume of the channel is not
// waited for: its replay takes the catch-up's messages from the stream
// when its buffer of live messages has no room for them (deliver,
// resumer.dropped).
// A catch-up's own; the zero value waits with no budget.
type pacer struct {
	full   []*conn     // queues the last delivery left at least half full
	budget *waitBudget // nil: off the receive loop, catchUpWait per wait
	stream string      // the stream it reads, for the budget's log
}

// wait waits until p.full's queues have room, for catchUpWait at most,
// or for what the budget allows (not at all when it is spent: the
// catch-up then delivers as the live path does); it gives up on those
// still without room then.
func (p *pacer) wait(ctx context.Context) {
	var start, deadline time.Time
	for {
		waiting := p.full[:0]
		for _, c := range p.full {
			if c.backlogged() {
				waiting = append(waiting, c)
			}
		}
		p.full = waiting
		if len(waiting) == 0 {
			p.charge(start, paceGrace)
			return
		}
		now := time.Now()
		if start.IsZero() {
			limit := catchUpWait
			if p.budget != nil {
				limit = p.budget.allow(now)
			}
			if limit <= 0 {
				p.budget.over(p.stream)
				return
			}
			start, deadline = now, now.Add(limit)
		} else if now.After(deadline) {
			for _, c := range waiting {
				c.giveUpPacing()
			}
			if p.budget != nil {
				p.budget.gaveUp.Add(int64(len(waiting)))
				if deadline.Sub(start) < catchUpWait {
					p.budget.over(p.stream)
				}
			}
			p.charge(start, 0)
			return
		}
		select {
		case <-ctx.Done():
			p.charge(start, 0)
			return
		case <-time.After(time.Millisecond): // the writers take their queues within it
		}
	}
}

// paceGrace is the part of a catch-up wait that ends with room (its
// readers took their queues) that the budget does not charge: a reader
// that takes its queue as soon as its writer runs costs nothing, even on
// a machine so loaded that the writer runs milliseconds late. A wait
// that gives up is charged whole: the grace never lets waits for readers
// that do not read go on unbudgeted.
const paceGrace = 10 * time.Millisecond

// charge takes the wait that began at start, if one did, less grace, from
// p's budget.
func (p *pacer) charge(start time.Time, grace time.Duration) {
	if p.budget != nil && !start.IsZero() {
		p.budget.spend(time.Since(start), grace)
	}
}

// waitBudget bounds how long the receive loop's catch-ups hold it, all
// of them together, waiting for room in their subscribers' queues
// (pacer). Every channel catches up on the loop, one after the other,
// after a Pub/Sub reconnect, and no channel gets live deliveries
// meanwhile: with a reader that stopped in each of hundreds of channels
// (stalled mobile clients), catchUpWait per channel would hold the loop
// for minutes; its notifications pile up unread meanwhile, in Redis once
// the subscriber's buffer is full, until Redis cuts the Pub/Sub
// connection (client-output-buffer-limit pubsub), which makes every
// channel catch up again. It is a bucket of waiting
// time that holds waitBurst at most (full at first) and fills by a
// waitShare-th of the time that passes; a wait may last what it holds,
// catchUpWait at most, and takes what it lasted from it. When it is
// empty, catch-ups deliver without waiting, as the live path does: a
// client that reads as fast as it can but that a backlog longer than
// SEND_QUEUE reaches then is closed 4002 and resumes, losing nothing.
// Such waits, skipped or cut short, are logged and counted (over), for
// the operator who sees those closes.
// A reader that takes its queue as fast as it can costs none of it: the
// first paceGrace of a wait that ends with room is not charged.
//
// left and at are the receive loop's; the counters are read by anyone.
type waitBudget struct {
	left time.Duration // below zero after a wait that ran a poll past its deadline
	at   time.Time     // when left was brought up to date; zero: never, full
	// waited is how long (ns) the catch-ups waited in all, grace
	// included (for tests); gaveUp, how many times they gave up on a
	// connection without room; overBudget, how many of their waits the
	// budget skipped, or cut short of catchUpWait and they gave up
	// (metrics).
	waited, gaveUp, overBudget atomic.Int64
	// spent logs the waits over budget, once while they go on, and ends
	// when the catch-ups that had them are over (hub.catchUp): an
	// operator seeing 4002 closes then can tell readers that a backlog
	// reached while the catch-ups could not wait from slow consumers.
	spent *logging.Episode
}

// allow brings the bucket up to now and returns how long a wait that
// starts then may last.
func (b *waitBudget) allow(now time.Time) time.Duration {
	if b.at.IsZero() {
		b.left = waitBurst
	} else {
		b.left = min(waitBurst, b.left+now.Sub(b.at)/waitShare)
	}
	b.at = now
	return min(catchUpWait, b.left)
}

// over counts a wait of a catch-up reading stream that the bucket did
// not allow catchUpWait and that ended without room: skipped, or given
// up sooner than a slow consumer would have been. It leaves the
// connections waited for to be delivered to as the live path does.
func (b *waitBudget) over(stream string) {
	b.overBudget.Add(1)
	b.spent.Fail(errWaitBudget, "stream", stream)
}

// errWaitBudget is the error of the spent episode.
var errWaitBudget = fmt.Errorf("the catch-ups have waited for room in their subscribers' queues all that their budget allows (%v at once, then %v a second)",
	waitBurst, time.Second/waitShare)

// spend takes a wait of d, less grace, from the bucket.
func (b *waitBudget) spend(d, grace time.Duration) {
	b.left -= max(0, d-grace)
	b.waited.Add(int64(d))
}

// sendable reports whether e, read from cs's stream, is a frame a client
// can read (stream.Entry.Sendable), and logs the episode of those that
// are not. onMessage checks a notification's frame the same way.
func (h *hub) sendable(cs *chanState, e *stream.Entry) bool {
	if !e.Sendable() {
		h.undecodable.Fail(errUndecodable, "stream", cs.stream, "id", e.ID)
		return false
	}
	h.undecodable.OK()
	return true
}

// errUndecodable is the error of the undecodable episode.
var errUndecodable = errors.New("a stream entry or notification is no message frame this release can send")

// pass moves cs past an entry it skips (not sendable), as a delivery
// would: the next notification names it as its predecessor. A targeted
// one counts as undelivered.
func (h *hub) pass(cs *chanState, id stream.ID) {
	if cs == h.inbox {
		h.undelivered.Add(1)
		cs.last = id
		return
	}
	cs.mu.Lock()
	cs.last = id
	cs.mu.Unlock()
}

// bounded is ctx with the hub's readTimeout, if it has one.
func (h *hub) bounded(ctx context.Context) (context.Context, context.CancelFunc) {
	if h.readTimeout <= 0 {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, h.readTimeout)
}

// lastID reads cs's stream position, within readTimeout.
func (h *hub) lastID(ctx context.Context, cs *chanState) (stream.ID, error) {
	ctx, cancel := h.bounded(ctx)
	defer cancel()
	return h.store.LastID(ctx, cs.stream)
}

// position reads cs's stream position on the receive loop: a read that
// fails stalls the channel (ok false), to be retried there.
func (h *hub) position(ctx context.Context, cs *chanState) (pos stream.ID, ok bool) {
	pos, err := h.lastID(ctx, cs)
	if err != nil {
		h.stall(ctx, cs, "read stream position", err)
		return pos, false
	}
	h.readFail.OK()
	return pos, true
}

// stall hands a read of cs that failed (what, err) over to a goroutine of
// its own, which retries it, waiting 50 ms doubling to 1 s between tries
// (logged once per outage: readFail; redisHook counts them), and reads on
// to the stream's end before it hands the channel back (onRecovered).
// Meanwhile the receive loop leaves cs alone and goes on with the other
// channels: a stream that cannot be read (its cluster node down, a key
// overwritten with another type) holds up only its own channel. Its
// messages wait in the stream. The retries end with ctx, or when
// sweepIdle drops cs (nobody here listens to it any more): a stream that
// stays unreadable is not read for the rest of the instance's life; when
// no other read is retried then, the outage's episode ends as given up
// (readFail.Abandon), since no success is left to end it. A channel
// subscribed again later is a new cs, read afresh; what the goroutine of
// the old one still reports is ignored (onRecovered). Receive loop only.
func (h *hub) stall(ctx context.Context, cs *chanState, what string, err error) {
	position := !cs.confirmed
	cs.stalled = true
	sctx, cancel := context.WithCancel(ctx)
	h.mu.Lock()
	live := h.chans[cs.notify] == cs
	if live {
		cs.endStall = cancel
	}
	h.mu.Unlock()
	if !live {
		cancel() // dropped meanwhile: nobody here reads it
		return
	}
	h.stalling.Add(1)
	h.stalls.Go(func() {
		defer cancel()
		r := recovery{cs: cs}
		for wait := 50 * time.Millisecond; ; wait = min(2*wait, time.Second) {
			h.readFailed(err, "op", what, "stream", cs.stream, "retry_in", wait.String())
			select {
			case <-sctx.Done():
				h.giveUp(ctx)
				return
			case <-time.After(wait):
			}
			if position {
				r.position, err = h.lastID(sctx, cs)
			} else {
				err = h.readUpTo(sctx, cs, stream.Max, nil)
			}
			if err == nil {
				break
			}
			if sctx.Err() != nil {
				h.giveUp(ctx) // ended while reading: not a failure of the read path
				return
			}
		}
		h.stalling.Add(-1)
		h.readFail.OK()
		select {
		case h.recovered <- r:
		case <-sctx.Done():
		}
	})
}

// readFailed records a failure of the read path: in loginRefused when
// Redis refused the login, else in readFail.
func (h *hub) readFailed(err error, attrs ...any) {
	if !loginFailed(h.loginRefused, err, attrs...) {
		h.readFail.Fail(err, attrs...)
	}
}

// loginFailed records err in login, the episode of Redis refusing the
// egress's login (hub.loginRefused), and reports true, when err is such
// a refusal (redisconn.LoginRefused); otherwise it reports false and the
// caller records err as a failure of its own kind. The read path, the
// Pub/Sub connections, the probe and the registry writes all ask it, so
// that a refused login is told apart, and logged, the same way wherever
// it is met. A nil login (a subscriber without one) records nothing.
func loginFailed(login *logging.Episode, err error, attrs ...any) bool {
	if login == nil || !redisconn.LoginRefused(err) {
		return false
	}
	login.Fail(err, attrs...)
	return true
}

// giveUp ends a goroutine of stall that stopped retrying its channel's
// read before it succeeded: sweepIdle dropped the channel, or the hub is
// stopping (ctx done). When it was the last read retried, the read path's
// episode ends here: no success is left to end it.
func (h *hub) giveUp(ctx context.Context) {
	if h.stalling.Add(-1) == 0 && ctx.Err() == nil {
		h.readFail.Abandon("then", "the channels whose reads failed have no subscriber here any more; each is read afresh if subscribed again")
	}
}

// onRecovered takes back a channel whose stalled read succeeded, and
// catches up on what was published since, if the loop set a notification
// aside meanwhile. A report about a cs that was dropped meanwhile (its
// goroutine read just before sweepIdle ended it) is ignored, also when
// the channel was subscribed again since: that is another cs, with its
// own first read.
func (h *hub) onRecovered(ctx context.Context, r recovery) {
	cs := r.cs
	if h.state(cs.notify) != cs {
		return
	}
	cs.stalled = false
	cs.caught = cs.notified.Less(cs.last) // the stalled read moved last
	if !cs.confirmed {
		h.confirm(cs, r.position)
	}
	if cs.missed {
		cs.missed = false
		h.catchUp(ctx, cs, stream.Max)
	}
}

// restarted handles a chain that starts again at from (0-0, or an older
// id than the ones delivered: see checkStartedBelow): the stream and its
// last-id key were both gone, after a silence of twice their TTL (nothing
// was published: any append would have renewed the key) or after Redis
// lost its data. The first is routine for quiet channels and inboxes, and
// closing every subscriber for it would be a false alarm; the second is
// the limit design.md accepts. The entries that follow are delivered.
//
// Its first entry normally has a greater id than the last one delivered
// (the ids are Redis's clock). When it does not (a Redis that restarted
// empty with a clock behind the one before), the subscribers here, which
// hold the old ids as their positions, would drop the new messages as
// already seen until the clock passes them, without a word: the first
// delivery checks that (floor) and, if so, closes them with 1011 instead,
// so that each resumes and is told recovered:false with a position the
// stream goes on from.
func (h *hub) restarted(cs *chanState, from stream.ID) {
	h.log.Info("stream starts again", "stream", cs.stream, "after", cs.last.String(), "from", from.String())
	cs.mu.Lock()
	if cs != h.inbox && cs.floor.Less(cs.last) {
		cs.floor = cs.last
	}
	cs.last = from
	cs.mu.Unlock()
}

// checkStartedBelow is told of an entry whose predecessor is from, with
// an id below the last one delivered, that is the first entry of a chain
// (from is 0-0), follows a notification with a greater id, or is the
// first notification after a read that went past them (caught). As a
// rule it is a late notification of an entry a catch-up delivered (the
// second kind only when notifications came over two connections, as
// across a resharding): the stream's position (LastID) is then at or past
// cs.last, and nothing is done. Reading the stream from cs.last instead
// could find a gap that the notifications still on their way would fill
// (the hub behind the stream's end while it was trimmed).
//
// But Redis may have lost its data with the connection up (FLUSHALL, an
// eviction of the stream and its last-id key) while its clock was behind
// the ids it had given (stepped back while the stream went on at its
// last id): the stream was created anew, its chain starting again at
// 0-0 below the ids delivered. No reconnect catches up then, and every
// notification until Redis's clock passes cs.last would be dropped as
// delivered, without a word. A stream's position goes back only when it
// lost data, so a position below cs.last tells that case: the chain
// started again (restarted), and the stream is read from 0-0. Its
// entries are all new (the first of them had no predecessor): the
// channel's subscribers are closed with 1011 at the first of them
// (floor, as after a Redis that restarted empty with its clock behind)
// and resume, told recovered:false; the inbox's targeted messages are
// delivered. So it is when Redis went back to an older copy of its data
// with the connection up (a full resync from a replica that lacked the
// last writes, then promoted: REPLICAOF keeps clients connected) while
// its clock was behind the ids lost: the stream goes on from an older
// entry (from), below the ids delivered; it is read from there, the
// entries after from being the new ones. The first new notification is
// above the one before it when the lost writes reached the hub only
// through a catch-up (their notifications lost with a Pub/Sub
// connection): caught tells that case. A read of the position that
// fails stalls the channel, whose retries read the stream from cs.last
// (a chain broken there is a gap). Receive loop only.
func (h *hub) checkStartedBelow(ctx context.Context, cs *chanState, from stream.ID) {
	pos, ok := h.position(ctx, cs)
	if !ok || !pos.Less(cs.last) {
		return
	}
	h.restarted(cs, from)
	h.catchUp(ctx, cs, stream.Max)
}

// gap handles messages after cs.last that are gone from the stream before
// this instance delivered them. A subscriber here that lacks them cannot
// get them, and delivering past them would hide the loss: it is closed
// with 1011 instead, resumes, and is told recovered:false. The channel
// goes on from `from`, the position the stream goes on from, so that a
// subscriber joining now is given a position it can resume from.
// Targeted messages (the inbox) are not resumable: the loss is logged and
// counted.
//
// When `from` is past cs.last it is the last id missing (Resume: the
// predecessor of the oldest entry left, or the stream's last id when none
// is), and a subscriber whose replay from the stream already reached it
// (its skip id is at or past `from`: it resumed here while the
// notifications were lost) lacks nothing; it is left open, and gets the
// messages after its skip id as usual. Every other subscriber is closed.
// A connection still replaying, whose position is not known until its
// replay ends, is judged then the same way (finishResume). A `from` not
// past cs.last (a stream behind the ids delivered, or a chain Resume
// could not read) closes them all, replaying or not.
func (h *hub) gap(cs *chanState, from stream.ID) {
	h.gaps.Add(1)
	if cs == h.inbox {
		h.log.Warn("targeted messages lost", "stream", cs.stream, "after", cs.last.String(), "resumes_at", from.String())
		cs.last = from
		return
	}
	cs.mu.Lock()
	replaying, closed, kept := cs.closeMissingLocked(cs.last, from, gapReason)
	h.log.Warn("stream gap", "channel", cs.name, "after", cs.last.String(), "resumes_at", from.String(), "replaying", replaying, "closed", closed, "kept", kept)
	cs.last = from
	cs.mu.Unlock()
}

// gapReason is the close reason of a connection that lacks messages a
// gap took.
const gapReason = "messages were trimmed before delivery: resume"

// closeMissingLocked closes with 1011 and reason the channel's
// subscribers here that may lack a message after `after` up to and
// including `through`, and returns how many connections still replaying
// it left for finishResume to judge, how many subscribers it closed and
// how many it kept: only subscribers whose skip id is at or past
// `through` are kept, and only when `through` is past `after` (otherwise
// it closes them all, replaying or not, as closeAllLocked). cs.mu is
// held.
func (cs *chanState) closeMissingLocked(after, through stream.ID, reason string) (replaying, closed, kept int) {
	if !after.Less(through) {
		return 0, cs.closeAllLocked(reason), 0
	}
	for c, skip := range cs.subs {
		if !skip.Less(through) {
			kept++
			continue
		}
		c.closeWith(protocol.CloseInternal, reason, true)
		closed++
	}
	for _, r := range cs.resuming {
		if r.gap.Less(through) {
			r.gap = through
		}
		r.sawLocked(through, false)
		replaying++
	}
	return replaying, closed, kept
}

// closeAllLocked closes the channel's subscribers and resumers here with
// 1011 and reason, and returns how many; they resume and are told
// recovered:false. cs.mu is held.
func (cs *chanState) closeAllLocked(reason string) int {
	n := len(cs.subs) + len(cs.resuming)
	for c := range cs.subs {
		c.closeWith(protocol.CloseInternal, reason, true)
	}
	for c := range cs.resuming {
		c.closeWith(protocol.CloseInternal, reason, true)
	}
	return n
}

func (h *hub) onMessage(ctx context.Context, notify, payload string) {
	cs := h.state(notify)
	if cs == nil {
		return
	}
	n, err := stream.ParseNotification(payload)
	if err != nil {
		// Not a notification this release can read: another release's
		// format during a rolling upgrade, or anything else published on
		// the channel. It still says the stream grew, and what was
		// appended is there: read it now rather than when the next
		// message shows the gap.
		h.badNotify.Fail(err, "channel", cs.name, "stream", cs.stream)
		switch {
		case cs.stalled:
			cs.missed = true
		case cs.confirmed:
			h.catchUp(ctx, cs, stream.Max)
		}
		return
	}
	h.badNotify.OK()
	if n.Route.Kind() == stream.RouteProbe {
		h.lastRecv.Store(monoNow())
		return
	}
	back := !cs.notified.Less(n.ID)
	cs.notified = n.ID
	if cs.stalled {
		cs.missed = true // in the stream: read once the channel is back
		return
	}
	if !cs.confirmed {
		return
	}
	caught := cs.caught
	cs.caught = false
	if !cs.last.Less(n.ID) {
		// Already delivered by a catch-up; unless it is the first entry
		// of a chain (predecessor 0-0) that started again below the ids
		// delivered, or comes after a notification with a greater id or
		// is the first after a read that went past the notifications
		// (the stream went back to an older chain: Redis resynced from
		// a replica that lacked the last writes, with the connection
		// up), which only the stream's position tells.
		if back || caught || n.Prev.IsZero() && n.ID != cs.last {
			h.checkStartedBelow(ctx, cs, n.Prev)
		}
		return
	}
	if n.Prev != cs.last {
		// A notification was lost (Redis reconnect): fill the gap from
		// the stream, this message included.
		if !h.catchUp(ctx, cs, n.ID) || !cs.last.Less(n.ID) {
			return // shutting down, or delivered from the stream
		}
	}
	if !n.Sendable() {
		// No frame a client could read, as a catch-up would find the
		// entry (sendable): skipped, and passed when it follows the
		// position, so that the next notification names it and the
		// chain goes on without a read. One that does not follow it
		// even after the catch-up (published by hand, say, its id not
		// in the stream) leaves the position alone: passing an id the
		// stream does not hold would break the chain, or hide what is
		// appended up to it.
		h.undecodable.Fail(errUndecodable, "stream", cs.stream, "id", n.IDStr)
		if n.Prev == cs.last {
			h.pass(cs, n.ID)
		}
		return
	}
	h.undecodable.OK()
	h.observeReadLag(n.TS)
	h.deliver(cs, n.ID, n.Route, textFrame(n.Frame), n.TS, nil)
}

// observeReadLag records, when metrics are kept, how long after its
// publish time (ts, unix ms) this instance got a message it delivers:
// from its notification, or from the stream in a catch-up (lost
// notifications, a Redis reconnect), each message once.
func (h *hub) observeReadLag(ts int64) {
	if h.readLag != nil && ts > 0 {
		h.readLag(float64(time.Now().UnixMilli()-ts) / 1000)
	}
}

// deliver fans one message out: frame is its WebSocket frame, built once
// (textFrame, entryFrame), and each subscriber's queue gets a pointer to
// it. A catch-up passes backlog, to which it appends the connections
// whose queue it left at least half full, to wait on (pacer); the live
// path passes nil, and allocates nothing per subscriber.
func (h *hub) deliver(cs *chanState, id stream.ID, route stream.Route, frame []byte, ts int64, backlog *[]*conn) {
	q := &queued{frame: frame, id: id, ts: ts, targeted: cs == h.inbox}
	if cs != h.inbox {
		cs.mu.Lock()
		if !cs.floor.IsZero() {
			if !cs.floor.Less(id) {
				h.gaps.Add(1)
				n := cs.closeAllLocked("the stream started again below your position: resume")
				h.log.Warn("stream starts again below the ids delivered", "channel", cs.name, "delivered", cs.floor.String(), "id", id.String(), "closed", n)
			}
			cs.floor = stream.Zero
		}
		// Written under mu so that a subscriber joining reads the id of
		// the last message it will not get (its resume point).
		cs.last = id
		for c, skip := range cs.subs {
			if skip.Less(id) && c.enqueue(q) && backlog != nil {
				*backlog = append(*backlog, c)
			}
		}
		for _, r := range cs.resuming {
			if len(r.buf) >= h.maxBuf {
				if !r.overflow && (backlog != nil || !r.caught.Less(r.buf[0].id)) {
					// A catch-up delivers far faster than a client reads,
					// and its pacer waits for no replay: what it delivers
					// is in the stream, which the replay reads on instead.
					// So is what it left in the buffer, which a few live
					// messages then fill: they are no sign of a slow
					// client either.
					clear(r.buf)
					r.buf, r.dropped = r.buf[:0], id
				} else {
					r.overflow = true
				}
				r.sawLocked(id, false)
				continue
			}
			r.buf = append(r.buf, q)
			if backlog != nil {
				r.caught = id
			}
			r.sawLocked(id, true)
		}
		cs.mu.Unlock()
		return
	}
	cs.last = id
	switch route.Kind() {
	case stream.RouteConnection:
		h.mu.Lock()
		c := h.conns[route.Target()]
		h.mu.Unlock()
		if c == nil {
			h.undelivered.Add(1)
			break
		}
		// A connection the server is closing (a disconnect, its
		// lifetime, a drain) is held until its client answers the
		// close, though its record went as the close began (unlist):
		// what the ingress routed to it before that and reaches it
		// meanwhile is not delivered, and counted so. Held before it
		// is offered: its writer may let go of it at once.
		q.holders.Add(1)
		queued, backlogged := c.offer(q)
		if !queued {
			q.holders.Add(-1)
			h.undelivered.Add(1)
		}
		if backlogged && backlog != nil {
			*backlog = append(*backlog, c)
		}
	case stream.RouteUser:
		h.mu.Lock()
		var targets []*conn
		for c := range h.users[route.Target()] {
			targets = append(targets, c)
		}
		h.mu.Unlock()
		// One message, however many of the user's queues take it: it is
		// counted undelivered once, when none does, or when each that
		// did dropped it unwritten (queued.letGo). The loop holds it
		// too, so that a connection dropping it before the next is
		// offered it does not count it lost.
		q.holders.Add(1)
		delivered := false
		for _, c := range targets {
			q.holders.Add(1)
			queued, backlogged := c.offer(q)
			if !queued {
				q.holders.Add(-1)
			}
			delivered = delivered || queued
			if backlogged && backlog != nil {
				*backlog = append(*backlog, c)
			}
		}
		if q.letGo(false, false) || !delivered {
			h.undelivered.Add(1)
		}
	case stream.RouteDisconnect:
		h.mu.Lock()
		c := h.conns[route.Target()]
		h.mu.Unlock()
		if c != nil {
			// Here, not in a goroutine of its own: closeWith does not
			// wait for the socket (the writer sends the close frame).
			c.closeWith(4003, "disconnected by operator", true)
		}
	default:
		h.undelivered.Add(1)
		h.badRoute.Fail(fmt.Errorf("route kind %q in entry %s", route.Kind(), id), "stream", cs.stream)
		return
	}
	h.badRoute.OK()
}

// acquire returns the live state of channel, subscribing in Redis if this
// instance was not yet; it waits for the subscription to be live.
func (h *hub) acquire(ctx context.Context, channel string) (*chanState, error) {
	notify := h.keys.Notify(channel)
	h.mu.Lock()
	cs := h.chans[notify]
	fresh := cs == nil
	if fresh {
		cs = &chanState{
			name: channel, stream: h.keys.Stream(channel), notify: notify,
			ready: make(chan struct{}), subs: make(map[*conn]stream.ID),
			resuming: make(map[*conn]*resumer),
		}
		h.chans[notify] = cs
	}
	cs.refs++
	// Read under the lock the channel was added under: either run's
	// scan of the early channels, after it set the subscriber, finds
	// the channel, or this finds the subscriber.
	sub := h.liveSub()
	subscribing := fresh && sub != nil
	if subscribing {
		// The subscribe below holds the channel until it is made, so
		// that the sweep cannot drop it first. Made after the channel
		// was confirmed by another subscribe (sweepIdle's, for a
		// channel acquired while it dropped the one before), then left
		// and dropped, it subscribed the channel again in Redis with no
		// state here: the sweep never unsubscribed it, and the next
		// subscribe of the channel waited for a confirmation that never
		// came (the subscriber held the channel as wanted and sent
		// nothing), answered unavailable until the Pub/Sub connection
		// was replaced.
		cs.refs++
	}
	h.mu.Unlock()
	if subscribing {
		// Not waited for: the subscriber places channels one at a time,
		// and on a Redis that does not answer each placement waits a
		// dial timeout, so that a subscribe could wait far longer than
		// the bound below (its reader, meanwhile, reads no pong). On an
		// error the channel stays wanted: the subscriber retries. A
		// closed subscriber (the hub has stopped) is no Redis failure:
		// the wait below ends unavailable.
		go func() {
			defer h.release(cs)
			err := sub.Subscribe(context.WithoutCancel(ctx), notify)
			if err != nil && !errors.Is(err, errClosedSubscriber) {
				h.redisErrors.Add(1)
				h.readFailed(err, "op", "subscribe in redis", "channel", channel)
			}
		}()
	}
	t := time.NewTimer(5 * time.Second)
	defer t.Stop()
	select {
	case <-cs.ready:
		return cs, nil
	case <-ctx.Done():
	case <-t.C:
	}
	h.release(cs)
	return nil, errUnavailable
}

var errUnavailable = errors.New("redis subscription not live")

// poolSize is rdb's pool size (per node on a cluster), go-redis's default
// filled in when none was set.
func poolSize(rdb redis.UniversalClient) int {
	switch c := rdb.(type) {
	case *redis.Client:
		return c.Options().PoolSize
	case *redis.ClusterClient:
		return c.Options().PoolSize
	}
	return 10
}

// release drops one reference; the sweeper unsubscribes states that stay
// unreferenced for linger.
func (h *hub) release(cs *chanState) {
	h.mu.Lock()
	cs.refs--
	if cs.refs == 0 {
		cs.idleAt = time.Now()
	}
	h.mu.Unlock()
}

// sweepIdle unsubscribes channels nobody local has listened to for linger,
// and ends the retries of their reads that stalled.
func (h *hub) sweepIdle(ctx context.Context, now time.Time) {
	var drop []string
	h.mu.Lock()
	for k, cs := range h.chans {
		if cs != h.inbox && cs.refs == 0 && now.Sub(cs.idleAt) >= linger {
			select {
			case <-cs.ready:
			default:
				if cs.endStall == nil {
					continue // never confirmed: keep until it is, so confirmations pair up
				}
				// Confirmed by Redis, its position read stalled: it
				// may never be read.
			}
			if cs.endStall != nil {
				cs.endStall()
			}
			delete(h.chans, k)
			drop = append(drop, k)
		}
	}
	h.mu.Unlock()
	if len(drop) > 0 {
		if sub := h.liveSub(); sub != nil {
			_ = sub.Unsubscribe(ctx, drop...)
			// A channel acquired again between the unlock above and the
			// unsubscribe has lost its subscription: subscribe it again
			// (a repeated confirmation only makes the hub catch up).
			var again []string
			h.mu.Lock()
			for _, k := range drop {
				if h.chans[k] != nil {
					again = append(again, k)
				}
			}
			h.mu.Unlock()
			for _, k := range again {
				_ = sub.Subscribe(ctx, k)
			}
		}
	}
}

func (h *hub) addConn(c *conn) {
	h.mu.Lock()
	h.conns[c.id] = c
	if c.user != "" {
		m := h.users[c.user]
		if m == nil {
			m = make(map[*conn]struct{})
			h.users[c.user] = m
		}
		m[c] = struct{}{}
	}
	h.mu.Unlock()
}

func (h *hub) removeConn(c *conn) {
	h.mu.Lock()
	delete(h.conns, c.id)
	if m := h.users[c.user]; m != nil {
		delete(m, c)
		if len(m) == 0 {
			delete(h.users, c.user)
		}
	}
	h.mu.Unlock()
}

func (h *hub) snapshotConns() []*conn {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := make([]*conn, 0, len(h.conns))
	for _, c := range h.conns {
		out = append(out, c)
	}
	return out
}

// probe publishes a liveness probe to this instance's inbox channel; the
// receive loop records its arrival.
func (h *hub) probe(ctx context.Context) error {
	return h.rdb.SPublish(ctx, h.inbox.notify, "0-0\n0-0\n0\np:\n").Err()
}

// subscribeLive adds c to cs with no replay: c gets every message fanned
// out after its "subscribed" frame, which is queued under the same lock
// and carries the id of the last message fanned out before (the point a
// client resumes from if it is cut before its first message).
func (cs *chanState) subscribeLive(c *conn, reply func(position stream.ID) *queued) {
	cs.mu.Lock()
	cs.subs[c] = stream.ID{}
	c.enqueue(reply(cs.last))
	cs.mu.Unlock()
}

// startResume registers c as resuming: live messages are buffered for it.
func (cs *chanState) startResume(c *conn) *resumer {
	cs.mu.Lock()
	r := &resumer{live: cs.last}
	cs.resuming[c] = r
	cs.mu.Unlock()
	return r
}

// lateNotice bounds how long a resume waits for this instance's
// notifications to reach the client's position (awaitLive). Pub/Sub
// delivers in milliseconds; a second covers a receive loop held up by a
// catch-up read. Only a resume whose stream read already failed to prove
// it whole waits, and it is told recovered:false when the time is up.
// The default of the hub's lateWait.
const lateNotice = time.Second

// awaitLive is for a resume from `after` whose stream read was not
// continuous (messages after `after` are trimmed) while the hub is behind
// `after` (r.live < after): the client got `after` from another instance,
// and this one's notifications may only be late. It waits, for at most
// wait (the hub's lateWait), until the hub delivers `after` into r's
// buffer (or empties the buffer at it: resumer.dropped), or passes it
// without, and reports whether it did deliver it. When it did, the
// buffer holds every message after `after` the hub delivered since, each
// proved by the chain (a notification naming the last id delivered as
// its predecessor, or a continuous stream read), and a gap the hub finds
// later is marked in r as for any replay (finishResume closes the
// connection): the client lacks nothing the live path does not give it,
// however far the stream was trimmed. Notifications that were lost, not
// late, never bring `after`: the hub finds the gap when the next one
// arrives, or nothing comes in time, and the answer stays false.
func (cs *chanState) awaitLive(ctx context.Context, r *resumer, after stream.ID, wait time.Duration) bool {
	cs.mu.Lock()
	for _, q := range r.buf {
		if q.id == after {
			cs.mu.Unlock()
			return !r.overflow
		}
	}
	if r.dropped == after {
		// Delivered, and found the buffer full of a catch-up's messages
		// (deliver): emptied there, it holds what follows, as if `after`
		// had been kept.
		cs.mu.Unlock()
		return !r.overflow
	}
	if !cs.last.Less(after) {
		cs.mu.Unlock()
		return false // passed it without delivering it (a gap)
	}
	arrived := make(chan struct{})
	r.awaited, r.arrived, r.hasAwaited = after, arrived, false
	cs.mu.Unlock()
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-arrived:
	case <-t.C:
	case <-ctx.Done():
	}
	cs.mu.Lock()
	defer cs.mu.Unlock()
	r.arrived = nil
	// A buffer emptied at `after` holds what follows, as above; one
	// emptied after `after` lost messages that follow it, which the
	// stream, trimmed, may not hold.
	return (r.hasAwaited || r.dropped == after) && !r.overflow && !after.Less(r.dropped)
}

// replayNeeds returns how far r's replay must read the stream: its
// buffer holds every message after that id the hub delivered (a gap's
// aside). It is live, or past it when a catch-up dropped the buffer.
func (cs *chanState) replayNeeds(r *resumer) stream.ID {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	if r.live.Less(r.dropped) {
		return r.dropped
	}
	return r.live
}

// overflowed reports whether r's buffer overflowed: its replay need go
// no further (finishResume closes the connection 4002).
func (cs *chanState) overflowed(r *resumer) bool {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	return r.overflow
}

// finishResume hands c over from its replay, which sent the channel's
// messages up to lastSent, to the live path: it queues the buffered
// messages newer than lastSent and makes c a live subscriber (live).
// Like the replay, it queues them only while the queue is less than
// half full, and waits for room (waitRoom) between: the replay may have
// left the queue half full, and a buffer of up to SEND_QUEUE messages
// queued at once would overflow it, closing 4002 a client that reads as
// fast as it can. Live messages go on reaching the buffer meanwhile.
//
// It returns readOn instead when a catch-up dropped buffered messages
// after lastSent (resumer.dropped), before the hand-over began or while
// it waited for room: the replay reads on from last, the last message c
// was sent (lastSent, or the last buffered message queued before the
// drop, which the replay must not send again), and calls it again. It
// closes c, and reports neither, when the buffer overflowed (4002: c
// resumes again, as a slow consumer), when a gap while c replayed took
// messages after lastSent (1011, as gap closes a subscriber that lacks
// them: c resumes and is told recovered:false), or when c closed while
// it waited.
func (cs *chanState) finishResume(ctx context.Context, c *conn, r *resumer, lastSent stream.ID) (last stream.ID, live, readOn bool) {
	for {
		cs.mu.Lock()
		if r.overflow {
			delete(cs.resuming, c)
			c.closeWith(protocol.CloseSlowConsumer, "slow consumer: resume from your last id", true)
			cs.mu.Unlock()
			return lastSent, false, false
		}
		if lastSent.Less(r.dropped) {
			cs.mu.Unlock()
			return lastSent, false, true
		}
		if lastSent.Less(r.gap) {
			delete(cs.resuming, c)
			c.closeWith(protocol.CloseInternal, gapReason, true)
			cs.mu.Unlock()
			return lastSent, false, false
		}
		// In order, as long as the queue has room; what is left stays
		// in the buffer, first.
		left := r.buf[:0]
		for _, q := range r.buf {
			if !lastSent.Less(q.id) {
				continue // the replay read it from the stream
			}
			if len(left) == 0 && c.enqueueIfRoom(q) {
				lastSent = q.id
				continue
			}
			left = append(left, q)
		}
		clear(r.buf[len(left):])
		r.buf = left
		if len(left) == 0 {
			delete(cs.resuming, c)
			// The replay may have read from the stream messages whose
			// live notification has not arrived yet: skip those when
			// they do.
			cs.subs[c] = lastSent
			cs.mu.Unlock()
			return lastSent, true, false
		}
		cs.mu.Unlock()
		if !c.waitRoom(ctx) {
			cs.remove(c)
			return lastSent, false, false
		}
	}
}

func (cs *chanState) remove(c *conn) {
	cs.mu.Lock()
	delete(cs.subs, c)
	delete(cs.resuming, c)
	cs.mu.Unlock()
}
