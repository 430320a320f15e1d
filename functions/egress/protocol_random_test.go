package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/gorilla/websocket"
	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"

	"github.com/wsrelay/wsrelay/shared/auth"
	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/protocol"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/stream"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// TestProtocolRandomized drives several clients, each on real WebSocket
// connections one after another, against an egress on a real Redis, with
// random sequences of valid and invalid frames (docs/protocol.md) while
// messages are published, and checks every reply and close against a
// model of the contract written from the docs:
//
//   - each request gets the reply the docs give it, in order, echoing its
//     ref; ten bad requests in a row close with 1008;
//   - a connection is closed only with the code the docs give for what it
//     sent (1002, 1007, 1009, 1008, the echo of its own close), or 4004
//     once its token expired;
//   - a message comes only on a channel subscribed (from its subscribed
//     reply to its unsubscribed one), and each subscription receives
//     exactly the channel's messages after its position, in order, once;
//     a resume from an id the client held is recovered;
//   - the registry and the hub hold the subscriptions the replies told of;
//   - each connection's log line has the close the client saw, and the
//     frames it sent and read;
//   - once every socket is gone, so are its registry records, the hub's
//     subscriptions and every goroutine.
//
// The seed is logged; WSRELAY_PROTOCOL_SEED repeats a run's choices (the
// interleaving of the clients and the publisher is the scheduler's), and
// WSRELAY_PROTOCOL_STEPS sets the steps per client (default 700, a few
// seconds). For many seeds: -count=N.
func TestProtocolRandomized(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	seed := envUint(t, "WSRELAY_PROTOCOL_SEED", uint64(time.Now().UnixNano()))
	steps := int(envUint(t, "WSRELAY_PROTOCOL_STEPS", 700))
	t.Logf("seed %d (WSRELAY_PROTOCOL_SEED=%d repeats the choices)", seed, seed)

	o, err := redis.ParseURL(redistest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	rdb := redis.NewClient(o)
	prefix := redistest.Prefix(t)
	defer func() { redistest.Cleanup(rdb, prefix); rdb.Close() }()
	logs := &testkit.SyncBuffer{}
	e := startEgressLogging(t, rdb, prefix, map[string]string{
		"JWT_SECRET":            testSecret,
		"PUBLIC_CHANNELS":       "pub-*",
		"MAX_SUBSCRIPTIONS":     strconv.Itoa(rndMaxSubs),
		"MAX_FRAME_BYTES":       strconv.Itoa(rndMaxFrame),
		"MAX_FRAMES_PER_SECOND": "100",
		"PING_INTERVAL":         "3s",
		"SHUTDOWN_GRACE":        "2s",
	}, logs)
	defer e.stop()
	ks := keys.Scheme{Prefix: prefix}

	pub := &rndPub{ids: map[string][]stream.ID{}, data: map[string]map[stream.ID]string{}}
	stopPub, pubDone := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(pubDone)
		pub.run(t, stream.NewStore(rdb), ks, rand.New(rand.NewPCG(seed, 1<<32)), stopPub)
	}()

	var stepped, finished sync.WaitGroup
	clients := make([]*rndClient, rndClients)
	for i := range clients {
		cl := &rndClient{
			t: t, name: fmt.Sprintf("client %d", i), user: fmt.Sprintf("user-%d", i), seed: seed, calm: i == 0,
			rdb: rdb, ks: ks,
			rng: rand.New(rand.NewPCG(seed, uint64(i))), e: e, pub: pub,
			pos: map[string]stream.ID{}, known: map[string]map[stream.ID]bool{},
		}
		clients[i] = cl
		stepped.Add(1)
		finished.Go(func() {
			done := sync.OnceFunc(stepped.Done)
			defer done()
			defer cl.recoverAbort()
			n := steps
			if cl.calm {
				n /= 2
			}
			for range n {
				cl.step()
			}
			done()
			<-pubDone
			cl.finish()
		})
	}
	stepped.Wait()
	close(stopPub)
	<-pubDone
	finished.Wait()
	if t.Failed() {
		return
	}

	// Every socket is closed: nothing of them is left in the egress or
	// in the registry.
	testkit.Eventually(t, 10*time.Second, func() error { return rndLeftovers(e.s, rdb, prefix) })
	lines := map[string]map[string]any{}
	for _, l := range logs.JSONLines(t) {
		if l["msg"] == "connection closed" {
			lines[fmt.Sprint(l["conn"])] = l
		}
		if l["level"] != "INFO" && l["level"] != "DEBUG" {
			t.Errorf("egress logged %v", l)
		}
	}
	stats := map[string]int{}
	for _, cl := range clients {
		for _, c := range cl.conns {
			l := lines[c.id]
			if l == nil {
				t.Errorf("%s: no log line for connection %s", cl.name, c.id)
				continue
			}
			if c.logCode == 0 {
				continue // the close raced its token's expiry
			}
			if code, _ := l["close_code"].(float64); int(code) != c.logCode || l["closed_by"] != c.logBy {
				t.Errorf("%s: connection %s logged close %v by %v, the client saw %d by %s", cl.name, c.id, l["close_code"], l["closed_by"], c.logCode, c.logBy)
			}
			if in, _ := l["frames_in"].(float64); c.sentExact && int(in) != c.sent {
				t.Errorf("%s: connection %s logged %v frames in, the client sent %d", cl.name, c.id, l["frames_in"], c.sent)
			}
			if out, _ := l["frames_out"].(float64); !c.dropped && int(out) != c.got {
				t.Errorf("%s: connection %s logged %v frames out, the client read %d", cl.name, c.id, l["frames_out"], c.got)
			}
		}
		for k, n := range cl.stats {
			stats[k] += n
		}
	}
	t.Logf("published %d messages; all clients: %v", pub.n, stats)
	e.stop()
}

type rndAction int

const (
	aPing rndAction = iota
	aSub
	aSubAfter
	aUnsub
	aBatch
	aRefresh
	aInvalid
	aBinary
	aFragmented
	aControlPing
	aFatal
	aClientClose
	aDrop
	aCheck
	aWait
	nActions
)

var rndActionNames = [nActions]string{"ping", "subscribe", "subscribe after", "unsubscribe", "batch", "refresh", "invalid", "binary",
	"fragmented", "control ping", "fatal", "client close", "drop", "check", "wait"}

// Weights of the actions: most clients do everything; the calm one only
// what keeps its connection open, long enough for its token to expire.
var (
	rndBusy = [nActions]int{aPing: 10, aSub: 14, aSubAfter: 10, aUnsub: 12, aBatch: 10, aRefresh: 6, aInvalid: 8, aBinary: 3,
		aFragmented: 7, aControlPing: 4, aFatal: 2, aClientClose: 1, aDrop: 1, aCheck: 2, aWait: 10}
	rndCalm = [nActions]int{aPing: 5, aSub: 10, aSubAfter: 10, aUnsub: 8, aRefresh: 1, aControlPing: 3, aCheck: 4, aWait: 40}
)

const (
	rndClients  = 4
	rndMaxSubs  = 3
	rndMaxFrame = 2048
)

