// Package harness starts and watches what the bench commands drive: the
// real ingress and egress binaries, built from the checkout, and a
// throwaway redis-server. bench/cmd/bench (make bench) and bench/cmd/soak
// (make soak) share it.
package harness

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/redis/go-redis/v9"
)

// Children tracks every process a command starts, so that they are killed
// on every way out: normal end, error, panic or signal.
type Children struct {
	mu    sync.Mutex
	procs map[int]*exec.Cmd
}

// Kids are the processes this one started.
var Kids = &Children{procs: make(map[int]*exec.Cmd)}

// Main runs a command's run with the command line's arguments until it
// returns or the process is interrupted (SIGINT, SIGTERM cancel ctx), then
// stops every process it started (Kids), and exits 1 with name and the
// error if run failed.
func Main(name string, run func(ctx context.Context, args []string, stdout, stderr io.Writer) error) {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	Kids.StopAll()
	if err != nil {
		fmt.Fprintln(os.Stderr, name+":", err)
		os.Exit(1)
	}
}

// Start runs name with env in its own process group, output to logf.
func (k *Children) Start(name string, args []string, env []string, logf *os.File) (*exec.Cmd, error) {
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

// forget removes cmd from the tracked processes and says whether it was
// there (it is waited for once only).
func (k *Children) forget(cmd *exec.Cmd) bool {
	if cmd == nil || cmd.Process == nil {
		return false
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	_, ok := k.procs[cmd.Process.Pid]
	delete(k.procs, cmd.Process.Pid)
	return ok
}

// Stop kills one child and waits for it.
func (k *Children) Stop(cmd *exec.Cmd) {
	if !k.forget(cmd) {
		return
	}
	_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	_ = cmd.Wait()
}

// Term stops one child the way a platform does: SIGTERM, then SIGKILL if
// it has not exited within grace. It says how long the exit took, and
// errs when the child had to be killed or exited with an error.
func (k *Children) Term(cmd *exec.Cmd, grace time.Duration) (time.Duration, error) {
	if !k.forget(cmd) {
		return 0, nil
	}
	t0 := time.Now()
	_ = cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			return time.Since(t0), fmt.Errorf("exited after SIGTERM: %w", err)
		}
		return time.Since(t0), nil
	case <-time.After(grace):
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-done
		return time.Since(t0), fmt.Errorf("still running %s after SIGTERM: killed", grace)
	}
}

// StopAll kills every child still running.
func (k *Children) StopAll() {
	k.mu.Lock()
	all := make([]*exec.Cmd, 0, len(k.procs))
	for _, c := range k.procs {
		all = append(all, c)
	}
	k.mu.Unlock()
	for _, c := range all {
		k.Stop(c)
	}
}

// FreePort asks the kernel for a free TCP port on 127.0.0.1.
func FreePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// Binaries are the built functions.
type Binaries struct {
	Ingress, Egress string
	EgressLean      string // empty unless Build was asked for the bench's extras
	Floor           string // likewise: cmd/floor, S5's yardstick
	FastFloor       string // likewise: cmd/fastfloor, S4's floor on fasthttp
}

