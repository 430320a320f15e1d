package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"

	"github.com/wsrelay/wsrelay/shared/auth"
	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/protocol"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/stream"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// TestCloseCausesAtOnce drives every cause the egress closes a socket for
// at the same instant T, for a few rounds, each against a fresh egress on
// the real Redis: the client's close frame, the TCP connection cut, a
// client that stops answering pings (missed pong), one that stops reading
// while its channel gets a burst (slow consumer, or the write timeout),
// an operator's disconnect (the inbox command the ingress's DELETE
// /v1/connections/{id} queues), the token's expiry (4004), MAX_LIFETIME,
// IDLE_TIMEOUT and, in some rounds, the drain. Each socket is given a
// random set of them, all due within a few sweep ticks of T. Whatever
// wins, each connection must end once: one log line, whose code is in
// docs/protocol.md's table (or the client's own, echoed), at most one
// close frame to the client, the one logged, and nothing after it; the
// metrics count each end once and their gauges are back to zero; the
// registry and the hub hold nothing of it; no goroutine is left.
//
// The seed is logged; WSRELAY_CLOSERACE_SEED repeats a run's choices (the
// interleaving is the scheduler's), WSRELAY_CLOSERACE_ROUNDS sets the
// rounds (default 3, about 3 s each), and WSRELAY_CLOSERACE_TRACE=1 logs
// how each socket ended.
func TestCloseCausesAtOnce(t *testing.T) {
	seed := envUint(t, "WSRELAY_CLOSERACE_SEED", uint64(time.Now().UnixNano()))
	rounds := int(envUint(t, "WSRELAY_CLOSERACE_ROUNDS", 3))
	t.Logf("seed %d (WSRELAY_CLOSERACE_SEED=%d repeats the choices)", seed, seed)
	documented := documentedCloseCodes(t)

	rdb, prefix := redistest.Client(t)
	if err := rdb.Ping(t.Context()).Err(); err != nil {
		t.Fatal(err)
	}
	base := goleak.IgnoreCurrent()
	rng := rand.New(rand.NewPCG(seed, 0))
	// The first rounds take the sweep's causes in turn (it closes for
	// one a tick, in its order: lifetime, idle, expiry, missed pong), the
	// others at random.
	settings := []closeRaceSettings{{lifetime: true, idle: true, drain: true}, {idle: true}, {drain: true}}
	for r := range rounds {
		st := closeRaceSettings{lifetime: rng.IntN(2) == 0, idle: rng.IntN(2) == 0, drain: rng.IntN(2) == 0}
		if r < len(settings) {
			st = settings[r]
		}
		if !t.Run(fmt.Sprintf("round%d", r), func(t *testing.T) {
			closeRaceRound(t, rng, rdb, prefix, st, documented)
		}) {
			break
		}
	}
	if err := goleak.Find(base); err != nil {
		t.Fatal(err)
	}
}

// closeRaceSettings are the causes a round gives every socket:
// MAX_LIFETIME and IDLE_TIMEOUT due at T, and the drain begun about then.
type closeRaceSettings struct{ lifetime, idle, drain bool }

// raceCauses are the causes one socket is given.
type raceCauses struct {
	closeFrame bool // sends a close frame at closeAt
	cut        bool // cuts the TCP connection at cutAt
	silent     bool // answers no ping from T-1.5×PING_INTERVAL (dropped about T)
	slow       bool // stops reading then too; its channel gets a burst about T
	disconnect bool // an operator's disconnect at disconnectAt
	expires    bool // its token expires at T

	closeAt, cutAt, disconnectAt, burstAt time.Time
}

func (c raceCauses) String() string {
	var s []string
	for _, x := range []struct {
		on   bool
		name string
	}{{c.closeFrame, "close"}, {c.cut, "cut"}, {c.silent, "silent"}, {c.slow, "slow"}, {c.disconnect, "disconnect"}, {c.expires, "expires"}} {
		if x.on {
			s = append(s, x.name)
		}
	}
	return strings.Join(s, "+")
}

// raceClient is one socket of a round, on a raw client (rawWS) that sees
// every frame the server sends, close frames included.
type raceClient struct {
	ws     *rawWS
	id     string
	causes raceCauses

	wmu        sync.Mutex
	sentClose  bool // the client's own close frame (not an echo)
	echoed     bool
	closes     []int // close codes received
	afterClose int   // frames received after the first close frame
	stopped    bool  // stopped reading on purpose (slow, cut)
}

