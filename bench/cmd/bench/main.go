// Command bench runs the wsrelay scenarios S1–S6 (issue 6) against the
// real ingress and egress binaries and a throwaway redis-server, and
// prints one table: median and min–max over -runs repetitions.
//
// It builds bin/ingress and bin/egress, starts every process itself and
// kills them all on the way out (normal end, error, panic or signal).
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime/pprof"
	"slices"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	kids.stopAll()
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

// row is one line of the table.
type row struct {
	scenario, metric string
	target, ref      string
	digits           int
}

var rows = []row{
	{"S1 fan-out 1×N", "deliver/s", "≥ 855k", "570k", 0},
	{"S1 fan-out 1×N", "p50 ms", "", "39", 1},
	{"S1 fan-out 1×N", "p99 ms", "≤ 43.5", "87", 1},
	{"S1 fan-out 1×N", "lost", "0", "", 0},
	{"S1 fan-out 1×N", "dup", "0", "", 0},
	{"S2 N channels×1", "deliver/s", "≥ 16.4k", "10.9k", 0},
	{"S2 N channels×1", "p50 ms", "", "1.3", 2},
	{"S2 N channels×1", "p99 ms", "≤ 5", "5.1", 2},
	{"S2 N channels×1", "lost", "0", "", 0},
	{"S2 N channels×1", "dup", "0", "", 0},
	{"S3 idle sockets", "KiB/conn", "≤ 10", "44.7", 1},
	{"S4 ingest only", "pub/s", "≥ 39.6k", "26.4k", 0},
	{"S4 ingest only", "p99 ms", "≤ 8.5", "8.5", 2},
	{"S4 ingest only", "pub fail", "0", "", 0},
	{"S5 cold start", "ingress ms", "≤ 10", "56", 1},
	{"S5 cold start", "egress ms", "≤ 10", "56", 1},
	{"S6 1 conn/instance", "lean RSS MiB", "≤ 10", "—", 1},
	{"S6 1 conn/instance", "anon MiB", "", "—", 1},
	{"S6 1 conn/instance", "default RSS MiB", "", "—", 1},
	{"S6 1 conn/instance", "CPU ms", "~0", "—", 0},
	{"S6 1 conn/instance", "cmds", "registry only", "—", 1},
	{"S6 1 conn/instance", "lost", "0", "", 0},
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) (err error) {
	defer func() {
		if p := recover(); p != nil {
			kids.stopAll()
			err = fmt.Errorf("panic: %v", p)
		}
	}()
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	runs := fs.Int("runs", 3, "repetitions of each scenario")
	short := fs.Bool("quick", false, "small sizes and one run: a smoke pass")
	only := fs.String("only", "", "comma-separated scenarios to run (s1,…,s6); empty: all")
	s4dur := fs.Duration("s4-duration", 0, "S4 duration (default 10s, 2s with -quick)")
	cpuprofile := fs.String("cpuprofile", "", "write the load generator's own CPU profile to this file")
	s1pubs := fs.Int("s1-publishes", 0, "S1 publishes (default 2000, 500 with -quick); more gives a profile time to sample")
	if err := fs.Parse(args); err != nil {
		return err
	}
	sz := full
	if *short {
		sz = quick
		if !isFlagSet(fs, "runs") {
			*runs = 1
		}
	}
	if *s4dur > 0 {
		sz.s4Dur = *s4dur
	}
	if *s1pubs > 0 {
		sz.s1Pubs = *s1pubs
	}
	limit := 9 * time.Minute
	if *short {
		limit = 3 * time.Minute
	}
	ctx, cancel := context.WithTimeout(ctx, limit*time.Duration(max(1, *runs))/3+time.Minute)
	defer cancel()

	nofile := raiseNoFile()
	root, err := repoRoot()
	if err != nil {
		return err
	}
	logDir, err := os.MkdirTemp("", "wsrelay-bench-")
	if err != nil {
		return err
	}
	fmt.Fprintf(stderr, "bench: logs in %s, RLIMIT_NOFILE %d\n", logDir, nofile)
	e := &env{logDir: logDir}
	if e.ingressBin, e.egressBin, e.egressLeanBin, err = buildBinaries(root); err != nil {
		return err
	}
	if err := e.startRedis(); err != nil {
		return err
	}
	defer e.rdb.Close()
	if *cpuprofile != "" {
		// The generator shares the cores with what it measures: this
		// shows what it costs them.
		f, err := os.Create(*cpuprofile)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}
	b := &bench{env: e, sz: sz, logf: func(f string, a ...any) { fmt.Fprintf(stderr, "bench: "+f+"\n", a...) }}

	scen := []struct {
		name string
		fn   func(context.Context) (result, error)
	}{{"s1", b.s1}, {"s2", b.s2}, {"s3", b.s3}, {"s4", b.s4}, {"s5", b.s5}, {"s6", b.s6}}
	results := map[string][]result{} // scenario prefix "S1" → runs
	start := time.Now()
	for _, s := range scen {
		if *only != "" && !slices.Contains(strings.Split(*only, ","), s.name) {
			continue
		}
		for i := range *runs {
			t0 := time.Now()
			r, err := s.fn(ctx)
			if ctx.Err() != nil {
				// Interrupted or out of time: a partial run measures nothing.
				return fmt.Errorf("stopped during %s run %d: %w", s.name, i+1, context.Cause(ctx))
			}
			if err != nil {
				return fmt.Errorf("%s run %d: %w", s.name, i+1, err)
			}
			_, _ = e.rdb.FlushAll(ctx).Result()
			b.logf("%s run %d (%.1fs): %s", s.name, i+1, time.Since(t0).Seconds(), r)
			key := strings.ToUpper(s.name)
			results[key] = append(results[key], r)
		}
	}
	printTable(stdout, results, *runs, sz, time.Since(start))
	return nil
}

