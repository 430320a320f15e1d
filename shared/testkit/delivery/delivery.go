// Package delivery checks the delivery contract of docs/protocol.md end
// to end, from the outside: what publishers were told (Log) against what
// a Go client's subscription handed its application (Chain). It is the
// check of e2e/chaos_test.go and of the soak (bench/cmd/soak), which
// both publish {"seq": n, "ch": channel} to a channel, n = 0, 1, 2, …,
// one publish at a time per channel. "ch" lets a message delivered on
// the wrong channel be told from one of the channel's own: the channels'
// seqs all start at 0, and two streams may give the same id.
//
// The contract, per chain of subscriptions (a subscription and its
// resumes, however the connection ended): every message acknowledged to
// a publisher from the chain's first position on is delivered, once, in
// id order, except those a resume was told it lost. A resume is a
// subscribe with after, the last id the client holds; its subscribed
// reply says recovered:true when nothing after that id is missing, and
// recovered:false when some of it was trimmed away, with the position
// the stream goes on from: the gap is the interval (held id, position],
// and the client goes on from the position (docs/protocol.md, "Resume,
// history and recovered").
package delivery

import (
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/wsrelay/wsrelay/shared/client"
	"github.com/wsrelay/wsrelay/shared/stream"
)

// Log is what was published to one channel: the id of each acknowledged
// publish by its sequence number, and the sequence numbers whose publish
// failed (written or not: unknown). Its methods are safe concurrently;
// Check expects the publishing to have stopped.
type Log struct {
	mu     sync.Mutex
	acked  map[int]stream.ID
	failed map[int]error
}

// NewLog returns an empty log.
func NewLog() *Log { return &Log{acked: map[int]stream.ID{}, failed: map[int]error{}} }

// Ack records that the publish of seq was acknowledged with id. An id
// that is not a stream id is not recorded: the error says so, and the
// caller decides whether it fails the publish or the run.
func (l *Log) Ack(seq int, id string) error {
	sid, ok := stream.ParseID(id)
	if !ok {
		return fmt.Errorf("publish %d acknowledged with id %q, not a stream id", seq, id)
	}
	l.mu.Lock()
	l.acked[seq] = sid
	l.mu.Unlock()
	return nil
}

// Fail records that the publish of seq failed with err: it may have been
// written all the same, so a message carrying seq is no problem, and
// none is owed.
func (l *Log) Fail(seq int, err error) {
	l.mu.Lock()
	l.failed[seq] = err
	l.mu.Unlock()
}

// Acked returns how many publishes were acknowledged.
func (l *Log) Acked() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.acked)
}

// Failed returns the failed publishes' errors by sequence number (a
// copy).
func (l *Log) Failed() map[int]error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return maps.Clone(l.failed)
}

// Chain records one logical subscription of a client to a channel, from
// its first subscribe to its unsubscribe (or the client leaving for
// good), across every reconnect: the client's own ones (a drained or
// killed egress, MAX_LIFETIME, a lost network) and an application's
// that closes its client and subscribes again after the last id it got
// (Subscribe with after). It records the events in the order the client
// delivered them. Its methods are safe concurrently, but Subscribe and
// Close are the caller's to order: one at a time.
type Chain struct {
	channel string
	count   *atomic.Int64                       // counts the messages, when set
	sub     atomic.Pointer[client.Subscription] // the current one; nil while one is being made
	mu      sync.Mutex
	events  []event
	// closed: unsubscribed, or its client left. Messages after its last
	// event are not owed (they may have been on their way when it ended).
	closed bool
	// dups are the messages the client dropped as not after the last it
	// delivered (Handler.OnDuplicate): the server sent them twice or out
	// of order. The client never hands them on, so only this sees them.
	dups []string
}

// Data is what a publisher of a chain's channel ch publishes as its
// seq'th message: {"seq": seq, "ch": ch}.
func Data(ch string, seq int) map[string]any { return map[string]any{"seq": seq, "ch": ch} }

// event is a message, or a subscribed reply with the position the
// subscription holds after it (Subscription.LastID).
type event struct {
	message   bool
	id        stream.ID // the message's id, or the position; stream.Max when unparsable
	badID     string    // a message's id that is not a stream id
	seq       int       // the message's seq; -1 for none
	ch        string    // the "ch" of the message's data when it is not the chain's channel
	recovered bool
}

