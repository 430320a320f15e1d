package main

import (
	"context"
	"fmt"
	"io"
	"maps"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/wsrelay/wsrelay/bench/harness"
)

// procSample is one function process at one sample.
type procSample struct {
	rssKiB     int64
	fds        int
	redisConns int     // of its fds, the TCP connections to Redis (its pool)
	goroutines float64 // go_goroutines
	heapBytes  float64 // go_memstats_heap_inuse_bytes: live, and garbage not yet collected
	gcGoal     float64 // go_memstats_next_gc_bytes: follows the live heap, without the sawtooth
	restarts   int     // of its slot so far (egress)
}

// sample is the state of the run at one moment.
type sample struct {
	at        time.Duration
	procs     [3]procSample // ingress, egress-a, egress-b
	redisMem  int64         // INFO memory used_memory
	keys      int64         // DBSIZE
	published int64         // channel publishes and targeted sends acknowledged so far
	delivered int64         // channel and targeted messages the clients got so far
	clients   int
	final     bool // after the clients left and the quiet period
}

var procNames = [3]string{"ingress", "egress-a", "egress-b"}

func (s *soak) takeSample(ctx context.Context, at time.Duration) (sample, error) {
	smp := sample{at: at}
	// Not in the middle of a rolling restart, whose old process is gone.
	s.restartMu.Lock()
	defer s.restartMu.Unlock()
	procs := [3]*harness.Proc{s.ingress}
	for i, e := range s.egress {
		procs[i+1], smp.procs[i+1].restarts = e.proc()
	}
	for i, p := range procs {
		ps := &smp.procs[i]
		var err error
		if ps.rssKiB, err = harness.RSSKiB(p.Pid()); err != nil {
			return smp, fmt.Errorf("%s: %w", procNames[i], err)
		}
		if ps.fds, err = harness.OpenFDs(p.Pid()); err != nil {
			return smp, fmt.Errorf("%s: %w", procNames[i], err)
		}
		if ps.redisConns, err = harness.TCPConnsTo(p.Pid(), s.redisPort); err != nil {
			return smp, fmt.Errorf("%s: %w", procNames[i], err)
		}
		m, err := harness.Metrics(p.Base, "go_goroutines", "go_memstats_heap_inuse_bytes", "go_memstats_next_gc_bytes")
		if err != nil {
			return smp, fmt.Errorf("%s: %w", procNames[i], err)
		}
		ps.goroutines, ps.heapBytes, ps.gcGoal = m["go_goroutines"], m["go_memstats_heap_inuse_bytes"], m["go_memstats_next_gc_bytes"]
	}
	info, err := s.env.RDB.Info(ctx, "memory").Result()
	if err != nil {
		return smp, fmt.Errorf("redis INFO: %w", err)
	}
	for line := range strings.SplitSeq(info, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "used_memory:"); ok {
			smp.redisMem, _ = strconv.ParseInt(v, 10, 64)
		}
	}
	if smp.keys, err = s.env.RDB.DBSize(ctx).Result(); err != nil {
		return smp, fmt.Errorf("redis DBSIZE: %w", err)
	}
	smp.published = s.published.Load() + s.targetedSent.Load()
	smp.delivered = s.delivered.Load() + s.targetedGot.Load()
	s.mu.Lock()
	smp.clients = len(s.live)
	s.mu.Unlock()
	return smp, nil
}

func mib(b float64) float64 { return b / (1 << 20) }

// line is the sample as one progress line.
func (smp sample) line() string {
	var sb strings.Builder
	fmt.Fprintf(&sb, "t=%s", smp.at.Round(time.Second))
	for i, p := range smp.procs {
		fmt.Fprintf(&sb, " %s rss=%.1fMiB fds=%d(redis %d) goroutines=%.0f heap=%.1fMiB", procNames[i], float64(p.rssKiB)/1024, p.fds, p.redisConns, p.goroutines, mib(p.heapBytes))
	}
	fmt.Fprintf(&sb, " redis=%.1fMiB keys=%d published=%d delivered=%d clients=%d", mib(float64(smp.redisMem)), smp.keys, smp.published, smp.delivered, smp.clients)
	return sb.String()
}

// series are the figures whose growth the report shows.
var series = func() []struct {
	name string
	f    func(sample) float64
} {
	type ser = struct {
		name string
		f    func(sample) float64
	}
	var out []ser
	for i, n := range procNames {
		out = append(out,
			ser{n + " RSS MiB", func(s sample) float64 { return float64(s.procs[i].rssKiB) / 1024 }},
			ser{n + " fds", func(s sample) float64 { return float64(s.procs[i].fds) }},
			ser{n + " Redis conns", func(s sample) float64 { return float64(s.procs[i].redisConns) }},
			ser{n + " goroutines", func(s sample) float64 { return s.procs[i].goroutines }},
			ser{n + " heap MiB", func(s sample) float64 { return mib(s.procs[i].heapBytes) }},
			ser{n + " GC goal MiB", func(s sample) float64 { return mib(s.procs[i].gcGoal) }},
		)
	}
	return append(out,
		ser{"redis used_memory MiB", func(s sample) float64 { return mib(float64(s.redisMem)) }},
		ser{"redis keys", func(s sample) float64 { return float64(s.keys) }},
	)
}()

