package main

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/logging"
)

// Timing of the subscriber's repair work, derived from each other.
const (
	// regroupEvery is how often channels that are not settled (never
	// placed, on a failing node, unconfirmed, or on a node the slot map
	// no longer names as their master) are placed again.
	regroupEvery = 250 * time.Millisecond
	// confirmWait is how long a SSUBSCRIBE may stay unconfirmed before it
	// is sent again (possibly to another node: the slot may have moved).
	confirmWait = 4 * regroupEvery
	// opTimeout bounds one subscribe or unsubscribe command; quickOp
	// bounds a best-effort one on a failing node.
	opTimeout = 2 * time.Second
	quickOp   = 200 * time.Millisecond
	// pingEvery: a node connection silent this long is pinged (by the
	// repair loop), so that a half-open connection (no error, no data) is
	// noticed: one silent for deadAfter is replaced. The hub's probe
	// covers only the inbox's node.
	pingEvery = 10 * time.Second
	deadAfter = 3 * pingEvery
)

// psEvent is one thing read from a shard Pub/Sub connection that the hub
// acts on: a subscription confirmation (the first one, or a repeat after a
// reconnect or a move to another node: the hub then catches up from the
// stream) or a message.
type psEvent struct {
	confirmed bool
	channel   string // shard channel
	payload   string // message only
}

// subscriber holds this instance's shard Pub/Sub subscriptions.
//
// On a single Redis it uses one Pub/Sub connection. On Redis Cluster a
// shard channel can only be subscribed on the master that owns its slot,
// so it keeps one Pub/Sub connection per master that owns a wanted
// channel, each read by its own goroutine; all of them feed one event
// stream (Events), read by the hub's receive loop. When a node fails or a
// slot moves (failover, resharding), the affected channels are resolved
// again and subscribed where they now live; the repeated confirmation
// makes the hub read what it missed from the stream, so no message is
// lost.
//
// Its methods are safe for concurrent use. Close stops every goroutine
// it started and waits for them.
type subscriber struct {
	log     *slog.Logger
	rdb     redis.UniversalClient
	cluster *redis.ClusterClient // nil on a single node
	events  chan psEvent

	ctx    context.Context // cancelled by Close
	cancel context.CancelFunc
	wg     sync.WaitGroup
	kick   chan struct{} // wakes the regroup loop; capacity 1

	// mu serialises placement (which talks to Redis) and guards the maps.
	// Node read loops take it only briefly, on a sunsubscribe.
	mu     sync.Mutex
	nodes  map[string]*nodeSub // by node address ("" on a single node)
	want   map[string]*nodeSub // by shard channel: where it is subscribed, nil if nowhere yet
	closed bool

	// down holds, by node address, when its Pub/Sub connection's error
	// was logged, until a read on that node succeeds again: an outage is
	// one line and its end another, however many times the connection
	// is replaced meanwhile. anyDown spares the read loops the lock.
	downMu  sync.Mutex
	down    map[string]time.Time
	anyDown atomic.Bool
	// login, when not nil, logs a Pub/Sub connection whose login Redis
	// refused (in place of its error line). A read that succeeds does not
	// end it: the connection may have logged in before the password
	// changed. The client's login hook does (redisconn.AddLoginHook).
	login *logging.Episode
}

