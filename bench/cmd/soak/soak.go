package main

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/wsrelay/wsrelay/bench/harness"
	"github.com/wsrelay/wsrelay/shared/publisher"
	"github.com/wsrelay/wsrelay/shared/testkit/delivery"
)

// soak is one run.
type soak struct {
	cfg  config
	env  *harness.Env
	logf func(string, ...any)

	rngMu sync.Mutex
	rng   *rand.Rand

	lb        *harness.Balancer
	redisPort int
	restartMu sync.Mutex // held by a rolling restart and by a sample
	ingress   *harness.Proc
	egress    [2]*egressSlot
	pub       *publisher.Client
	pubHTTP   *http.Transport

	channels []string
	logs     map[string]*delivery.Log // by channel

	mu      sync.Mutex
	live    map[int]*soakClient
	chains  []*delivery.Chain // every chain the run made
	nextID  int
	clients sync.WaitGroup

	targets *targetedLog // every targeted send, receipt and connection, for check

	published, delivered         atomic.Int64 // channel messages
	targetedSent, targetedGot    atomic.Int64
	targetedGone                 atomic.Int64 // sent to a connection that had ended: 404
	reads, readErrors            atomic.Int64
	connects, resumes, leaves    atomic.Int64
	subscribes, unsubscribes     atomic.Int64
	publishErrors, targetedError atomic.Int64
	firstErrMu                   sync.Mutex
	firstErrs                    map[string]string
}

func (s *soak) intN(n int) int {
	s.rngMu.Lock()
	defer s.rngMu.Unlock()
	return s.rng.IntN(n)
}

// expDelay is a random delay with mean d (exponential, capped at 4d).
func (s *soak) expDelay(d time.Duration) time.Duration {
	s.rngMu.Lock()
	f := s.rng.ExpFloat64()
	s.rngMu.Unlock()
	return time.Duration(min(f, 4) * float64(d))
}

// noteErr keeps the first error of each kind, for the report.
func (s *soak) noteErr(kind string, err error) {
	s.firstErrMu.Lock()
	defer s.firstErrMu.Unlock()
	if s.firstErrs == nil {
		s.firstErrs = map[string]string{}
	}
	if _, ok := s.firstErrs[kind]; !ok {
		s.firstErrs[kind] = err.Error()
	}
}

func (s *soak) start() error {
	var err error
	if s.lb, err = harness.NewBalancer(); err != nil {
		return err
	}
	if _, port, ok := strings.Cut(s.env.RedisAddr, ":"); ok {
		s.redisPort, _ = strconv.Atoi(port)
	}
	if err := s.startIngress(); err != nil {
		return err
	}
	for i, name := range []string{"egress-a", "egress-b"} {
		p, err := s.startEgress()
		if err != nil {
			return err
		}
		s.egress[i] = &egressSlot{name: name, p: p}
		s.lb.Add(addr(p))
	}
	s.pubHTTP = &http.Transport{MaxIdleConnsPerHost: 16}
	s.pub, err = publisher.New(publisher.Options{
		URL:        s.ingress.Base,
		Token:      apiKey,
		HTTPClient: &http.Client{Transport: s.pubHTTP, Timeout: 5 * time.Second},
		MinBackoff: 50 * time.Millisecond,
		MaxBackoff: time.Second,
	})
	if err != nil {
		return err
	}
	s.logs = map[string]*delivery.Log{}
	for i := range s.cfg.channels {
		ch := "soak-" + strconv.Itoa(i)
		s.channels = append(s.channels, ch)
		s.logs[ch] = delivery.NewLog()
	}
	s.live = map[int]*soakClient{}
	return nil
}

// stopAll ends whatever is still running, on every way out.
func (s *soak) stopAll() {
	for _, c := range s.liveClients() {
		c.closeClient()
	}
	if s.lb != nil {
		s.lb.Close()
	}
	if s.pubHTTP != nil {
		s.pubHTTP.CloseIdleConnections()
	}
	if s.ingress != nil {
		harness.Kids.Stop(s.ingress.Cmd)
	}
	for _, e := range s.egress {
		if e != nil {
			p, _ := e.proc()
			harness.Kids.Stop(p.Cmd)
		}
	}
}

// token mints a user token (HS256) for user, allowed every soak channel.
func token(user string) string {
	enc := base64.RawURLEncoding
	head := enc.EncodeToString([]byte(`{"alg":"HS256","typ":"JWT"}`))
	claims, _ := json.Marshal(map[string]any{
		"sub": user, "exp": time.Now().Add(time.Hour).Unix(), "channels": []string{"soak-*"},
	})
	msg := head + "." + enc.EncodeToString(claims)
	mac := hmac.New(sha256.New, []byte(jwtSecret))
	mac.Write([]byte(msg))
	return msg + "." + enc.EncodeToString(mac.Sum(nil))
}