// report is what the run found.
type report struct {
	cfg      config
	samples  []sample
	counts   []string // what the run did, one line each
	keys     string   // the keys left at the end, by kind
	gaps     int      // resumes told recovered:false
	misses   []string // the targeted sends not received as they should be, one line each
	checks   []string // the checks that passed
	problems []string // the checks that failed, and why
}

func (r *report) fail(format string, args ...any) {
	r.problems = append(r.problems, fmt.Sprintf(format, args...))
}

// thirds returns the mean of series f over the first and the last third
// of the samples after warm-up (the final one, taken after the clients
// left, excluded), and false when there are too few of them.
func thirds(samples []sample, warmup time.Duration, f func(sample) float64) (first, last float64, ok bool) {
	var vals []float64
	for _, s := range samples {
		if !s.final && s.at >= warmup {
			vals = append(vals, f(s))
		}
	}
	n := len(vals) / 3
	if n == 0 {
		return 0, 0, false
	}
	mean := func(v []float64) float64 {
		t := 0.0
		for _, x := range v {
			t += x
		}
		return t / float64(len(v))
	}
	return mean(vals[:n]), mean(vals[len(vals)-n:]), true
}

func (r *report) print(w io.Writer) {
	c := r.cfg
	fmt.Fprintf(w, "\nwsrelay soak: %s of traffic, %d clients, %d channels, %.0f publishes/s, %.0f targeted/s, %.0f reads/s, a client action every %s on average, an egress restart every %s; REGISTRY_TTL %s, HISTORY_TTL %s, MAX_LIFETIME %s; seed %d\n\n",
		c.duration, c.clients, c.channels, c.rate, c.targeted, c.reads, c.churn, c.restartEvery, c.registryTTL, c.historyTTL, c.maxLifetime, c.seed)
	tw := tabwriter.NewWriter(w, 0, 0, 1, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "t\t│\ting RSS\tfds\tgor\theap\t│\teg-a RSS\tfds\tgor\theap\t│\teg-b RSS\tfds\tgor\theap\trestarts\t│\tredis MiB\tkeys\t│\tpublished\tdelivered\tclients\t")
	for _, s := range r.samples {
		at := s.at.Round(time.Second).String()
		if s.final {
			at = "end " + at
		}
		fmt.Fprintf(tw, "%s\t", at)
		for _, p := range s.procs {
			fmt.Fprintf(tw, "│\t%.1f\t%d (%d)\t%.0f\t%.1f\t", float64(p.rssKiB)/1024, p.fds, p.redisConns, p.goroutines, mib(p.heapBytes))
		}
		fmt.Fprintf(tw, "%d/%d\t│\t%.1f\t%d\t│\t%d\t%d\t%d\t\n", s.procs[1].restarts, s.procs[2].restarts, mib(float64(s.redisMem)), s.keys, s.published, s.delivered, s.clients)
	}
	tw.Flush()
	fmt.Fprintf(w, "\n(RSS and heap in use in MiB; fds (of them to Redis); gor: goroutines; restarts: egress-a/egress-b so far; the end row is after the clients left and %s of quiet)\n\n", 2*c.registryTTL+2*time.Second)

	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "series (samples from %s on)\tfirst third\tlast third\tchange\n", c.warmup)
	for _, s := range series {
		first, last, ok := thirds(r.samples, c.warmup, s.f)
		if !ok {
			fmt.Fprintf(w, "too few samples after the %s warm-up for first-third/last-third averages: run longer or sample more often\n", c.warmup)
			break
		}
		change := "–"
		if first != 0 {
			change = fmt.Sprintf("%+.1f%%", 100*(last-first)/first)
		}
		fmt.Fprintf(tw, "%s\t%.1f\t%.1f\t%s\n", s.name, first, last, change)
	}
	tw.Flush()
	fmt.Fprintln(w)
	for _, l := range r.counts {
		fmt.Fprintln(w, l)
	}
	fmt.Fprintf(w, "keys left at the end: %s\n\n", r.keys)
	if len(r.misses) > 0 {
		fmt.Fprintf(w, "targeted sends not received as sent (times from the start of the traffic):\n")
		for _, l := range r.misses {
			fmt.Fprintln(w, "  ", l)
		}
		fmt.Fprintln(w)
	}
	for _, l := range r.checks {
		fmt.Fprintln(w, "ok  ", l)
	}
	for _, l := range r.problems {
		fmt.Fprintln(w, "FAIL", l)
	}
}