// nodeSub is one Pub/Sub connection to one node.
type nodeSub struct {
	addr   string
	ps     *redis.PubSub
	chans  map[string]struct{} // guarded by subscriber.mu
	cancel context.CancelFunc

	// failing is set by the read loop on an error and cleared by the next
	// successful read (the confirmations of the channels go-redis
	// subscribes again on the new connection, or a pong).
	failing atomic.Bool
	// downLogged is set when the read loop had the node logged down
	// (nodeDown: not for a redirection) and cleared with failing.
	downLogged atomic.Bool
	// lastRead is when the connection last delivered anything,
	// pingedAt when the repair loop last pinged it for being silent, on
	// the monotonic clock (mono): by the wall clock, a clock stepped
	// forward had every node's connection replaced as silent at once, and
	// one stepped back left a dead one in place for as long as the step.
	lastRead, pingedAt atomic.Int64
	// refused is set by the read loop when the node refused
	// go-redis's SSUBSCRIBE of a connection it replaced, which names all
	// the connection's channels: with CROSSSLOT (a cluster refuses it
	// unless they share a slot), or with any error that is the new
	// connection's first reply (NOPERM while the node's ACL lacks the
	// channels), so that none of them is subscribed any more. That
	// SSUBSCRIBE is none of the subscriber's (sentAt does not know it),
	// so nothing else would send them again: the node's next pong ended
	// its failing, and its channels stayed unsubscribed for good.
	// regroup then sends each its own SSUBSCRIBE.
	refused atomic.Bool
	// replaced is set by the read loop on an error of the connection
	// (not a reply of Redis): the next reply read is the replacement's
	// first, the answer to go-redis's SSUBSCRIBE. Cleared by any reply.
	replaced atomic.Bool

	// stalled is how long in all (ns) the read loop has waited to hand
	// events to the hub, and blockedAt when the wait under way began
	// (mono, 0 when none); the end of a wait updates both under mu. The hub reads the stream for each
	// confirmation, so after a burst of placements (a failover, a
	// Reconnect, a refused resubscribe) the confirmations of thousands of
	// channels wait in the connection for the hub, not for Redis: that
	// time counts neither towards confirmWait (each SSUBSCRIBE sent again
	// meanwhile cost the hub one more catch-up, and the more there were,
	// the more were sent again: O(n²)) nor as silence (deadAfter).
	stalled   atomic.Int64
	blockedAt atomic.Int64

	mu     sync.Mutex
	sentAt map[string]sentMark // channels sent SSUBSCRIBE but not confirmed yet
}

// sentMark is when a SSUBSCRIBE was sent: at (zero when Redis dropped the
// subscription: send again at once) and the node's stall total then.
type sentMark struct {
	at      time.Time
	stalled int64
}

// newSubscriber starts the subscriber's repair loop; Close stops it.
// login, when not nil, logs the login refusals (see subscriber.login).
func newSubscriber(log *slog.Logger, rdb redis.UniversalClient, login *logging.Episode) *subscriber {
	ctx, cancel := context.WithCancel(context.Background())
	s := &subscriber{
		log:    log,
		rdb:    rdb,
		login:  login,
		events: make(chan psEvent, 256),
		ctx:    ctx,
		cancel: cancel,
		kick:   make(chan struct{}, 1),
		nodes:  make(map[string]*nodeSub),
		want:   make(map[string]*nodeSub),
	}
	s.cluster, _ = rdb.(*redis.ClusterClient)
	s.wg.Add(1)
	go func() { defer s.wg.Done(); s.regroupLoop() }()
	return s
}

// Events is the single stream of confirmations and messages from every
// node. It is never closed; stop reading when the subscriber's owner stops.
func (s *subscriber) Events() <-chan psEvent { return s.events }

// Subscribe subscribes the shard channel on the node that owns it. On an
// error the channel stays wanted and is placed again by the repair loop;
// the confirmation arrives on Events either way.
func (s *subscriber) Subscribe(ctx context.Context, channel string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return errClosedSubscriber
	}
	if _, ok := s.want[channel]; ok {
		return nil
	}
	s.want[channel] = nil
	err := s.placeLocked(ctx, channel)
	if err != nil {
		s.wake()
	}
	return err
}

