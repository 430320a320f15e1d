package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"time"
)

// report prints each scenario's outcome and what each process logged at
// warn or above, and returns how many scenarios failed.
func report(w io.Writer, cfg config, results []*result, logDir string) int {
	fmt.Fprintf(w, "upgrade check: old %s, new %s, one Redis, one key prefix\n\n", cfg.oldName, cfg.newName)
	failed := 0
	for _, r := range results {
		verdict := "ok"
		if len(r.problems) > 0 {
			verdict = "FAILED"
			failed++
		}
		fmt.Fprintf(w, "%-24s %-6s %s\n", r.name, verdict, r.took.Round(10*time.Millisecond))
		for _, c := range r.counts {
			fmt.Fprintf(w, "    %s\n", c)
		}
		for _, p := range r.problems {
			fmt.Fprintf(w, "    PROBLEM: %s\n", p)
		}
	}
	fmt.Fprintln(w, "\nlogged at warn or above (informational):")
	logs, _ := filepath.Glob(filepath.Join(logDir, "*.log"))
	slices.Sort(logs)
	logged := false
	for _, f := range logs {
		counts := warnings(f)
		for _, k := range slices.Sorted(maps.Keys(counts)) {
			logged = true
			fmt.Fprintf(w, "    %-20s %s ×%d\n", filepath.Base(f), k, counts[k])
		}
	}
	if !logged {
		fmt.Fprintln(w, "    nothing")
	}
	return failed
}

// warnings counts a log file's lines at WARN or ERROR by level and
// message.
func warnings(file string) map[string]int {
	out := map[string]int{}
	f, err := os.Open(file)
	if err != nil {
		return out
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var rec struct{ Level, Msg string }
		if json.Unmarshal(sc.Bytes(), &rec) != nil {
			continue
		}
		if rec.Level == "WARN" || rec.Level == "ERROR" {
			out[rec.Level+" "+rec.Msg]++
		}
	}
	return out
}