// opened reads the welcome and the subscribed reply, answering pings
// meanwhile (PING_INTERVAL is short: a socket that does not answer is
// dropped before the round's T).
func (c *raceClient) opened(t *testing.T) {
	t.Helper()
	for {
		op, p := c.ws.read()
		if op == opPing {
			c.write(clientFrame(true, opPong, p))
			continue
		}
		var r protocol.Reply
		if op != opText || json.Unmarshal(p, &r) != nil {
			t.Fatalf("frame op %d %q, want the welcome or subscribed", op, p)
		}
		switch {
		case c.id == "" && r.Type == protocol.TypeWelcome:
			c.id = r.ConnectionID
		case c.id != "" && r.Type == protocol.TypeSubscribed:
			return
		default:
			t.Fatalf("frame %q, want the welcome, then subscribed", p)
		}
	}
}

func (c *raceClient) write(frame []byte) {
	_ = c.ws.nc.SetWriteDeadline(time.Now().Add(time.Second))
	_, _ = c.ws.nc.Write(frame)
}

// read reads the server's frames until the connection ends, answering
// pings (until silent) and echoing the server's close.
func (c *raceClient) read(silentAt time.Time) {
	for {
		if c.causes.slow && time.Now().After(silentAt) {
			c.wmu.Lock()
			c.stopped = true
			c.wmu.Unlock()
			return
		}
		op, p, err := c.ws.next()
		if err != nil {
			return
		}
		c.wmu.Lock()
		if len(c.closes) > 0 {
			c.afterClose++
		}
		switch op {
		case opPing:
			if !c.causes.silent || time.Now().Before(silentAt) {
				c.write(clientFrame(true, opPong, p))
			}
		case opClose:
			code := 1005
			if len(p) >= 2 {
				code = int(binary.BigEndian.Uint16(p))
			}
			c.closes = append(c.closes, code)
			if !c.sentClose && !c.echoed {
				c.echoed = true
				c.write(clientFrame(true, opClose, p[:min(2, len(p))]))
			}
		}
		c.wmu.Unlock()
	}
}

