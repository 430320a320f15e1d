package e2e

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
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

	"github.com/gorilla/websocket"

	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

var (
	buildOnce sync.Once
	binDir    string
	buildErr  error
)

// binaries builds bin/ingress and bin/egress once per test process.
func binaries(t testing.TB) (ingress, egress string) {
	t.Helper()
	buildOnce.Do(func() {
		binDir, buildErr = os.MkdirTemp("", "wsrelay-e2e-bin-")
		if buildErr != nil {
			return
		}
		_, file, _, _ := runtime.Caller(0)
		root := filepath.Dir(filepath.Dir(file))
		for _, f := range []string{"ingress", "egress"} {
			// The tags the Makefile builds each function with.
			tags := map[string]string{"ingress": "nomsgpack,nethttpomithttp2", "egress": "nethttpomithttp2"}[f]
			cmd := exec.Command("go", "build", "-race", "-tags="+tags, "-o", filepath.Join(binDir, f), "./functions/"+f)
			cmd.Dir = root
			if out, err := cmd.CombinedOutput(); err != nil {
				buildErr = fmt.Errorf("build %s: %v\n%s", f, err, out)
				return
			}
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return filepath.Join(binDir, "ingress"), filepath.Join(binDir, "egress")
}

// proc is a function running as its own process.
type proc struct {
	t    testing.TB
	name string
	cmd  *exec.Cmd
	URL  string // http://127.0.0.1:port
	mu   sync.Mutex
	logs bytes.Buffer
	done chan struct{}
}

// env is a set of environment variables for a function.
type env map[string]string

// start runs the function binary ("ingress" or "egress") with env, on a
// free port, and waits for /healthz.
func start(t testing.TB, fn string, e env) *proc {
	t.Helper()
	return startOn(t, fn, e, 0)
}

// startOn is start on port, or on a free one for 0: a test that stops an
// instance starts it again where its clients (or a proxy) look for it.
func startOn(t testing.TB, fn string, e env, port int) *proc {
	t.Helper()
	ing, eg := binaries(t)
	bin := ing
	if fn == "egress" {
		bin = eg
	}
	if port == 0 {
		var err error
		if port, err = redistest.FreePort(); err != nil {
			t.Fatal(err)
		}
	}
	p := &proc{t: t, name: fn, URL: "http://127.0.0.1:" + strconv.Itoa(port), done: make(chan struct{})}
	p.cmd = exec.Command(bin)
	p.cmd.Env = append(os.Environ(), "PORT="+strconv.Itoa(port), "LOG_FORMAT=json", "LOG_LEVEL=debug")
	for k, v := range e {
		p.cmd.Env = append(p.cmd.Env, k+"="+v)
	}
	out, _ := p.cmd.StdoutPipe()
	p.cmd.Stderr = p.cmd.Stdout
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(out)
		sc.Buffer(make([]byte, 64*1024), 1<<20)
		for sc.Scan() {
			p.mu.Lock()
			p.logs.Write(sc.Bytes())
			p.logs.WriteByte('\n')
			p.mu.Unlock()
		}
		_ = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.kill()
		if t.Failed() {
			t.Logf("%s logs:\n%s", fn, p.Logs())
		}
	})
	testkit.Eventually(t, 15*time.Second, func() error {
		select {
		case <-p.done:
			return fmt.Errorf("%s exited: %s", fn, p.Logs())
		default:
		}
		return httpStatus(p.URL+"/healthz", 200)
	})
	return p
}

// Logs returns what the process has written so far.
func (p *proc) Logs() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.logs.String()
}

func (p *proc) kill() {
	if p.cmd.Process != nil {
		_ = p.cmd.Process.Kill()
	}
	<-p.done
}

// term sends SIGTERM and waits up to d for the process to exit.
func (p *proc) term(d time.Duration) error {
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return nil
	case <-time.After(d):
		return fmt.Errorf("%s did not exit within %s", p.name, d)
	}
}