// Build builds bin/bench/ingress and bin/bench/egress from the repository
// root the way `make package` builds what ships to SCF (static, trimmed,
// stripped), so memory and start-up figures are the deployed binaries'.
// With extras it also builds bin/bench/egress-lean (-tags wsrelay_lean,
// as `make package LEAN=1`, for S6), bin/bench/floor (cmd/floor, a
// bare net/http server built the same way, for S4 and S5) and
// bin/bench/fastfloor (cmd/fastfloor, the same on fasthttp, for S4).
func Build(root string, extras bool) (Binaries, error) {
	bin := filepath.Join(root, "bin", "bench")
	type target struct{ dir, pkg, out, tags, gcflags string }
	targets := []target{
		// The Makefile's TAGS_ingress and TAGS_egress (+ LEAN_TAG).
		{"functions/ingress", ".", "ingress", "nomsgpack,nethttpomithttp2", ""},
		{"functions/egress", ".", "egress", "nethttpomithttp2", ""},
	}
	if extras {
		targets = append(targets,
			target{"functions/egress", ".", "egress-lean", "nethttpomithttp2,wsrelay_lean", "all=-l"},
			target{"bench", "./cmd/floor", "floor", "nethttpomithttp2", ""},
			target{"bench", "./cmd/fastfloor", "fastfloor", "nethttpomithttp2", ""})
	}
	for _, b := range targets {
		cmd := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-gcflags="+b.gcflags, "-tags="+b.tags, "-o", filepath.Join(bin, b.out), b.pkg)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		cmd.Dir = filepath.Join(root, filepath.FromSlash(b.dir))
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			return Binaries{}, fmt.Errorf("build %s: %w", b.out, err)
		}
	}
	bs := Binaries{Ingress: filepath.Join(bin, "ingress"), Egress: filepath.Join(bin, "egress")}
	if extras {
		bs.EgressLean = filepath.Join(bin, "egress-lean")
		bs.Floor = filepath.Join(bin, "floor")
		bs.FastFloor = filepath.Join(bin, "fastfloor")
	}
	return bs, nil
}

