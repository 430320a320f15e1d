package main

import (
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/wsrelay/wsrelay/shared/client"
)

// targetedWindow is how near a targeted send its target connection's end
// must be for the send to be allowed to miss it: from targetedWindow
// before the send's start (the client saw the close, the egress had not
// yet removed the connection's record, and the ingress found it) to
// targetedWindow after its acknowledgement (the connection was closing
// when its egress read the send from its inbox: a cut at MAX_LIFETIME, a
// drain, the client's own close). docs/api.md, "Send to a connection"
// and "Send to a user": a send reaches the connections live when it is
// made, and misses one that closes meanwhile.
const targetedWindow = 2 * time.Second

// targetedLog records every acknowledged targeted send, every targeted
// message a client got and the life of every connection, so that the end
// can check the sends one by one (check). Safe for concurrent use.
type targetedLog struct {
	t0 time.Time // the run's start: times are printed from it

	mu       sync.Mutex
	sends    []targetedSend
	receipts []receipt
	conns    map[string]*connLife // by connection id
	order    []string             // connection ids, in the order of their welcome
}

// targetedSend is one acknowledged send.
type targetedSend struct {
	n      int  // the {"n": n} of its data, unique in the run
	toUser bool // to user, else to conn
	user   string
	// conn is the connection sent to; for a send to a user, the
	// connection the soak knew the user by at the send (shown, not
	// checked: a user is checked on all of its connections).
	conn         string
	start, acked time.Time // the call's start and its acknowledgement
	connections  int       // a send to a user: how many the ingress targeted
	// gone: a send to a connection answered 404 connection_not_found
	// (acked is the answer's time), allowed only if the connection had
	// ended by then.
	gone bool
}

func (s targetedSend) kind() string {
	if s.toUser {
		return "user"
	}
	return "connection"
}

// receipt is one targeted message a client got.
type receipt struct {
	n          int    // -1: data without a number
	user, conn string // the client's user, and the connection it came on
	target     string // the frame's "target": "user" or "connection"
	at         time.Time
}

// connLife is one connection's life, as its client saw it.
type connLife struct {
	id, user   string
	welcome    time.Time
	closing    time.Time // the soak began closing it (closingWhy); zero if it did not
	closingWhy string
	ended      time.Time // the client saw it end (endedWhy); zero if it did not
	endedWhy   string
}

// endAt is when the connection began to end: the soak's close of it or
// the end its client saw, the earlier; zero while it is live.
func (c *connLife) endAt() time.Time {
	if !c.closing.IsZero() && (c.ended.IsZero() || c.closing.Before(c.ended)) {
		return c.closing
	}
	return c.ended
}

func newTargetedLog(t0 time.Time) *targetedLog {
	return &targetedLog{t0: t0, conns: map[string]*connLife{}}
}

func (l *targetedLog) sent(s targetedSend) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.sends = append(l.sends, s)
}

func (l *targetedLog) got(r receipt) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.receipts = append(l.receipts, r)
}

// gotMessage records a targeted message that user's connection conn got.
func (l *targetedLog) gotMessage(at time.Time, user, conn string, m client.Message) {
	var d struct {
		N *int `json:"n"`
	}
	n := -1
	if json.Unmarshal(m.Data, &d) == nil && d.N != nil {
		n = *d.N
	}
	l.got(receipt{n: n, user: user, conn: conn, target: m.Target, at: at})
}

func (l *targetedLog) welcome(at time.Time, user, conn string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.conns[conn] == nil {
		l.order = append(l.order, conn)
	}
	l.conns[conn] = &connLife{id: conn, user: user, welcome: at}
}

// closing records that the soak began closing conn (why: a resume, a
// leave, the end of the run), unless it had ended already.
func (l *targetedLog) closing(at time.Time, conn, why string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if c := l.conns[conn]; c != nil && c.closing.IsZero() && c.ended.IsZero() {
		c.closing, c.closingWhy = at, why
	}
}