// check runs the end's checks into rep.
func (s *soak) check(ctx context.Context, rep *report) {
	// The traffic itself: a run whose publishes, sends or reads failed,
	// or that published or delivered nothing, leaves the checks below
	// nothing to check (a chain is owed only acknowledged messages, and
	// only acknowledged sends are checked).
	var failedPubs int
	for _, l := range s.logs {
		failedPubs += len(l.Failed())
	}
	var trouble []string
	if failedPubs > 0 {
		trouble = append(trouble, fmt.Sprintf("%d channel publishes failed", failedPubs))
	}
	if n := s.targetedError.Load(); n > 0 {
		trouble = append(trouble, fmt.Sprintf("%d targeted sends failed", n))
	}
	if n := s.readErrors.Load(); n > 0 {
		trouble = append(trouble, fmt.Sprintf("%d reads failed", n))
	}
	if s.published.Load() == 0 || s.delivered.Load() == 0 {
		trouble = append(trouble, fmt.Sprintf("%d channel publishes acknowledged, %d deliveries", s.published.Load(), s.delivered.Load()))
	}
	if s.cfg.targeted > 0 && s.targetedSent.Load() == 0 {
		trouble = append(trouble, "no targeted send acknowledged")
	}
	if s.cfg.reads > 0 && s.reads.Load() == 0 {
		trouble = append(trouble, "no read answered")
	}
	if len(trouble) > 0 {
		rep.fail("traffic: %s (the first error of each kind is above)", strings.Join(trouble, "; "))
	} else {
		rep.checks = append(rep.checks, fmt.Sprintf("traffic: %d channel publishes, %d targeted sends and %d reads answered, none failed", s.published.Load(), s.targetedSent.Load(), s.reads.Load()))
	}

	// Delivery: every chain, in full.
	s.mu.Lock()
	chains := slices.Clone(s.chains)
	s.mu.Unlock()
	bad := 0
	for _, c := range chains {
		p, g := c.Check(s.logs[c.Channel()], true)
		rep.gaps += len(g)
		for _, l := range p {
			if bad < 20 {
				rep.fail("delivery, %s: %s", c.Channel(), l)
			}
			bad++
		}
	}
	if bad > 20 {
		rep.fail("delivery: … and %d more", bad-20)
	}
	if bad == 0 {
		rep.checks = append(rep.checks, fmt.Sprintf("delivery: %d subscription chains, no message lost, none twice, all in order (resumes told recovered:false: %d)", len(chains), rep.gaps))
	}

	s.checkTargeted(rep)

	// Goroutines back to their idle level. The egress processes at the
	// end may be new ones (a rolling restart): an idle one has as many as
	// an idle one at the start.
	base, final := rep.samples[0], rep.samples[len(rep.samples)-1]
	for i, n := range procNames {
		b, f := base.procs[i], final.procs[i]
		fds := fmt.Sprintf("(fds %d at the start, %d at the end; to Redis %d and %d)", b.fds, f.fds, b.redisConns, f.redisConns)
		if f.goroutines > b.goroutines+max(5, b.goroutines/10) {
			rep.fail("goroutines: %s has %.0f after the clients left, %.0f at the start %s", n, f.goroutines, b.goroutines, fds)
		} else {
			rep.checks = append(rep.checks, fmt.Sprintf("goroutines: %s %.0f at the start, %.0f at the end %s", n, b.goroutines, f.goroutines, fds))
		}
	}

	// Keys: no registry record or set outlives its connections (the quiet
	// period is longer than REGISTRY_TTL), and every key left expires.
	kinds := map[string]int{}
	var registry, forever, tooLong []string
	// The longest TTL each kind of key is given (the ingress's channel and
	// inbox limits, shared/stream's :last keys at twice their stream's).
	bound := map[string]time.Duration{
		"stream":            s.cfg.historyTTL,
		"stream :last":      2 * s.cfg.historyTTL,
		"idempotency":       s.cfg.idempotencyTTL,
		"idempotent append": s.cfg.idempotencyTTL,
		"inbox":             2 * s.cfg.registryTTL,
		"inbox :last":       4 * s.cfg.registryTTL,
	}
	iter := s.env.RDB.Scan(ctx, 0, prefix+":*", 1000).Iterator()
	for iter.Next(ctx) {
		k := iter.Val()
		kind := keyKind(k)
		kinds[kind]++
		if kind == "registry" {
			if len(registry) < 5 {
				registry = append(registry, k)
			}
			continue
		}
		ttl, err := s.env.RDB.PTTL(ctx, k).Result()
		switch b, ok := bound[kind]; {
		case err != nil:
		case ttl < 0 && ttl != -2*time.Nanosecond:
			if len(forever) < 5 {
				forever = append(forever, k)
			}
			kinds[kind+" without TTL"]++
		case ok && ttl > b:
			if len(tooLong) < 5 {
				tooLong = append(tooLong, fmt.Sprintf("%s (%s, at most %s)", k, ttl.Round(time.Second), b))
			}
			kinds[kind+" with a TTL too long"]++
		}
	}
	if err := iter.Err(); err != nil {
		rep.fail("keys: SCAN: %v", err)
	}
	var parts []string
	for _, k := range slices.Sorted(maps.Keys(kinds)) {
		parts = append(parts, fmt.Sprintf("%s %d", k, kinds[k]))
	}
	rep.keys = strings.Join(parts, ", ")
	if rep.keys == "" {
		rep.keys = "none"
	}
	if n := kinds["registry"]; n > 0 {
		rep.fail("keys: %d registry keys left after the clients left and %s of quiet, e.g. %v", n, 2*s.cfg.registryTTL+2*time.Second, registry)
	} else {
		rep.checks = append(rep.checks, "keys: no registry key left")
	}
	if len(forever) > 0 {
		rep.fail("keys: keys that never expire, e.g. %v", forever)
	}
	if len(tooLong) > 0 {
		rep.fail("keys: keys that expire later than their kind should, e.g. %v", tooLong)
	}
	if len(forever)+len(tooLong) == 0 {
		rep.checks = append(rep.checks, "keys: every key left expires (streams and their :last by HISTORY_TTL, idempotency records by IDEMPOTENCY_WINDOW)")
	}

	rep.counts = append(rep.counts,
		fmt.Sprintf("channel publishes acknowledged %d, failed %d; channel messages delivered %d", s.published.Load(), failedPubs, s.delivered.Load()),
		fmt.Sprintf("targeted sends acknowledged %d (to a connection gone since: %d, errors: %d), targeted messages received %d", s.targetedSent.Load(), s.targetedGone.Load(), s.targetedError.Load(), s.targetedGot.Load()),
		fmt.Sprintf("history and registry reads %d, errors %d", s.reads.Load(), s.readErrors.Load()),
		fmt.Sprintf("clients: %d in all, %d left for good; connections %d; subscribes %d, unsubscribes %d, closes and resumes %d", s.nextID, s.leaves.Load(), s.connects.Load(), s.subscribes.Load(), s.unsubscribes.Load(), s.resumes.Load()),
	)
	s.firstErrMu.Lock()
	for _, k := range slices.Sorted(maps.Keys(s.firstErrs)) {
		rep.counts = append(rep.counts, fmt.Sprintf("first %s error: %s", k, s.firstErrs[k]))
	}
	s.firstErrMu.Unlock()
}