// Unsubscribe drops the shard channels (no confirmation is reported).
func (s *subscriber) Unsubscribe(ctx context.Context, channels ...string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	byNode := make(map[*nodeSub][]string)
	for _, ch := range channels {
		n, ok := s.want[ch]
		delete(s.want, ch)
		if ok && n != nil {
			delete(n.chans, ch)
			n.unsent(ch)
			byNode[n] = append(byNode[n], ch)
		}
	}
	var errs []error
	for n, chs := range byNode {
		if s.cluster == nil {
			if err := n.ps.SUnsubscribe(ctx, chs...); err != nil {
				errs = append(errs, err)
			}
			continue
		}
		// A cluster refuses (CROSSSLOT) a SUNSUBSCRIBE of channels in
		// different slots, and the node would go on sending them.
		for _, ch := range chs {
			if err := n.ps.SUnsubscribe(ctx, ch); err != nil {
				errs = append(errs, err)
				// The connection is down, and each further call would
				// dial it again: the rest stay in go-redis's list, which
				// it subscribes again in one SSUBSCRIBE on reconnect (the
				// cluster refuses it unless they share a slot).
				break
			}
		}
	}
	s.dropEmptyLocked()
	return errors.Join(errs...)
}

// Reconnect replaces the Pub/Sub connection of the node that holds
// channel and subscribes its channels again where they now live (used
// when probes, published to channel, show that its read path is dead
// although the connection looks open). On a cluster the other nodes'
// connections stay: the probes say nothing about them (each is pinged
// when silent), and replacing them made every channel of the instance
// subscribe again and catch up from its stream at each resubscribe, every
// 4 × PROBE_INTERVAL for as long as the inbox's master stayed down.
func (s *subscriber) Reconnect(ctx context.Context, channel string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return
	}
	again := []string{}
	if _, ok := s.want[channel]; ok {
		again = append(again, channel)
	}
	if n := s.want[channel]; n != nil {
		n.stop()
		delete(s.nodes, n.addr)
		for ch := range n.chans {
			s.want[ch] = nil
			if ch != channel {
				again = append(again, ch)
			}
		}
	}
	if s.cluster != nil {
		s.cluster.ReloadState(ctx)
	}
	for _, ch := range again {
		_ = s.placeLocked(ctx, ch)
	}
	s.endGoneLocked()
}

// Close closes every connection and waits for the goroutines. It is
// idempotent.
func (s *subscriber) Close() error {
	// Cancelled before taking mu: the repair loop holds it while placing
	// channels, each placement waiting up to a dial timeout on a Redis
	// that does not answer, and that work would otherwise all be done
	// before Close could stop it.
	s.cancel()
	s.mu.Lock()
	if !s.closed {
		s.closed = true
		for addr, n := range s.nodes {
			n.stop()
			delete(s.nodes, addr)
		}
	}
	s.mu.Unlock()
	s.wg.Wait()
	return nil
}

var errClosedSubscriber = errors.New("subscriber closed")