// NewChain returns a chain on channel, with no subscription yet. count,
// when not nil, is added 1 for each message delivered (a total over
// chains).
func NewChain(channel string, count *atomic.Int64) *Chain {
	return &Chain{channel: channel, count: count}
}

// Channel returns the chain's channel.
func (c *Chain) Channel() string { return c.channel }

// Subscribe subscribes cl to the chain's channel after the id after (""
// for a new subscription) and makes that the chain's current
// subscription: the first one, or a resume on a new client. On an error
// the chain has no current subscription.
func (c *Chain) Subscribe(cl *client.Client, after string) (*client.Subscription, error) {
	c.sub.Store(nil) // so that the new one's subscribed reply waits for it
	s, err := cl.Subscribe(c.channel, client.Handler{After: after, OnMessage: c.onMessage, OnSubscribed: c.onSubscribed, OnDuplicate: c.onDuplicate})
	if err != nil {
		return nil, err
	}
	c.sub.Store(s)
	return s, nil
}

// Subscription returns the current subscription, nil before the first
// Subscribe returned or after one failed.
func (c *Chain) Subscription() *client.Subscription { return c.sub.Load() }

func (c *Chain) onMessage(m client.Message) {
	var d struct {
		Seq *int
		Ch  *string
	}
	ev := event{message: true, id: stream.Max, seq: -1}
	if id, ok := stream.ParseID(m.ID); ok {
		ev.id = id
	} else {
		ev.badID = m.ID
	}
	if json.Unmarshal(m.Data, &d) == nil && d.Seq != nil {
		ev.seq = *d.Seq
	}
	if d.Ch != nil && *d.Ch != c.channel {
		ev.ch = *d.Ch
	}
	c.mu.Lock()
	c.events = append(c.events, ev)
	c.mu.Unlock()
	if c.count != nil {
		c.count.Add(1)
	}
}

func (c *Chain) onDuplicate(m client.Message, last string) {
	c.mu.Lock()
	c.dups = append(c.dups, fmt.Sprintf("message %s sent again or out of order after %s (dropped by the client)", m.ID, last))
	c.mu.Unlock()
}

func (c *Chain) onSubscribed(recovered bool) {
	// The handler can run before Subscribe has returned to the caller.
	s := c.sub.Load()
	for s == nil {
		time.Sleep(time.Millisecond)
		s = c.sub.Load()
	}
	pos, ok := stream.ParseID(s.LastID())
	if !ok {
		pos = stream.Max // reported by Check
	}
	c.mu.Lock()
	c.events = append(c.events, event{id: pos, seq: -1, recovered: recovered})
	c.mu.Unlock()
}

// Close marks the chain ended (unsubscribed, or its client gone for
// good): from then on it is owed only what was published up to the last
// thing it got. It does not unsubscribe.
func (c *Chain) Close() {
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
}

// Subscribed reports whether the server has answered the chain's first
// subscribe.
func (c *Chain) Subscribed() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.events) > 0
}

// Messages returns how many messages the chain got so far.
func (c *Chain) Messages() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, ev := range c.events {
		if ev.message {
			n++
		}
	}
	return n
}

