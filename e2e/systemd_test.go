package e2e

import (
	"bufio"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"
)

// systemdUnit is a unit file's settings, each key's values in order.
type systemdUnit map[string][]string

// readUnit parses a unit file: "[Section]" lines and "Key=value" lines,
// keyed "Section.Key"; "#" and ";" start comments.
func readUnit(t *testing.T, file string) systemdUnit {
	t.Helper()
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	u := systemdUnit{}
	section := ""
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || line[0] == '#' || line[0] == ';':
		case line[0] == '[' && line[len(line)-1] == ']':
			section = line[1 : len(line)-1]
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok || section == "" {
				t.Fatalf("%s:%d: not a setting: %q", file, n, line)
			}
			k = section + "." + strings.TrimSpace(k)
			u[k] = append(u[k], strings.TrimSpace(v))
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return u
}

// one is the single value of key, failing if it is not set exactly once.
func (u systemdUnit) one(t *testing.T, where, key string) string {
	t.Helper()
	if len(u[key]) != 1 {
		t.Fatalf("%s: %s set %d times, want once", where, key, len(u[key]))
	}
	return u[key][0]
}

// env is what the unit's Environment= lines set (space-separated
// assignments, each optionally in double quotes).
func (u systemdUnit) env() map[string]string {
	m := map[string]string{}
	for _, line := range u["Service.Environment"] {
		for _, a := range regexp.MustCompile(`"[^"]*"|\S+`).FindAllString(line, -1) {
			k, v, _ := strings.Cut(strings.Trim(a, `"`), "=")
			m[k] = v
		}
	}
	return m
}

// TestSystemdUnits checks deploy/systemd against the functions and
// docs/deployment.md: the binary paths and env files the documented
// install creates, each Environment= variable one the function reads, the
// ports nginx's file proxies to, a stop timeout above the documented
// shutdown time, and that systemd itself loads the units without a
// complaint: where systemd-analyze exists, and under CI always.
func TestSystemdUnits(t *testing.T) {
	ing, eg := binaries(t)
	bins := map[string]string{"ingress": ing, "egress": eg}
	root := repoRoot(t)
	doc, err := os.ReadFile(filepath.Join(root, "docs", "deployment.md"))
	if err != nil {
		t.Fatal(err)
	}
	nginx := shippedNginxConf(t)
	wantPort := map[string]string{"ingress": "8080", "egress": "8081"}
	grace, err := time.ParseDuration(readmeDefault(t, "SHUTDOWN_GRACE"))
	if err != nil {
		t.Fatal(err)
	}
	redisTimeout, err := time.ParseDuration(readmeDefault(t, "REDIS_TIMEOUT"))
	if err != nil {
		t.Fatal(err)
	}

	units := map[string]string{}
	for _, fn := range []string{"ingress", "egress"} {
		name := "wsrelay-" + fn + ".service"
		file := filepath.Join(root, "deploy", "systemd", name)
		units[fn] = file
		u := readUnit(t, file)

		execStart := u.one(t, name, "Service.ExecStart")
		if want := "/usr/local/bin/wsrelay-" + fn; execStart != want {
			t.Errorf("%s: ExecStart=%s, want %s", name, execStart, want)
		}
		if want := "install -m 755 bin/" + fn; !regexp.MustCompile(regexp.QuoteMeta(want) + ` +` + regexp.QuoteMeta(execStart) + `\n`).Match(doc) {
			t.Errorf("docs/deployment.md does not install bin/%s as %s, which %s runs", fn, execStart, name)
		}
		if ef, want := u.one(t, name, "Service.EnvironmentFile"), "/etc/wsrelay/"+fn+".env"; ef != want || !strings.Contains(string(doc), "> "+want) {
			t.Errorf("%s: EnvironmentFile=%s; docs/deployment.md must create it as %s", name, ef, want)
		}
		known := envNames(t, bins[fn])
		env := u.env()
		for k := range env {
			if !slices.Contains(known, k) {
				t.Errorf("%s: Environment=%s is not read by the %s (%s -env)", name, k, fn, fn)
			}
		}
		if env["PORT"] != wantPort[fn] || !strings.Contains(nginx, "server 127.0.0.1:"+wantPort[fn]+";") {
			t.Errorf("%s: PORT=%q; docs/deployment.md and deploy/nginx/wsrelay.conf have the %s on %s", name, env["PORT"], fn, wantPort[fn])
		}
		// docs/deployment.md, "Stopping: SIGTERM": both take up to
		// SHUTDOWN_GRACE + REDIS_TIMEOUT + 1 s to stop by default, the
		// ingress one REDIS_TIMEOUT more while Redis hangs (a claim
		// release under way).
		stop, err := time.ParseDuration(u.one(t, name, "Service.TimeoutStopSec") + "s")
		need := grace + redisTimeout + time.Second
		if fn == "ingress" {
			need += redisTimeout
		}
		if err != nil || stop <= need {
			t.Errorf("%s: TimeoutStopSec=%s (%v); the %s may take %s to stop", name, u["Service.TimeoutStopSec"], err, fn, need)
		}
	}

	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		// A container has no systemd; make deps installs it, so that CI
		// does not pass with half of the test left out.
		if os.Getenv("CI") == "true" {
			t.Fatal("systemd-analyze not found: install it (apt-get install -y systemd)")
		}
		t.Logf("systemd-analyze not found: the units were only read, not loaded by systemd")
		return
	}
	verifyUnits(t, analyze, units, bins)
}