func (s *subscriber) wake() {
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

// resolve returns the address of the node owning channel's slot and a
// client for it.
func (s *subscriber) resolve(ctx context.Context, channel string) (string, redis.UniversalClient, error) {
	if s.cluster == nil {
		return "", s.rdb, nil
	}
	c, err := s.cluster.MasterForKey(ctx, channel)
	if err != nil {
		return "", nil, err
	}
	return c.Options().Addr, c, nil
}

// placeLocked subscribes channel on the node that owns it now, moving it
// off the node it was on if that changed; if it stays on the same node
// it sends SSUBSCRIBE again only while unconfirmed.
func (s *subscriber) placeLocked(ctx context.Context, channel string) error {
	addr, client, err := s.resolve(ctx, channel)
	if err != nil {
		return err
	}
	old := s.want[channel]
	if old != nil && old.addr == addr && !old.unconfirmedFor(channel, time.Now(), confirmWait) {
		return nil
	}
	if old != nil && old.addr != addr {
		delete(old.chans, channel)
		old.unsent(channel)
		// Best effort, and not under s.mu: go-redis holds a connection's
		// lock through each of its reconnect attempts, which our context
		// does not bound (only the dial timeout bounds each attempt), so
		// on a node that stopped answering every placement
		// (and every Subscribe) would wait seconds per moved channel.
		// (Closing that node's connection, once it has no channel left,
		// still waits for one attempt.) A late SUNSUBSCRIBE of a channel
		// wanted there again is seen by that node's read loop, which has
		// the channel placed again.
		wait := opTimeout
		if old.failing.Load() {
			wait = quickOp // it is most likely dead
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			uctx, cancel := context.WithTimeout(s.ctx, wait)
			defer cancel()
			_ = old.ps.SUnsubscribe(uctx, channel)
		}()
	}
	n := s.nodes[addr]
	if n == nil {
		n = s.startNode(addr, client)
	}
	n.chans[channel] = struct{}{}
	s.want[channel] = n
	now := time.Now()
	n.mu.Lock()
	n.sentAt[channel] = sentMark{at: now, stalled: n.stallTotal(now)}
	n.mu.Unlock()
	sctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	return n.ps.SSubscribe(sctx, channel)
}

func (s *subscriber) startNode(addr string, client redis.UniversalClient) *nodeSub {
	ctx, cancel := context.WithCancel(s.ctx)
	n := &nodeSub{
		addr:   addr,
		ps:     client.SSubscribe(ctx),
		chans:  make(map[string]struct{}),
		cancel: cancel,
		sentAt: make(map[string]sentMark),
	}
	n.lastRead.Store(monoNow())
	s.nodes[addr] = n
	s.wg.Add(1)
	go func() { defer s.wg.Done(); s.read(ctx, n) }()
	return n
}

// dropEmptyLocked closes the connections of nodes no wanted channel is on.
func (s *subscriber) dropEmptyLocked() {
	for addr, n := range s.nodes {
		if len(n.chans) == 0 {
			n.stop()
			delete(s.nodes, addr)
		}
	}
	s.endGoneLocked()
}

// endGoneLocked ends the outage of each node logged down that the
// instance no longer has a connection to, once every wanted channel is
// placed: a failover moved its channels to the promoted replica, or its
// channels were dropped (their sockets left). Only a read on the node
// itself ended it before, so after a failover, whose dead master has
// another address than the new one, the episode never ended.
func (s *subscriber) endGoneLocked() {
	if !s.anyDown.Load() {
		return
	}
	for _, n := range s.want {
		if n == nil {
			return // not placed yet: the outage goes on
		}
	}
	s.downMu.Lock()
	defer s.downMu.Unlock()
	for addr, at := range s.down {
		if _, ok := s.nodes[addr]; ok {
			continue
		}
		delete(s.down, addr)
		s.log.Info("redis subscription back", "node", s.nodeName(addr), "down_for", time.Since(at).Round(time.Millisecond).String(),
			"no_longer_needed", true)
	}
	s.anyDown.Store(len(s.down) > 0)
}

// read is one node's receive loop. go-redis reconnects the connection by
// itself and subscribes its channels again; the repeated confirmations
// reach the hub, which catches up.
//
// Its reads have no deadline: go-redis cannot take up a reply where a
// read that timed out left it, so a deadline that expired in the middle
// of a message (a large one, or one Redis was descheduled while writing)
// made the next read fail to parse the rest, and the connection was
// dropped, every channel on the node subscribed again and caught up from
// its stream. stop (Close) ends a read by closing the connection, and
// the repair loop pings a silent one (the pong is a read), as go-redis's
// own PubSub.Channel does.
func (s *subscriber) read(ctx context.Context, n *nodeSub) {
	backoff := 50 * time.Millisecond
	for ctx.Err() == nil {
		msg, err := n.ps.Receive(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			// A dead node, or MOVED (the slot lives elsewhere now): the
			// repair loop resolves this node's channels again. A
			// redirection is no failure of the node, which answered: a
			// resharding moved a slot, and a channel placed again with
			// the slot map from before the move was sent to its old
			// master. That is routine, and not logged as the node down.
			//
			// failing stays set past a redirection until a read succeeds
			// (a quiet node's next pong, up to pingEvery later), so
			// whether the node's failure is logged is tracked apart: a
			// node that stops after a redirection is logged down too.
			n.failing.Store(true)
			if !redirected(err) && !n.downLogged.Swap(true) {
				s.nodeDown(n.addr, err)
			}
			var re redis.Error
			reply := errors.As(err, &re)
			if redis.HasErrorPrefix(err, "CROSSSLOT") || reply && n.replaced.Load() {
				n.refused.Store(true)
			}
			n.replaced.Store(!reply)
			s.wake()
			select {
			case <-ctx.Done():
				return
			case <-time.After(backoff):
			}
			backoff = min(backoff*2, time.Second)
			continue
		}
		backoff = 50 * time.Millisecond
		n.replaced.Store(false)
		n.failing.Store(false)
		n.downLogged.Store(false)
		n.lastRead.Store(monoNow())
		if s.anyDown.Load() {
			s.nodeUp(n.addr)
		}
		var ev psEvent
		switch m := msg.(type) {
		case *redis.Subscription:
			switch m.Kind {
			case "ssubscribe":
				n.unsent(m.Channel)
				ev = psEvent{confirmed: true, channel: m.Channel}
			case "sunsubscribe":
				// Our own unsubscribe, or sent by Redis itself when the
				// slot moved away: if the channel is still wanted here,
				// mark it so that it is placed again.
				s.mu.Lock()
				if s.want[m.Channel] == n {
					n.mu.Lock()
					n.sentAt[m.Channel] = sentMark{}
					n.mu.Unlock()
					s.wake()
				}
				s.mu.Unlock()
				continue
			default:
				continue
			}
		case *redis.Message:
			ev = psEvent{channel: m.Channel, payload: m.Payload}
		default:
			continue
		}
		select {
		case s.events <- ev:
			continue
		default:
		}
		n.blockedAt.Store(monoNow())
		select {
		case s.events <- ev:
		case <-ctx.Done():
			return
		}
		now := monoNow()
		n.mu.Lock() // stallTotal's readers see both or neither
		n.stalled.Add(now - n.blockedAt.Load())
		n.blockedAt.Store(0)
		n.mu.Unlock()
		n.lastRead.Store(now)
	}
}

// nodeDown logs the error of a node's Pub/Sub connection, unless one of
// the node's is logged already. A login Redis refused is logged as such
// (s.login), and ends when Redis accepts a login.
func (s *subscriber) nodeDown(addr string, err error) {
	if loginFailed(s.login, err, "node", s.nodeName(addr)) {
		return
	}
	s.downMu.Lock()
	defer s.downMu.Unlock()
	if _, ok := s.down[addr]; ok {
		return
	}
	if s.down == nil {
		s.down = make(map[string]time.Time)
	}
	s.down[addr] = time.Now()
	s.anyDown.Store(true)
	s.log.Warn("redis subscription error", "node", s.nodeName(addr), "err", err.Error(),
		"then", "reconnecting with backoff up to 1s; the channels there are subscribed again and caught up from their streams once it answers")
}

// redirected reports whether err is a cluster redirection (MOVED, ASK):
// the node answered that the slot is, or is going, elsewhere.
func redirected(err error) bool {
	return redis.HasErrorPrefix(err, "MOVED ") || redis.HasErrorPrefix(err, "ASK ")
}

// nodeName is the address of node addr for the log: the single node's
// own, whose key in nodes is "".
func (s *subscriber) nodeName(addr string) string {
	if c, ok := s.rdb.(*redis.Client); ok && addr == "" {
		return c.Options().Addr
	}
	return addr
}

// nodeUp logs that a node logged down answers again.
func (s *subscriber) nodeUp(addr string) {
	s.downMu.Lock()
	defer s.downMu.Unlock()
	at, ok := s.down[addr]
	if !ok {
		return
	}
	delete(s.down, addr)
	s.anyDown.Store(len(s.down) > 0)
	s.log.Info("redis subscription back", "node", s.nodeName(addr), "down_for", time.Since(at).Round(time.Millisecond).String())
}

// regroupLoop places channels that are not settled: never placed, on a
// failing node, unconfirmed for confirmWait, or on a node the slot map
// no longer names as their master (ownedElsewhere).
func (s *subscriber) regroupLoop() {
	t := time.NewTicker(regroupEvery)
	defer t.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-s.kick:
		case <-t.C:
		}
		s.regroup(time.Now())
	}
}

