package e2e

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/wsrelay/wsrelay/shared/testkit"
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
	cmd.Env = append(environWithout("REDIS_URL"), "INGRESS_PORT="+strconv.Itoa(ip), "EGRESS_PORT="+strconv.Itoa(ep))
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

// TestRunStopsWhileBuilding: `make run`'s script stopped while it builds
// the functions (minutes on a fresh clone's cold build cache), by a
// SIGTERM to the script alone (`kill <pid>`, or to make, which passes it
// on) or by Ctrl-C (SIGINT to its process group, as a terminal sends it;
// and from a real terminal, set to `stty tostop`, in which a build that
// writes to it must go on), exits at once and leaves nothing behind: not
// the build, not the throwaway Redis, not its temp dir. The build is a
// stand-in GO that prints a line as go does when it downloads a module,
// then never ends on its own, with a child of its own as go build has
// its compilers.
func TestRunStopsWhileBuilding(t *testing.T) {
	for _, tc := range []struct {
		name  string
		group bool // the signal to the script's process group, not to it alone
		tty   bool // in a terminal (script(1)), stopped by typing Ctrl-C
		sig   syscall.Signal
	}{
		{"SIGTERM to the script", false, false, syscall.SIGTERM},
		{"Ctrl-C", true, false, syscall.SIGINT},
		{"Ctrl-C in a terminal with tostop", false, true, syscall.SIGINT},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			tmp := filepath.Join(dir, "tmp")
			if err := os.Mkdir(tmp, 0o755); err != nil {
				t.Fatal(err)
			}
			pidFile := filepath.Join(dir, "build.pids")
			fakeGo := filepath.Join(dir, "go")
			// A go build that runs until it is stopped, its child (a
			// compiler) included; both pids written once it has started.
			// The child takes SIGINT as go's compilers do (bash would
			// start it with SIGINT ignored).
			if err := os.WriteFile(fakeGo, []byte("#!/bin/bash\necho 'go: downloading example.com/m v1.0.0' >&2\n(trap - INT; exec sleep 600) &\necho \"$$ $!\" >>"+pidFile+"\nwait\n"), 0o755); err != nil {
				t.Fatal(err)
			}
			ip, ep := quietPort(t), quietPort(t)
			cmd := exec.Command("bash", filepath.Join(repoRoot(t), "scripts", "run.sh"))
			var tty io.WriteCloser
			if tc.tty {
				if _, err := exec.LookPath("script"); err != nil {
					t.Skip("script(1) not found (util-linux)")
				}
				cmd = exec.Command("script", "-qfec", "stty tostop; exec bash scripts/run.sh", "/dev/null")
				var err error
				if tty, err = cmd.StdinPipe(); err != nil {
					t.Fatal(err)
				}
			}
			cmd.Dir = repoRoot(t)
			cmd.Env = append(environWithout("REDIS_URL", "TMPDIR"), "GO="+fakeGo, "TMPDIR="+tmp,
				"INGRESS_PORT="+strconv.Itoa(ip), "EGRESS_PORT="+strconv.Itoa(ep))
			cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
			var out testkit.SyncBuffer
			cmd.Stdout, cmd.Stderr = &out, &out
			// Exited is the script's exit, not the end of its output,
			// which a process it left behind would hold open.
			cmd.WaitDelay = time.Second
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			exited := make(chan struct{})
			go func() { _ = cmd.Wait(); close(exited) }()
			var pids []int // the build's: the stand-in go and its child
			t.Cleanup(func() {
				_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
				for _, p := range pids {
					_ = syscall.Kill(p, syscall.SIGKILL)
				}
				select {
				case <-exited:
				case <-time.After(15 * time.Second):
				}
			})
			testkit.Eventually(t, time.Minute, func() error {
				b, _ := os.ReadFile(pidFile)
				if len(strings.Fields(string(b))) < 2 {
					return fmt.Errorf("the build has not started; run.sh printed:\n%s", out.String())
				}
				return nil
			})
			b, _ := os.ReadFile(pidFile)
			for _, f := range strings.Fields(string(b)) {
				p, err := strconv.Atoi(f)
				if err != nil {
					t.Fatal(err)
				}
				pids = append(pids, p)
			}
			redisPort := ""
			if _, after, ok := strings.Cut(out.String(), "throwaway Redis at redis://127.0.0.1:"); ok {
				redisPort, _, _ = strings.Cut(after, "/")
			}
			if redisPort == "" {
				t.Fatalf("no throwaway Redis before the build; run.sh printed:\n%s", out.String())
			}

			if tc.tty {
				if _, err := tty.Write([]byte{3}); err != nil { // Ctrl-C
					t.Fatal(err)
				}
			} else {
				target := cmd.Process.Pid
				if tc.group {
					target = -target
				}
				if err := syscall.Kill(target, tc.sig); err != nil {
					t.Fatal(err)
				}
			}
			select {
			case <-exited:
			case <-time.After(10 * time.Second):
				t.Fatalf("run.sh still running 10 s after %v during its build; it printed:\n%s", tc.sig, out.String())
			}
			testkit.Eventually(t, 10*time.Second, func() error {
				for _, p := range pids {
					if alive(p) {
						return fmt.Errorf("build process %d still running after run.sh exited", p)
					}
				}
				if c, err := net.DialTimeout("tcp", "127.0.0.1:"+redisPort, time.Second); err == nil {
					c.Close()
					return fmt.Errorf("the throwaway Redis on %s still answers", redisPort)
				}
				if left, _ := filepath.Glob(filepath.Join(tmp, "wsrelay-run.*")); len(left) > 0 {
					return fmt.Errorf("temp dir left behind: %v", left)
				}
				return nil
			})
		})
	}
}

