package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/wsrelay/wsrelay/bench/harness"
)

// sizes are the scenario parameters; -quick shrinks them.
type sizes struct {
	s1Subs, s1Pubs     int
	s1rPubs            int
	s1rRate            float64 // publishes/s
	s2Chans, s2Pubs    int
	s3Conns            int
	s4Conns            int
	s4Dur              time.Duration
	s5Reps             int
	s6Procs, s6Chans   int
	s6Pubs, publishers int
}

var full = sizes{
	s1Subs: 1000, s1Pubs: 2000,
	s1rPubs: 1000, s1rRate: 200,
	s2Chans: 1000, s2Pubs: 20000,
	s3Conns: 10000,
	s4Conns: 64, s4Dur: 10 * time.Second,
	s5Reps:  10,
	s6Procs: 20, s6Chans: 1000, s6Pubs: 10000,
	publishers: 16,
}

var quick = sizes{
	s1Subs: 200, s1Pubs: 500,
	s1rPubs: 200, s1rRate: 200,
	s2Chans: 200, s2Pubs: 4000,
	s3Conns: 2000,
	s4Conns: 64, s4Dur: 2 * time.Second,
	s5Reps:  3,
	s6Procs: 5, s6Chans: 200, s6Pubs: 2000,
	publishers: 16,
}

// result is one run of one scenario: metric name → value.
type result map[string]float64

// bench runs scenarios against one Redis; each run gets fresh processes
// and its own key prefix.
type bench struct {
	env   *env
	sz    sizes
	runID int
	logf  func(format string, args ...any)
	// floors are the HTTP servers S4 runs its floor on (-s4-floors).
	floors []string
	// timeline, when above 0, logs S1's, S1r's and S2's latency over
	// each 1/timeline of the publishes (-timeline).
	timeline int
}

func (b *bench) prefix(s string) string {
	b.runID++
	return "b" + strconv.Itoa(b.runID) + s
}

// fanOut runs S1 and S2 on system k: nChans channels, subsTotal
// subscribers spread over them on one egress, nPubs publishes spread
// round-robin over the channels.
func (b *bench) fanOut(ctx context.Context, k kind, name string, nChans, subsTotal, nPubs int, rate float64) (result, error) {
	sys, err := b.startSystem(k, b.prefix(name), publishing|delivering, 0, "SEND_QUEUE=4096")
	if err != nil {
		return nil, err
	}
	defer sys.stop()

	ch := func(i int) string { return "ch" + strconv.Itoa(i%nChans) }
	var rcvd tally
	subs, err := dialMany(ctx, sys, subsTotal, ch, nPubs, &rcvd)
	if err != nil {
		return nil, err
	}
	want := 0
	for i, s := range subs {
		// Subscriber i is on channel i%nChans; message j goes to j%nChans.
		c := i % nChans
		s.accept = func(seq int64) bool { return int(seq)%nChans == c }
		s.expected = nPubs / nChans
		if c < nPubs%nChans {
			s.expected++
		}
		want += s.expected
	}
	pub := newPublisher(sys, b.sz.publishers)
	defer pub.close()
	// CPU seconds of every process during the run: who the 2 cores went to.
	cpu := newCPUMeter(sys, b.env)
	st := pub.publishUntil(ctx, nPubs, b.sz.publishers, time.Time{}, rate, ch)
	waitDelivered(ctx, &rcvd, int64(want), 3*time.Second)
	used := cpu.seconds()
	closeAll(subs)
	d := collect(subs, nPubs)
	if b.timeline > 0 {
		b.logf("%s %s timeline, p50/max ms per 1/%d of the publishes: %s", k, name, b.timeline, timeline(subs, nPubs, b.timeline))
	}
	if st.failed > 0 {
		b.logf("%s: %d publishes failed, first: %v", name, st.failed, st.firstErr)
	}
	if d.got == 0 {
		return nil, fmt.Errorf("%s: no message was delivered (%d publishes made)", name, st.ok)
	}
	if d.lost > 0 || d.stray > 0 {
		b.logf("%s: %d messages lost, %d misrouted: this run's latency and throughput count only what arrived where it should", name, d.lost, d.stray)
	}
	secs := float64(d.last-st.start) / 1e9
	r := result{
		"p50 ms":    pct(d.lats, 50),
		"p99 ms":    pct(d.lats, 99),
		"lost":      float64(d.lost),
		"dup":       float64(d.dups),
		"stray":     float64(d.stray),
		"pub fail":  float64(st.failed),
		"pub/s":     float64(st.ok) / (float64(st.end-st.start) / 1e9),
		"deliver/s": float64(d.got) / secs,
		"wall s":    secs,
	}
	for q, lats := range d.byQuarter {
		r[fmt.Sprintf("p50 q%d ms", q+1)] = pct(lats, 50)
	}
	for who, sec := range used {
		r["cpu "+who+" s"] = sec
	}
	return r, nil
}