// closeRaceRound is one round of TestCloseCausesAtOnce.
func closeRaceRound(t *testing.T, rng *rand.Rand, rdb redis.UniversalClient, prefix string, r closeRaceSettings, documented map[int]bool) {
	lifetime, idle, drainAtT := r.lifetime, r.idle, r.drain
	const (
		n            = 12
		pingInterval = 100 * time.Millisecond // a sweep every 50 ms
		jitter       = 100 * time.Millisecond // the other causes come within ±jitter of T
	)
	// T is a whole second (a token's exp is in seconds), at least a
	// second ahead (MAX_LIFETIME and IDLE_TIMEOUT are at least 1s).
	now := time.Now()
	T := now.Add(1050 * time.Millisecond).Truncate(time.Second).Add(time.Second)
	toT := T.Sub(now)
	env := map[string]string{
		"JWT_SECRET": testSecret, "PING_INTERVAL": pingInterval.String(), "WRITE_TIMEOUT": "300ms",
		"SEND_QUEUE": "16", "SHUTDOWN_GRACE": "1s", "PROBE_INTERVAL": "200ms",
		"REDIS_URL": redistest.URL(t), "REDIS_KEY_PREFIX": prefix,
	}
	if lifetime {
		env["MAX_LIFETIME"] = toT.String()
	}
	if idle {
		// A little shorter, so that it is not always behind MAX_LIFETIME
		// in the sweep's order.
		env["IDLE_TIMEOUT"] = (toT - 30*time.Millisecond).String()
	}
	cfg, err := loadConfig(func(k string) string { return env[k] })
	if err != nil {
		t.Fatal(err)
	}
	logs := &testkit.SyncBuffer{}
	s := NewServer(cfg, slog.New(slog.NewJSONHandler(logs, nil)), rdb)
	// Run and the HTTP server are stopped apart, so that /metrics is
	// still served once the drain has ended every socket.
	ctx, drain := context.WithCancel(context.Background())
	ran := make(chan struct{})
	go func() { s.Run(ctx); close(ran) }()
	srv := httptest.NewServer(s)
	stopped := sync.OnceFunc(func() { drain(); <-ran; srv.Close() })
	t.Cleanup(stopped)
	e := &secEgress{s: s, srv: srv, stop: stopped}
	<-s.hub.inbox.ready
	ks := keys.Scheme{Prefix: prefix}
	store := stream.NewStore(rdb)
	at := func(base time.Time) time.Time {
		return base.Add(time.Duration(rng.Int64N(int64(2*jitter))) - jitter)
	}

	clients := make([]*raceClient, n)
	for i := range clients {
		c := &raceClient{causes: raceCauses{
			closeFrame: rng.IntN(3) == 0, cut: rng.IntN(5) == 0, silent: rng.IntN(3) == 0,
			slow: rng.IntN(4) == 0, disconnect: rng.IntN(3) == 0, expires: rng.IntN(2) == 0,
		}}
		cc := &c.causes
		cc.closeAt, cc.cutAt, cc.disconnectAt, cc.burstAt = at(T), at(T), at(T), at(T)
		// Every socket ends in the round, whatever the round's settings.
		if !drainAtT && !lifetime && !idle && !cc.closeFrame && !cc.cut && !cc.silent && !cc.slow && !cc.disconnect && !cc.expires {
			cc.closeFrame = true
		}
		exp := T
		if !cc.expires {
			exp = T.Add(time.Hour)
		}
		tok := token(t, auth.Claims{Subject: "u" + strconv.Itoa(i%4), Channels: []string{"race-*"}, Expires: exp})
		var d *net.Dialer
		if cc.slow {
			d = rcvBufDialer(16 << 10)
		}
		ch := "race-" + strconv.Itoa(i)
		c.ws = rawUpgrade(t, e, d, "/ws?"+url.Values{"token": {tok}, "channels": {ch}}.Encode())
		c.opened(t)
		clients[i] = c
	}
	var plan []string
	for _, c := range clients {
		plan = append(plan, c.causes.String())
	}
	t.Logf("T in %v; lifetime %v, idle %v, drain at T %v; sockets: %s", time.Until(T).Round(time.Millisecond), lifetime, idle, drainAtT, strings.Join(plan, ", "))

	data := []byte(`"` + strings.Repeat("x", 16<<10) + `"`)
	var wg sync.WaitGroup
	for i, c := range clients {
		cc := c.causes
		wg.Go(func() { c.read(T.Add(-3 * pingInterval / 2)) })
		if cc.closeFrame {
			wg.Go(func() {
				time.Sleep(time.Until(cc.closeAt))
				c.wmu.Lock()
				defer c.wmu.Unlock()
				if len(c.closes) == 0 {
					c.sentClose = true
					c.write(clientFrame(true, opClose, closePayload(1000, "bye")))
				}
			})
		}
		if cc.cut {
			wg.Go(func() {
				time.Sleep(time.Until(cc.cutAt))
				c.wmu.Lock()
				c.stopped = true
				c.wmu.Unlock()
				_ = c.ws.nc.Close()
			})
		}
		if cc.disconnect {
			wg.Go(func() {
				time.Sleep(time.Until(cc.disconnectAt))
				_, err := store.Append(context.Background(), []stream.Append{{Stream: ks.Inbox(s.instance), Notify: ks.InboxNotify(s.instance),
					Msg: stream.Message{Route: stream.Disconnect(c.id), TS: time.Now().UnixMilli(), Data: []byte("null")}}})
				if err != nil {
					t.Errorf("disconnect %s: %v", c.id, err)
				}
			})
		}
		if cc.slow {
			ch := "race-" + strconv.Itoa(i)
			wg.Go(func() {
				time.Sleep(time.Until(cc.burstAt))
				as := make([]stream.Append, 64)
				for k := range as {
					as[k] = stream.Append{Stream: ks.Stream(ch), Notify: ks.Notify(ch), Msg: stream.Message{Channel: ch, TS: time.Now().UnixMilli(), Data: data}}
				}
				if _, err := store.Append(context.Background(), as); err != nil {
					t.Errorf("burst to %s: %v", ch, err)
				}
			})
		}
	}
	drained := make(chan struct{})
	if drainAtT {
		go func() {
			time.Sleep(time.Until(at(T)))
			drain()
			<-ran
			close(drained)
		}()
	}

	testkit.Eventually(t, 10*time.Second, func() error { return openSockets(s, 0) })
	if drainAtT {
		<-drained
	}
	// The clients that stopped reading end their side now; the others
	// have read the end of their connection.
	for _, c := range clients {
		if c.causes.slow {
			_ = c.ws.nc.Close()
		}
	}
	wg.Wait()

	// One end logged per socket, with a documented code (or the one the
	// client closed with), and the client saw that close or none.
	type end struct {
		Msg       string
		Level     string
		Conn      string
		CloseCode int    `json:"close_code"`
		ClosedBy  string `json:"closed_by"`
		Reason    string
	}
	ends := map[string][]end{}
	for l := range strings.Lines(logs.String()) {
		var r end
		if err := json.Unmarshal([]byte(l), &r); err != nil {
			t.Fatalf("log line %q: %v", l, err)
		}
		if r.Level == "ERROR" {
			t.Errorf("error logged: %s", l)
		}
		if r.Msg == "connection closed" {
			ends[r.Conn] = append(ends[r.Conn], r)
		}
	}
	if len(ends) != n {
		t.Errorf("%d connections' ends logged, want %d", len(ends), n)
	}
	trace := os.Getenv("WSRELAY_CLOSERACE_TRACE") != ""
	won := map[string]int{}
	for _, le := range ends {
		won[fmt.Sprintf("%d %s", le[0].CloseCode, le[0].Reason)]++
	}
	t.Logf("ends: %v", won)
	for _, c := range clients {
		got := ends[c.id]
		if len(got) != 1 {
			t.Errorf("socket %s (%s): %d ends logged, want 1: %+v", c.id, c.causes, len(got), got)
			continue
		}
		le := got[0]
		switch {
		case le.ClosedBy == "server" && !documented[le.CloseCode]:
			t.Errorf("socket %s (%s): closed by the server with %d (%s), not in docs/protocol.md's table", c.id, c.causes, le.CloseCode, le.Reason)
		case le.ClosedBy == "client" && le.CloseCode != 1000 && le.CloseCode != 1006:
			t.Errorf("socket %s (%s): closed by the client with %d (%s): it sent 1000 or cut the connection", c.id, c.causes, le.CloseCode, le.Reason)
		}
		c.wmu.Lock()
		closes, after, stopped := c.closes, c.afterClose, c.stopped
		c.wmu.Unlock()
		if trace {
			t.Logf("%s (%s): %d %s by %s; the client was sent %v", c.id, c.causes, le.CloseCode, le.Reason, le.ClosedBy, closes)
		}
		if len(closes) > 1 {
			t.Errorf("socket %s (%s): %d close frames %v", c.id, c.causes, len(closes), closes)
		}
		if after > 0 {
			t.Errorf("socket %s (%s): %d frames after the close frame", c.id, c.causes, after)
		}
		if len(closes) == 1 && closes[0] != le.CloseCode {
			t.Errorf("socket %s (%s): the client was sent close %d, the log says %d (%s, by %s)", c.id, c.causes, closes[0], le.CloseCode, le.Reason, le.ClosedBy)
		}
		if len(closes) == 0 && !stopped && le.CloseCode != 1006 && !(drainAtT && le.CloseCode == protocol.CloseGoingAway) {
			// Only a dropped peer (1006), one that stopped reading, or a
			// socket the drain cut after its grace goes without a close
			// frame.
			t.Errorf("socket %s (%s): no close frame, the log says %d (%s, by %s)", c.id, c.causes, le.CloseCode, le.Reason, le.ClosedBy)
		}
	}
	checkEndMetrics(t, e, logs.String(), n)
	if err := rndLeftovers(s, rdb, prefix); err != nil {
		t.Error(err)
	}
	stopped()
}

// documentedCloseCodes reads the codes of docs/protocol.md's close-code
// table.
func documentedCloseCodes(t *testing.T) map[int]bool {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "docs", "protocol.md"))
	if err != nil {
		t.Fatal(err)
	}
	_, table, ok := strings.Cut(string(b), "## Close codes")
	if !ok {
		t.Fatal(`docs/protocol.md has no "## Close codes"`)
	}
	table, _, _ = strings.Cut(table, "\n\n## ")
	codes := map[int]bool{}
	for _, m := range regexp.MustCompile(`(?m)^\| (\d{4}) \|`).FindAllStringSubmatch(table, -1) {
		k, _ := strconv.Atoi(m[1])
		codes[k] = true
	}
	if !codes[protocol.CloseTokenExpired] || !codes[protocol.CloseGoingAway] {
		t.Fatalf("close codes read from docs/protocol.md: %v", codes)
	}
	return codes
}