// RepoRoot finds the directory holding go.work, upwards from the working
// directory.
func RepoRoot() (string, error) {
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

// Env is one running system's shared parts: Redis, binaries, logs.
type Env struct {
	Binaries
	RedisURL  string
	RedisAddr string
	LogDir    string
	Redis     *exec.Cmd
	RDB       *redis.Client // the command's own connection
}

// StartRedis starts a redis-server with no persistence on a free port.
func (e *Env) StartRedis() error {
	port, err := FreePort()
	if err != nil {
		return err
	}
	logf, err := os.Create(filepath.Join(e.LogDir, "redis.log"))
	if err != nil {
		return err
	}
	defer logf.Close()
	e.Redis, err = Kids.Start("redis-server", []string{
		"--port", strconv.Itoa(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
		"--dir", e.LogDir, "--maxclients", "20000",
	}, os.Environ(), logf)
	if err != nil {
		return err
	}
	e.RedisAddr = "127.0.0.1:" + strconv.Itoa(port)
	e.RedisURL = "redis://" + e.RedisAddr + "/0"
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		r := redis.NewClient(&redis.Options{Addr: e.RedisAddr})
		err := r.Ping(context.Background()).Err()
		r.Close()
		if err == nil {
			e.RDB = redis.NewClient(&redis.Options{Addr: e.RedisAddr})
			return nil
		}
		time.Sleep(10 * time.Millisecond)
	}
	return errors.New("redis-server did not answer within 5 s")
}

// Proc is one started function.
type Proc struct {
	Cmd  *exec.Cmd
	Port int
	Base string // http://127.0.0.1:port
}

// Pid is the process's id.
func (p *Proc) Pid() int { return p.Cmd.Process.Pid }

// StartFunction starts bin (ingress or egress) with prefix as key prefix
// and waits for /readyz. It returns the time from exec to the first 200.
// extra comes after the defaults, so it can override them (exec keeps the
// last value of a variable set twice). Its output goes to the log
// directory's <bin's name>.log.
func (e *Env) StartFunction(bin, prefix string, extra ...string) (*Proc, time.Duration, error) {
	return e.StartNamed(filepath.Base(bin), bin, prefix, extra...)
}

// StartNamed is StartFunction with the output in <name>.log: for
// instances of two builds of one function side by side.
func (e *Env) StartNamed(name, bin, prefix string, extra ...string) (*Proc, time.Duration, error) {
	port, err := FreePort()
	if err != nil {
		return nil, 0, err
	}
	logf, err := os.OpenFile(filepath.Join(e.LogDir, name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, 0, err
	}
	defer logf.Close()
	vars := append([]string{
		"PATH=" + os.Getenv("PATH"),
		"PORT=" + strconv.Itoa(port),
		"REDIS_URL=" + e.RedisURL,
		"REDIS_KEY_PREFIX=" + prefix,
		"LOG_LEVEL=warn",
		"ALLOW_ANONYMOUS=true",
		"MAX_SUBSCRIPTIONS=1000",
		"PUBLISH_RATE_PER_USER=0", // the bench measures the system, not its limits
	}, extra...)
	// BENCH_DEBUG=1 gives each function a profiling port (DEBUG_ADDR on a
	// free port, logged in its log file) to profile a run while it goes on.
	if os.Getenv("BENCH_DEBUG") != "" {
		vars = append(vars, "DEBUG_ADDR=127.0.0.1:0")
	}
	return StartReady(bin, nil, append(vars, RuntimeVars()...), port, "/readyz", logf)
}

// StartFloor starts bin/bench/floor and waits for /readyz, as
// StartFunction does for a function: the time from exec to the first 200
// of a server that does nothing else. server is "" or "net/http" for
// cmd/floor, else cmd/fastfloor's FLOOR_SERVER.
func (e *Env) StartFloor(server string) (*Proc, time.Duration, error) {
	port, err := FreePort()
	if err != nil {
		return nil, 0, err
	}
	logf, err := os.OpenFile(filepath.Join(e.LogDir, "floor.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, 0, err
	}
	defer logf.Close()
	vars := []string{"PATH=" + os.Getenv("PATH"), "PORT=" + strconv.Itoa(port)}
	bin := e.Floor
	if server != "" && server != "net/http" {
		bin = e.FastFloor
		vars = append(vars, "FLOOR_SERVER="+server)
	}
	return StartReady(bin, nil, append(vars, RuntimeVars()...), port, "/readyz", logf)
}

// RuntimeVars are the Go runtime settings given to the command, which
// reach every process it starts (e.g. GODEBUG=gctrace=1 to see their
// collections in the logs).
func RuntimeVars() []string {
	var vars []string
	for _, k := range []string{"GODEBUG", "GOGC", "GOMEMLIMIT", "GOMAXPROCS"} {
		if v, ok := os.LookupEnv(k); ok {
			vars = append(vars, k+"="+v)
		}
	}
	return vars
}

// StartReady starts bin, listening on port, and waits until readyPath
// answers 200. It returns the time from exec to that answer.
func StartReady(bin string, args, vars []string, port int, readyPath string, logf *os.File) (*Proc, time.Duration, error) {
	t0 := time.Now()
	cmd, err := Kids.Start(bin, args, vars, logf)
	if err != nil {
		return nil, 0, err
	}
	p := &Proc{Cmd: cmd, Port: port, Base: "http://127.0.0.1:" + strconv.Itoa(port)}
	d, err := waitReady(p.Base+readyPath, t0, 10*time.Second)
	if err != nil {
		Kids.Stop(cmd)
		return nil, 0, fmt.Errorf("%s: %w", filepath.Base(bin), err)
	}
	return p, d, nil
}

// ProbeClient is for the functions' own endpoints (readiness, metrics):
// one connection per request, so that it holds none of theirs open.
var ProbeClient = &http.Client{
	Timeout:   time.Second,
	Transport: &http.Transport{DisableKeepAlives: true},
}

// waitReady polls url every 200 µs until it answers 200.
func waitReady(url string, t0 time.Time, limit time.Duration) (time.Duration, error) {
	for time.Since(t0) < limit {
		resp, err := ProbeClient.Get(url)
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

// RSSKiB reads VmRSS of pid.
func RSSKiB(pid int) (int64, error) { return StatusKiB(pid, "VmRSS:") }

// StatusKiB reads one kB field of /proc/<pid>/status (VmRSS:, RssAnon:).
func StatusKiB(pid int, field string) (int64, error) {
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

// OpenFDs counts the open file descriptors of pid (/proc/<pid>/fd).
func OpenFDs(pid int) (int, error) {
	ents, err := os.ReadDir("/proc/" + strconv.Itoa(pid) + "/fd")
	return len(ents), err
}

// CPUTicks reads utime+stime of pid, in clock ticks (USER_HZ, 100/s).
func CPUTicks(pid int) (int64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, err
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, errors.New("bad stat")
	}
	f := strings.Fields(s[i+1:])
	// After "pid (comm)": state is field 3; utime 14, stime 15 (1-based).
	if len(f) < 13 {
		return 0, errors.New("bad stat")
	}
	ut, err := strconv.ParseInt(f[11], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("stat utime: %w", err)
	}
	st, err := strconv.ParseInt(f[12], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("stat stime: %w", err)
	}
	return ut + st, nil
}

// RaiseNoFile lifts RLIMIT_NOFILE to its hard limit; children inherit it.
func RaiseNoFile() uint64 {
	var r syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &r); err != nil {
		return 0
	}
	r.Cur = r.Max
	_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &r)
	_ = syscall.Getrlimit(syscall.RLIMIT_NOFILE, &r)
	return r.Cur
}

// SleepCtx sleeps for d or until ctx ends, and then says why.
func SleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// Metrics reads the Prometheus text of base+"/metrics" and returns the
// value of each unlabelled series in names (a series it lacks is absent
// from the map).
func Metrics(base string, names ...string) (map[string]float64, error) {
	resp, err := ProbeClient.Get(base + "/metrics")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return nil, fmt.Errorf("GET %s/metrics: %s", base, resp.Status)
	}
	want := map[string]bool{}
	for _, n := range names {
		want[n] = true
	}
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		name, val, ok := strings.Cut(sc.Text(), " ")
		if !ok || !want[name] {
			continue
		}
		if v, err := strconv.ParseFloat(strings.TrimSpace(val), 64); err == nil {
			out[name] = v
		}
	}
	return out, sc.Err()
}

// TCPConnsTo counts the TCP connections of pid whose remote port is port
// (e.g. its Redis connections).
func TCPConnsTo(pid, port int) (int, error) {
	ports, err := TCPLocalPortsTo(pid, port)
	return len(ports), err
}

// TCPLocalPortsTo returns the local ports of pid's TCP connections whose
// remote port is port: the sockets among its open descriptors, matched by
// inode with /proc/<pid>/net/tcp and tcp6. A server's list of its clients
// (Redis's CLIENT LIST addr=) names them by these ports, so a test can
// pick out one process's connections among many.
func TCPLocalPortsTo(pid, port int) ([]int, error) {
	dir := "/proc/" + strconv.Itoa(pid)
	ents, err := os.ReadDir(dir + "/fd")
	if err != nil {
		return nil, err
	}
	inodes := map[string]bool{}
	for _, e := range ents {
		link, err := os.Readlink(dir + "/fd/" + e.Name())
		if err != nil {
			continue // closed since
		}
		if ino, ok := strings.CutPrefix(link, "socket:["); ok {
			inodes[strings.TrimSuffix(ino, "]")] = true
		}
	}
	suffix := fmt.Sprintf(":%04X", port)
	var out []int
	for _, table := range []string{"/net/tcp", "/net/tcp6"} {
		b, err := os.ReadFile(dir + table)
		if err != nil {
			continue
		}
		for line := range strings.SplitSeq(string(b), "\n") {
			// sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
			f := strings.Fields(line)
			if len(f) <= 9 || !strings.HasSuffix(f[2], suffix) || !inodes[f[9]] {
				continue
			}
			_, hex, _ := strings.Cut(f[1], ":")
			if p, err := strconv.ParseUint(hex, 16, 16); err == nil {
				out = append(out, int(p))
			}
		}
	}
	return out, nil
}

// CommandStats reads Redis's INFO commandstats as command → calls.
func (e *Env) CommandStats(ctx context.Context) (map[string]int64, error) {
	s, err := e.RDB.Info(ctx, "commandstats").Result()
	if err != nil {
		return nil, fmt.Errorf("INFO commandstats: %w", err)
	}
	out := map[string]int64{}
	for line := range strings.SplitSeq(s, "\n") {
		name, rest, ok := strings.Cut(strings.TrimSpace(line), ":")
		name, found := strings.CutPrefix(name, "cmdstat_")
		if !ok || !found {
			continue
		}
		calls, _, _ := strings.Cut(strings.TrimPrefix(rest, "calls="), ",")
		out[name], _ = strconv.ParseInt(calls, 10, 64)
	}
	return out, nil
}