// regroup runs the repair loop's round at now, a reading of time.Now.
func (s *subscriber) regroup(now time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return
	}
	for addr, n := range s.nodes {
		if n.blockedAt.Load() != 0 {
			continue // waiting on the hub, not on Redis
		}
		silent := time.Duration(mono(now) - n.lastRead.Load())
		if silent > pingEvery && time.Duration(mono(now)-n.pingedAt.Load()) > pingEvery {
			n.pingedAt.Store(mono(now))
			s.wg.Add(1) // Close waits for it: it sets closed under mu first
			go func() {
				defer s.wg.Done()
				pctx, cancel := context.WithTimeout(s.ctx, quickOp)
				_ = n.ps.Ping(pctx) // the pong counts as a read
				cancel()
			}()
		}
		if silent > deadAfter {
			// Silent although pinged: replace the connection.
			s.log.Warn("redis subscription silent, reconnecting", "node", s.nodeName(addr))
			n.stop()
			delete(s.nodes, addr)
			for ch := range n.chans {
				s.want[ch] = nil
			}
		}
	}
	for _, n := range s.nodes {
		if n.refused.Swap(false) {
			n.mu.Lock()
			for ch := range n.chans {
				n.sentAt[ch] = sentMark{} // sent again below
			}
			n.mu.Unlock()
		}
	}
	var todo []string
	for ch, n := range s.want {
		if n == nil || n.failing.Load() || n.unconfirmedFor(ch, now, confirmWait) || s.ownedElsewhere(ch, n) {
			todo = append(todo, ch)
		}
	}
	if len(todo) == 0 {
		return
	}
	if s.cluster != nil {
		// Asynchronous: a later round sees the new slot owners.
		s.cluster.ReloadState(s.ctx)
	}
	for _, ch := range todo {
		if err := s.placeLocked(s.ctx, ch); err != nil && s.ctx.Err() == nil {
			s.log.Debug("place shard channel", "channel", ch, "err", err.Error())
		}
	}
	s.dropEmptyLocked()
}

