// Command bench runs the wsrelay scenarios S1–S6 (issue 6) against the
// real ingress and egress binaries and a throwaway redis-server, and
// prints one table: median and min–max over -runs repetitions.
//
// With -centrifugo (make bench CENTRIFUGO=1) it runs S1–S5 on Centrifugo
// too, each run of a scenario right after wsrelay's, and adds Centrifugo's
// figures and the ratio to the table: on a shared, noisy machine a ratio
// measured in one run says more than a comparison with figures from
// another day.
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
	"runtime/pprof"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/wsrelay/wsrelay/bench/harness"
)

func main() { harness.Main("bench", run) }

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
	{"S1 fan-out 1×N", "stray", "0", "", 0},
	{"S1r same rate", "deliver/s", "", "", 0},
	{"S1r same rate", "p50 ms", "", "", 1},
	{"S1r same rate", "p99 ms", "", "", 1},
	{"S1r same rate", "lost", "0", "", 0},
	{"S1r same rate", "dup", "0", "", 0},
	{"S1r same rate", "stray", "0", "", 0},
	{"S2 N channels×1", "deliver/s", "≥ 16.4k", "10.9k", 0},
	{"S2 N channels×1", "p50 ms", "", "1.3", 2},
	{"S2 N channels×1", "p99 ms", "≤ 5", "5.1", 2},
	{"S2 N channels×1", "lost", "0", "", 0},
	{"S2 N channels×1", "dup", "0", "", 0},
	{"S2 N channels×1", "stray", "0", "", 0},
	{"S3 idle sockets", "KiB/conn", "≤ 10", "44.7", 1},
	{"S4 ingest only", "pub/s", "≥ 39.6k", "26.4k", 0},
	{"S4 ingest only", "p99 ms", "≤ 8.5", "8.5", 2},
	{"S4 ingest only", "pub fail", "0", "", 0},
	{"S4 ingest only", "floor pub/s", "", "", 0},
	{"S4 ingest only", "floor fasthttp pub/s", "", "", 0},
	{"S4 ingest only", "floor adaptor pub/s", "", "", 0},
	{"S5 cold start", "ingress ms", "≤ 10", "56", 1},
	{"S5 cold start", "egress ms", "≤ 10", "56", 1},
	{"S5 cold start", "floor ms", "", "", 1},
	{"S6 1 conn/instance", "lean RSS MiB", "≤ 10", "—", 1},
	{"S6 1 conn/instance", "anon MiB", "", "—", 1},
	{"S6 1 conn/instance", "default RSS MiB", "", "—", 1},
	{"S6 1 conn/instance", "CPU ms", "~0", "—", 0},
	{"S6 1 conn/instance", "cmds", "registry only", "—", 1},
	{"S6 1 conn/instance", "lost", "0", "", 0},
	{"S6 1 conn/instance", "dup", "0", "", 0},
	{"S6 1 conn/instance", "stray", "0", "", 0},
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) (err error) {
	defer func() {
		if p := recover(); p != nil {
			harness.Kids.StopAll()
			err = fmt.Errorf("panic: %v", p)
		}
	}()
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	runs := fs.Int("runs", 3, "repetitions of each scenario")
	short := fs.Bool("quick", false, "small sizes and one run: a smoke pass")
	only := fs.String("only", "", "comma-separated scenarios to run (s1,s1r,s2,…,s6); empty: all")
	s4dur := fs.Duration("s4-duration", 0, "S4 duration (default 10s, 2s with -quick)")
	cpuprofile := fs.String("cpuprofile", "", "write the load generator's own CPU profile to this file")
	s1pubs := fs.Int("s1-publishes", 0, "S1 publishes (default 2000, 500 with -quick); more gives a profile time to sample")
	s2pubs := fs.Int("s2-publishes", 0, "S2 publishes (default 20000, 4000 with -quick); more gives a profile time to sample")
	floorList := fs.String("s4-floors", "net/http", "HTTP servers S4 runs its floor on after the ingress, comma-separated: net/http (cmd/floor, floor pub/s), fasthttp and fasthttp-adaptor (gin's way onto fasthttp; cmd/fastfloor)")
	timeline := fs.Int("timeline", 0, "log S1's, S1r's and S2's latency (p50/max ms) over each 1/N of the publishes, in publish order, for every run; 0: off")
	cfHistory := fs.Bool("centrifugo-history", false, "run Centrifugo with history and recovery (1,000 messages, 24 h, as wsrelay keeps by default) instead of its defaults (no history)")
	cfBin := fs.String("centrifugo", "", "path to a centrifugo binary: run S1–S5 on it too, interleaved with wsrelay's runs, and compare (make bench CENTRIFUGO=1)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	floors, err := parseFloors(*floorList)
	if err != nil {
		return err
	}
	selected, err := parseOnly(*only)
	if err != nil {
		return err
	}
	if *runs < 1 {
		return fmt.Errorf("-runs: %d, want at least 1", *runs)
	}
	if *timeline < 0 || *timeline > 100 {
		return fmt.Errorf("-timeline: %d is not between 0 (off) and 100 parts", *timeline)
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
	if *s2pubs > 0 {
		sz.s2Pubs = *s2pubs
	}
	limit := 9 * time.Minute
	if *short {
		limit = 3 * time.Minute
	}
	kinds := []kind{wsrelay}
	if *cfBin != "" {
		kinds = append(kinds, centrifugo)
		limit *= 2
	}
	ctx, cancel := context.WithTimeout(ctx, limit*time.Duration(max(1, *runs))/3+time.Minute)
	defer cancel()

	nofile := harness.RaiseNoFile()
	root, err := harness.RepoRoot()
	if err != nil {
		return err
	}
	logDir, err := os.MkdirTemp("", "wsrelay-bench-")
	if err != nil {
		return err
	}
	fmt.Fprintf(stderr, "bench: logs in %s, RLIMIT_NOFILE %d\n", logDir, nofile)
	e := &env{Env: &harness.Env{LogDir: logDir}, centrifugoBin: *cfBin, centrifugoHistory: *cfHistory}
	if e.Binaries, err = harness.Build(root, true); err != nil {
		return err
	}
	if err := e.StartRedis(); err != nil {
		return err
	}
	defer e.RDB.Close()
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
	b := &bench{env: e, sz: sz, floors: floors, timeline: *timeline, logf: func(f string, a ...any) { fmt.Fprintf(stderr, "bench: "+f+"\n", a...) }}

	scen := []struct {
		name string
		fn   func(context.Context, kind) (result, error)
	}{{"s1", b.s1}, {"s1r", b.s1r}, {"s2", b.s2}, {"s3", b.s3}, {"s4", b.s4}, {"s5", b.s5}, {"s6", b.s6}}
	results := map[kind]map[string][]result{} // system → scenario prefix "S1" → runs
	for _, k := range kinds {
		results[k] = map[string][]result{}
	}
	start := time.Now()
	for _, s := range scen {
		if !selected[s.name] {
			continue
		}
		for i := range *runs {
			// The systems take turns within each run, so that both see
			// the machine in the same state.
			order := kinds
			if i%2 == 1 {
				// Alternate who goes first, so that what the first run
				// leaves behind (page cache, Redis's memory) favours
				// neither system.
				order = slices.Clone(kinds)
				slices.Reverse(order)
			}
			for _, k := range order {
				if k == centrifugo && s.name == "s6" {
					continue // Centrifugo has no such mode
				}
				t0 := time.Now()
				r, err := s.fn(ctx, k)
				if ctx.Err() != nil {
					// Interrupted or out of time: a partial run measures nothing.
					return fmt.Errorf("stopped during %s %s run %d: %w", k, s.name, i+1, context.Cause(ctx))
				}
				if err != nil {
					return fmt.Errorf("%s %s run %d: %w", k, s.name, i+1, err)
				}
				_, _ = e.RDB.FlushAll(ctx).Result()
				b.logf("%s %s run %d (%.1fs): %s", k, s.name, i+1, time.Since(t0).Seconds(), r)
				key := strings.ToUpper(s.name[:1]) + s.name[1:] // "S1", "S1r"
				results[k][key] = append(results[k][key], r)
			}
		}
	}
	printTable(stdout, results, *runs, sz, time.Since(start))
	return nil
}

// scenarioNames are the scenarios, in the order they run.
var scenarioNames = []string{"s1", "s1r", "s2", "s3", "s4", "s5", "s6"}

// parseOnly reads -only: the scenarios to run, comma-separated; empty: all.
// A name it does not know is an error: the run would leave that scenario
// out of the table without a word (or print an empty table), and exit 0.
func parseOnly(list string) (map[string]bool, error) {
	out := map[string]bool{}
	if list == "" {
		for _, n := range scenarioNames {
			out[n] = true
		}
		return out, nil
	}
	for _, n := range strings.Split(list, ",") {
		if !slices.Contains(scenarioNames, n) {
			return nil, fmt.Errorf("-only: %q is not one of %s", n, strings.Join(scenarioNames, ","))
		}
		out[n] = true
	}
	return out, nil
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

// printTable prints wsrelay's figures, the targets and the issue's
// Centrifugo reference, and, when Centrifugo ran in this run too, its
// figures and wsrelay's as a ratio of them (wsrelay ÷ Centrifugo).
func printTable(w io.Writer, results map[kind]map[string][]result, runs int, sz sizes, took time.Duration) {
	fmt.Fprintf(w, "\nwsrelay bench: %d run(s) per scenario, %s total; S1 %d subs × %d pubs (S1r %d at %.0f/s), S2 %d ch × %d pubs, S3 %d conns, S4 %d conns %s, S5 %d starts, S6 %d lean procs (+1 default build) × %d pubs on %d ch\n\n",
		runs, took.Round(time.Second), sz.s1Subs, sz.s1Pubs, sz.s1rPubs, sz.s1rRate, sz.s2Chans, sz.s2Pubs, sz.s3Conns, sz.s4Conns, sz.s4Dur, sz.s5Reps, sz.s6Procs, sz.s6Pubs, sz.s6Chans)
	cf, compared := results[centrifugo]
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	if compared {
		fmt.Fprintln(tw, "scenario\tmetric\tmedian\tmin–max\ttarget\tCentrifugo (issue)\tCentrifugo here\tmin–max\twsrelay ÷ here")
	} else {
		fmt.Fprintln(tw, "scenario\tmetric\tmedian\tmin–max\ttarget\tCentrifugo (issue)")
	}
	for _, r := range rows {
		key := strings.Fields(r.scenario)[0]
		ours, ok := summarize(results[wsrelay][key], r.metric)
		if !ok {
			continue
		}
		f := func(v float64) string { return fmt.Sprintf("%.*f", r.digits, v) }
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s–%s\t%s\t%s", r.scenario, r.metric, f(ours.median), f(ours.min), f(ours.max), r.target, r.ref)
		if compared {
			if theirs, ok := summarize(cf[key], r.metric); ok {
				ratio := "–"
				if theirs.median != 0 {
					ratio = fmt.Sprintf("%.2f×", ours.median/theirs.median)
				}
				fmt.Fprintf(tw, "\t%s\t%s–%s\t%s", f(theirs.median), f(theirs.min), f(theirs.max), ratio)
			} else {
				fmt.Fprint(tw, "\t–\t\t")
			}
		}
		fmt.Fprintln(tw)
	}
	tw.Flush()
}

// spread is the median and range of one metric over runs.
type spread struct{ median, min, max float64 }

func summarize(runs []result, metric string) (spread, bool) {
	var vals []float64
	for _, x := range runs {
		if v, ok := x[metric]; ok {
			vals = append(vals, v)
		}
	}
	if len(vals) == 0 {
		return spread{}, false
	}
	slices.Sort(vals)
	return spread{median(vals), vals[0], vals[len(vals)-1]}, true
}

// median of sorted vals (not empty): the middle value, or the mean of the
// two middle values when their number is even.
func median(vals []float64) float64 {
	n := len(vals)
	if n%2 == 1 {
		return vals[n/2]
	}
	return (vals[n/2-1] + vals[n/2]) / 2
}
