package main

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

// pubLog is what was published to one channel: the id of each
// acknowledged publish by its sequence number, and the sequence numbers
// whose publish failed (written or not: unknown).
type pubLog struct {
	mu     sync.Mutex
	acked  map[int]stream.ID
	failed map[int]error
}

func newPubLog() *pubLog { return &pubLog{acked: map[int]stream.ID{}, failed: map[int]error{}} }

func (p *pubLog) ack(seq int, id string) error {
	sid, ok := stream.ParseID(id)
	if !ok {
		return fmt.Errorf("publish %d acknowledged with id %q, not a stream id", seq, id)
	}
	p.mu.Lock()
	p.acked[seq] = sid
	p.mu.Unlock()
	return nil
}

func (p *pubLog) fail(seq int, err error) {
	p.mu.Lock()
	p.failed[seq] = err
	p.mu.Unlock()
}

// chain is one logical subscription of a client to a channel, from its
// first subscribe to its unsubscribe (or the client leaving for good),
// across every reconnect: the Go client's own ones (MAX_LIFETIME, a
// drained egress) and the soak's (a client that closes itself and dials
// again with Handler.After, as an application that stored its position).
// It records the events in the order the client delivered them.
type chain struct {
	channel string
	got     *atomic.Int64                       // counts the messages, when set
	sub     atomic.Pointer[client.Subscription] // the current one; nil while one is being made
	mu      sync.Mutex
	events  []event
	// closed: unsubscribed, or its client left. Messages after its last
	// event are not owed (they may have been on their way when it ended).
	closed bool
}

// event is a message, or a subscribed reply with the position the
// subscription holds after it (Subscription.LastID).
type event struct {
	message   bool
	id        stream.ID // the message's id, or the position
	seq       int
	recovered bool
}

func (c *chain) onMessage(m client.Message) {
	var d struct{ Seq *int }
	ev := event{message: true, id: stream.Max, seq: -1}
	if id, ok := stream.ParseID(m.ID); ok {
		ev.id = id
	}
	if json.Unmarshal(m.Data, &d) == nil && d.Seq != nil {
		ev.seq = *d.Seq
	}
	c.mu.Lock()
	c.events = append(c.events, ev)
	c.mu.Unlock()
	if c.got != nil {
		c.got.Add(1)
	}
}

func (c *chain) onSubscribed(recovered bool) {
	// The handler can run before Subscribe has returned to the soak.
	s := c.sub.Load()
	for s == nil {
		time.Sleep(time.Millisecond)
		s = c.sub.Load()
	}
	pos, ok := stream.ParseID(s.LastID())
	if !ok {
		pos = stream.Max // reported by check
	}
	c.mu.Lock()
	c.events = append(c.events, event{id: pos, seq: -1, recovered: recovered})
	c.mu.Unlock()
}

func (c *chain) handler(after string) client.Handler {
	return client.Handler{After: after, OnMessage: c.onMessage, OnSubscribed: c.onSubscribed}
}

func (c *chain) close() {
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
}

// check returns what the chain's events break of the delivery contract
// (docs/protocol.md), given what was published to its channel (p, which
// has stopped), and a line for each resume told recovered:false: nothing
// twice, in stream order, and every acknowledged message from the first
// subscription on (to the chain's last event, if it was closed), except
// those in the gap right at a resume told recovered:false (between the
// last id the client held and the position the reply gave). Without
// full, it only looks for acknowledged messages still owed: the
// condition to wait for at the end. It is e2e/chaos_test.go's check.
func (c *chain) check(p *pubLog, full bool) (problems, gaps []string) {
	c.mu.Lock()
	events := slices.Clone(c.events)
	closed := c.closed
	c.mu.Unlock()
	p.mu.Lock()
	defer p.mu.Unlock()
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
	for _, id := range p.acked {
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
				// The position the stream goes on from is the
				// predecessor of the oldest message left: a message
				// published after the one held.
				if !cur.Less(ev.id) {
					bad("recovered:false with position %s, not after the id held %s", ev.id, cur)
				} else if !ackedIDs[ev.id] && len(p.failed) == 0 {
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
		if !cur.Less(ev.id) {
			bad("message %s (seq %d) after %s: duplicate or out of order", ev.id, ev.seq, cur)
		}
		cur = ev.id
		got[ev.id] = true
		if prev, dup := seqs[ev.seq]; dup {
			bad("seq %d delivered twice, as %s and %s", ev.seq, prev, ev.id)
		}
		seqs[ev.seq] = ev.id
		if id, ok := p.acked[ev.seq]; ok && id != ev.id {
			bad("seq %d delivered as %s, acknowledged as %s", ev.seq, ev.id, id)
		} else if _, failed := p.failed[ev.seq]; !ok && !failed {
			bad("message %s carries seq %d, which was never published", ev.id, ev.seq)
		}
	}
	if !full {
		problems = problems[:0]
	}
	// Every acknowledged message after the first position (up to the
	// last event of a closed chain), but those a recovered:false skipped.
	owed, missing := 0, 0
	var first string
	for seq := range slices.Values(slices.Sorted(maps.Keys(p.acked))) {
		id := p.acked[seq]
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
	return problems, gaps
}