var (
	// Channels the clients use: their tokens allow ch-* (or only ch-a, or
	// none), pub-* is public, priv-1 never allowed.
	rndChannels = []string{"ch-a", "ch-b", "ch-c", "pub-1", "priv-1"}
	rndBadNames = []string{"", "bad name", "-x", "a/b", "é", strings.Repeat("x", 129)}
	// The channel name syntax of docs/protocol.md.
	rndNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$`)
	// Ids that are not message ids.
	rndBadAfters = []string{"x", "1-", "-1", "", "1-2-3", "18446744073709551616-0", "1-18446744073709551616", " 1-0", "+1-0", "1-+0", "0x1-0", "1.5-0"}
)

// rndLeftovers reports what is left of ended connections in s and in the
// registry.
func rndLeftovers(s *Server, rdb redis.UniversalClient, prefix string) error {
	if n := s.open.Load(); n != 0 {
		return fmt.Errorf("%d connections still open", n)
	}
	h := s.hub
	h.mu.Lock()
	if len(h.conns) != 0 || len(h.users) != 0 {
		h.mu.Unlock()
		return fmt.Errorf("hub still holds %d connections, %d users", len(h.conns), len(h.users))
	}
	for _, cs := range h.chans {
		if cs == h.inbox {
			continue
		}
		cs.mu.Lock()
		n := len(cs.subs) + len(cs.resuming)
		cs.mu.Unlock()
		if cs.refs != 0 || n != 0 {
			h.mu.Unlock()
			return fmt.Errorf("channel %s: %d references, %d subscribers", cs.name, cs.refs, n)
		}
	}
	h.mu.Unlock()
	ks, err := rdb.Keys(context.Background(), prefix+":*").Result()
	if err != nil {
		return err
	}
	for _, k := range ks {
		if strings.Contains(k, "{r:") || strings.HasSuffix(k, ":conns") {
			return fmt.Errorf("registry key %s left", k)
		}
	}
	return nil
}

// rndPub publishes to the channels and records every id.
type rndPub struct {
	mu   sync.Mutex
	ids  map[string][]stream.ID // in stream order
	data map[string]map[stream.ID]string
	n    int
}

func (p *rndPub) run(t *testing.T, store *stream.Store, ks keys.Scheme, rng *rand.Rand, stop <-chan struct{}) {
	for n := 0; ; {
		select {
		case <-stop:
			return
		default:
		}
		var as []stream.Append
		for range 1 + rng.IntN(3) {
			ch := rndChannels[rng.IntN(len(rndChannels))]
			n++
			as = append(as, stream.Append{Stream: ks.Stream(ch), Notify: ks.Notify(ch),
				Msg: stream.Message{Channel: ch, TS: time.Now().UnixMilli(), Data: []byte(strconv.Itoa(n))}})
		}
		ids, err := store.Append(context.Background(), as)
		if err != nil {
			t.Errorf("publish: %v", err)
			return
		}
		p.mu.Lock()
		for i, a := range as {
			id := stream.MustParseID(ids[i])
			ch := a.Msg.Channel
			p.ids[ch] = append(p.ids[ch], id)
			if p.data[ch] == nil {
				p.data[ch] = map[stream.ID]string{}
			}
			p.data[ch][id] = string(a.Msg.Data)
			p.n++
		}
		p.mu.Unlock()
		time.Sleep(time.Duration(rng.IntN(10)) * time.Millisecond)
	}
}

func (p *rndPub) has(ch string, id stream.ID) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	_, ok := p.data[ch][id]
	return ok
}

// random returns a published id of ch, if any.
func (p *rndPub) random(rng *rand.Rand, ch string) (stream.ID, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	ids := p.ids[ch]
	if len(ids) == 0 {
		return stream.ID{}, false
	}
	return ids[rng.IntN(len(ids))], true
}

// after returns the published ids of ch greater than start.
func (p *rndPub) after(ch string, start stream.ID) []stream.ID {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []stream.ID
	for _, id := range p.ids[ch] {
		if start.Less(id) {
			out = append(out, id)
		}
	}
	return out
}

type rndTokKind int

const (
	tokWide      rndTokKind = iota // ch-*
	tokNarrow                      // ch-a
	tokNone                        // no channels claim: public ones only
	tokShort                       // ch-*, expiring in seconds
	tokExpired                     // refused
	tokOtherUser                   // refused
	tokGarbage                     // refused
	tokBadSig                      // refused
	nTokKinds
)

var rndTokNames = []string{"wide", "narrow", "none", "short", "expired", "other user", "garbage", "bad signature"}

type rndToken struct {
	kind rndTokKind
	raw  string
	exp  time.Time // as in the token (whole seconds)
}

// rndAllow is whether a token of kind allows ch (PUBLIC_CHANNELS=pub-*).
func rndAllow(kind rndTokKind, ch string) bool {
	if strings.HasPrefix(ch, "pub-") {
		return true
	}
	switch kind {
	case tokWide, tokShort:
		return strings.HasPrefix(ch, "ch-")
	case tokNarrow:
		return ch == "ch-a"
	}
	return false
}

// rndExp is a reply, or a close, a connection is owed.
type rndExp struct {
	desc   string
	typ    string          // reply type ("welcome" too); "" for a close
	codes  []string        // error: the codes the docs allow
	ref    json.RawMessage // the ref the reply echoes; nil: none
	bad    bool            // error: counts toward the ten bad requests
	ch     string          // subscribed, unsubscribed
	after  *stream.ID      // a subscribe's position
	recov  bool            // the resume must be recovered
	drops  map[string]bool // refresh: the subscriptions it ends first
	tok    *rndToken       // refresh
	closes []int           // a close with one of these codes
	by     string          // who closes, for the log line
}

func (e *rndExp) fail(bad bool, codes ...string) *rndExp {
	e.typ, e.bad, e.codes = protocol.TypeError, bad, codes
	return e
}

// rndSim is the state of a connection as the server sees it, to predict
// the replies to a frame.
type rndSim struct {
	subs map[string]bool
	kind rndTokKind
	bad  int
}

// refusals are what the server may answer a subscribe of ch, a valid
// name, with: the docs do not rank them, so any that applies is right.
// None: it is subscribed.
func (s *rndSim) refusals(ch string) []string {
	var codes []string
	if s.subs[ch] {
		codes = append(codes, protocol.CodeAlreadySubscribed)
	}
	if !rndAllow(s.kind, ch) {
		codes = append(codes, protocol.CodeForbidden)
	}
	if len(s.subs) >= rndMaxSubs {
		codes = append(codes, protocol.CodeTooManySubs)
	}
	return codes
}

// rndPart is one request of a text frame.
type rndPart struct {
	raw     string
	broken  bool // not a JSON object: invalid_json, the rest of the frame dropped
	predict func(*rndSim) *rndExp
}

type rndEvent struct {
	kind byte // 't' text, 'p' pong, 'c' close, 'e' read error
	data []byte
	code int
}

type rndSession struct {
	ch       string
	start    stream.ID
	ids      []stream.ID
	data     []string
	complete bool // received everything published
}

type rndConn struct {
	cl   *rndClient
	ws   *websocket.Conn
	nc   net.Conn
	wmu  sync.Mutex
	evMu sync.Mutex
	evs  []rndEvent
	sig  chan struct{}
	done chan struct{} // the reader has ended

	id       string
	tok      rndToken
	expired  bool // a token of the connection expired while it was in use
	subs     map[string]*rndSession
	bad      int
	exps     []*rndExp
	pings    []string // payloads of the pings sent and not answered
	waitPong string
	closed   bool
	dropped  bool // by the client, without reading what was in flight
	gotCode  int  // the close code received
	byServer bool // the server's close came first
	logCode  int  // the close its log line must have (0: not checked)
	logBy    string
	// The data frames sent (when sentExact: none whose count the docs
	// leave open) and the text frames received, for the log line.
	sent      int
	sentExact bool
	got       int
}

type rndClient struct {
	t     *testing.T
	calm  bool
	name  string
	user  string
	seed  uint64
	rng   *rand.Rand
	e     *secEgress
	rdb   redis.UniversalClient
	ks    keys.Scheme
	pub   *rndPub
	c     *rndConn
	conns []*rndConn
	// pos is the client's resume position per channel: the last id it
	// received, or the position of its subscribed reply.
	pos      map[string]stream.ID
	known    map[string]map[stream.ID]bool // ids of each channel's stream the client was told
	want     []string                      // subscribed when the last connection ended: resumed on the next
	sessions []*rndSession
	trace    []string
	seq      int
	stats    map[string]int
}

type rndAbort struct{}

func (cl *rndClient) fail(format string, args ...any) {
	cl.t.Errorf("%s (seed %d): %s\nlast frames, → sent, ← received:\n%s", cl.name, cl.seed, fmt.Sprintf(format, args...), strings.Join(cl.trace, "\n"))
	panic(rndAbort{})
}

func (cl *rndClient) recoverAbort() {
	r := recover()
	if r == nil {
		return
	}
	if _, ok := r.(rndAbort); !ok {
		panic(r)
	}
	if cl.c != nil {
		cl.c.nc.Close()
		<-cl.c.done
	}
}

func (cl *rndClient) tracef(format string, args ...any) {
	s := fmt.Sprintf(format, args...)
	if len(s) > 300 {
		s = s[:300] + "…"
	}
	cl.trace = append(cl.trace, s)
	if len(cl.trace) > 80 {
		cl.trace = cl.trace[1:]
	}
}

func (cl *rndClient) count(what string) {
	if cl.stats == nil {
		cl.stats = map[string]int{}
	}
	cl.stats[what]++
}

func (cl *rndClient) newToken(kind rndTokKind) rndToken {
	exp := time.Now().Add(time.Hour)
	claims := auth.Claims{Subject: cl.user, Channels: []string{"ch-*"}}
	secret := testSecret
	switch kind {
	case tokNarrow:
		claims.Channels = []string{"ch-a"}
	case tokNone:
		claims.Channels = nil
	case tokShort:
		// It expires while the connection is used: 4004 unless
		// refreshed in time. On a refresh it may expire before the
		// server reads it (invalid_token then).
		exp = time.Now().Add(time.Duration(2000+cl.rng.IntN(2000)) * time.Millisecond)
	case tokExpired:
		exp = time.Now().Add(-10 * time.Second)
	case tokOtherUser:
		claims.Subject = "mallory"
	case tokBadSig:
		secret = "another-secret-0123456789abcdef0123456"
	case tokGarbage:
		return rndToken{kind: kind, raw: []string{"", "a.b.c", "not a token", "x.y"}[cl.rng.IntN(4)]}
	}
	claims.Expires = exp
	raw, err := auth.SignHS256(secret, claims)
	if err != nil {
		cl.fail("sign: %v", err)
	}
	return rndToken{kind: kind, raw: raw, exp: time.Unix(exp.Unix(), 0)}
}

func jsonStr(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}

// genRef returns a ref as written in a request (empty: none), the ref
// the reply must echo, and whether the ref makes the request invalid.
func (cl *rndClient) genRef() (raw string, echo json.RawMessage, bad bool) {
	cl.seq++
	n := strconv.Itoa(cl.seq)
	switch cl.rng.IntN(48) {
	case 0, 1, 2, 17, 18, 19:
		return "", nil, false
	case 3:
		raw = `"` + strings.Repeat("r", 62) + `"` // 64 bytes, quotes included
	case 4:
		return `"` + strings.Repeat("r", 63) + `"`, nil, true
	case 5:
		return `{"n":` + n + `}`, nil, true
	case 6:
		return `[` + n + `]`, nil, true
	case 7:
		return `true`, nil, true
	case 8:
		return `null`, nil, true
	case 9:
		raw = "-" + n + ".5e1"
	case 10:
		raw = `"<&>` + n + `"`
	case 11, 12, 13, 14, 15:
		raw = `"r-` + n + `"`
	default:
		raw = n
	}
	return raw, json.RawMessage(raw), false
}

// obj writes a JSON object of fields (name, raw value) in random order,
// now and then pretty-printed.
func (cl *rndClient) obj(fields [][2]string) string {
	cl.rng.Shuffle(len(fields), func(i, j int) { fields[i], fields[j] = fields[j], fields[i] })
	var b strings.Builder
	b.WriteByte('{')
	for i, f := range fields {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(jsonStr(f[0]) + ":" + f[1])
	}
	b.WriteByte('}')
	if cl.rng.IntN(8) == 0 {
		var out bytes.Buffer
		if json.Indent(&out, []byte(b.String()), "", "  ") == nil {
			return out.String()
		}
	}
	return b.String()
}

func withRef(fields [][2]string, ref string) [][2]string {
	if ref != "" {
		fields = append(fields, [2]string{"ref", ref})
	}
	return fields
}

func (cl *rndClient) pingPart() rndPart {
	ref, echo, badRef := cl.genRef()
	desc := "ping " + ref
	return rndPart{raw: cl.obj(withRef([][2]string{{"type", `"ping"`}}, ref)), predict: func(*rndSim) *rndExp {
		e := &rndExp{desc: desc}
		if badRef {
			return e.fail(true, protocol.CodeInvalidFrame)
		}
		e.typ, e.ref = protocol.TypePong, echo
		return e
	}}
}

// inStream reports whether id is known to be in ch's stream (nothing is
// trimmed in this test).
func (cl *rndClient) inStream(ch string, id stream.ID) bool {
	return id.IsZero() || cl.known[ch][id] || cl.pub.has(ch, id)
}

func (cl *rndClient) subPart(ch string, after *string) rndPart {
	ref, echo, badRef := cl.genRef()
	fields := [][2]string{{"type", `"subscribe"`}, {"channel", jsonStr(ch)}}
	var aid stream.ID
	aok, recov := true, false
	desc := "subscribe " + ch + " " + ref
	if after != nil {
		fields = append(fields, [2]string{"after", jsonStr(*after)})
		aok = !slices.Contains(rndBadAfters, *after)
		if aok {
			aid = stream.MustParseID(*after)
			recov = cl.inStream(ch, aid)
		}
		desc += " after " + *after
	}
	return rndPart{raw: cl.obj(withRef(fields, ref)), predict: func(s *rndSim) *rndExp {
		e := &rndExp{desc: desc}
		if badRef {
			return e.fail(true, protocol.CodeInvalidFrame)
		}
		e.ref = echo
		var codes []string
		if !aok {
			codes = append(codes, protocol.CodeInvalidAfter)
		}
		if !rndNameRE.MatchString(ch) {
			codes = append(codes, protocol.CodeInvalidChannel)
		}
		if len(codes) > 0 {
			return e.fail(true, codes...)
		}
		if codes := s.refusals(ch); len(codes) > 0 {
			return e.fail(false, codes...)
		}
		s.subs[ch] = true
		e.typ, e.ch = protocol.TypeSubscribed, ch
		if after != nil {
			e.after, e.recov = &aid, recov
		}
		return e
	}}
}

func (cl *rndClient) unsubPart(ch string) rndPart {
	ref, echo, badRef := cl.genRef()
	desc := "unsubscribe " + ch + " " + ref
	return rndPart{raw: cl.obj(withRef([][2]string{{"type", `"unsubscribe"`}, {"channel", jsonStr(ch)}}, ref)), predict: func(s *rndSim) *rndExp {
		e := &rndExp{desc: desc}
		if badRef {
			return e.fail(true, protocol.CodeInvalidFrame)
		}
		e.ref = echo
		switch {
		case !rndNameRE.MatchString(ch):
			return e.fail(true, protocol.CodeInvalidChannel)
		case !s.subs[ch]:
			return e.fail(false, protocol.CodeNotSubscribed)
		}
		delete(s.subs, ch)
		e.typ, e.ch = protocol.TypeUnsubscribed, ch
		return e
	}}
}

func (cl *rndClient) refreshPart(kind rndTokKind) rndPart {
	tok := cl.newToken(kind)
	ref, echo, badRef := cl.genRef()
	fields := [][2]string{{"type", `"refresh"`}}
	if tok.raw != "" || cl.rng.IntN(2) == 0 {
		fields = append(fields, [2]string{"token", jsonStr(tok.raw)})
	}
	desc := "refresh (" + rndTokNames[kind] + ") " + ref
	return rndPart{raw: cl.obj(withRef(fields, ref)), predict: func(s *rndSim) *rndExp {
		e := &rndExp{desc: desc}
		if badRef {
			return e.fail(true, protocol.CodeInvalidFrame)
		}
		e.ref = echo
		switch kind {
		case tokWide, tokNarrow, tokNone, tokShort:
		case tokOtherUser:
			return e.fail(true, protocol.CodeForbidden)
		default:
			return e.fail(true, protocol.CodeInvalidToken)
		}
		e.drops = map[string]bool{}
		for ch := range s.subs {
			if !rndAllow(kind, ch) {
				e.drops[ch] = true
				delete(s.subs, ch)
			}
		}
		s.kind = kind
		e.typ, e.tok = protocol.TypeRefreshed, &tok
		return e
	}}
}

// invalidPart is a JSON object that is not a valid request.
func (cl *rndClient) invalidPart() rndPart {
	ref, echo, badRef := cl.genRef()
	var fields [][2]string
	codes := []string{protocol.CodeInvalidFrame}
	switch cl.rng.IntN(9) {
	case 0:
		fields, codes = [][2]string{{"type", `"dance"`}}, []string{protocol.CodeUnknownType}
	case 1:
		fields, codes = [][2]string{{"type", `"PING"`}}, []string{protocol.CodeUnknownType}
	case 2:
		fields = [][2]string{{"channel", `"ch-a"`}}
	case 3:
		fields = [][2]string{{"type", `"subscribe"`}, {"channel", "7"}}
	case 4:
		fields = [][2]string{{"type", `"subscribe"`}, {"channel", `"ch-a"`}, {"after", "5"}}
	case 5:
		fields = [][2]string{{"type", "5"}}
	case 6:
		fields = [][2]string{{"type", `"refresh"`}, {"token", `{"t":1}`}}
	case 7:
		fields = nil // {}
	case 8:
		// "" is a missing type or an unknown one: the docs do not say.
		fields, codes = [][2]string{{"type", `""`}}, []string{protocol.CodeInvalidFrame, protocol.CodeUnknownType}
	}
	raw := cl.obj(withRef(fields, ref))
	return rndPart{raw: raw, predict: func(*rndSim) *rndExp {
		e := &rndExp{desc: "invalid " + raw}
		if badRef {
			// A bad ref is invalid_frame, or whatever else is wrong
			// with the request; never echoed.
			return e.fail(true, append(codes, protocol.CodeInvalidFrame)...)
		}
		e.ref = echo
		return e.fail(true, codes...)
	}}
}

// brokenPart is not a JSON object; it cannot be completed by the parts
// after it (which start with '{').
func (cl *rndClient) brokenPart() rndPart {
	raws := []string{`[1,2]`, `"ping"`, `42`, `null`, `{"type":"ping"`, `{"type":"ping",`, `nope`, `}`}
	return rndPart{raw: raws[cl.rng.IntN(len(raws))], broken: true}
}

func (cl *rndClient) pickChannel() string {
	if cl.rng.IntN(7) == 0 {
		return rndBadNames[cl.rng.IntN(len(rndBadNames))]
	}
	return rndChannels[cl.rng.IntN(len(rndChannels))]
}

// pickAfter returns a position to subscribe to ch from.
func (cl *rndClient) pickAfter(ch string) string {
	r := cl.rng.IntN(100)
	switch {
	case r < 35:
		if p, ok := cl.pos[ch]; ok {
			return p.String()
		}
		return "0-0"
	case r < 55:
		if id, ok := cl.pub.random(cl.rng, ch); ok {
			return id.String()
		}
		return "0-0"
	case r < 63:
		return "0-0"
	case r < 70:
		return "99999999999999-0" // ahead of the stream
	case r < 85:
		// An id of another channel: anywhere in this one's.
		if id, ok := cl.pub.random(cl.rng, rndChannels[cl.rng.IntN(len(rndChannels))]); ok {
			return id.String()
		}
		return "1-1"
	}
	return rndBadAfters[cl.rng.IntN(len(rndBadAfters))]
}

// anyPart is a random request, valid or not.
func (cl *rndClient) anyPart() rndPart {
	switch r := cl.rng.IntN(100); {
	case r < 15:
		return cl.pingPart()
	case r < 35:
		return cl.subPart(cl.pickChannel(), nil)
	case r < 50:
		ch := cl.pickChannel()
		a := cl.pickAfter(ch)
		return cl.subPart(ch, &a)
	case r < 70:
		return cl.unsubPart(cl.pickChannel())
	case r < 78:
		k := rndTokKind(cl.rng.IntN(int(nTokKinds)))
		if k == tokShort {
			k = tokWide // its reply depends on when it is read: alone in a frame only
		}
		return cl.refreshPart(k)
	}
	return cl.invalidPart()
}

func (c *rndConn) sim() *rndSim {
	s := &rndSim{subs: map[string]bool{}, kind: c.tok.kind, bad: c.bad}
	for ch := range c.subs {
		s.subs[ch] = true
	}
	return s
}

// predict returns the replies owed to a text frame of parts, and the
// close after them when they make ten bad requests in a row.
func predict(s *rndSim, parts []rndPart) []*rndExp {
	var exps []*rndExp
	for _, p := range parts {
		var e *rndExp
		if p.broken {
			e = (&rndExp{desc: "broken " + p.raw}).fail(true, protocol.CodeInvalidJSON)
		} else {
			e = p.predict(s)
		}
		exps = append(exps, e)
		if ex := s.count(e); ex != nil {
			return append(exps, ex)
		}
		if p.broken {
			break // the rest of the frame is dropped
		}
	}
	return exps
}

// count applies a reply to the run of bad requests; it returns the close
// owed when the run reaches ten.
func (s *rndSim) count(e *rndExp) *rndExp {
	switch {
	case e.typ != protocol.TypeError:
		s.bad = 0
	case e.bad:
		s.bad++
		if s.bad >= 10 {
			return &rndExp{desc: "close after ten bad requests", closes: []int{protocol.ClosePolicy}, by: "server"}
		}
	}
	return nil
}

func closeExp(desc string, code int) *rndExp {
	return &rndExp{desc: desc, closes: []int{code}, by: "server"}
}

// textFrame joins parts into one frame's payload; now and then padded
// with whitespace to MAX_FRAME_BYTES, or one byte over it.
func (cl *rndClient) textFrame(parts []rndPart) []byte {
	seps := []string{"\n", " ", "", "\r\n", "\t\n "}
	var b strings.Builder
	for i, p := range parts {
		if i > 0 {
			b.WriteString(seps[cl.rng.IntN(len(seps))])
		}
		b.WriteString(p.raw)
	}
	switch cl.rng.IntN(40) {
	case 0, 1, 2, 3:
		return []byte(" \n" + b.String() + "\n")
	case 4:
		over := cl.rng.IntN(2)
		if cl.calm {
			over = 0 // it keeps its connection
		}
		if n := rndMaxFrame + over - b.Len(); n > 0 {
			b.WriteString(strings.Repeat(" ", n))
		}
	}
	return []byte(b.String())
}

// owed is what a data frame's payload is owed (and counts it as sent):
// over the read limit, the close 1009 alone.
func (c *rndConn) owed(payload []byte, exps []*rndExp) []*rndExp {
	c.sent++
	if len(payload) > rndMaxFrame {
		c.sentExact = false
		return []*rndExp{closeExp("over MAX_FRAME_BYTES", protocol.CloseTooBig)}
	}
	return exps
}

func (c *rndConn) write(b []byte) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	_ = c.nc.SetWriteDeadline(time.Now().Add(10 * time.Second))
	_, _ = c.nc.Write(b) // what happened shows in what is read
}

func (c *rndConn) push(ev rndEvent) {
	c.evMu.Lock()
	c.evs = append(c.evs, ev)
	c.evMu.Unlock()
	select {
	case c.sig <- struct{}{}:
	default:
	}
}

// next returns the next event, waiting until deadline (false: none).
func (c *rndConn) next(deadline time.Time) (rndEvent, bool) {
	for {
		c.evMu.Lock()
		if len(c.evs) > 0 {
			ev := c.evs[0]
			c.evs = c.evs[1:]
			c.evMu.Unlock()
			return ev, true
		}
		c.evMu.Unlock()
		d := time.Until(deadline)
		if d <= 0 {
			return rndEvent{}, false
		}
		t := time.NewTimer(d)
		select {
		case <-c.sig:
		case <-t.C:
		}
		t.Stop()
	}
}

func (cl *rndClient) connect() {
	r := cl.rng.IntN(100)
	if cl.calm {
		r = 30 // a short token: it expires while the calm client runs
	}
	kind := tokWide
	switch {
	case r < 25:
		kind = tokNarrow
	case r < 35:
		kind = tokShort
	case r < 40:
		kind = tokNone
	}
	tok := cl.newToken(kind)
	q := url.Values{}
	d := websocket.Dialer{HandshakeTimeout: 10 * time.Second}
	if cl.rng.IntN(2) == 0 {
		q.Set("token", tok.raw)
	} else {
		d.Subprotocols = []string{Subprotocol, "token." + tok.raw}
	}
	var initial []string
	if len(cl.want) == 0 && cl.rng.IntN(4) == 0 {
		for range 1 + cl.rng.IntN(4) {
			initial = append(initial, rndChannels[cl.rng.IntN(len(rndChannels))])
		}
		q.Set("channels", strings.Join(initial, ","))
	}
	if len(initial) > rndMaxSubs {
		// More names than a connection may hold: the upgrade is refused
		// whole. Connect again without them.
		_, resp, err := d.Dial(cl.e.url(q), nil)
		var body []byte
		if resp != nil {
			body, _ = io.ReadAll(resp.Body)
		}
		if err == nil || resp == nil || resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(body), `"`+protocol.CodeTooManySubs+`"`) {
			cl.fail("dial with %d initial channels: %v %v %s, want 400 %s", len(initial), err, resp, body, protocol.CodeTooManySubs)
		}
		cl.tracef("→ connect (%s token) channels=%v: refused, too many", rndTokNames[kind], initial)
		cl.count("connect refused: too many channels")
		initial = nil
		q.Del("channels")
	}
	ws, _, err := d.Dial(cl.e.url(q), nil)
	if err != nil {
		cl.fail("dial: %v", err)
	}
	c := &rndConn{cl: cl, ws: ws, nc: ws.NetConn(), sig: make(chan struct{}, 1), done: make(chan struct{}), tok: tok, subs: map[string]*rndSession{}, sentExact: true}
	cl.c = c
	ws.SetPingHandler(func(p string) error {
		c.write(clientFrame(true, opPong, []byte(p)))
		return nil
	})
	ws.SetPongHandler(func(p string) error {
		c.push(rndEvent{kind: 'p', data: []byte(p)})
		return nil
	})
	ws.SetCloseHandler(func(int, string) error { return nil })
	go func() {
		defer close(c.done)
		for {
			typ, b, err := ws.ReadMessage()
			if err != nil {
				var ce *websocket.CloseError
				if errors.As(err, &ce) {
					c.push(rndEvent{kind: 'c', code: ce.Code, data: []byte(ce.Text)})
				} else {
					c.push(rndEvent{kind: 'e', data: []byte(err.Error())})
				}
				return
			}
			if typ != websocket.TextMessage {
				c.push(rndEvent{kind: 'e', data: []byte(fmt.Sprintf("a server frame of type %d", typ))})
				return
			}
			c.push(rndEvent{kind: 't', data: b})
		}
	}()
	cl.tracef("→ connect (%s token) channels=%v", rndTokNames[kind], initial)
	cl.count("connect")
	c.exps = append(c.exps, &rndExp{desc: "welcome", typ: protocol.TypeWelcome})
	s := c.sim()
	for _, ch := range initial {
		// No ref, no position; they count toward nothing.
		c.exps = append(c.exps, func() *rndExp {
			e := &rndExp{desc: "initial " + ch}
			if codes := s.refusals(ch); len(codes) > 0 {
				return e.fail(false, codes...)
			}
			s.subs[ch] = true
			e.typ, e.ch = protocol.TypeSubscribed, ch
			return e
		}())
	}
	c.settle()
	if c.closed || len(cl.want) == 0 {
		return
	}
	// Resume what the last connection had, as the reference clients do:
	// after the last id received, in one frame (or one each).
	var parts []rndPart
	for _, ch := range cl.want {
		a := cl.pos[ch].String()
		parts = append(parts, cl.subPart(ch, &a))
	}
	cl.want = nil
	if cl.rng.IntN(3) == 0 {
		for _, p := range parts {
			if !c.closed {
				cl.sendText(c, []rndPart{p})
				c.settle()
			}
		}
		return
	}
	cl.sendText(c, parts)
	c.settle()
}

// sendText sends parts in one text frame and notes what it is owed.
func (cl *rndClient) sendText(c *rndConn, parts []rndPart) {
	payload := cl.textFrame(parts)
	exps := c.owed(payload, predict(c.sim(), parts))
	cl.tracef("→ text %s", payload)
	c.exps = append(c.exps, exps...)
	c.write(clientFrame(true, opText, payload))
}

func (cl *rndClient) step() {
	if cl.c == nil {
		cl.connect()
		if cl.c.closed {
			cl.endConn()
		}
		return
	}
	c, rng := cl.c, cl.rng
	weights := rndBusy
	if cl.calm {
		weights = rndCalm
	}
	total := 0
	for _, w := range weights {
		total += w
	}
	a := rndAction(0)
	for r := rng.IntN(total); r >= weights[a]; a++ {
		r -= weights[a]
	}
	cl.count(rndActionNames[a])
	switch a {
	case aPing:
		cl.sendText(c, []rndPart{cl.pingPart()})
	case aSub:
		cl.sendText(c, []rndPart{cl.subPart(cl.pickChannel(), nil)})
	case aSubAfter:
		ch := cl.pickChannel()
		a := cl.pickAfter(ch)
		cl.sendText(c, []rndPart{cl.subPart(ch, &a)})
	case aUnsub:
		cl.sendText(c, []rndPart{cl.unsubPart(cl.pickChannel())})
	case aBatch:
		var parts []rndPart
		for range 2 + rng.IntN(5) {
			parts = append(parts, cl.anyPart())
		}
		if rng.IntN(4) == 0 {
			i := rng.IntN(len(parts))
			parts = append(parts[:i], append([]rndPart{cl.brokenPart()}, parts[i:]...)...)
		}
		cl.sendText(c, parts)
	case aRefresh:
		k := rndTokKind(rng.IntN(int(nTokKinds)))
		if cl.calm && k < tokShort {
			k = tokShort // its tokens expire while it runs
		}
		cl.sendText(c, []rndPart{cl.refreshPart(k)})
	case aInvalid:
		if rng.IntN(3) > 0 {
			cl.sendText(c, []rndPart{cl.invalidPart()})
			break
		}
		payload := []string{"", " \n", `[]`, `{"type":"ping"`, "nope"}[rng.IntN(5)]
		cl.tracef("→ text %q", payload)
		c.exps = append(c.exps, c.owed([]byte(payload), predict(c.sim(), []rndPart{{raw: payload, broken: true}}))...)
		c.write(clientFrame(true, opText, []byte(payload)))
	case aBinary:
		payload := []byte(`{"type":"ping"}`)
		if rng.IntN(2) == 0 {
			payload = make([]byte, rng.IntN(40))
			for i := range payload {
				payload[i] = byte(rng.IntN(256))
			}
		}
		s := c.sim()
		e := (&rndExp{desc: "binary frame"}).fail(true, protocol.CodeBinaryFrame)
		exps := []*rndExp{e}
		if ex := s.count(e); ex != nil {
			exps = append(exps, ex)
		}
		cl.tracef("→ binary %q", payload)
		c.exps = append(c.exps, c.owed(payload, exps)...)
		if len(payload) > 1 && rng.IntN(2) == 0 {
			k := 1 + rng.IntN(len(payload)-1)
			c.write(append(clientFrame(false, opBinary, payload[:k]), clientFrame(true, opContinuation, payload[k:])...))
		} else {
			c.write(clientFrame(true, opBinary, payload))
		}
	case aFragmented:
		var parts []rndPart
		for range 1 + rng.IntN(3) {
			parts = append(parts, cl.anyPart())
		}
		payload := cl.textFrame(parts)
		c.exps = append(c.exps, c.owed(payload, predict(c.sim(), parts))...)
		cl.tracef("→ text in fragments %s", payload)
		cl.fragments(c, opText, payload)
	case aControlPing:
		c.write(cl.ping(c))
	case aFatal:
		cl.fatal(c)
	case aClientClose:
		cl.clientClose(c)
	case aDrop:
		cl.drop(c)
	case aCheck:
		cl.checkServer(c)
	case aWait:
		time.Sleep(time.Duration(rng.IntN(40)) * time.Millisecond)
		c.pending()
	}
	if !c.closed {
		c.settle()
	}
	if c.closed {
		cl.endConn()
	}
}

// ping sends a WebSocket ping with a payload of its own.
func (cl *rndClient) ping(c *rndConn) []byte {
	cl.seq++
	p := "p" + strconv.Itoa(cl.seq) + strings.Repeat(".", cl.rng.IntN(100))
	c.pings = append(c.pings, p)
	c.waitPong = p
	return clientFrame(true, opPing, []byte(p))
}

// fragments sends payload as a message of 2–4 fragments (some of them
// empty), with pings between them now and then, in one write or several.
func (cl *rndClient) fragments(c *rndConn, op byte, payload []byte) {
	rng := cl.rng
	n := 2 + rng.IntN(3)
	cuts := []int{0, len(payload)}
	for range n - 1 {
		cuts = append(cuts, rng.IntN(len(payload)+1))
	}
	slices.Sort(cuts)
	var frames [][]byte
	for i := range len(cuts) - 1 {
		fop := byte(opContinuation)
		if i == 0 {
			fop = op
		}
		frames = append(frames, clientFrame(i == len(cuts)-2, fop, payload[cuts[i]:cuts[i+1]]))
		if i < len(cuts)-2 && rng.IntN(3) == 0 {
			frames = append(frames, cl.ping(c))
		}
	}
	if rng.IntN(2) == 0 {
		c.write(bytes.Join(frames, nil))
		return
	}
	for _, f := range frames {
		c.write(f)
		time.Sleep(time.Millisecond)
	}
}

// fatal sends a frame that ends the connection, with the close code the
// docs give for it.
func (cl *rndClient) fatal(c *rndConn) {
	rng := cl.rng
	mask := []byte{1, 2, 3, 4}
	var b []byte
	code := protocol.CloseProtocolError
	desc := ""
	switch k := rng.IntN(17); k {
	case 0:
		desc, code = "text over the limit", protocol.CloseTooBig
		b = clientFrame(true, opText, bytes.Repeat([]byte(" "), rndMaxFrame+1+rng.IntN(300)))
	case 1:
		desc, code = "fragments over the limit together", protocol.CloseTooBig
		b = append(clientFrame(false, opText, bytes.Repeat([]byte(" "), rndMaxFrame/2+1)), clientFrame(true, opContinuation, bytes.Repeat([]byte(" "), rndMaxFrame/2+1))...)
	case 2:
		desc, code = "a header announcing 1 TiB", protocol.CloseTooBig
		b = []byte{0x80 | opText, 0x80 | 127, 0, 0, 1, 0, 0, 0, 0, 0}
		b = append(b, mask...)
	case 3:
		desc, code = "text not UTF-8", protocol.CloseInvalidData
		b = clientFrame(true, opText, []byte("{\"type\":\"ping\",\"ref\":\"\xff\xfe\"}"))
	case 4:
		desc, code = "fragments not UTF-8 together", protocol.CloseInvalidData
		p := []byte("{\"type\":\"ping\",\"ref\":\"\xc3\"}") // a lone lead byte
		b = append(clientFrame(false, opText, p[:22]), clientFrame(true, opContinuation, p[22:])...)
	case 5:
		desc = "reserved bit"
		b = clientFrame(true, opText, []byte(`{"type":"ping"}`))
		b[0] |= 0x40
	case 6:
		desc = "unmasked frame"
		b = append([]byte{0x80 | opText, 15}, `{"type":"ping"}`...)
	case 7:
		desc = "stray continuation"
		b = clientFrame(true, opContinuation, []byte(`{"type":"ping"}`))
	case 8:
		desc = "ping over 125 bytes"
		b = clientFrame(true, opPing, bytes.Repeat([]byte("p"), 126))
	case 9:
		desc = "fragmented ping"
		b = clientFrame(false, opPing, []byte("p"))
	case 10:
		desc = "unknown opcode"
		b = clientFrame(true, []byte{0x3, 0x7, 0xB, 0xF}[rng.IntN(4)], []byte("x"))
	case 11:
		desc = "text inside a fragmented message"
		b = append(clientFrame(false, opText, []byte(`{"type":`)), clientFrame(true, opText, []byte(`{"type":"ping"}`))...)
	case 12:
		desc = "close with a one-byte payload"
		b = clientFrame(true, opClose, []byte{3})
	case 13:
		c := []int{0, 999, 1004, 1005, 1006, 1015, 2999, 5000}[rng.IntN(8)]
		desc = fmt.Sprintf("close with code %d", c)
		b = clientFrame(true, opClose, binary.BigEndian.AppendUint16(nil, uint16(c)))
	case 14:
		desc = "close reason not UTF-8"
		b = clientFrame(true, opClose, []byte{0x03, 0xE8, 0xff})
	case 15:
		desc = "payload length with its top bit set"
		b = []byte{0x80 | opText, 0x80 | 127, 0x80, 0, 0, 0, 0, 0, 0, 1}
		b = append(b, mask...)
	case 16:
		desc = "unmasked control frame"
		b = []byte{0x80 | opPing, 1, 'p'}
	}
	cl.tracef("→ fatal: %s", desc)
	c.sentExact = false
	c.exps = append(c.exps, closeExp(desc, code))
	c.write(b)
}

// clientClose closes the connection from the client's side: the server
// echoes the code.
func (cl *rndClient) clientClose(c *rndConn) {
	code := []int{1000, 1001, 3000, 4000, 4999, 1005}[cl.rng.IntN(6)]
	var p []byte
	if code != 1005 {
		p = closePayload(code, []string{"", "bye", "fin ✓"}[cl.rng.IntN(3)])
	}
	cl.tracef("→ close %d", code)
	c.exps = append(c.exps, &rndExp{desc: fmt.Sprintf("echo of close %d", code), closes: []int{code}, by: "client"})
	if cl.rng.IntN(4) == 0 {
		// In the middle of a fragmented message, which is dropped.
		c.write(clientFrame(false, opText, []byte(`{"type":"pi`)))
	}
	c.write(clientFrame(true, opClose, p))
}

// drop ends the TCP connection without a close frame.
func (cl *rndClient) drop(c *rndConn) {
	cl.tracef("→ drop")
	c.ended(1006, "client")
	c.nc.Close()
}

// endConn ends the current connection (closed by either side), answering
// a server's close now and then.
func (cl *rndClient) endConn() {
	c := cl.c
	if c.byServer && cl.rng.IntN(2) == 0 {
		c.write(clientFrame(true, opClose, closePayload(c.gotCode, "")))
	}
	c.nc.Close()
	select {
	case <-c.done:
	case <-time.After(10 * time.Second):
		cl.fail("the reader did not end")
	}
	cl.conns = append(cl.conns, c)
	cl.c = nil
}

// finish reads everything published on the subscriptions of the last
// connection, closes it, and checks every subscription the client had.
func (cl *rndClient) finish() {
	if cl.c == nil {
		cl.connect()
	}
	c := cl.c
	deadline := time.Now().Add(20 * time.Second)
	for !c.closed {
		missing := ""
		for ch, s := range c.subs {
			want := cl.pub.after(ch, s.start)
			if len(s.ids) < len(want) {
				missing = fmt.Sprintf("%s: %d of %d messages", ch, len(s.ids), len(want))
				break
			}
			s.complete = true
		}
		if missing == "" {
			break
		}
		ev, ok := c.next(deadline)
		if !ok {
			cl.fail("after the last publish, still waiting for %s", missing)
		}
		c.handle(ev)
	}
	if !c.closed {
		cl.checkServer(c)
		cl.sendText(c, []rndPart{{raw: `{"type":"ping","ref":"last"}`, predict: func(*rndSim) *rndExp {
			return &rndExp{desc: "last ping", typ: protocol.TypePong, ref: json.RawMessage(`"last"`)}
		}}})
		c.settle()
	}
	if !c.closed {
		if cl.rng.IntN(3) == 0 {
			cl.drop(c)
		} else {
			cl.clientClose(c)
			c.settle()
		}
	}
	cl.endConn()
	for _, s := range cl.sessions {
		want := cl.pub.after(s.ch, s.start)
		if !s.start.IsZero() && !cl.pub.has(s.ch, s.start) {
			cl.fail("%s: position %s is no id of the channel", s.ch, s.start)
		}
		if len(s.ids) > len(want) || !slices.Equal(s.ids, want[:len(s.ids)]) || s.complete && len(s.ids) != len(want) {
			cl.fail("%s after %s: received %v, want (a prefix of) %v", s.ch, s.start, s.ids, want)
		}
		for i, id := range s.ids {
			cl.pub.mu.Lock()
			d := cl.pub.data[s.ch][id]
			cl.pub.mu.Unlock()
			if s.data[i] != d {
				cl.fail("%s %s: data %s, published %s", s.ch, id, s.data[i], d)
			}
		}
	}
}

// pending handles the events already read.
func (c *rndConn) pending() {
	for !c.closed {
		ev, ok := c.next(time.Now())
		if !ok {
			return
		}
		c.handle(ev)
	}
}

// settle handles events until every reply owed has come (and the pong to
// the last ping), or the connection closed.
func (c *rndConn) settle() {
	deadline := time.Now().Add(20 * time.Second)
	for !c.closed && (len(c.exps) > 0 || c.waitPong != "") {
		ev, ok := c.next(deadline)
		if !ok {
			want := "the pong to " + c.waitPong
			if len(c.exps) > 0 {
				want = c.exps[0].desc
			}
			c.cl.fail("no reply within 20s: waiting for %s", want)
		}
		c.handle(ev)
	}
}

func (c *rndConn) handle(ev rndEvent) {
	cl := c.cl
	switch ev.kind {
	case 'p':
		cl.tracef("← pong %q", ev.data)
		i := slices.Index(c.pings, string(ev.data))
		if i < 0 {
			cl.fail("pong %q answers no ping sent (or one answered already)", ev.data)
		}
		c.pings = c.pings[i+1:]
		if c.waitPong == string(ev.data) {
			c.waitPong = ""
		}
	case 'e':
		cl.fail("the connection ended without a close frame: %s", ev.data)
	case 'c':
		cl.tracef("← close %d %q", ev.code, ev.data)
		c.onClose(ev.code)
	case 't':
		c.got++
		c.onText(ev.data)
	}
}

func (c *rndConn) onClose(code int) {
	cl := c.cl
	c.gotCode = code
	cl.count(fmt.Sprintf("closed %d", code))
	for i, e := range c.exps {
		if slices.Contains(e.closes, code) {
			if i > 0 && e.by == "server" {
				// A close the client's frames caused comes after the
				// replies to the requests before them.
				cl.fail("closed with %d before the reply to %s", code, c.exps[0].desc)
			}
			c.ended(code, e.by)
			return
		}
	}
	if code == protocol.CloseTokenExpired && (c.expired || time.Now().After(c.tok.exp)) {
		c.ended(code, "server")
		return
	}
	var owed []string
	for _, e := range c.exps {
		owed = append(owed, e.desc)
	}
	cl.fail("closed with %d, which nothing sent calls for (owed: %v)", code, owed)
}

// ended notes the end of the connection: its subscriptions are over.
func (c *rndConn) ended(code int, by string) {
	c.closed, c.logCode, c.logBy, c.byServer = true, code, by, by == "server"
	c.dropped = code == 1006
	if c.expired || time.Now().After(c.tok.exp) {
		c.logCode = 0 // a client close may race the server's 4004
	}
	c.cl.want = nil
	for ch := range c.subs {
		c.cl.want = append(c.cl.want, ch)
	}
	slices.Sort(c.cl.want)
	c.subs = nil
	c.exps = nil
	c.waitPong = ""
}

type rndReply struct {
	Type          string          `json:"type"`
	Channel       *string         `json:"channel"`
	ID            string          `json:"id"`
	Position      *string         `json:"position"`
	Recovered     *bool           `json:"recovered"`
	Code          string          `json:"code"`
	Message       string          `json:"message"`
	Ref           json.RawMessage `json:"ref"`
	ConnectionID  string          `json:"connection_id"`
	User          *string         `json:"user"`
	MaxFrameBytes int64           `json:"max_frame_bytes"`
	TS            int64           `json:"ts"`
	Data          json.RawMessage `json:"data"`
}

// sameJSON reports whether a and b are the same JSON value (both absent
// counts).
func sameJSON(a, b json.RawMessage) bool {
	if len(a) == 0 || len(b) == 0 {
		return len(a) == len(b)
	}
	var x, y any
	da, db := json.NewDecoder(bytes.NewReader(a)), json.NewDecoder(bytes.NewReader(b))
	da.UseNumber()
	db.UseNumber()
	return da.Decode(&x) == nil && db.Decode(&y) == nil && reflect.DeepEqual(x, y)
}

func (c *rndConn) onText(b []byte) {
	cl := c.cl
	var f rndReply
	dec := json.NewDecoder(bytes.NewReader(b))
	if !utf8.Valid(b) || len(b) == 0 || b[0] != '{' || dec.Decode(&f) != nil || dec.More() {
		cl.fail("server frame %q is not one JSON object", b)
	}
	if f.Type == protocol.TypeMessage {
		c.onMessage(&f, b)
		return
	}
	cl.tracef("← %s", b)
	if len(c.exps) > 0 && f.Type == protocol.TypeUnsubscribed && len(f.Ref) == 0 && f.Channel != nil && c.exps[0].drops[*f.Channel] {
		// Ended by the refresh at the head, ahead of its refreshed.
		delete(c.exps[0].drops, *f.Channel)
		c.endSession(*f.Channel)
		return
	}
	if len(c.exps) == 0 {
		cl.fail("reply %s to no request", b)
	}
	e := c.exps[0]
	if e.closes != nil {
		cl.fail("reply %s after %s, which closes the connection", b, e.desc)
	}
	c.exps = c.exps[1:]
	if e.typ == protocol.TypeRefreshed && f.Type == protocol.TypeError && f.Code == protocol.CodeInvalidToken &&
		e.tok.kind == tokShort && len(e.drops) == 0 && time.Now().After(e.tok.exp) {
		// The short token expired before the server read it.
		e = (&rndExp{desc: e.desc, ref: e.ref}).fail(true, protocol.CodeInvalidToken)
	}
	if e.typ == protocol.TypeRefreshed && f.Type == protocol.TypeError && f.Code == protocol.CodeInvalidToken &&
		!c.tok.exp.IsZero() && time.Now().After(c.tok.exp) {
		// The connection's own token expired before the server read the
		// refresh: refused, nothing dropped, and the 4004 follows.
		e = (&rndExp{desc: e.desc, ref: e.ref}).fail(false, protocol.CodeInvalidToken)
		c.expired = true
	}
	if f.Type != e.typ || (e.typ == protocol.TypeError && !slices.Contains(e.codes, f.Code)) {
		want := e.typ
		if e.typ == protocol.TypeError {
			want = fmt.Sprintf("error %v", e.codes)
		}
		cl.fail("reply %s to %s, want %s", b, e.desc, want)
	}
	if e.typ != protocol.TypeWelcome && !sameJSON(f.Ref, e.ref) {
		cl.fail("reply %s to %s: ref %s, want %s", b, e.desc, f.Ref, e.ref)
	}
	cl.count(f.Type)
	switch f.Type {
	case protocol.TypeWelcome:
		if f.ConnectionID == "" || f.User == nil || *f.User != cl.user || f.MaxFrameBytes != rndMaxFrame {
			cl.fail("welcome %s", b)
		}
		c.id = f.ConnectionID
	case protocol.TypeError:
		if f.Message == "" {
			cl.fail("error %s without a message", b)
		}
		if e.bad {
			c.bad++
		}
		cl.count(f.Code)
	case protocol.TypeSubscribed:
		c.onSubscribed(e, &f, b)
	case protocol.TypeUnsubscribed:
		if f.Channel == nil || *f.Channel != e.ch {
			cl.fail("reply %s to %s", b, e.desc)
		}
		c.endSession(e.ch)
	case protocol.TypeRefreshed:
		if len(e.drops) > 0 {
			cl.fail("refreshed before unsubscribed from %v", e.drops)
		}
		if time.Now().After(c.tok.exp) {
			c.expired = true
		}
		c.tok = *e.tok
	}
	if f.Type != protocol.TypeError {
		c.bad = 0
	}
}

func (c *rndConn) onSubscribed(e *rndExp, f *rndReply, b []byte) {
	cl := c.cl
	if f.Channel == nil || *f.Channel != e.ch || f.Position == nil {
		cl.fail("reply %s to %s", b, e.desc)
	}
	pos, ok := stream.ParseID(*f.Position)
	if !ok {
		cl.fail("reply %s to %s: position is no id", b, e.desc)
	}
	switch {
	case e.after == nil && f.Recovered != nil:
		cl.fail("reply %s to %s: recovered without a position asked", b, e.desc)
	case e.after != nil && f.Recovered == nil:
		cl.fail("reply %s to %s: no recovered", b, e.desc)
	case e.after != nil && e.recov && !*f.Recovered:
		cl.fail("reply %s to %s: not recovered, from an id of the stream (nothing is trimmed)", b, e.desc)
	case e.after != nil && *f.Recovered && pos != *e.after:
		cl.fail("reply %s to %s: recovered, at another position", b, e.desc)
	}
	s := &rndSession{ch: e.ch, start: pos}
	c.subs[e.ch] = s
	cl.sessions = append(cl.sessions, s)
	cl.pos[e.ch] = pos
	cl.know(e.ch, pos)
}

func (cl *rndClient) know(ch string, id stream.ID) {
	if cl.known[ch] == nil {
		cl.known[ch] = map[stream.ID]bool{}
	}
	cl.known[ch][id] = true
}

func (c *rndConn) endSession(ch string) {
	if c.subs[ch] == nil {
		c.cl.fail("unsubscribed from %s, not subscribed", ch)
	}
	delete(c.subs, ch)
}

func (c *rndConn) onMessage(f *rndReply, b []byte) {
	cl := c.cl
	if f.Channel == nil {
		cl.fail("message %s without a channel", b)
	}
	ch := *f.Channel
	s := c.subs[ch]
	if s == nil {
		cl.fail("message %s on %s, not subscribed", b, ch)
	}
	id, ok := stream.ParseID(f.ID)
	last := s.start
	if len(s.ids) > 0 {
		last = s.ids[len(s.ids)-1]
	}
	if !ok || !last.Less(id) || f.TS == 0 {
		cl.fail("message %s on %s after %s", b, ch, last)
	}
	cl.tracef("← message %s %s", ch, id)
	cl.count("message")
	s.ids = append(s.ids, id)
	s.data = append(s.data, string(f.Data))
	cl.pos[ch] = id
	cl.know(ch, id)
}

// checkServer compares what the egress and the registry hold for c with
// the subscriptions the client was told of (every reply owed has come:
// the registry is written before the reply).
func (cl *rndClient) checkServer(c *rndConn) {
	var want []string
	for ch := range c.subs {
		want = append(want, ch)
	}
	slices.Sort(want)
	problem := func() string {
		ctx := context.Background()
		rec, err := cl.e.s.reg.Get(ctx, c.id)
		if err != nil {
			return fmt.Sprintf("registry record: %v", err)
		}
		got := slices.Clone(rec.Channels)
		slices.Sort(got)
		if !slices.Equal(got, want) || rec.User != cl.user {
			return fmt.Sprintf("registry record of %s: user %s, channels %v", rec.User, c.id, rec.Channels)
		}
		if err := cl.rdb.ZScore(ctx, cl.ks.UserConns(cl.user), c.id).Err(); err != nil {
			return fmt.Sprintf("%s not among the connections of %s: %v", c.id, cl.user, err)
		}
		h := cl.e.s.hub
		h.mu.Lock()
		defer h.mu.Unlock()
		sc := h.conns[c.id]
		if sc == nil {
			return "not in the hub"
		}
		for _, ch := range rndChannels {
			err := cl.rdb.ZScore(ctx, cl.ks.ChannelConns(ch), c.id).Err()
			if (err == nil) != slices.Contains(want, ch) {
				return fmt.Sprintf("membership of %s in the registry: %v", ch, err)
			}
			in := false
			if cs := h.chans[cl.ks.Notify(ch)]; cs != nil {
				// A replay goes on after its subscribed reply.
				cs.mu.Lock()
				_, live := cs.subs[sc]
				_, resuming := cs.resuming[sc]
				cs.mu.Unlock()
				in = live || resuming
			}
			if in != slices.Contains(want, ch) {
				return fmt.Sprintf("subscriber of %s in the hub: %v", ch, in)
			}
		}
		return ""
	}()
	cl.tracef("  check: %v", want)
	if problem != "" && !c.expired && time.Now().Before(c.tok.exp) {
		// (Not while its token expired: the egress may be ending it.)
		cl.fail("the egress disagrees with the replies, subscribed to %v: %s", want, problem)
	}
}

// envUint is the environment variable name as a number, or def when it
// is unset: the knobs of the randomized tests (seed, rounds, steps).
func envUint(t *testing.T, name string, def uint64) uint64 {
	t.Helper()
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	v, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return v
}
