// Command soak runs wsrelay under production-like traffic and churn for a
// long time (make soak, SOAK_ARGS='-duration 12m') and shows whether the
// functions hold steady: it samples each process's memory, file
// descriptors and goroutines and Redis's memory and keys every -sample,
// and at the end checks that nothing was lost or delivered twice, that
// each targeted send reached its target (or missed a connection ending
// at that moment), that the goroutines went back to where they started
// and that no registry key was left behind (docs/soak.md).
//
// It builds the functions as make bench does, starts a throwaway
// redis-server, one ingress and two egress instances behind a round-robin
// TCP balancer, and kills them all on the way out (normal end, error,
// panic or signal). It exits non-zero when a check fails; growth is
// reported, not judged.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/wsrelay/wsrelay/bench/harness"
)

func main() { harness.Main("soak", run) }

// config is the run's shape, from the flags.
type config struct {
	duration, sample, warmup    time.Duration
	clients, channels           int
	rate, targeted, reads       float64 // per second
	churn                       time.Duration
	restartEvery                time.Duration
	registryTTL, historyTTL     time.Duration
	maxLifetime, idempotencyTTL time.Duration
	seed                        uint64
}

func parse(args []string, stderr io.Writer) (config, error) {
	var c config
	fs := flag.NewFlagSet("soak", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.DurationVar(&c.duration, "duration", 10*time.Minute, "how long the traffic and churn last (the end's checks come after)")
	fs.DurationVar(&c.sample, "sample", 30*time.Second, "time between samples")
	fs.DurationVar(&c.warmup, "warmup", time.Minute, "samples before this are left out of the first-third/last-third averages")
	fs.IntVar(&c.clients, "clients", 40, "WebSocket clients at any time (one leaving for good is replaced by a new one)")
	fs.IntVar(&c.channels, "channels", 8, "channels the clients subscribe to and the publishers publish to")
	fs.Float64Var(&c.rate, "rate", 20, "channel publishes per second, over all channels")
	fs.Float64Var(&c.targeted, "targeted", 2, "messages per second sent to users and to connections (half each)")
	fs.Float64Var(&c.reads, "reads", 2, "history and registry reads per second")
	fs.DurationVar(&c.churn, "churn", 10*time.Second, "mean time between a client's own actions (subscribe, unsubscribe, close and resume, leave)")
	fs.DurationVar(&c.restartEvery, "restart-every", 3*time.Minute, "time between rolling restarts of an egress (SIGTERM, then a new one); 0: none")
	fs.DurationVar(&c.registryTTL, "registry-ttl", 5*time.Second, "REGISTRY_TTL of both functions")
	fs.DurationVar(&c.historyTTL, "history-ttl", time.Minute, "HISTORY_TTL of the ingress")
	fs.DurationVar(&c.maxLifetime, "max-lifetime", 45*time.Second, "MAX_LIFETIME of the egress: every socket is cut after it")
	fs.DurationVar(&c.idempotencyTTL, "idempotency-window", time.Minute, "IDEMPOTENCY_WINDOW of the ingress")
	fs.Uint64Var(&c.seed, "seed", 0, "seed of the clients' random choices (0: from the clock; logged)")
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	switch {
	case c.duration <= 0 || c.sample <= 0 || c.churn <= 0:
		return c, errors.New("-duration, -sample and -churn must be positive")
	case c.clients < 1 || c.channels < 2 || c.rate <= 0:
		return c, errors.New("want -clients ≥ 1, -channels ≥ 2 and -rate > 0")
	case c.registryTTL < 3*time.Second:
		return c, errors.New("-registry-ttl must be at least 3s (the functions' minimum)")
	}
	if c.seed == 0 {
		c.seed = uint64(time.Now().UnixNano())
	}
	return c, nil
}

const (
	prefix    = "soak"
	apiKey    = "soak-api-key-0123456789abcdef"
	jwtSecret = "soak-jwt-secret-0123456789abcdef0123456789"
	grace     = 3 * time.Second // SHUTDOWN_GRACE of the egress
)

func run(ctx context.Context, args []string, stdout, stderr io.Writer) (err error) {
	defer func() {
		if p := recover(); p != nil {
			harness.Kids.StopAll()
			err = fmt.Errorf("panic: %v", p)
		}
	}()
	cfg, err := parse(args, stderr)
	if err != nil {
		return err
	}
	var logMu sync.Mutex // the progress lines come from several goroutines
	logf := func(f string, a ...any) {
		logMu.Lock()
		defer logMu.Unlock()
		fmt.Fprintf(stderr, "soak: "+f+"\n", a...)
	}
	nofile := harness.RaiseNoFile()
	root, err := harness.RepoRoot()
	if err != nil {
		return err
	}
	logDir, err := os.MkdirTemp("", "wsrelay-soak-")
	if err != nil {
		return err
	}
	logf("logs in %s, RLIMIT_NOFILE %d, seed %d (-seed %d runs the same choices again)", logDir, nofile, cfg.seed, cfg.seed)
	e := &harness.Env{LogDir: logDir}
	if e.Binaries, err = harness.Build(root, false); err != nil {
		return err
	}
	if err := e.StartRedis(); err != nil {
		return err
	}
	defer harness.Kids.Stop(e.Redis)
	defer e.RDB.Close()
	s := &soak{cfg: cfg, env: e, logf: logf, rng: rand.New(rand.NewPCG(cfg.seed, 0x50a6))}
	defer s.stopAll()
	if err := s.start(); err != nil {
		return err
	}
	report, err := s.drive(ctx)
	if err != nil {
		return err
	}
	report.print(stdout)
	if len(report.problems) > 0 {
		return fmt.Errorf("%d check(s) failed (above)", len(report.problems))
	}
	return nil
}

// common is the environment of both functions.
func (s *soak) common() []string {
	return []string{
		"ALLOW_ANONYMOUS=false",
		"JWT_SECRET=" + jwtSecret,
		"REGISTRY_TTL=" + s.cfg.registryTTL.String(),
		"PROBE_INTERVAL=1s",
	}
}

func (s *soak) startIngress() error {
	p, _, err := s.env.StartFunction(s.env.Ingress, prefix, append(s.common(),
		"API_KEYS="+apiKey,
		"HISTORY_TTL="+s.cfg.historyTTL.String(),
		"IDEMPOTENCY_WINDOW="+s.cfg.idempotencyTTL.String(),
	)...)
	if err != nil {
		return err
	}
	s.ingress = p
	return nil
}

func (s *soak) startEgress() (*harness.Proc, error) {
	p, _, err := s.env.StartFunction(s.env.Egress, prefix, append(s.common(),
		"MAX_LIFETIME="+s.cfg.maxLifetime.String(),
		"SHUTDOWN_GRACE="+grace.String(),
		"MAX_SUBSCRIPTIONS=16",
	)...)
	return p, err
}

// egressSlot is one of the two egress instances the balancer spreads the
// sockets over; a rolling restart replaces its process.
type egressSlot struct {
	name     string
	mu       sync.Mutex
	p        *harness.Proc
	restarts int
}

func (e *egressSlot) proc() (*harness.Proc, int) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.p, e.restarts
}

func addr(p *harness.Proc) string { return "127.0.0.1:" + strconv.Itoa(p.Port) }

// restart drains the slot's egress the way a redeploy does: out of the
// balancer, SIGTERM (its sockets are closed 1001 and their clients resume
// on the other instance), then a new process in its place.
func (s *soak) restart(slot *egressSlot) error {
	s.restartMu.Lock()
	defer s.restartMu.Unlock()
	old, _ := slot.proc()
	s.lb.Remove(addr(old))
	took, err := harness.Kids.Term(old.Cmd, grace+5*time.Second)
	if err != nil {
		return fmt.Errorf("%s: %w", slot.name, err)
	}
	p, err := s.startEgress()
	if err != nil {
		return fmt.Errorf("%s: start again: %w", slot.name, err)
	}
	slot.mu.Lock()
	slot.p = p
	slot.restarts++
	slot.mu.Unlock()
	s.lb.Add(addr(p))
	s.logf("%s drained in %s and started again (restart %d)", slot.name, took.Round(time.Millisecond), slot.restarts)
	return nil
}
