package main

import (
	"context"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

// p50 is the median as the docs define it: over an even number of
// samples, the mean of the two middle ones; other percentiles interpolate
// between the two closest ranks the same way.
func TestPct(t *testing.T) {
	for _, c := range []struct {
		samples []uint32
		p, want float64
	}{
		{[]uint32{4000, 1000, 3000, 2000}, 50, 2.5},
		{[]uint32{1000, 2000, 3000}, 50, 2},
		{[]uint32{7000}, 99, 7},
		{[]uint32{}, 99, 0},
		{[]uint32{0, 1000}, 99, 0.99},
		{[]uint32{5000, 1000, 2000, 3000, 4000}, 100, 5},
		{[]uint32{5000, 1000, 2000, 3000, 4000}, 0, 1},
	} {
		if got := pct(append([]uint32(nil), c.samples...), c.p); got != c.want {
			t.Errorf("pct(%v, %v) = %v, want %v", c.samples, c.p, got, c.want)
		}
	}
}

// A phase in which no publish succeeded measures nothing: its p99 of no
// samples (0) and its CPU of no traffic (0) would read as perfect.
func TestNothingPublished(t *testing.T) {
	if err := published("s4", pubStats{failed: 64, firstErr: errStatus}); err == nil || !strings.Contains(err.Error(), "no publish succeeded") {
		t.Fatalf("all failed: %v", err)
	}
	if err := published("s4", pubStats{ok: 1, failed: 63}); err != nil {
		t.Fatalf("one succeeded: %v", err)
	}
}

// S6 charges the egresses every command of the window but the publish
// path's: commands no publish issues are theirs, and those a publish
// issues once per script run count beyond that number.
func TestEgressCommands(t *testing.T) {
	before := map[string]int64{"evalsha": 100, "xadd": 100, "get": 100, "set": 100, "spublish": 100, "info": 3}
	after := map[string]int64{
		"evalsha": 1100, "xadd": 1100, "get": 1100, "set": 1102, "spublish": 1100, "info": 4,
		"xinfo|stream": 50, "pexpire": 40, "xtrim": 5, // the script's, on some appends
		"xdel": 1, "xsetid": 1, // the script's, for a stream recreated behind its chain
		"persist":   7,                       // the script's, with HISTORY_TTL=0
		"xrevrange": 3, "zadd": 2, "time": 1, // nothing on the publish path issues these
	}
	n, detail := egressCommands(before, after)
	if n != 8 || detail != "set=2 time=1 xrevrange=3 zadd=2" {
		t.Fatalf("egressCommands = %d %q, want 8 %q", n, detail, "set=2 time=1 xrevrange=3 zadd=2")
	}
	after["xadd"] += 30 // the script's second XADD on the append that creates a stream
	if n, _ := egressCommands(before, after); n != 8 {
		t.Fatalf("with 30 more XADD: %d, want 8", n)
	}
	after["spublish"] += 4 // beyond the scripts' own
	if n, _ := egressCommands(before, after); n != 12 {
		t.Fatalf("with 4 more SPUBLISH: %d, want 12", n)
	}
}

// TestParseFloors: -s4-floors names the servers the floors know, each
// with its own metrics, and refuses any other name rather than running
// net/http in its place.
func TestParseFloors(t *testing.T) {
	got, err := parseFloors("net/http, fasthttp,fasthttp-adaptor")
	if err != nil || len(got) != 3 || got[0] != "net/http" || got[1] != "fasthttp" || got[2] != "fasthttp-adaptor" {
		t.Fatalf("parseFloors = %q, %v", got, err)
	}
	if floorMetric("net/http") != "floor " || floorMetric("fasthttp") == floorMetric("fasthttp-adaptor") {
		t.Errorf("metric prefixes: %q %q %q", floorMetric("net/http"), floorMetric("fasthttp"), floorMetric("fasthttp-adaptor"))
	}
	for _, bad := range []string{"", "gin", "net/http,"} {
		if _, err := parseFloors(bad); err == nil {
			t.Errorf("parseFloors(%q) accepted", bad)
		}
	}
}

// The timeline splits the messages by publish order, not by arrival, and
// says so when a part got nothing (every message of it lost).
func TestTimeline(t *testing.T) {
	subs := []*subscriber{
		{seqs: []uint32{0, 1, 2, 3, 6, 7}, lats: []uint32{1000, 3000, 2000, 9000, 40000, 50000}},
		{seqs: []uint32{0, 7}, lats: []uint32{5000, 60000}},
	}
	if got, want := timeline(subs, 8, 4), "3/5 6/9 – 50/60"; got != want {
		t.Errorf("timeline = %q, want %q", got, want)
	}
	if got, want := timeline(subs, 8, 1), "7/60"; got != want {
		t.Errorf("one part: timeline = %q, want %q", got, want)
	}
}

// An egress that has exited by the time S6 reads its figures fails the
// run: its RSS can no longer be read (an exited child not yet waited for
// has no VmRSS), and leaving it out would report the most of the others,
// or 0 MiB for the default build, as if it had been measured.
func TestS6UsageOfExitedProcess(t *testing.T) {
	gone := exec.Command("true")
	if err := gone.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = gone.Wait() }()
	// A zombie until it is waited for.
	for deadline := time.Now().Add(5 * time.Second); ; {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(gone.Process.Pid) + "/stat")
		if err != nil {
			t.Fatal(err)
		}
		if _, after, _ := strings.Cut(string(b), ") "); strings.HasPrefix(after, "Z") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the child has not exited")
		}
		time.Sleep(time.Millisecond)
	}
	self := os.Getpid()
	for _, pids := range [][]int{
		{self, gone.Process.Pid, self}, // a lean one
		{self, self, gone.Process.Pid}, // the default build
	} {
		cpu0 := make([]int64, len(pids))
		if u, err := readS6Usage(pids, cpu0); err == nil {
			t.Errorf("readS6Usage(%v) = %+v with no error, an exited process among them", pids, u)
		}
	}
	if u, err := readS6Usage([]int{self, self}, []int64{0, 0}); err != nil || u.maxRSS == 0 || u.maxAnon == 0 || u.defaultRSS == 0 {
		t.Errorf("readS6Usage of live processes = %+v, %v", u, err)
	}
}

// -only names scenarios the bench has, and -runs at least one run: a name
// it does not know (a typo, "S3" as the table spells it, a space after a
// comma) or no run at all would leave figures out of the table, or print
// an empty one, and exit 0 as if they had been measured.
func TestParseOnly(t *testing.T) {
	got, err := parseOnly("s1,s3")
	if err != nil || len(got) != 2 || !got["s1"] || !got["s3"] {
		t.Fatalf("parseOnly(s1,s3) = %v, %v", got, err)
	}
	if all, err := parseOnly(""); err != nil || len(all) != len(scenarioNames) {
		t.Fatalf("parseOnly(\"\") = %v, %v; want every scenario", all, err)
	}
	for _, bad := range []string{"s7", "S3", "s1, s3", "s1,", ","} {
		if sel, err := parseOnly(bad); err == nil {
			t.Errorf("parseOnly(%q) = %v, accepted", bad, sel)
		}
	}
	for _, runs := range []string{"0", "-1"} {
		if err := run(context.Background(), []string{"-runs", runs, "-only", "s5"}, io.Discard, io.Discard); err == nil || !strings.Contains(err.Error(), "-runs") {
			t.Errorf("-runs %s: %v, want an error about -runs", runs, err)
		}
	}
}