// end records that conn's client saw it end, and why.
func (l *targetedLog) end(at time.Time, conn, why string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if c := l.conns[conn]; c != nil && c.ended.IsZero() {
		c.ended, c.endedWhy = at, why
	}
}

// verdictKind is what check found wrong with a send.
type verdictKind int

const (
	// missAllowed: not received, and the contract allows it: its target
	// connection (every one of the user's) ended within the window of the
	// send, or the user had none.
	missAllowed verdictKind = iota
	// missUnexplained: a connection live at the send and after it did not
	// get it.
	missUnexplained
	duplicate  // a connection got it twice
	misrouted  // a connection that was not its target got it, or as the other kind
	unreadable // a targeted message without a number
)

func (k verdictKind) String() string {
	return [...]string{"missed, allowed", "missed, unexplained", "received twice", "misrouted", "unreadable"}[k]
}

// verdict is one finding of check.
type verdict struct {
	kind   verdictKind
	send   targetedSend // zero for unreadable
	detail string
}

// check checks each acknowledged send against what the clients got: a
// send to a connection must reach that connection, and a send to a user
// each of the user's connections that was welcomed before the send
// started, once, and nothing else, unless the connection ended within w
// of the send (targetedWindow). A connection welcomed during the send
// need not get it, and one welcomed after it may (an egress that caught
// its inbox up delivers to the user's connections of then). It returns
// how many sends were received as they should be and a verdict for each
// of the others, in n order.
func (l *targetedLog) check(w time.Duration) (received int, verdicts []verdict) {
	l.mu.Lock()
	defer l.mu.Unlock()
	byN := map[int][]receipt{}
	for _, r := range l.receipts {
		if r.n < 0 {
			verdicts = append(verdicts, verdict{kind: unreadable, detail: fmt.Sprintf("on %s of %s at %s", r.conn, r.user, l.at(r.at))})
			continue
		}
		byN[r.n] = append(byN[r.n], r)
	}
	sends := slices.SortedFunc(slices.Values(l.sends), func(a, b targetedSend) int { return a.n - b.n })
	for _, s := range sends {
		if s.gone {
			// Not found: the connection must have ended before the
			// answer (or within w of it), not have been live.
			switch c := l.conns[s.conn]; {
			case c == nil:
				verdicts = append(verdicts, verdict{kind: missUnexplained, send: s, detail: "answered 404, and " + s.conn + " was never welcomed"})
			case c.endAt().IsZero():
				verdicts = append(verdicts, verdict{kind: missUnexplained, send: s, detail: "answered 404 while " + s.conn + " was live, and it stayed live"})
			case c.endAt().After(s.acked.Add(w)):
				verdicts = append(verdicts, verdict{kind: missUnexplained, send: s, detail: fmt.Sprintf("answered 404, and %s ended %s from the send's start, after the answer", s.conn, signed(c.endAt().Sub(s.start)))})
			}
			continue
		}
		// What each connection got: misrouted copies are findings of their
		// own and do not count as received.
		var found []verdict
		gotBy := map[string]int{}
		right := 0
		for _, r := range byN[s.n] {
			gotBy[r.conn]++
			switch {
			case r.target != s.kind():
				found = append(found, verdict{kind: misrouted, send: s, detail: fmt.Sprintf("%s of %s got it as a send to a %s", r.conn, r.user, r.target)})
			case s.toUser && r.user != s.user, !s.toUser && r.conn != s.conn:
				found = append(found, verdict{kind: misrouted, send: s, detail: fmt.Sprintf("%s of %s got it at %s", r.conn, r.user, l.at(r.at))})
			default:
				right++
			}
		}
		for _, id := range slices.Sorted(maps.Keys(gotBy)) {
			if n := gotBy[id]; n > 1 {
				found = append(found, verdict{kind: duplicate, send: s, detail: fmt.Sprintf("%s got it %d times", id, n)})
			}
		}
		// The connections that should have got it.
		var owed []*connLife
		if s.toUser {
			for _, id := range l.order {
				if c := l.conns[id]; c.user == s.user && c.welcome.Before(s.start) && (c.endAt().IsZero() || !c.endAt().Before(s.start.Add(-w))) {
					owed = append(owed, c)
				}
			}
		} else if c := l.conns[s.conn]; c != nil {
			owed = append(owed, c)
		}
		var allowed, unexplained []string
		reached := 0
		for _, c := range owed {
			if gotBy[c.id] > 0 {
				reached++
				continue
			}
			switch e := c.endAt(); {
			case e.IsZero():
				unexplained = append(unexplained, c.id+" was live and stayed live")
			case e.Before(s.start.Add(-w)) || e.After(s.acked.Add(w)):
				unexplained = append(unexplained, fmt.Sprintf("%s ended %s from the send's start, outside the window", c.id, signed(e.Sub(s.start))))
			default:
				allowed = append(allowed, fmt.Sprintf("%s ended %s from the send's start", c.id, signed(e.Sub(s.start))))
			}
		}
		switch {
		case len(unexplained) > 0:
			found = append([]verdict{{kind: missUnexplained, send: s, detail: strings.Join(append(unexplained, allowed...), "; ")}}, found...)
		case right > 0 || reached > 0: // got, if only as the wrong kind
		case len(allowed) > 0:
			found = append([]verdict{{kind: missAllowed, send: s, detail: strings.Join(allowed, "; ")}}, found...)
		case s.toUser:
			found = append([]verdict{{kind: missAllowed, send: s, detail: fmt.Sprintf("%s had no connection at the send (the ingress targeted %d)", s.user, s.connections)}}, found...)
		default:
			found = append([]verdict{{kind: missUnexplained, send: s, detail: s.conn + " was never welcomed"}}, found...)
		}
		if len(found) == 0 {
			received++
		}
		verdicts = append(verdicts, found...)
	}
	return received, verdicts
}