func (b *bench) s1(ctx context.Context, k kind) (result, error) {
	return b.fanOut(ctx, k, "s1", 1, b.sz.s1Subs, b.sz.s1Pubs, 0)
}

// s1r is S1 at a fixed publish rate both systems can sustain: latency at
// the same offered load, where S1 compares it at each one's saturation
// (closed-loop publishers go as fast as the shared cores let them, so a
// faster fan-out also gets faster publishers and as long a queue).
func (b *bench) s1r(ctx context.Context, k kind) (result, error) {
	return b.fanOut(ctx, k, "s1r", 1, b.sz.s1Subs, b.sz.s1rPubs, b.sz.s1rRate)
}

func (b *bench) s2(ctx context.Context, k kind) (result, error) {
	return b.fanOut(ctx, k, "s2", b.sz.s2Chans, b.sz.s2Chans, b.sz.s2Pubs, 0)
}

// cpuMeter reads the CPU time the system's processes, Redis and the bench
// itself use between its creation and seconds().
type cpuMeter struct {
	pids  map[string]int
	start map[string]int64
}

func newCPUMeter(sys *sut, e *env) *cpuMeter {
	m := &cpuMeter{pids: map[string]int{"redis": e.Redis.Process.Pid, "bench": os.Getpid()}, start: map[string]int64{}}
	for who, p := range sys.procs {
		m.pids[who] = p.Pid()
	}
	for who, pid := range m.pids {
		m.start[who], _ = harness.CPUTicks(pid)
	}
	return m
}

// seconds returns the CPU seconds each process used so far.
func (m *cpuMeter) seconds() map[string]float64 {
	out := make(map[string]float64, len(m.pids))
	for who, pid := range m.pids {
		c, _ := harness.CPUTicks(pid)
		out[who] = float64(c-m.start[who]) / 100
	}
	return out
}

