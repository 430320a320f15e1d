package e2e

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/wsrelay/wsrelay/shared/client"
	pubpkg "github.com/wsrelay/wsrelay/shared/publisher"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/stream"
	"github.com/wsrelay/wsrelay/shared/testkit"
	"github.com/wsrelay/wsrelay/shared/testkit/delivery"
)

// TestChaosDelivery runs the functions together under mixed failures and
// checks the delivery contract end to end. One ingress and three egress
// instances share one Redis that persists every write (AOF, fsync
// always). Eight Go clients, each on two or three of four channels, reach
// the egress instances through a round-robin TCP proxy each (a client that
// reconnects lands on another instance); the egress also closes sockets by
// itself (IDLE_TIMEOUT, MAX_LIFETIME). Publishers (shared/publisher,
// retries with an Idempotency-Key) publish a sequence number per channel
// while, at random moments of a seeded schedule, egress instances are
// killed (SIGKILL) or drained (SIGTERM) and started again on their port,
// Redis is killed and started again on its data, and clients lose their
// network for longer than the history lasts (HISTORY_SIZE 20), and
// replies of the ingress to the publishers are lost on the way back.
//
// Then, per client and channel: nothing twice (by sequence number, so a
// publish written twice counts), in stream order, and every acknowledged
// message from the client's first subscription on, except those in the
// gap right at a resume told recovered:false (between the last id the
// client held and the position the reply gave): shared/testkit/delivery,
// as the soak (bench/cmd/soak) checks it. The proxies also read the
// server's frames: per connection and channel, every message's id is
// above the last one sent and the subscription's position (the Go client
// would hide a duplicate the server sent).
//
// WSRELAY_CHAOS_SEED=<n> runs the schedule of a logged seed again.
func TestChaosDelivery(t *testing.T) {
	leaks := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, leaks) })
	began := time.Now()

	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("WSRELAY_CHAOS_SEED"); s != "" {
		n, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("WSRELAY_CHAOS_SEED: %v", err)
		}
		seed = n
	}
	t.Logf("seed %d (WSRELAY_CHAOS_SEED=%d to run this schedule again)", seed, seed)
	rng := rand.New(rand.NewPCG(seed, 0x5eed))

	const (
		nEgress   = 3
		nClients  = 8
		window    = 12 * time.Second // faults happen in it; publishing lasts as long
		pubEvery  = 20 * time.Millisecond
		historyOf = 20
	)
	channels := []string{"chaos-a", "chaos-b", "chaos-c", "chaos-d"}

	// Small stream nodes, so that trimming to HISTORY_SIZE (whole nodes)
	// stays close to it.
	srv := redistest.StartPersistent(t, "--stream-node-max-entries", "10")
	e := env{
		"REDIS_URL":        srv.URL(),
		"REDIS_KEY_PREFIX": redistest.Prefix(t),
		"ALLOW_ANONYMOUS":  "true",
		"HISTORY_SIZE":     strconv.Itoa(historyOf),
		"IDLE_TIMEOUT":     "2s",
		"MAX_LIFETIME":     "3s",
		"SHUTDOWN_GRACE":   "2s",
		"PROBE_INTERVAL":   "200ms",
		"REGISTRY_TTL":     "3s",
	}
	ing := start(t, "ingress", e)

	type egressSlot struct {
		port int
		p    *proc
		up   bool
	}
	slots := make([]*egressSlot, nEgress)
	var backends []string
	for i := range slots {
		// A port it is started again on after each kill.
		port := quietPort(t)
		slots[i] = &egressSlot{port: port, p: startOn(t, "egress", e, port), up: true}
		backends = append(backends, "127.0.0.1:"+strconv.Itoa(port))
	}

	// The server's frames, as the proxies read them.
	var (
		wireMu     sync.Mutex
		wireFaults []string
	)
	wireFault := func(s string) {
		wireMu.Lock()
		wireFaults = append(wireFaults, s)
		wireMu.Unlock()
	}

	// Clients.
	type chaosClient struct {
		c         *client.Client
		proxy     *rrProxy
		connects  atomic.Int64
		instances sync.Map
		subs      map[string]*delivery.Chain
	}
	var (
		endsMu sync.Mutex
		ends   = map[string]int{} // how the clients' connections ended
	)
	noteEnd := func(err error) {
		var re *client.RefusedError
		var de *client.DisconnectError
		what := "lost or not connected"
		switch {
		case errors.As(err, &re):
			what = fmt.Sprintf("refused %d", re.Status)
		case errors.As(err, &de):
			what = fmt.Sprintf("closed %d", de.Code)
		}
		endsMu.Lock()
		ends[what]++
		endsMu.Unlock()
	}
	clients := make([]*chaosClient, nClients)
	for i := range clients {
		cc := &chaosClient{subs: map[string]*delivery.Chain{}}
		cc.proxy = newRRProxy(t, backends, i, func(s string) { wireFault(fmt.Sprintf("client %d: %s", i, s)) })
		c, err := client.Dial(client.Options{
			URL:        "ws://" + cc.proxy.Addr() + "/ws",
			User:       fmt.Sprintf("chaos%d", i),
			MinBackoff: 50 * time.Millisecond,
			MaxBackoff: 500 * time.Millisecond,
			OnState: func(s client.State, err error) {
				if s == client.StateDisconnected {
					noteEnd(err)
				}
			},
			OnWelcome: func(w client.Welcome) {
				cc.connects.Add(1)
				cc.instances.Store(w.Instance, true)
			},
		})
		if err != nil {
			t.Fatal(err)
		}
		cc.c = c
		t.Cleanup(func() { c.Close() })
		// Two or three of the channels.
		mine := slices.Clone(channels)
		rng.Shuffle(len(mine), func(a, b int) { mine[a], mine[b] = mine[b], mine[a] })
		for _, ch := range mine[:2+rng.IntN(2)] {
			cs := delivery.NewChain(ch, nil)
			if _, err := cs.Subscribe(c, ""); err != nil {
				t.Fatal(err)
			}
			cc.subs[ch] = cs
		}
		clients[i] = cc
	}
	testkit.Eventually(t, 15*time.Second, func() error {
		for i, cc := range clients {
			for ch, cs := range cc.subs {
				if !cs.Subscribed() {
					return fmt.Errorf("client %d not subscribed to %s yet", i, ch)
				}
			}
		}
		return nil
	})

	// Publishers: one per channel, each publish after the last one's
	// outcome, so that acknowledged sequence numbers are in id order.
	// Through a proxy that can lose the ingress's replies: a connection
	// per request, so that DropReplies(n) loses the next n.
	ingProxy := newProxy(t, strings.TrimPrefix(ing.URL, "http://"))
	tr := &http.Transport{DisableKeepAlives: true}
	t.Cleanup(tr.CloseIdleConnections)
	pub, err := pubpkg.New(pubpkg.Options{
		URL:         "http://" + ingProxy.Addr(),
		HTTPClient:  &http.Client{Transport: tr, Timeout: 2 * time.Second},
		MaxAttempts: 30,
		MinBackoff:  20 * time.Millisecond,
		MaxBackoff:  250 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	pubs := map[string]*chaosPublisher{}
	stopPub := make(chan struct{})
	// A publish in flight when Redis is killed leaves its
	// Idempotency-Key claimed on the AOF; the ingress frees it once
	// Redis answers again, and until then its retries are answered 409
	// (docs/api.md). A call that cannot finish in time is given up on
	// after a while, its outcome unknown, and the next one goes on
	// (chaosPublisher.run); at the end, the calls still trying when
	// publishing stops are ended too.
	pubCtx, giveUp := context.WithCancel(context.Background())
	var pubWG sync.WaitGroup
	for _, ch := range channels {
		p := &chaosPublisher{log: delivery.NewLog()}
		pubs[ch] = p
		pubWG.Go(func() { p.run(pubCtx, pub, ch, pubEvery, stopPub) })
	}
	stopPublishing := sync.OnceFunc(func() {
		close(stopPub)
		tm := time.AfterFunc(2*time.Second, giveUp)
		pubWG.Wait()
		tm.Stop()
		giveUp()
	})
	t.Cleanup(stopPublishing)

	// The schedule: each fault at a random moment, over for good before
	// the window ends. Egress faults pick an instance that is up when
	// they start.
	type action struct {
		at   time.Duration
		what func() string
	}
	var actions []action
	ms := func(lo, hi int) time.Duration { return time.Duration(lo+rng.IntN(hi-lo+1)) * time.Millisecond }
	upSlots := func() []int {
		var up []int
		for i, s := range slots {
			if s.up {
				up = append(up, i)
			}
		}
		return up
	}
	counts := map[string]int{}
	faults := []string{"redis", "kill", "kill", "term", "term", "partition", "partition", "lost replies", "lost replies"}
	if rng.IntN(2) == 0 {
		faults = append(faults, "kill")
	}
	for _, f := range faults {
		at := ms(500, int(window.Milliseconds())-3500)
		switch f {
		case "redis":
			down := ms(200, 1500)
			actions = append(actions,
				action{at, func() string { srv.Stop(); return "redis: killed" }},
				action{at + down, func() string { srv.Restart(t); counts["redis restarts"]++; return "redis: started again on its data" }})
		case "kill", "term":
			slot := -1
			down := ms(100, 1500)
			actions = append(actions,
				action{at, func() string {
					up := upSlots()
					if len(up) == 0 {
						return f + ": every egress is down already, skipped"
					}
					slot = up[rng.IntN(len(up))]
					s := slots[slot]
					s.up = false
					if f == "kill" {
						_ = s.p.cmd.Process.Kill()
						counts["egress SIGKILLs"]++
						return fmt.Sprintf("egress %d: SIGKILL", slot)
					}
					_ = s.p.cmd.Process.Signal(syscall.SIGTERM)
					counts["egress SIGTERMs"]++
					return fmt.Sprintf("egress %d: SIGTERM", slot)
				}},
				action{at + down, func() string {
					if slot < 0 {
						return f + ": nothing to start again"
					}
					s := slots[slot]
					select {
					case <-s.p.done:
					case <-time.After(10 * time.Second):
						t.Fatalf("egress %d did not exit after %s", slot, f)
					}
					s.p = startOn(t, "egress", e, s.port)
					s.up = true
					return fmt.Sprintf("egress %d: started again on port %d", slot, s.port)
				}})
		case "lost replies":
			n := 1 + rng.IntN(3)
			actions = append(actions, action{at, func() string {
				ingProxy.DropReplies(n)
				return fmt.Sprintf("ingress: the next %d replies to the publishers lost", n)
			}})
		case "partition":
			who := rng.IntN(nClients)
			down := ms(2000, 3500)
			actions = append(actions,
				action{at, func() string {
					clients[who].proxy.Cut()
					counts["client partitions"]++
					return fmt.Sprintf("client %d: network cut", who)
				}},
				action{at + down, func() string { clients[who].proxy.Heal(); return fmt.Sprintf("client %d: network back", who) }})
		}
	}
	slices.SortStableFunc(actions, func(a, b action) int { return int(a.at - b.at) })
	t0 := time.Now()
	t.Logf("setup took %s; faults from now on", time.Since(began).Round(time.Millisecond))
	for _, a := range actions {
		time.Sleep(time.Until(t0.Add(a.at)))
		what := a.what()
		t.Logf("%6.2fs %s", time.Since(t0).Seconds(), what)
	}
	time.Sleep(time.Until(t0.Add(window)))
	stopPublishing()
	t.Logf("%6.2fs publishing stopped", time.Since(t0).Seconds())

	// Every client catches up on what it is owed.
	testkit.Eventually(t, 20*time.Second, func() error {
		for i, cc := range clients {
			for ch, cs := range cc.subs {
				if v, _ := cs.Check(pubs[ch].log, false); len(v) > 0 {
					return fmt.Errorf("client %d, %s: %s", i, ch, v[0])
				}
			}
		}
		return nil
	})
	t.Logf("%6.2fs every client caught up", time.Since(t0).Seconds())

	// The contract, in full.
	var (
		delivered, falseResumes, reconnects, instancesSeen int
		problems                                           []string
	)
	for i, cc := range clients {
		for _, ch := range channels {
			cs := cc.subs[ch]
			if cs == nil {
				continue
			}
			v, gaps := cs.Check(pubs[ch].log, true)
			for _, v := range v {
				problems = append(problems, fmt.Sprintf("client %d, %s: %s", i, ch, v))
			}
			for _, g := range gaps {
				t.Logf("client %d, %s: %s", i, ch, g)
			}
			falseResumes += len(gaps)
			delivered += cs.Messages()
		}
		reconnects += int(cc.connects.Load()) - 1
		n := 0
		cc.instances.Range(func(any, any) bool { n++; return true })
		instancesSeen += n
	}
	wireMu.Lock()
	problems = append(problems, wireFaults...)
	wireMu.Unlock()
	var acked, failed, replayed int
	for _, ch := range channels {
		p := pubs[ch]
		acked += p.log.Acked()
		replayed += p.replayed
		fails := p.log.Failed()
		failed += len(fails)
		for seq, err := range fails {
			t.Logf("%s: publish of %d failed: %v", ch, seq, err)
		}
		problems = append(problems, p.bad...)
	}
	endsMu.Lock()
	t.Logf("clients' connections ended: %v", ends)
	endsMu.Unlock()
	t.Logf("faults %v; published %d acknowledged (%d of them replayed after a lost reply: %d replies lost), %d failed; delivered %d; %d reconnects over %d instances (%.1f instances per client); %d resumes told recovered:false",
		counts, acked, replayed, ingProxy.Dropped(), failed, delivered, reconnects, instancesSeen, float64(instancesSeen)/nClients, falseResumes)
	for i, p := range problems {
		if i == 20 {
			t.Errorf("… and %d more", len(problems)-i)
			break
		}
		t.Error(p)
	}
}

// chaosPublisher publishes {"seq": n, "ch": channel} (delivery.Data) to one channel, n = 0, 1, 2, …, one
// publish at a time, and keeps each one's outcome. replayed and bad are
// read once run has returned.
type chaosPublisher struct {
	log      *delivery.Log
	replayed int      // acknowledged by a retry's replay of the first reply
	bad      []string // acknowledgements whose id is not a stream id
}

func (p *chaosPublisher) run(ctx context.Context, pub *pubpkg.Client, ch string, every time.Duration, stop <-chan struct{}) {
	for seq := 0; ; seq++ {
		select {
		case <-stop:
			return
		case <-time.After(every):
		}
		// Long enough to ride out a Redis restart and the claims it
		// left behind; a call still failing then is given up on.
		cctx, cancel := context.WithTimeout(ctx, 4*time.Second)
		res, err := pub.Publish(cctx, ch, pubpkg.Message{Data: delivery.Data(ch, seq)})
		cancel()
		if err == nil {
			if err = p.log.Ack(seq, res.ID); err != nil {
				p.bad = append(p.bad, fmt.Sprintf("%s: %v", ch, err))
			}
		}
		switch {
		case err != nil:
			p.log.Fail(seq, err)
		case res.Replayed:
			p.replayed++
		}
	}
}

// rrProxy forwards each connection it accepts to the next of its
// backends that takes it, round robin, as a load balancer in front of
// egress instances does; Cut and Heal take a client's network away and
// give it back. It reads the server's side of every WebSocket it carries
// (wireCheck) and reports what breaks the per-connection order.
type rrProxy struct {
	ln       net.Listener
	backends []string
	report   func(string)

	mu     sync.Mutex
	next   int
	refuse bool
	conns  map[net.Conn]struct{}
	wg     sync.WaitGroup
}

func newRRProxy(t testing.TB, backends []string, first int, report func(string)) *rrProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &rrProxy{ln: ln, backends: backends, next: first, report: report, conns: map[net.Conn]struct{}{}}
	p.wg.Go(p.accept)
	t.Cleanup(p.close)
	return p
}