// verifyUnits runs `systemd-analyze verify` on the units in a root of
// their own (no running systemd needed) holding the documented install:
// the binaries at their ExecStart paths, the units in /etc/systemd/system,
// and the host's targets they depend on. systemd-analyze exits 0 on a
// setting it ignores, so any line about a unit of ours fails.
func verifyUnits(t *testing.T, analyze string, units, bins map[string]string) {
	t.Helper()
	var targets string
	for _, d := range []string{"/usr/lib/systemd/system", "/lib/systemd/system"} {
		if _, err := os.Stat(filepath.Join(d, "sysinit.target")); err == nil {
			targets = d
			break
		}
	}
	if targets == "" {
		if os.Getenv("CI") == "true" {
			t.Fatal("no systemd targets (sysinit.target) on this host: install systemd (apt-get install -y systemd)")
		}
		t.Logf("no systemd targets on this host: the units were only read, not loaded by systemd")
		return
	}
	root := t.TempDir()
	for _, d := range []string{"usr/local/bin", "etc/systemd/system", "usr/lib/systemd/system"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	tf, _ := filepath.Glob(filepath.Join(targets, "*.target"))
	for _, f := range tf {
		copyFile(t, f, filepath.Join(root, "usr/lib/systemd/system", filepath.Base(f)), 0o644)
	}
	var args []string
	for fn, unit := range units {
		copyFile(t, bins[fn], filepath.Join(root, "usr/local/bin", "wsrelay-"+fn), 0o755)
		copyFile(t, unit, filepath.Join(root, "etc/systemd/system", filepath.Base(unit)), 0o644)
		args = append(args, "/etc/systemd/system/"+filepath.Base(unit))
	}
	slices.Sort(args)
	out, err := exec.Command(analyze, append([]string{"verify", "--root=" + root}, args...)...).CombinedOutput()
	if err != nil || regexp.MustCompile(`wsrelay-`).Match(out) {
		t.Fatalf("systemd-analyze verify %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	if len(out) > 0 {
		t.Logf("systemd-analyze verify (about the host's units, not ours):\n%s", out)
	}
}

// copyFile copies src to dst with mode, hard-linking when it can (the
// binaries are large).
func copyFile(t *testing.T, src, dst string, mode os.FileMode) {
	t.Helper()
	if fi, err := os.Stat(src); err == nil && fi.Mode().Perm() == mode && os.Link(src, dst) == nil {
		return
	}
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}
