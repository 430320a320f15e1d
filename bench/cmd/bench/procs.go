package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/redis/go-redis/v9"
)

// children tracks every process the bench starts, so that they are killed
// on every way out: normal end, error, panic or signal.
type children struct {
	mu    sync.Mutex
	procs map[int]*exec.Cmd
}

var kids = &children{procs: make(map[int]*exec.Cmd)}

// start runs name with env in its own process group, output to logf.
func (k *children) start(name string, args []string, env []string, logf *os.File) (*exec.Cmd, error) {
	cmd := exec.Command(name, args...)
	cmd.Env = env
	cmd.Stdout = logf
	cmd.Stderr = logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	k.mu.Lock()
	k.procs[cmd.Process.Pid] = cmd
	k.mu.Unlock()
	return cmd, nil
}

// stop kills one child and waits for it.
func (k *children) stop(cmd *exec.Cmd) {
	if cmd == nil || cmd.Process == nil {
		return
	}
	k.mu.Lock()
	_, ok := k.procs[cmd.Process.Pid]
	delete(k.procs, cmd.Process.Pid)
	k.mu.Unlock()
	if !ok {
		return
	}
	_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	_ = cmd.Wait()
}

// stopAll kills every child still running.
func (k *children) stopAll() {
	k.mu.Lock()
	all := make([]*exec.Cmd, 0, len(k.procs))
	for _, c := range k.procs {
		all = append(all, c)
	}
	k.mu.Unlock()
	for _, c := range all {
		k.stop(c)
	}
}

// freePort asks the kernel for a free TCP port on 127.0.0.1.
func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// buildBinaries builds bin/bench/ingress, bin/bench/egress and
// bin/bench/egress-lean from the repository root the way `make package`
// builds what ships to SCF (static, trimmed, stripped; the lean egress
// with -tags wsrelay_lean, as `make package LEAN=1`), so memory and
// start-up figures are the deployed binaries'.
func buildBinaries(root string) (ingress, egress, egressLean string, err error) {
	bin := filepath.Join(root, "bin", "bench")
	for _, b := range []struct{ fn, out, tags string }{
		// The Makefile's TAGS_ingress and TAGS_egress (+ LEAN_TAG).
		{"ingress", "ingress", "nomsgpack,nethttpomithttp2"},
		{"egress", "egress", "nethttpomithttp2"},
		{"egress", "egress-lean", "nethttpomithttp2,wsrelay_lean"},
	} {
		cmd := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-tags="+b.tags, "-o", filepath.Join(bin, b.out), ".")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		cmd.Dir = filepath.Join(root, "functions", b.fn)
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			return "", "", "", fmt.Errorf("build %s: %w", b.out, err)
		}
	}
	return filepath.Join(bin, "ingress"), filepath.Join(bin, "egress"), filepath.Join(bin, "egress-lean"), nil
}

// repoRoot finds the directory holding go.work, upwards from the working
// directory.
func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.work")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("go.work not found above the working directory")
		}
		dir = parent
	}
}

// env is the bench's view of one running system: Redis, binaries, logs.
type env struct {
	ingressBin, egressBin, egressLeanBin string
	centrifugoBin                        string // empty: not compared
	centrifugoHistory                    bool   // Centrifugo keeps history, as wsrelay does
	redisURL                             string
	redisAddr                            string
	logDir                               string
	redis                                *exec.Cmd
	rdb                                  *redis.Client // the bench's own connection
}

// startRedis starts a redis-server with no persistence on a free port.
func (e *env) startRedis() error {
	port, err := freePort()
	if err != nil {
		return err
	}
	logf, err := os.Create(filepath.Join(e.logDir, "redis.log"))
	if err != nil {
		return err
	}
	e.redis, err = kids.start("redis-server", []string{
		"--port", strconv.Itoa(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
		"--dir", e.logDir, "--maxclients", "20000",
	}, os.Environ(), logf)
	if err != nil {
		return err
	}
	e.redisAddr = "127.0.0.1:" + strconv.Itoa(port)
	e.redisURL = "redis://" + e.redisAddr + "/0"
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		r := redis.NewClient(&redis.Options{Addr: e.redisAddr})
		err := r.Ping(context.Background()).Err()
		r.Close()
		if err == nil {
			e.rdb = redis.NewClient(&redis.Options{Addr: e.redisAddr})
			return nil
		}
		time.Sleep(10 * time.Millisecond)
	}
	return errors.New("redis-server did not answer within 5 s")
}