func (p *rrProxy) Addr() string { return p.ln.Addr().String() }

func (p *rrProxy) accept() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		var up net.Conn
		for range p.backends {
			if p.refuse {
				break
			}
			addr := p.backends[p.next%len(p.backends)]
			p.next++
			if up, err = net.DialTimeout("tcp", addr, time.Second); err == nil {
				break
			}
		}
		if up == nil {
			p.mu.Unlock()
			c.Close()
			continue
		}
		p.conns[c], p.conns[up] = struct{}{}, struct{}{}
		p.mu.Unlock()
		w := &wireCheck{last: map[string]stream.ID{}, report: p.report}
		p.wg.Go(func() { p.pipe(up, c, nil) })
		p.wg.Go(func() { p.pipe(c, up, w) })
	}
}

func (p *rrProxy) pipe(dst, src net.Conn, w *wireCheck) {
	buf := make([]byte, 32*1024)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if w != nil {
				w.feed(buf[:n])
			}
			if _, werr := dst.Write(buf[:n]); werr != nil {
				break
			}
		}
		if err != nil {
			break
		}
	}
	dst.Close()
	src.Close()
	p.mu.Lock()
	delete(p.conns, dst)
	delete(p.conns, src)
	p.mu.Unlock()
}

// Cut closes every connection and refuses new ones until Heal.
func (p *rrProxy) Cut() {
	p.mu.Lock()
	p.refuse = true
	for c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
}

