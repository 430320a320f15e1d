package e2e

import (
	"bufio"
	"encoding/json"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
)

// TestMakeRun is the README's quick start as a user follows it: `make run`
// on a machine without REDIS_URL, then the two commands it prints, each as
// printed: the browser one-liner in the console of the demo page, and the
// curl publish from a shell. The message must reach the page's socket.
// Ctrl-C (SIGINT to make's process group, as a terminal sends it) must
// stop everything it started, the throwaway Redis included.
func TestMakeRun(t *testing.T) {
	if _, err := exec.LookPath("curl"); err != nil {
		t.Fatal("curl not found: the quick start's publish command needs it")
	}
	tab := newBrowser(t) // before make run: skips where Chromium is missing
	_, file, _, _ := runtime.Caller(0)
	root := filepath.Dir(filepath.Dir(file))
	ip, ep := quietPort(t), quietPort(t)
	cmd := exec.Command("make", "--no-print-directory", "run")
	cmd.Dir = root
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "REDIS_URL=") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(cmd.Env, "INGRESS_PORT="+strconv.Itoa(ip), "EGRESS_PORT="+strconv.Itoa(ep))
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// exited is closed once make has exited, with its error in exitErr:
	// a channel each waiter can read, the cleanup included, even after
	// the loop below has seen it end.
	exited := make(chan struct{})
	var (
		mu      sync.Mutex
		lines   []string
		exitErr error
	)
	go func() {
		sc := bufio.NewScanner(out)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			mu.Lock()
			lines = append(lines, sc.Text())
			mu.Unlock()
		}
		exitErr = cmd.Wait()
		close(exited)
	}()
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			// What make started, should it have left anything behind.
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-exited
		}
	})
	output := func() string {
		mu.Lock()
		defer mu.Unlock()
		return strings.Join(lines, "\n")
	}

	// What it prints, once both functions are up (it builds them first).
	var wsLine, curlLine string
	deadline := time.Now().Add(3 * time.Minute)
	for wsLine == "" || curlLine == "" {
		select {
		case <-exited:
			t.Fatalf("make run exited (%v) before printing its commands:\n%s", exitErr, output())
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("make run printed no commands within 3 minutes:\n%s", output())
		}
		mu.Lock()
		for _, l := range lines {
			switch l = strings.TrimSpace(l); {
			case strings.HasPrefix(l, "ws = new WebSocket("):
				wsLine = l
			case strings.HasPrefix(l, "curl "):
				curlLine = l
			}
		}
		mu.Unlock()
	}
	if !strings.Contains(output(), "throwaway Redis") {
		t.Fatalf("make run did not start its own Redis:\n%s", output())
	}

	// The one-liner, as printed, in the console of the demo page; the test
	// listens on the same socket beside the printed console.log.
	runIn(t, tab, "open the demo page", chromedp.Navigate("http://localhost:"+strconv.Itoa(ep)+"/"))
	evalIn(t, tab, "the printed one-liner", chromedp.Evaluate[any](wsLine+`; window.got = []; ws.addEventListener("message", (e) => got.push(e.data)); true`))
	frames := func() []map[string]any {
		raw := evalIn(t, tab, "frames", chromedp.Evaluate[[]string](`got`))
		var fs []map[string]any
		for _, r := range raw {
			var f map[string]any
			if err := json.Unmarshal([]byte(r), &f); err != nil {
				t.Fatalf("frame %q: %v", r, err)
			}
			fs = append(fs, f)
		}
		return fs
	}
	waitFrame := func(what string, ok func(map[string]any) bool) {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for {
			for _, f := range frames() {
				if ok(f) {
					return
				}
			}
			if time.Now().After(deadline) {
				t.Fatalf("no %s on the page's socket; frames %v\nmake run:\n%s", what, frames(), output())
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	waitFrame(`"subscribed" to demo`, func(f map[string]any) bool { return f["type"] == "subscribed" && f["channel"] == "demo" })

	// The publish, as printed, from a shell.
	if b, err := exec.Command("bash", "-c", curlLine).CombinedOutput(); err != nil || !strings.Contains(string(b), `"id"`) {
		t.Fatalf("the printed curl: %v\n%s", err, b)
	}
	waitFrame("hello message", func(f map[string]any) bool {
		d, _ := f["data"].(map[string]any)
		return f["type"] == "message" && f["channel"] == "demo" && d["text"] == "hello"
	})

	// Ctrl-C: everything it started stops. (make itself dies of the
	// SIGINT, as it does in a terminal; the script exits 0.)
	redisPort := ""
	for _, l := range strings.Split(output(), "\n") {
		if _, after, ok := strings.Cut(l, "throwaway Redis at redis://127.0.0.1:"); ok {
			redisPort, _, _ = strings.Cut(after, "/")
		}
	}
	if err := syscall.Kill(-cmd.Process.Pid, syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	select {
	case <-exited:
		stopped = true
		var ee *exec.ExitError
		if exitErr != nil && !(errors.As(exitErr, &ee) && ee.Sys().(syscall.WaitStatus).Signal() == syscall.SIGINT) {
			t.Fatalf("make run after Ctrl-C: %v\n%s", exitErr, output())
		}
		if !strings.Contains(output(), "stopping") {
			t.Fatalf("make run's script did not stop on Ctrl-C:\n%s", output())
		}
		// Each function stops the way it does on SIGTERM (the egress
		// drains its sockets with 1001), and says so: its log reaches
		// the terminal to the end, rather than its last writes killing
		// it (SIGPIPE) because what prefixes its lines died of the
		// Ctrl-C first.
		for _, prefix := range []string{"[ingress]", "[egress]"} {
			found := false
			for _, l := range strings.Split(output(), "\n") {
				if strings.HasPrefix(l, prefix) && strings.Contains(l, "msg=stopped") {
					found = true
				}
			}
			if !found {
				t.Fatalf("no %s ... msg=stopped line after Ctrl-C:\n%s", prefix, output())
			}
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("make run still running 30 s after Ctrl-C:\n%s", output())
	}
	for _, port := range []string{strconv.Itoa(ip), strconv.Itoa(ep), redisPort} {
		if port == "" {
			t.Fatalf("no Redis port in the output:\n%s", output())
		}
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			c, err := (&net.Dialer{Timeout: time.Second}).Dial("tcp", "127.0.0.1:"+port)
			if err != nil {
				break
			}
			c.Close()
			if time.Now().After(deadline) {
				t.Fatalf("port %s still open 10 s after Ctrl-C", port)
			}
		}
	}
}

// TestRunWithoutRedisServer: `make run`'s script on a machine with no
// redis-server and an apt-get that fails (no network, no such package)
// stops with a message of its own that says what to do, not with apt's
// error alone, and starts nothing.
func TestRunWithoutRedisServer(t *testing.T) {
	_, file, _, _ := runtime.Caller(0)
	root := filepath.Dir(filepath.Dir(file))
	// A PATH with everything this machine has but redis-server, and an
	// apt-get (and a sudo, for a run that is not root's) that fail as
	// apt-get does without a network.
	bin := t.TempDir()
	for _, dir := range filepath.SplitList(os.Getenv("PATH")) {
		ents, _ := os.ReadDir(dir)
		for _, e := range ents {
			n := e.Name()
			if n == "redis-server" || n == "apt-get" || n == "sudo" {
				continue
			}
			_ = os.Symlink(filepath.Join(dir, n), filepath.Join(bin, n)) // the first on PATH wins, as in a shell
		}
	}
	write := func(name, body string) {
		if err := os.WriteFile(filepath.Join(bin, name), []byte("#!/bin/sh\n"+body+"\n"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	write("apt-get", `echo "E: Unable to locate package redis-server" >&2; exit 100`)
	write("sudo", `exec "$@"`)
	ip, ep := quietPort(t), quietPort(t)
	cmd := exec.Command("bash", filepath.Join(root, "scripts", "run.sh"))
	cmd.Dir = root
	cmd.Env = []string{"PATH=" + bin, "HOME=" + os.Getenv("HOME"), "INGRESS_PORT=" + strconv.Itoa(ip), "EGRESS_PORT=" + strconv.Itoa(ep)}
	done := make(chan struct{})
	var (
		out []byte
		err error
	)
	go func() { out, err = cmd.CombinedOutput(); close(done) }()
	select {
	case <-done:
	case <-time.After(time.Minute):
		_ = cmd.Process.Kill()
		<-done
		t.Fatalf("run.sh did not stop without redis-server; it printed:\n%s", out)
	}
	if err == nil {
		t.Fatalf("run.sh succeeded without redis-server; it printed:\n%s", out)
	}
	if !strings.Contains(string(out), "run: could not install redis-server") || !strings.Contains(string(out), "REDIS_URL") {
		t.Fatalf("run.sh's failure does not say what to do; it printed:\n%s", out)
	}
	for _, p := range []int{ip, ep} {
		if c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(p), 100*time.Millisecond); err == nil {
			c.Close()
			t.Errorf("port %d is served after run.sh failed", p)
		}
	}
}
