// Package redistest gives tests a real Redis: the one named by REDIS_URL,
// else one answering on 127.0.0.1:6379, else a throwaway redis-server
// started on a free port for the test process. It never mocks Redis.
//
// Each test gets its own key prefix, so tests run in parallel on one Redis
// and clean up only their own keys.
package redistest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"
)

var (
	once     sync.Once
	baseURL  string
	setupErr error
	servers  []*Server
	mu       sync.Mutex
)

// URL returns the redis:// URL of the Redis every test of this process
// uses, starting a throwaway server if needed. It fails the test if no
// Redis can be had.
func URL(t testing.TB) string {
	t.Helper()
	once.Do(func() {
		if u := os.Getenv("REDIS_URL"); u != "" {
			baseURL = u
			return
		}
		if c, err := net.DialTimeout("tcp", "127.0.0.1:6379", 200*time.Millisecond); err == nil {
			c.Close()
			baseURL = "redis://127.0.0.1:6379/0"
			return
		}
		s, err := startServer(nil, nil, 0)
		if err != nil {
			setupErr = err
			return
		}
		baseURL = s.URL()
	})
	if setupErr != nil {
		t.Fatalf("redistest: no Redis: %v (install redis-server or set REDIS_URL)", setupErr)
	}
	return baseURL
}

// Prefix returns a key prefix unique to this test.
func Prefix(t testing.TB) string {
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	return "t" + hex.EncodeToString(b)
}

// Client returns a client to the test Redis and a key prefix unique to t;
// at the end of the test it deletes every key under the prefix.
func Client(t testing.TB) (redis.UniversalClient, string) {
	t.Helper()
	o, err := redis.ParseURL(URL(t))
	if err != nil {
		t.Fatalf("redistest: %v", err)
	}
	rdb := redis.NewClient(o)
	prefix := Prefix(t)
	t.Cleanup(func() {
		Cleanup(rdb, prefix)
		rdb.Close()
	})
	return rdb, prefix
}

// Cleanup deletes every key under prefix.
func Cleanup(rdb redis.UniversalClient, prefix string) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	del := func(ctx context.Context, c *redis.Client) error {
		iter := c.Scan(ctx, 0, prefix+":*", 500).Iterator()
		for iter.Next(ctx) {
			c.Del(ctx, iter.Val())
		}
		return iter.Err()
	}
	if cc, ok := rdb.(*redis.ClusterClient); ok {
		_ = cc.ForEachMaster(ctx, del)
		return
	}
	if c, ok := rdb.(*redis.Client); ok {
		_ = del(ctx, c)
	}
}

// Server is a redis-server process started by a test.
type Server struct {
	Port int
	Dir  string
	cmd  *exec.Cmd
	args []string
	ca   *CA // set for a server that speaks only TLS (StartTLS)
}

// URL of the server: rediss:// for a server started with StartTLS.
func (s *Server) URL() string {
	if s.ca != nil {
		return fmt.Sprintf("rediss://127.0.0.1:%d/0", s.Port)
	}
	return fmt.Sprintf("redis://127.0.0.1:%d/0", s.Port)
}

// Options are go-redis options for a client of the server as the
// default user: over TLS, trusting the server's CA, for a server started
// with StartTLS.
func (s *Server) Options() *redis.Options {
	o := &redis.Options{Addr: s.Addr(), DisableIdentity: true}
	if s.ca != nil {
		o.TLSConfig = s.ca.ClientConfig()
	}
	return o
}

// Addr is host:port.
func (s *Server) Addr() string { return "127.0.0.1:" + strconv.Itoa(s.Port) }

// Start starts a private redis-server for one test (for fault tests that
// stop and restart it), stopped at the end of the test.
func Start(t testing.TB, extra ...string) *Server {
	t.Helper()
	s, err := startServer(extra, nil, 0)
	if err != nil {
		t.Fatalf("redistest: %v", err)
	}
	t.Cleanup(s.Stop)
	return s
}

// StartWithPassword starts a private redis-server (as Start) whose
// default user needs password, and returns it with an operator's client:
// logged in as an ACL user of its own with every right, so that it goes
// on working while the test changes the default user's password (CONFIG
// SET requirepass) or disables it. The client is closed at the end of
// the test.
func StartWithPassword(t testing.TB, password string) (*Server, *redis.Client) {
	t.Helper()
	s := Start(t, "--requirepass", password)
	boot := redis.NewClient(&redis.Options{Addr: s.Addr(), Password: password, DisableIdentity: true})
	defer boot.Close()
	if err := boot.Do(context.Background(), "ACL", "SETUSER", "operator", "on", ">operatorpw", "~*", "&*", "+@all").Err(); err != nil {
		t.Fatalf("redistest: operator user: %v", err)
	}
	admin := redis.NewClient(&redis.Options{Addr: s.Addr(), Username: "operator", Password: "operatorpw", DisableIdentity: true})
	t.Cleanup(func() { admin.Close() })
	return s, admin
}

// StartPersistent is Start for a server that keeps its data across Stop
// and Restart: an append-only file in its directory, fsynced before each
// write is acknowledged (appendfsync always), so that whatever Redis
// acknowledged survives a kill and the restart that follows.
func StartPersistent(t testing.TB, extra ...string) *Server {
	t.Helper()
	return Start(t, append([]string{"--appendonly", "yes", "--appendfsync", "always"}, extra...)...)
}

// startServer starts a redis-server on a free port: its plain port, or
// with ca, its TLS port (and no plain one); with a busOffset, a port
// whose port+busOffset is free too (a cluster node's bus). A port another
// process took first is given up for another one.
func startServer(extra []string, ca *CA, busOffset int) (*Server, error) {
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		return nil, fmt.Errorf("redis-server not found in PATH: %w", err)
	}
	for attempt := 1; ; attempt++ {
		s, err := startServerOnce(bin, extra, ca, busOffset)
		if err == nil || attempt == 3 {
			return s, err
		}
	}
}