// drive runs the traffic and churn for the duration, then the end: the
// clients catch up and leave, a quiet period, the last sample and the
// checks.
func (s *soak) drive(ctx context.Context) (*report, error) {
	rep := &report{cfg: s.cfg}
	t0 := time.Now()
	s.targets = newTargetedLog(t0)
	base, err := s.takeSample(ctx, 0)
	if err != nil {
		return nil, fmt.Errorf("first sample: %w", err)
	}
	rep.samples = append(rep.samples, base)
	s.logf("%s", base.line())

	runCtx, stopTraffic := context.WithCancel(ctx)
	defer stopTraffic()
	var bg sync.WaitGroup
	for range s.cfg.clients {
		s.arrive(runCtx)
	}
	for _, ch := range s.channels {
		bg.Go(func() { s.publish(runCtx, ch) })
	}
	if s.cfg.targeted > 0 {
		bg.Go(func() { s.sendTargeted(runCtx) })
	}
	if s.cfg.reads > 0 {
		bg.Go(func() { s.read(runCtx) })
	}
	restartErr := make(chan error, 1)
	if s.cfg.restartEvery > 0 {
		bg.Go(func() {
			for i := 0; ; i++ {
				if harness.SleepCtx(runCtx, s.cfg.restartEvery) != nil {
					return
				}
				if err := s.restart(s.egress[i%2]); err != nil {
					restartErr <- err
					stopTraffic()
					return
				}
			}
		})
	}
	end := t0.Add(s.cfg.duration)
	for next := t0.Add(s.cfg.sample); next.Before(end) || next.Equal(end); next = next.Add(s.cfg.sample) {
		if harness.SleepCtx(runCtx, time.Until(next)) != nil {
			break
		}
		smp, err := s.takeSample(runCtx, time.Since(t0))
		if err != nil {
			s.logf("sample at %s: %v", time.Since(t0).Round(time.Second), err)
			continue
		}
		rep.samples = append(rep.samples, smp)
		s.logf("%s", smp.line())
	}
	_ = harness.SleepCtx(runCtx, time.Until(end))
	stopTraffic()
	bg.Wait()
	s.clients.Wait() // the clients' own loops; their connections stay open
	select {
	case err := <-restartErr:
		return nil, err
	default:
	}
	if ctx.Err() != nil {
		return nil, fmt.Errorf("stopped: %w", context.Cause(ctx))
	}
	s.logf("traffic stopped at %s; waiting for every client to catch up", time.Since(t0).Round(time.Second))

	// Every open chain catches up on what it is owed.
	catchUp := time.Now().Add(30 * time.Second)
	for {
		owed := s.owed()
		if owed == "" {
			break
		}
		if time.Now().After(catchUp) {
			s.logf("still owed after 30 s: %s", owed)
			break
		}
		if harness.SleepCtx(ctx, 200*time.Millisecond) != nil {
			return nil, fmt.Errorf("stopped: %w", context.Cause(ctx))
		}
	}
	// The clients leave; then a quiet period longer than REGISTRY_TTL, so
	// that whatever a connection left in the registry would have expired
	// had it been refreshed no more.
	for _, c := range s.liveClients() {
		c.markClosing("the end of the run")
		c.closeConn()
	}
	s.mu.Lock()
	clear(s.live)
	s.mu.Unlock()
	s.pubHTTP.CloseIdleConnections()
	quiet := 2*s.cfg.registryTTL + 2*time.Second
	s.logf("clients gone; quiet for %s", quiet)
	if err := harness.SleepCtx(ctx, quiet); err != nil {
		return nil, fmt.Errorf("stopped: %w", context.Cause(ctx))
	}
	final, err := s.takeSample(ctx, time.Since(t0))
	if err != nil {
		return nil, fmt.Errorf("final sample: %w", err)
	}
	final.final = true
	rep.samples = append(rep.samples, final)
	s.logf("%s", final.line())
	s.check(ctx, rep)
	return rep, nil
}

// owed names the first open chain still owed a message, or "".
func (s *soak) owed() string {
	s.mu.Lock()
	chains := slices.Clone(s.chains)
	s.mu.Unlock()
	for _, c := range chains {
		if p, _ := c.Check(s.logs[c.Channel()], false); len(p) > 0 {
			return c.Channel() + ": " + p[0]
		}
	}
	return ""
}