// keyKind names what a key is for (shared/keys).
func keyKind(k string) string {
	switch {
	case strings.HasSuffix(k, ":conns") || strings.Contains(k, "{r:"):
		return "registry"
	case strings.Contains(k, ":once:"):
		return "idempotent append"
	case strings.Contains(k, "{k:"):
		return "idempotency"
	case strings.Contains(k, "{i:") && strings.HasSuffix(k, ":last"):
		return "inbox :last"
	case strings.Contains(k, "{i:"):
		return "inbox"
	case strings.HasSuffix(k, ":last"):
		return "stream :last"
	case strings.HasSuffix(k, "}:s"):
		return "stream"
	case strings.Contains(k, "{l:"):
		return "rate limit"
	}
	return "other"
}

// checkTargeted checks the targeted sends one by one (targetedLog.check)
// and lists each that was not received as sent: a miss the contract
// allows passes; an unexplained miss, a message received twice by a
// connection, or by one it was not sent to, fails.
func (s *soak) checkTargeted(rep *report) {
	received, verdicts := s.targets.check(targetedWindow)
	kinds := map[verdictKind]int{}
	for _, v := range verdicts {
		rep.misses = append(rep.misses, s.targets.line(v))
		kinds[v.kind]++
	}
	if bad := len(verdicts) - kinds[missAllowed]; bad > 0 {
		rep.fail("targeted: %d missed unexplained, %d received twice, %d misrouted, %d unreadable (listed above)",
			kinds[missUnexplained], kinds[duplicate], kinds[misrouted], kinds[unreadable])
		return
	}
	listed := ""
	if kinds[missAllowed] > 0 {
		listed = ", listed above"
	}
	rep.checks = append(rep.checks, fmt.Sprintf("targeted: %d acknowledged sends checked one by one: %d received by their target, once, nothing misrouted; %d missed by a connection that ended within %s of the send, or by a user with none (allowed%s)",
		received+kinds[missAllowed], received, kinds[missAllowed], targetedWindow, listed))
}