func (p *proc) wsURL(query string) string {
	return "ws" + strings.TrimPrefix(p.URL, "http") + "/ws?" + query
}

func httpStatus(url string, want int) error {
	resp, err := http.Get(url)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != want {
		return fmt.Errorf("GET %s: %d, want %d", url, resp.StatusCode, want)
	}
	return nil
}

// post sends a JSON body and decodes the JSON answer.
func post(t testing.TB, url string, body any, out any) int {
	t.Helper()
	st, rb := postRaw(t, url, body)
	if out != nil {
		if err := json.Unmarshal(rb, out); err != nil {
			t.Fatalf("POST %s: %d %s", url, st, rb)
		}
	}
	return st
}

// postAccepted is post for a request the test needs answered 2xx (a
// publish before the test waits for its delivery): any other answer
// fails the test here, with its status and body, so that a 503 on a
// loaded machine reads as a 503, not as a message that never arrived.
func postAccepted(t testing.TB, url string, body any, out any) {
	t.Helper()
	st, rb := postRaw(t, url, body)
	if st < 200 || st > 299 {
		t.Fatalf("POST %s: %d %s, want 2xx", url, st, rb)
	}
	if out != nil {
		if err := json.Unmarshal(rb, out); err != nil {
			t.Fatalf("POST %s: %d %s", url, st, rb)
		}
	}
}

// postRaw sends a JSON body and returns the status and body of the answer.
func postRaw(t testing.TB, url string, body any) (int, []byte) {
	t.Helper()
	b, _ := json.Marshal(body)
	resp, err := http.Post(url, "application/json", bytes.NewReader(b))
	if err != nil {
		t.Fatalf("POST %s: %v", url, err)
	}
	defer resp.Body.Close()
	rb, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, rb
}

// postQuiet is post for background goroutines: it reports failure as
// status 0 instead of failing the test.
func postQuiet(url string, body any, out any) int {
	b, _ := json.Marshal(body)
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Post(url, "application/json", bytes.NewReader(b))
	if err != nil {
		return 0
	}
	defer resp.Body.Close()
	rb, _ := io.ReadAll(resp.Body)
	if out != nil && json.Unmarshal(rb, out) != nil {
		return 0
	}
	return resp.StatusCode
}

func getJSON(t testing.TB, url string, out any) int {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	rb, _ := io.ReadAll(resp.Body)
	if out != nil && resp.StatusCode == 200 {
		if err := json.Unmarshal(rb, out); err != nil {
			t.Fatalf("GET %s: %s", url, rb)
		}
	}
	return resp.StatusCode
}

// frame is any server frame.
type frame struct {
	Type         string          `json:"type"`
	ConnectionID string          `json:"connection_id"`
	User         string          `json:"user"`
	Instance     string          `json:"instance"`
	Channel      string          `json:"channel"`
	Target       string          `json:"target"`
	ID           string          `json:"id"`
	Event        string          `json:"event"`
	From         string          `json:"from"`
	Data         json.RawMessage `json:"data"`
	Recovered    *bool           `json:"recovered"`
	Position     string          `json:"position"`
	Code         string          `json:"code"`
	Message      string          `json:"message"`
}

// wsClient is a minimal test client: it collects frames in order.
type wsClient struct {
	t         testing.TB
	ws        *websocket.Conn
	mu        sync.Mutex
	frames    []frame
	closed    chan struct{}
	closeCode int
	closeText string // the close frame's reason
	welcome   frame
}

func dial(t testing.TB, url string) *wsClient {
	t.Helper()
	ws, resp, err := websocket.DefaultDialer.Dial(url, nil)
	if err != nil {
		status := 0
		if resp != nil {
			status = resp.StatusCode
		}
		t.Fatalf("dial %s: %v (status %d)", url, err, status)
	}
	c := &wsClient{t: t, ws: ws, closed: make(chan struct{})}
	go c.read()
	t.Cleanup(func() { ws.Close(); <-c.closed })
	c.welcome = c.waitFrame(func(f frame) bool { return f.Type == "welcome" })
	return c
}