// publish publishes {"seq": n, "ch": ch} (delivery.Data) to ch, n = 0, 1, 2, …, one publish at a
// time (so that acknowledged sequence numbers are in id order), each with
// an Idempotency-Key of its own that its retries repeat.
func (s *soak) publish(ctx context.Context, ch string) {
	every := time.Duration(float64(time.Second) * float64(s.cfg.channels) / s.cfg.rate)
	log := s.logs[ch]
	// Spread the channels' publishes over the interval.
	if harness.SleepCtx(ctx, time.Duration(s.intN(int(every)+1))) != nil {
		return
	}
	tick := time.NewTicker(every)
	defer tick.Stop()
	for seq := 0; ; seq++ {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		// Not ctx: a publish under way when the traffic stops finishes,
		// so that its outcome is known.
		cctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		res, err := s.pub.Publish(cctx, ch, publisher.Message{Data: delivery.Data(ch, seq)},
			publisher.WithIdempotencyKey(fmt.Sprintf("%s-%d", ch, seq)))
		cancel()
		if err == nil {
			err = log.Ack(seq, res.ID)
		}
		if err != nil {
			log.Fail(seq, err)
			s.publishErrors.Add(1)
			s.noteErr("publish", err)
			continue
		}
		s.published.Add(1)
	}
}

// liveClients returns the live clients: a copy, so that closing them
// does not hold s.mu.
func (s *soak) liveClients() []*soakClient {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Collect(maps.Values(s.live))
}

// randomClient picks a live client, or nil.
func (s *soak) randomClient() *soakClient {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.live) == 0 {
		return nil
	}
	ids := make([]int, 0, len(s.live))
	for id := range s.live {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return s.live[ids[s.intN(len(ids))]]
}

// sendTargeted sends {"n": i} to a live client's user and to a live
// connection, in turn, and records each acknowledged send for the
// targeted check.
func (s *soak) sendTargeted(ctx context.Context) {
	every(ctx, s.cfg.targeted, func(i int) {
		c := s.randomClient()
		if c == nil {
			return
		}
		m := publisher.Message{Data: map[string]int{"n": i}, Event: "targeted"}
		ts := targetedSend{n: i, toUser: i%2 == 0, user: c.user, conn: c.connID(), start: time.Now()}
		if !ts.toUser && ts.conn == "" {
			return // not welcomed yet
		}
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		var err error
		if ts.toUser {
			ts.connections, err = s.pub.SendToUser(cctx, c.user, m)
		} else {
			_, err = s.pub.SendToConnection(cctx, ts.conn, m)
		}
		ts.acked = time.Now()
		cancel()
		var pe *publisher.Error
		switch {
		case err == nil:
			s.targetedSent.Add(1)
			s.targets.sent(ts)
		case !ts.toUser && errors.As(err, &pe) && pe.Status == http.StatusNotFound && pe.Code == "connection_not_found":
			// The connection ended (cut, closed, left) since, which
			// the check makes sure of.
			s.targetedGone.Add(1)
			ts.gone = true
			s.targets.sent(ts)
		case ctx.Err() != nil:
		default:
			s.targetedError.Add(1)
			s.noteErr("targeted", err)
		}
	})
}

// read reads a channel's history, a channel's connections and a
// connection's record, in turn, as a backend does.
func (s *soak) read(ctx context.Context) {
	every(ctx, s.cfg.reads, func(i int) {
		ch := s.channels[s.intN(len(s.channels))]
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		var err error
		switch i % 3 {
		case 0:
			_, err = s.pub.History(cctx, ch, "", 50)
		case 1:
			_, err = s.pub.ChannelConnections(cctx, ch, 100)
		case 2:
			if c := s.randomClient(); c != nil {
				if conn := c.connID(); conn != "" {
					_, err = s.pub.Connection(cctx, conn)
				}
			}
		}
		cancel()
		var pe *publisher.Error
		switch {
		case err == nil, errors.As(err, &pe) && pe.Status == http.StatusNotFound && pe.Code == "connection_not_found":
			s.reads.Add(1) // or the connection read had ended since
		case ctx.Err() != nil:
		default:
			s.readErrors.Add(1)
			s.noteErr("read", err)
		}
	})
}

// every calls do(0), do(1), … perSecond times a second until ctx ends.
func every(ctx context.Context, perSecond float64, do func(i int)) {
	tick := time.NewTicker(time.Duration(float64(time.Second) / perSecond))
	defer tick.Stop()
	for i := 0; ; i++ {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		do(i)
	}
}