func startServerOnce(bin string, extra []string, ca *CA, busOffset int) (*Server, error) {
	port, err := quietPort(busOffset)
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "redistest-")
	if err != nil {
		return nil, err
	}
	s := &Server{Port: port, Dir: dir, ca: ca}
	s.args = []string{"--port", strconv.Itoa(port)}
	if ca != nil {
		s.args = append([]string{"--port", "0", "--tls-port", strconv.Itoa(port)}, ca.serverArgs()...)
	}
	s.args = append(s.args, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir)
	s.args = append(s.args, extra...)
	if err := s.launch(bin); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	mu.Lock()
	servers = append(servers, s)
	mu.Unlock()
	return s, nil
}

// launch starts the server and waits until it answers. It fails if the
// process exits first (its port was taken after FreePort checked it) or
// if the Redis answering on its port is another process.
func (s *Server) launch(bin string) error {
	cmd := exec.Command(bin, s.args...)
	if err := cmd.Start(); err != nil {
		return err
	}
	s.cmd = cmd
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if exited(cmd.Process.Pid) {
			s.Stop()
			return fmt.Errorf("redis-server on port %d exited as it started: was the port taken?", s.Port)
		}
		// Until the port accepts, a plain dial: go-redis would log each
		// refused dial ("failed to dial") into the test's output.
		c, err := net.DialTimeout("tcp", s.Options().Addr, 200*time.Millisecond)
		if err != nil {
			time.Sleep(20 * time.Millisecond)
			continue
		}
		c.Close()
		switch pid, err := s.pid(); {
		case err == nil && pid == cmd.Process.Pid:
			return nil
		case err == nil:
			s.Stop()
			return fmt.Errorf("port %d is served by another redis-server (pid %d)", s.Port, pid)
		}
		time.Sleep(20 * time.Millisecond)
	}
	s.Stop()
	return fmt.Errorf("redis-server on port %d did not answer", s.Port)
}

// exited reports whether the child process pid has exited (a zombie
// until Stop waits for it), without waiting for it: a goroutine blocked
// in Wait would count as a leak in the tests that look for them.
func exited(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		_, noProc := os.Stat("/proc/self/stat")
		return os.IsNotExist(err) && noProc == nil // no /proc: cannot tell
	}
	// pid (comm) state ...: comm may hold spaces and parentheses.
	i := bytes.LastIndexByte(b, ')')
	return i >= 0 && i+2 < len(b) && b[i+2] == 'Z'
}

// pid asks the Redis answering on the server's port for its process id,
// logged in with the --requirepass of the server's arguments if any.
func (s *Server) pid() (int, error) {
	o := s.Options()
	o.DialTimeout, o.ReadTimeout, o.WriteTimeout = 200*time.Millisecond, 200*time.Millisecond, 200*time.Millisecond
	o.MaxRetries = -1
	for i, a := range s.args {
		if a == "--requirepass" && i+1 < len(s.args) {
			o.Password = s.args[i+1]
		}
	}
	c := redis.NewClient(o)
	defer c.Close()
	info, err := c.Info(context.Background(), "server").Result()
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(info, "\r\n") {
		if v, ok := strings.CutPrefix(line, "process_id:"); ok {
			return strconv.Atoi(v)
		}
	}
	return 0, fmt.Errorf("no process_id in INFO server")
}

// Stop kills the server. It keeps nothing, unless it was started with
// StartPersistent.
func (s *Server) Stop() {
	if s.cmd != nil {
		_ = s.cmd.Process.Kill()
		_, _ = s.cmd.Process.Wait()
		s.cmd = nil
	}
}

// Restart starts the server again on the same port and directory: empty,
// or, for a server started with StartPersistent, with the data it had.
func (s *Server) Restart(t testing.TB) {
	t.Helper()
	s.Stop()
	bin, _ := exec.LookPath("redis-server")
	if err := s.launch(bin); err != nil {
		t.Fatalf("redistest: restart: %v", err)
	}
}

// Main runs a package's tests, then stops the servers they started and
// exits with the tests' status (Finish): TestMain's whole body where
// nothing else needs cleaning up.
func Main(m *testing.M) { os.Exit(Finish(m.Run())) }

// Finish stops the servers the tests started and returns the status to
// exit with, given the tests' own, code: tests that passed fail the run
// if they left a goroutine running (goleak), since every test stops what
// it started, so that a component that leaks one per use shows up here.
// For a TestMain with more to clean up than Main does.
func Finish(code int) int {
	StopAll()
	if code == 0 {
		if err := findLeaks(); err != nil {
			fmt.Fprintf(os.Stderr, "redistest: goroutines left running after the tests: %v\n", err)
			return 1
		}
	}
	return code
}

// findLeaks is goleak.Find given up to 3 s more: goleak itself waits
// about half a second, and a go-redis client closed while it was
// dialling a node the test had stopped leaves its dialler asleep for up
// to a second (its pool retries a failed dial every second, and looks
// at whether it was closed only then). A goroutine left running for good
// is still there after it.
func findLeaks() error {
	err := goleak.Find()
	for i := 0; err != nil && i < 3; i++ {
		time.Sleep(time.Second)
		err = goleak.Find()
	}
	return err
}

// StopAll stops every server this process started; call it from TestMain.
func StopAll() {
	mu.Lock()
	defer mu.Unlock()
	for _, s := range servers {
		s.Stop()
		os.RemoveAll(filepath.Clean(s.Dir))
	}
	servers = nil
}