// s3: idle subscribed sockets on one egress; RSS delta per connection.
// Sockets share channels ten to one (1,000 channels for 10,000 sockets).
func (b *bench) s3(ctx context.Context, k kind) (result, error) {
	pfx := b.prefix("s3")
	// Pings every 2 s, so that the idle period holds two ping/pong rounds:
	// what an idle connection costs includes keeping it alive.
	sys, err := b.startSystem(k, pfx, delivering, 2*time.Second)
	if err != nil {
		return nil, err
	}
	defer sys.stop()
	pid := sys.sub.Pid()
	var rcvd tally
	ch := func(i int) string { return "idle" + strconv.Itoa(i/10) }
	warm, err := dialMany(ctx, sys, 10, ch, 1, &rcvd)
	if err != nil {
		return nil, err
	}
	defer closeAll(warm)
	if err := harness.SleepCtx(ctx, time.Second); err != nil {
		return nil, err
	}
	// The first scrape before the baseline, so that what serving it
	// allocated is not counted against the sockets.
	go0 := goMetrics(sys)
	rss0, err := harness.RSSKiB(pid)
	if err != nil {
		return nil, err
	}
	n := b.sz.s3Conns
	subs, err := dialMany(ctx, sys, n, func(i int) string { return ch(i + 10) }, 1, &rcvd)
	if err != nil {
		return nil, err
	}
	defer closeAll(subs)
	if err := harness.SleepCtx(ctx, 5*time.Second); err != nil {
		return nil, err
	}
	// Every socket must still be open, or the RSS would be divided among
	// connections the server no longer holds.
	if gone := closedCount(subs) + closedCount(warm); gone > 0 {
		return nil, fmt.Errorf("s3: %d of %d idle sockets were closed by the server during the idle period", gone, n+len(warm))
	}
	rss1, err := harness.RSSKiB(pid)
	if err != nil {
		return nil, err
	}
	r := result{
		"KiB/conn":  float64(rss1-rss0) / float64(n),
		"RSS MiB":   float64(rss1) / 1024,
		"conns":     float64(n),
		"base MiB":  float64(rss0) / 1024,
		"after MiB": float64(rss1) / 1024,
	}
	if go1 := goMetrics(sys); len(go0) > 0 && len(go1) > 0 {
		per := func(k string) float64 { return (go1[k] - go0[k]) / float64(n) }
		r["heap KiB/conn"] = per("go_memstats_heap_inuse_bytes") / 1024
		r["stack KiB/conn"] = per("go_memstats_stack_inuse_bytes") / 1024
		r["goroutines/conn"] = per("go_goroutines")
	}
	return r, nil
}

// s4: ingest only, no subscribers, 64 keep-alive connections.
func (b *bench) s4(ctx context.Context, k kind) (result, error) {
	sys, err := b.startSystem(k, b.prefix("s4"), publishing, 0)
	if err != nil {
		return nil, err
	}
	r, err := b.ingest(ctx, sys, "")
	sys.stop()
	if err != nil || k != wsrelay {
		return r, err
	}
	// The same load on cmd/floor, which answers the publish route and
	// does nothing else: the most an ingress on net/http could reach here
	// today, the generator's share of the cores included; and, with
	// -s4-floors, on the floor served by other HTTP servers.
	for _, server := range b.floors {
		p, _, err := b.env.StartFloor(server)
		if err != nil {
			return nil, err
		}
		fr, err := b.ingest(ctx, &sut{kind: wsrelay, pub: p, procs: map[string]*harness.Proc{"floor": p}}, floorMetric(server))
		harness.Kids.Stop(p.Cmd)
		if err != nil {
			return nil, err
		}
		for m, v := range fr {
			r[m] = v
		}
	}
	return r, nil
}

// floorServers are the HTTP servers S4's floor runs on (net/http is
// cmd/floor, the others cmd/fastfloor's FLOOR_SERVER), each with the
// prefix of its S4 metrics.
var floorServers = map[string]string{
	"net/http":         "floor ",
	"fasthttp":         "floor fasthttp ",
	"fasthttp-adaptor": "floor adaptor ",
}

// floorMetric is the prefix of S4's metrics for the floor on server.
func floorMetric(server string) string { return floorServers[server] }

// parseFloors reads -s4-floors: a comma-separated list of floorServers.
func parseFloors(list string) ([]string, error) {
	var out []string
	for _, s := range strings.Split(list, ",") {
		s = strings.TrimSpace(s)
		if _, ok := floorServers[s]; !ok {
			return nil, fmt.Errorf("-s4-floors: %q is not one of net/http, fasthttp, fasthttp-adaptor", s)
		}
		out = append(out, s)
	}
	return out, nil
}