// alive reports whether process pid exists and is not a zombie (one
// reparented to a PID 1 that does not reap is done all the same).
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	_, after, ok := strings.Cut(string(b), ") ")
	return ok && !strings.HasPrefix(after, "Z")
}

// TestRunOneLinerRemote: `make run` on a remote machine, the README's
// second way: ALLOWED_ORIGINS and INGRESS_URL exported with the address
// the browser uses. The browser one-liner it prints, pasted as printed
// into the console of the demo page opened at that address, subscribes.
// The browser is elsewhere: its localhost is not the machine make run
// runs on (Chromium's own localhost resolves to nothing here, and the
// machine is "wsrelay.test").
func TestRunOneLinerRemote(t *testing.T) {
	tab := newBrowserWithPrefs(t, "", chromedp.Flag("host-resolver-rules", "MAP localhost ~NOTFOUND, MAP wsrelay.test 127.0.0.1"))
	ip, ep := quietPort(t), quietPort(t)
	cmd := exec.Command("bash", filepath.Join(repoRoot(t), "scripts", "run.sh"))
	cmd.Dir = repoRoot(t)
	cmd.Env = append(environWithout("REDIS_URL"), "INGRESS_PORT="+strconv.Itoa(ip), "EGRESS_PORT="+strconv.Itoa(ep),
		"ALLOWED_ORIGINS=http://wsrelay.test:"+strconv.Itoa(ep), "INGRESS_URL=http://wsrelay.test:"+strconv.Itoa(ip))
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	var out testkit.SyncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.WaitDelay = time.Second
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGINT)
		select {
		case <-exited:
		case <-time.After(30 * time.Second):
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-exited
		}
	})
	var wsLine string
	testkit.Eventually(t, 3*time.Minute, func() error {
		select {
		case <-exited:
			t.Fatalf("run.sh exited before printing its commands:\n%s", out.String())
		default:
		}
		for _, l := range strings.Split(out.String(), "\n") {
			if l = strings.TrimSpace(l); strings.HasPrefix(l, "ws = new WebSocket(") {
				wsLine = l
				return nil
			}
		}
		return fmt.Errorf("no one-liner printed yet")
	})
	runIn(t, tab, "open the demo page", chromedp.Navigate("http://wsrelay.test:"+strconv.Itoa(ep)+"/"))
	evalIn(t, tab, "the printed one-liner", chromedp.Evaluate[any](wsLine+`; window.got = []; ws.addEventListener("message", (e) => got.push(e.data)); true`))
	testkit.Eventually(t, 20*time.Second, func() error {
		for _, r := range evalIn(t, tab, "frames", chromedp.Evaluate[[]string](`got`)) {
			var f map[string]any
			if json.Unmarshal([]byte(r), &f) == nil && f["type"] == "subscribed" && f["channel"] == "demo" {
				return nil
			}
		}
		state := evalIn(t, tab, "socket", chromedp.Evaluate[string](`ws.url + " readyState " + ws.readyState`))
		return fmt.Errorf("the printed one-liner %q did not subscribe on the demo page at wsrelay.test (%s)", wsLine, state)
	})
}

// environWithout is this process's environment less the variables names
// (make run's own settings, which the test sets itself or leaves unset).
func environWithout(names ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		if !slices.Contains(names, name) {
			env = append(env, kv)
		}
	}
	return env
}