func (c *wsClient) read() {
	defer close(c.closed)
	for {
		_, b, err := c.ws.ReadMessage()
		if err != nil {
			if ce, ok := err.(*websocket.CloseError); ok {
				c.mu.Lock()
				c.closeCode, c.closeText = ce.Code, ce.Text
				c.mu.Unlock()
			}
			return
		}
		var f frame
		if err := json.Unmarshal(b, &f); err != nil {
			c.t.Errorf("bad frame %s", b)
			continue
		}
		c.mu.Lock()
		c.frames = append(c.frames, f)
		c.mu.Unlock()
	}
}

func (c *wsClient) send(v any) {
	b, _ := json.Marshal(v)
	if err := c.ws.WriteMessage(websocket.TextMessage, b); err != nil {
		c.t.Fatalf("send: %v", err)
	}
}

// waitFrame waits for the first frame matching ok.
func (c *wsClient) waitFrame(ok func(frame) bool) frame {
	c.t.Helper()
	var got frame
	testkit.Eventually(c.t, 10*time.Second, func() error {
		c.mu.Lock()
		defer c.mu.Unlock()
		for _, f := range c.frames {
			if ok(f) {
				got = f
				return nil
			}
		}
		return fmt.Errorf("no such frame among %d", len(c.frames))
	})
	return got
}

func (c *wsClient) subscribe(ch string) {
	c.t.Helper()
	c.send(map[string]any{"type": "subscribe", "channel": ch})
	c.waitFrame(func(f frame) bool { return f.Type == "subscribed" && f.Channel == ch })
}

// messages returns the message frames received so far, optionally of one
// channel.
func (c *wsClient) messages(ch string) []frame {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []frame
	for _, f := range c.frames {
		if f.Type == "message" && (ch == "" || f.Channel == ch) {
			out = append(out, f)
		}
	}
	return out
}

// waitMessages waits until n messages of channel ch arrived.
func (c *wsClient) waitMessages(ch string, n int) []frame {
	c.t.Helper()
	testkit.Eventually(c.t, 15*time.Second, func() error {
		if got := len(c.messages(ch)); got < n {
			return fmt.Errorf("%d of %d messages on %q", got, n, ch)
		}
		return nil
	})
	return c.messages(ch)
}

// checkSequence asserts got carries exactly the ids want, in order.
func checkSequence(t testing.TB, who string, got []frame, want []string) {
	t.Helper()
	if len(got) != len(want) {
		ids := make([]string, len(got))
		for i := range got {
			ids[i] = got[i].ID
		}
		lost, dup := compare(ids, want)
		t.Fatalf("%s: got %d messages, want %d (lost %d, duplicated %d): %s", who, len(got), len(want), lost, dup, diff(ids, want))
	}
	for i := range want {
		if got[i].ID != want[i] {
			t.Fatalf("%s: message %d has id %s, want %s", who, i, got[i].ID, want[i])
		}
	}
}

// diff describes the first difference between got and want.
func diff(got, want []string) string {
	for i := range min(len(got), len(want)) {
		if got[i] != want[i] {
			lo := max(0, i-2)
			return fmt.Sprintf("first difference at %d: got %v, want %v", i, got[lo:min(len(got), i+3)], want[lo:min(len(want), i+3)])
		}
	}
	if len(got) > len(want) {
		return fmt.Sprintf("extra at the end: %v", got[len(want):])
	}
	return fmt.Sprintf("missing at the end: %v", want[len(got):])
}

// quietPort is redistest.FreePort for a function's port, failing the
// test when none is free: a port below the ephemeral range, for a server
// started well after the port was picked (make run builds both functions
// first) or started again on it (the chaos test's egresses).
func quietPort(t testing.TB) int {
	t.Helper()
	p, err := redistest.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	return p
}