// ingest publishes to sys from S4's connections for S4's duration, as
// fast as they go, and returns what S4 reports, each metric's name
// prefixed with pre: publishes/s, their latency and failures, and the
// CPU each process used per publish.
func (b *bench) ingest(ctx context.Context, sys *sut, pre string) (result, error) {
	pub := newPublisher(sys, b.sz.s4Conns)
	defer pub.close()
	cpu := newCPUMeter(sys, b.env)
	st := pub.publishUntil(ctx, 1<<30, b.sz.s4Conns, time.Now().Add(b.sz.s4Dur), 0, func(i int) string { return "in" + strconv.Itoa(i%1000) })
	used := cpu.seconds()
	name := strings.TrimSpace("s4 " + pre)
	if err := published(name, st); err != nil {
		return nil, err
	}
	if st.failed > 0 {
		b.logf("%s: %d publishes failed, first: %v", name, st.failed, st.firstErr)
	}
	r := result{
		pre + "pub/s":    float64(st.ok) / (float64(st.end-st.start) / 1e9),
		pre + "p50 ms":   pct(st.lats, 50),
		pre + "p99 ms":   pct(st.lats, 99),
		pre + "pub fail": float64(st.failed),
	}
	for who, sec := range used {
		r[pre+"cpu µs/pub "+who] = sec * 1e6 / float64(max(1, st.ok))
	}
	return r, nil
}

// s5: exec to the first 200 on /readyz, median of reps starts, for each
// function and, in wsrelay's runs, for cmd/floor: what any Go server
// costs to start on this machine today.
func (b *bench) s5(ctx context.Context, k kind) (result, error) {
	type fn struct {
		name  string
		start func() (*harness.Proc, time.Duration, error)
	}
	fns := []fn{
		{"ingress", func() (*harness.Proc, time.Duration, error) {
			return b.env.StartFunction(b.env.Ingress, b.prefix("s5"))
		}},
		{"egress", func() (*harness.Proc, time.Duration, error) { return b.env.StartFunction(b.env.Egress, b.prefix("s5")) }},
		// The machine's own share: a bare net/http server (cmd/floor).
		{"floor", func() (*harness.Proc, time.Duration, error) { return b.env.StartFloor("") }},
	}
	if k == centrifugo {
		// One process does both jobs: its start is both rows' figure.
		fns = []fn{{"centrifugo", func() (*harness.Proc, time.Duration, error) {
			return b.env.startCentrifugo(b.prefix("s5"), 0)
		}}}
	}
	r := result{}
	for _, f := range fns {
		var ds []float64
		for range b.sz.s5Reps {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			p, d, err := f.start()
			if err != nil {
				return nil, err
			}
			harness.Kids.Stop(p.Cmd)
			ds = append(ds, float64(d)/1e6)
		}
		slices.Sort(ds)
		r[f.name+" ms"] = median(ds)
	}
	if v, ok := r["centrifugo ms"]; ok {
		r["ingress ms"], r["egress ms"] = v, v
	}
	return r, nil
}

// publishSide are the commands only the publish path issues: the script
// itself, and what it calls on some appends only (xinfo|stream, as Redis
// 7 names a subcommand, on a channel's first append; xtrim and pexpire
// on a stream's first append in each second; xdel and xsetid when a
// stream created anew got an id behind its chain; xadd, which it calls
// twice on the append that creates a stream, since its first, NOMKSTREAM,
// adds nothing then; and persist, with HISTORY_TTL=0), plus the bench's
// own INFO. No egress ever calls XADD (the ingress writes the instances'
// inboxes too).
// They are left out of S6's count whole. (A registry refresh's PEXPIRE
// goes with a ZADD, which is counted.)
var publishSide = map[string]bool{
	"evalsha": true, "eval": true, "xinfo|stream": true, "xtrim": true, "pexpire": true, "info": true,
	"xdel": true, "xsetid": true, "xadd": true, "persist": true,
}

// perScript are the commands each run of the append script calls exactly
// once: only what a window has beyond the script's runs is someone else's.
var perScript = map[string]bool{"get": true, "set": true, "spublish": true}