// line is v on one line: the send, what is wrong, and the lives of the
// target user's connections around it.
func (l *targetedLog) line(v verdict) string {
	if v.kind == unreadable {
		return fmt.Sprintf("targeted message without a number (%s): %s", v.kind, v.detail)
	}
	s := v.send
	l.mu.Lock()
	defer l.mu.Unlock()
	var sb strings.Builder
	fmt.Fprintf(&sb, "targeted n=%d to %s ", s.n, s.kind())
	if s.toUser {
		fmt.Fprintf(&sb, "%s (%d connections; known as %s)", s.user, s.connections, orNone(s.conn))
	} else {
		fmt.Fprintf(&sb, "%s (of %s)", s.conn, s.user)
	}
	fmt.Fprintf(&sb, " sent %s, acknowledged %s: %s: %s; %s's connections:", l.at(s.start), l.at(s.acked), v.kind, v.detail, s.user)
	near := 0
	for _, id := range l.order {
		c := l.conns[id]
		if c.user != s.user || c.welcome.After(s.acked.Add(10*time.Second)) || (!c.endAt().IsZero() && c.endAt().Before(s.start.Add(-10*time.Second))) {
			continue
		}
		near++
		fmt.Fprintf(&sb, " %s welcome %s", c.id, l.at(c.welcome))
		if !c.closing.IsZero() {
			fmt.Fprintf(&sb, ", closing %s (%s)", l.at(c.closing), c.closingWhy)
		}
		if !c.ended.IsZero() {
			fmt.Fprintf(&sb, ", ended %s (%s)", l.at(c.ended), c.endedWhy)
		}
		sb.WriteString(";")
	}
	if near == 0 {
		sb.WriteString(" none within 10 s")
	}
	return strings.TrimSuffix(sb.String(), ";")
}

// at is t as the time since the run's start, to the millisecond.
func (l *targetedLog) at(t time.Time) string {
	return fmt.Sprintf("t=%.3fs", t.Sub(l.t0).Seconds())
}

func signed(d time.Duration) string {
	if d < 0 {
		return "-" + (-d).Round(time.Millisecond).String()
	}
	return "+" + d.Round(time.Millisecond).String()
}

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}