// proc is one started function.
type proc struct {
	cmd  *exec.Cmd
	port int
	base string // http://127.0.0.1:port
}

// startFunction starts bin (ingress or egress) with prefix as key prefix
// and waits for /readyz. It returns the time from exec to the first 200.
func (e *env) startFunction(bin, prefix string, extra ...string) (*proc, time.Duration, error) {
	port, err := freePort()
	if err != nil {
		return nil, 0, err
	}
	logf, err := os.OpenFile(filepath.Join(e.logDir, filepath.Base(bin)+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, 0, err
	}
	defer logf.Close()
	vars := append([]string{
		"PATH=" + os.Getenv("PATH"),
		"PORT=" + strconv.Itoa(port),
		"REDIS_URL=" + e.redisURL,
		"REDIS_KEY_PREFIX=" + prefix,
		"LOG_LEVEL=warn",
		"ALLOW_ANONYMOUS=true",
		"MAX_SUBSCRIPTIONS=1000",
		"PUBLISH_RATE_PER_USER=0", // the bench measures the system, not its limits
	}, extra...)
	// BENCH_DEBUG=1 gives each function a profiling port (DEBUG_ADDR on a
	// free port, logged in its log file) to profile a scenario while it runs.
	if os.Getenv("BENCH_DEBUG") != "" {
		vars = append(vars, "DEBUG_ADDR=127.0.0.1:0")
	}
	return startReady(bin, nil, append(vars, runtimeVars()...), port, "/readyz", logf)
}

// runtimeVars are the Go runtime settings given to the bench, which reach
// every process it starts (e.g. GODEBUG=gctrace=1 to see their
// collections in the logs).
func runtimeVars() []string {
	var vars []string
	for _, k := range []string{"GODEBUG", "GOGC", "GOMEMLIMIT", "GOMAXPROCS"} {
		if v, ok := os.LookupEnv(k); ok {
			vars = append(vars, k+"="+v)
		}
	}
	return vars
}

// startReady starts bin, listening on port, and waits until readyPath
// answers 200. It returns the time from exec to that answer.
func startReady(bin string, args, vars []string, port int, readyPath string, logf *os.File) (*proc, time.Duration, error) {
	t0 := time.Now()
	cmd, err := kids.start(bin, args, vars, logf)
	if err != nil {
		return nil, 0, err
	}
	p := &proc{cmd: cmd, port: port, base: "http://127.0.0.1:" + strconv.Itoa(port)}
	d, err := waitReady(p.base+readyPath, t0, 10*time.Second)
	if err != nil {
		kids.stop(cmd)
		return nil, 0, fmt.Errorf("%s: %w", filepath.Base(bin), err)
	}
	return p, d, nil
}

var probeClient = &http.Client{
	Timeout:   time.Second,
	Transport: &http.Transport{DisableKeepAlives: true},
}

// waitReady polls url every 200 µs until it answers 200.
func waitReady(url string, t0 time.Time, limit time.Duration) (time.Duration, error) {
	for time.Since(t0) < limit {
		resp, err := probeClient.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return time.Since(t0), nil
			}
		}
		time.Sleep(200 * time.Microsecond)
	}
	return 0, fmt.Errorf("not ready within %s", limit)
}

// rssKiB reads VmRSS of pid.
func rssKiB(pid int) (int64, error) { return statusKiB(pid, "VmRSS:") }

// statusKiB reads one kB field of /proc/<pid>/status (VmRSS:, RssAnon:).
func statusKiB(pid int, field string) (int64, error) {
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), field); ok {
			v = strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB"))
			return strconv.ParseInt(v, 10, 64)
		}
	}
	return 0, errors.New(field + " not found")
}

// cpuTicks reads utime+stime of pid, in clock ticks (USER_HZ, 100/s).
func cpuTicks(pid int) (int64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, err
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, errors.New("bad stat")
	}
	f := strings.Fields(s[i+2:])
	// After "pid (comm)": state is field 3; utime 14, stime 15 (1-based).
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return ut + st, nil
}

// raiseNoFile lifts RLIMIT_NOFILE to its hard limit; children inherit it.
func raiseNoFile() uint64 {
	var r syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &r); err != nil {
		return 0
	}
	r.Cur = r.Max
	_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &r)
	_ = syscall.Getrlimit(syscall.RLIMIT_NOFILE, &r)
	return r.Cur
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