// Heal accepts connections again.
func (p *rrProxy) Heal() {
	p.mu.Lock()
	p.refuse = false
	p.mu.Unlock()
}

func (p *rrProxy) close() {
	p.ln.Close()
	p.Cut()
	p.wg.Wait()
}

// wireCheck parses the server's side of one WebSocket connection (the
// upgrade response, then unmasked frames) and checks, per channel, that
// each message's id is above the subscription's position ("subscribed")
// and above the message before it: what docs/protocol.md promises a
// connection, before any client deduplicates.
type wireCheck struct {
	buf      []byte
	upgraded bool
	off      bool // not a WebSocket (a refused upgrade): not read further
	msg      []byte
	last     map[string]stream.ID
	report   func(string)
}

func (w *wireCheck) feed(p []byte) {
	if w.off {
		return
	}
	w.buf = append(w.buf, p...)
	if !w.upgraded {
		i := bytes.Index(w.buf, []byte("\r\n\r\n"))
		if i < 0 {
			return
		}
		if !bytes.HasPrefix(w.buf, []byte("HTTP/1.1 101 ")) {
			w.off, w.buf = true, nil
			return
		}
		w.upgraded = true
		w.buf = w.buf[i+4:]
	}
	for len(w.buf) >= 2 {
		b0, b1 := w.buf[0], w.buf[1]
		n, h := uint64(b1&0x7f), 2
		switch n {
		case 126:
			if len(w.buf) < 4 {
				return
			}
			n, h = uint64(binary.BigEndian.Uint16(w.buf[2:])), 4
		case 127:
			if len(w.buf) < 10 {
				return
			}
			n, h = binary.BigEndian.Uint64(w.buf[2:]), 10
		}
		if b1&0x80 != 0 || n > 1<<24 {
			w.report("a server frame the check cannot read (masked or over 16 MiB)")
			w.off, w.buf = true, nil
			return
		}
		if uint64(len(w.buf)-h) < n {
			return
		}
		payload := w.buf[h : h+int(n)]
		if op := b0 & 0x0f; op == 0 || op == 1 {
			w.msg = append(w.msg, payload...)
			if b0&0x80 != 0 {
				w.frame(w.msg)
				w.msg = w.msg[:0]
			}
		}
		w.buf = w.buf[h+int(n):]
	}
	if len(w.buf) == 0 {
		w.buf = nil // let go of the array
	}
}

func (w *wireCheck) frame(b []byte) {
	var f struct {
		Type, Channel, ID, Position string
	}
	if json.Unmarshal(b, &f) != nil || f.Channel == "" {
		return
	}
	switch f.Type {
	case "subscribed":
		pos, ok := stream.ParseID(f.Position)
		if !ok {
			w.report(fmt.Sprintf("subscribed to %s with position %q", f.Channel, f.Position))
			return
		}
		w.last[f.Channel] = pos
	case "message":
		id, ok := stream.ParseID(f.ID)
		last, subscribed := w.last[f.Channel]
		switch {
		case !ok:
			w.report(fmt.Sprintf("message on %s with id %q", f.Channel, f.ID))
		case !subscribed:
			w.report(fmt.Sprintf("message %s on %s before its subscribed reply", f.ID, f.Channel))
		case !last.Less(id):
			w.report(fmt.Sprintf("message %s on %s sent after %s on the same connection: duplicate or out of order", f.ID, f.Channel, last))
		}
		if ok {
			w.last[f.Channel] = id
		}
	}
}