// s6: one socket per egress process on its own channel, while other
// channels take publishes. The processes are lean builds, as the
// one-connection-per-instance deployment ships them (docs/deployment.md),
// plus one default build whose RSS is reported beside theirs.
func (b *bench) s6(ctx context.Context, _ kind) (result, error) {
	pfx := b.prefix("s6")
	ing, _, err := b.env.StartFunction(b.env.Ingress, pfx)
	if err != nil {
		return nil, err
	}
	defer harness.Kids.Stop(ing.Cmd)
	n := b.sz.s6Procs + 1 // the last one is the default build
	egs := make([]*harness.Proc, n)
	subs := make([]*subscriber, n)
	var rcvd tally
	defer func() {
		closeAll(subs)
		for _, p := range egs {
			if p != nil {
				harness.Kids.Stop(p.Cmd)
			}
		}
	}()
	for i := range n {
		bin := b.env.EgressLean
		if i == n-1 {
			bin = b.env.Egress
		}
		egs[i], _, err = b.env.StartFunction(bin, pfx)
		if err != nil {
			return nil, err
		}
		// Its own channel's message is numbered after the other channels'
		// publishes, so one of those delivered to it counts as stray.
		own := int64(b.sz.s6Pubs + i)
		subs[i], err = dialSubscriber(ctx, &sut{kind: wsrelay, sub: egs[i]}, "own"+strconv.Itoa(i), b.sz.s6Pubs+n, &rcvd)
		if err != nil {
			return nil, err
		}
		subs[i].expected = 1
		subs[i].accept = func(seq int64) bool { return seq == own }
	}
	pub := newPublisher(&sut{kind: wsrelay, pub: ing}, b.sz.publishers)
	defer pub.close()
	// Warm the ingress's Redis pool so its connection setup (HELLO) falls
	// outside the window.
	pub.publishAll(ctx, 4*b.sz.publishers, b.sz.publishers, func(i int) string { return "warm" + strconv.Itoa(i) })
	if err := harness.SleepCtx(ctx, 500*time.Millisecond); err != nil {
		return nil, err
	}
	stats0, err := b.env.CommandStats(ctx)
	if err != nil {
		return nil, err
	}
	cpu0 := make([]int64, n)
	for i, p := range egs {
		if cpu0[i], err = harness.CPUTicks(p.Pid()); err != nil {
			return nil, fmt.Errorf("s6: egress %d: CPU: %w", i, err)
		}
	}
	st := pub.publishAll(ctx, b.sz.s6Pubs, b.sz.publishers, func(i int) string { return "other" + strconv.Itoa(i%b.sz.s6Chans) })
	if err := published("s6", st); err != nil {
		return nil, err
	}
	if err := harness.SleepCtx(ctx, 200*time.Millisecond); err != nil {
		return nil, err
	}
	stats1, err := b.env.CommandStats(ctx)
	if err != nil {
		return nil, err
	}
	pids := make([]int, n)
	for i, p := range egs {
		pids[i] = p.Pid()
	}
	use, err := readS6Usage(pids, cpu0)
	if err != nil {
		return nil, err
	}
	egressCmds, detail := egressCommands(stats0, stats1)
	b.logf("s6: %d publishes in %.2fs; non-publish Redis commands meanwhile: %s", st.ok, float64(st.end-st.start)/1e9, detail)
	// Own channels still deliver: one message each, sent after the window.
	for i := range n {
		if _, err := pub.publish(ctx, "own"+strconv.Itoa(i), b.sz.s6Pubs+i); err != nil {
			return nil, fmt.Errorf("publish to own channel: %w", err)
		}
	}
	waitDelivered(ctx, &rcvd, int64(n), 3*time.Second)
	closeAll(subs)
	d := collect(subs, b.sz.s6Pubs+n)
	subs = nil
	return result{
		"lean RSS MiB":    float64(use.maxRSS) / 1024,
		"anon MiB":        float64(use.maxAnon) / 1024,
		"default RSS MiB": float64(use.defaultRSS) / 1024,
		"CPU ms":          float64(use.maxCPU) * 10,
		"cmds":            float64(egressCmds) / float64(n),
		"lost":            float64(d.lost),
		"dup":             float64(d.dups),
		"stray":           float64(d.stray),
		"pub fail":        float64(st.failed),
	}, nil
}