// Check returns what the chain's events break of the delivery contract,
// given what was published to its channel (l, which has stopped), and a
// line for each resume told recovered:false. The problems, with full:
//
//   - a message before the first subscribed reply, or a reply without a
//     position;
//   - a message whose id is not a stream id;
//   - a message of another channel: the "ch" of its data is not the
//     chain's;
//   - a message not after the id the client held: delivered twice, or
//     out of order, whether the client handed it on or dropped it
//     (Handler.OnDuplicate); a sequence number delivered twice (a publish
//     written twice counts too), or under another id than its
//     acknowledgement's, or one never published;
//   - recovered:true that moved the position, or recovered:false whose
//     position is not after the id held, or is no acknowledged
//     message's id while no publish failed: the position is the
//     predecessor of the oldest message left, a message published after
//     the id held, and so acknowledged unless its publish failed (its
//     id unknown), as long as Redis loses no write (the chaos test's
//     fsyncs every one, the soak's never restarts);
//   - an acknowledged message from the first position on (up to the last
//     event of a closed chain) not delivered, but for those in a
//     recovered:false gap;
//   - acknowledged ids that do not rise with the sequence numbers: each
//     publish to a channel started after the one before it was answered.
//
// Without full, only acknowledged messages still owed (and a chain not
// answered yet): the condition to wait for before checking in full.
func (c *Chain) Check(l *Log, full bool) (problems, gaps []string) {
	c.mu.Lock()
	events := slices.Clone(c.events)
	closed := c.closed
	dups := slices.Clone(c.dups)
	c.mu.Unlock()
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(events) == 0 {
		if closed {
			return nil, nil // ended before the server answered
		}
		return []string{"never subscribed"}, nil
	}
	if events[0].message {
		return []string{"no subscribed reply before the first message"}, nil
	}
	if events[0].id == stream.Max {
		return []string{"subscribed without a position"}, nil
	}
	bad := func(format string, args ...any) { problems = append(problems, fmt.Sprintf(format, args...)) }
	ackedIDs := map[stream.ID]bool{}
	for _, id := range l.acked {
		ackedIDs[id] = true
	}
	// skipped are the intervals (held, position] of the resumes told
	// recovered:false: what they lost, and nothing else, may be missing.
	type interval struct{ from, to stream.ID }
	var skipped []interval
	in := func(id stream.ID) bool {
		return slices.ContainsFunc(skipped, func(g interval) bool { return g.from.Less(id) && !g.to.Less(id) })
	}
	start := events[0].id
	got := map[stream.ID]bool{}
	seqs := map[int]stream.ID{}
	cur := start // the id the client holds
	for _, ev := range events[1:] {
		if !ev.message {
			switch {
			case ev.id == stream.Max:
				bad("subscribed without a position")
			case ev.recovered && ev.id != cur:
				bad("recovered:true moved the position from %s to %s", cur, ev.id)
			case !ev.recovered:
				if !cur.Less(ev.id) {
					bad("recovered:false with position %s, not after the id held %s", ev.id, cur)
				} else if !ackedIDs[ev.id] && len(l.failed) == 0 {
					bad("recovered:false at position %s, which no publish wrote", ev.id)
				}
				skipped = append(skipped, interval{cur, ev.id})
				n := 0
				for id := range ackedIDs {
					if cur.Less(id) && !ev.id.Less(id) {
						n++
					}
				}
				gaps = append(gaps, fmt.Sprintf("recovered:false after %s: position %s, %d acknowledged messages skipped", cur, ev.id, n))
				cur = ev.id
			}
			continue
		}
		if ev.badID != "" {
			bad("message with id %q (seq %d), not a stream id", ev.badID, ev.seq)
			continue
		}
		if ev.ch != "" {
			bad("message %s (seq %d) of channel %q delivered on %q", ev.id, ev.seq, ev.ch, c.channel)
			continue
		}
		if !cur.Less(ev.id) {
			bad("message %s (seq %d) after %s: duplicate or out of order", ev.id, ev.seq, cur)
		}
		cur = ev.id
		got[ev.id] = true
		if prev, dup := seqs[ev.seq]; dup {
			bad("seq %d delivered twice, as %s and %s", ev.seq, prev, ev.id)
		}
		seqs[ev.seq] = ev.id
		if id, ok := l.acked[ev.seq]; ok && id != ev.id {
			bad("seq %d delivered as %s, acknowledged as %s", ev.seq, ev.id, id)
		} else if _, failed := l.failed[ev.seq]; !ok && !failed {
			bad("message %s carries seq %d, which was never published", ev.id, ev.seq)
		}
	}
	problems = append(problems, dups...)
	if !full {
		problems = problems[:0]
	}
	// Every acknowledged message after the first position (up to the
	// last event of a closed chain), but those a recovered:false skipped.
	owed, missing := 0, 0
	var first string
	ackedSeqs := slices.Sorted(maps.Keys(l.acked))
	for _, seq := range ackedSeqs {
		id := l.acked[seq]
		if !start.Less(id) || in(id) || (closed && cur.Less(id)) {
			continue
		}
		owed++
		if got[id] {
			continue
		}
		if missing == 0 {
			first = fmt.Sprintf("seq %d (%s)", seq, id)
		}
		missing++
	}
	if missing > 0 {
		bad("%d acknowledged messages of %d owed not delivered, the first %s (resumes told recovered:false: %d; received %d)", missing, owed, first, len(skipped), len(got))
	}
	if full {
		// Acknowledged ids rise with the sequence numbers: each publish
		// started after the one before was acknowledged.
		var last stream.ID
		for _, seq := range ackedSeqs {
			id := l.acked[seq]
			if !last.Less(id) {
				bad("seq %d acknowledged as %s, not after %s", seq, id, last)
			}
			last = id
		}
	}
	return problems, gaps
}