func isFlagSet(fs *flag.FlagSet, name string) bool {
	set := false
	fs.Visit(func(f *flag.Flag) { set = set || f.Name == name })
	return set
}

func (r result) String() string {
	keys := make([]string, 0, len(r))
	for k := range r {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var sb strings.Builder
	for _, k := range keys {
		fmt.Fprintf(&sb, "%s=%.4g ", k, r[k])
	}
	return strings.TrimSpace(sb.String())
}

func printTable(w io.Writer, results map[string][]result, runs int, sz sizes, took time.Duration) {
	fmt.Fprintf(w, "\nwsrelay bench: %d run(s) per scenario, %s total; S1 %d subs × %d pubs, S2 %d ch × %d pubs, S3 %d conns, S4 %d conns %s, S5 %d starts, S6 %d lean procs (+1 default build) × %d pubs on %d ch\n\n",
		runs, took.Round(time.Second), sz.s1Subs, sz.s1Pubs, sz.s2Chans, sz.s2Pubs, sz.s3Conns, sz.s4Conns, sz.s4Dur, sz.s5Reps, sz.s6Procs, sz.s6Pubs, sz.s6Chans)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "scenario\tmetric\tmedian\tmin–max\ttarget\tCentrifugo")
	for _, r := range rows {
		rs := results[r.scenario[:2]]
		if len(rs) == 0 {
			continue
		}
		var vals []float64
		for _, x := range rs {
			if v, ok := x[r.metric]; ok {
				vals = append(vals, v)
			}
		}
		if len(vals) == 0 {
			continue
		}
		slices.Sort(vals)
		f := func(v float64) string { return fmt.Sprintf("%.*f", r.digits, v) }
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s–%s\t%s\t%s\n", r.scenario, r.metric, f(vals[len(vals)/2]), f(vals[0]), f(vals[len(vals)-1]), r.target, r.ref)
	}
	tw.Flush()
}