// s6Usage is what S6 reads of its egress processes after the window: the
// most CPU ticks any used in it, the most VmRSS and RssAnon (KiB) of the
// lean ones, and the default build's VmRSS.
type s6Usage struct{ maxCPU, maxRSS, maxAnon, defaultRSS int64 }

// readS6Usage reads S6's figures of the processes pids, the last of which
// is the default build, cpu0 being their CPU ticks before the window. A
// figure it cannot read is an error: an egress that has exited has no
// VmRSS, and leaving it out would print the others' figures, or 0 MiB for
// the default build, as if every process had been measured.
func readS6Usage(pids []int, cpu0 []int64) (s6Usage, error) {
	var u s6Usage
	for i, pid := range pids {
		c, err := harness.CPUTicks(pid)
		if err != nil {
			return u, fmt.Errorf("s6: egress %d (pid %d): CPU: %w", i, pid, err)
		}
		u.maxCPU = max(u.maxCPU, c-cpu0[i])
		rss, err := harness.RSSKiB(pid)
		if err != nil {
			return u, fmt.Errorf("s6: egress %d (pid %d) has exited or cannot be read: %w", i, pid, err)
		}
		if i == len(pids)-1 {
			u.defaultRSS = rss
			continue
		}
		u.maxRSS = max(u.maxRSS, rss)
		// Private memory: RSS minus the binary's file-backed pages, which
		// every process of the same binary shares.
		anon, err := harness.StatusKiB(pid, "RssAnon:")
		if err != nil {
			return u, fmt.Errorf("s6: egress %d (pid %d) has exited or cannot be read: %w", i, pid, err)
		}
		u.maxAnon = max(u.maxAnon, anon)
	}
	return u, nil
}

// egressCommands returns how many commands of the window between the
// INFO commandstats snapshots before and after are not the publish
// path's, and which ones ("name=count ...").
func egressCommands(before, after map[string]int64) (int64, string) {
	scripts := after["evalsha"] - before["evalsha"] + after["eval"] - before["eval"]
	var egressCmds int64
	var detail []string
	for k, v := range after {
		d := v - before[k]
		if perScript[k] {
			d -= scripts
		}
		if d <= 0 || publishSide[k] {
			continue
		}
		egressCmds += d
		detail = append(detail, k+"="+strconv.FormatInt(d, 10))
	}
	slices.Sort(detail)
	return egressCmds, strings.Join(detail, " ")
}

// published is an error when no publish of st succeeded: such a phase
// measures nothing, and its figures (a p99 of no samples, no CPU for no
// traffic) would read as perfect.
func published(name string, st pubStats) error {
	if st.ok > 0 {
		return nil
	}
	return fmt.Errorf("%s: no publish succeeded (%d failed, first: %v)", name, st.failed, st.firstErr)
}

// goMetrics scrapes the egress's Go runtime gauges (none for other systems) from /metrics, to split
// RSS into heap and goroutine stacks.
func goMetrics(sys *sut) map[string]float64 {
	out := map[string]float64{}
	if sys.kind != wsrelay {
		return out
	}
	resp, err := harness.ProbeClient.Get(sys.sub.Base + "/metrics")
	if err != nil {
		return out
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	for line := range strings.SplitSeq(string(body), "\n") {
		name, val, ok := strings.Cut(line, " ")
		if ok && strings.HasPrefix(name, "go_") {
			out[name], _ = strconv.ParseFloat(val, 64)
		}
	}
	return out
}