// ownedElsewhere reports whether the slot map, as the cluster client
// last loaded it, names another master than n for channel's slot. A
// channel Redis dropped when its node became a replica (a planned
// failover, or a master back after one) is placed again at once, with
// the map from before the switch: on that node, which accepts it (a
// replica serves its master's shard channels) and confirms it. It would
// stay there, getting the shard's messages only as long as the node
// replicates that master, and none of those the master sent before it
// knew its new replica; a replica made to follow another master keeps
// the subscription without a word. An in-memory lookup per channel.
func (s *subscriber) ownedElsewhere(channel string, n *nodeSub) bool {
	if s.cluster == nil {
		return false
	}
	addr, _, err := s.resolve(s.ctx, channel)
	return err == nil && addr != n.addr
}

// unconfirmedFor reports whether channel is not confirmed although it was
// sent SSUBSCRIBE longer than d before now, not counting the time the read
// loop has since waited on the hub (or was dropped by Redis).
func (n *nodeSub) unconfirmedFor(channel string, now time.Time, d time.Duration) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	m, ok := n.sentAt[channel]
	if !ok {
		return false
	}
	if m.at.IsZero() {
		return true
	}
	return now.Sub(m.at)-time.Duration(n.stallTotal(now)-m.stalled) > d
}

// stallTotal is how long in all (ns) the read loop has waited on the hub
// up to now, the wait under way included. n.mu is held.
func (n *nodeSub) stallTotal(now time.Time) int64 {
	t := n.stalled.Load()
	if b := n.blockedAt.Load(); b != 0 {
		t += max(0, mono(now)-b)
	}
	return t
}

func (n *nodeSub) unsent(channel string) {
	n.mu.Lock()
	delete(n.sentAt, channel)
	n.mu.Unlock()
}

// stop ends the node's read loop and closes its connection.
func (n *nodeSub) stop() {
	n.cancel()
	_ = n.ps.Close()
}
