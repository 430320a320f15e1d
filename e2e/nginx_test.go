package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/wsrelay/wsrelay/shared/auth"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// nginxPath finds nginx; under CI its absence fails the test (make deps
// installs Debian's nginx), elsewhere it skips. Debian puts it in
// /usr/sbin, which is not on an ordinary user's PATH.
func nginxPath(t *testing.T) string {
	t.Helper()
	if p, err := exec.LookPath("nginx"); err == nil {
		return p
	}
	for _, p := range []string{"/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"} {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("nginx not found: install it (apt-get install -y nginx)")
	}
	t.Skip("nginx not found (apt-get install -y nginx); this test runs under CI")
	return ""
}

// shippedNginxConf is deploy/nginx/wsrelay.conf.
func shippedNginxConf(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot(t), "deploy", "nginx", "wsrelay.conf"))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// renderNginxConf is the shipped file with only the upstream addresses
// (the ports of the systemd units) and the listen port replaced.
func renderNginxConf(t *testing.T, conf, ingressAddr, egressAddr string, port int) string {
	t.Helper()
	for _, r := range []struct{ old, new string }{
		{"server 127.0.0.1:8080;", "server " + ingressAddr + ";"},
		{"server 127.0.0.1:8081;", "server " + egressAddr + ";"},
		{"listen 80;", "listen 127.0.0.1:" + strconv.Itoa(port) + ";"},
	} {
		if n := strings.Count(conf, r.old); n != 1 {
			t.Fatalf("deploy/nginx/wsrelay.conf has %q %d times, want once: update this test with the file", r.old, n)
		}
		conf = strings.Replace(conf, r.old, r.new, 1)
	}
	return conf
}

// startNginx runs nginx in the foreground with the shipped file included
// in an http block, as /etc/nginx/conf.d/ would, with its pid, logs and
// temporary files under a test directory. It returns nginx's address.
func startNginx(t *testing.T, ingressAddr, egressAddr string) string {
	t.Helper()
	bin := nginxPath(t)
	dir := t.TempDir()
	port, err := redistest.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	site := filepath.Join(dir, "wsrelay.conf")
	if err := os.WriteFile(site, []byte(renderNginxConf(t, shippedNginxConf(t), ingressAddr, egressAddr, port)), 0o644); err != nil {
		t.Fatal(err)
	}
	user := ""
	if os.Geteuid() == 0 {
		// Workers would run as nobody, who cannot enter the test's
		// directory (0700) to buffer request bodies.
		user = "user root;"
	}
	var tmp []string
	for _, k := range []string{"client_body", "proxy", "fastcgi", "uwsgi", "scgi"} {
		tmp = append(tmp, fmt.Sprintf("%s_temp_path %s;", k, filepath.Join(dir, k)))
	}
	top := fmt.Sprintf(`%s
worker_processes 1;
pid %s;
events { worker_connections 256; }
http {
    access_log %s;
    %s
    include %s;
}
`, user, filepath.Join(dir, "nginx.pid"), filepath.Join(dir, "access.log"), strings.Join(tmp, "\n    "), site)
	conf := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(conf, []byte(top), 0o644); err != nil {
		t.Fatal(err)
	}
	errorLog := filepath.Join(dir, "error.log")
	args := []string{"-p", dir, "-c", conf, "-e", errorLog}

	// nginx -t names a bad directive; a warning is a defect of the file too.
	out, err := exec.Command(bin, append(args, "-t")...).CombinedOutput()
	if err != nil || bytes.Contains(out, []byte("[warn]")) {
		t.Fatalf("nginx -t: %v\n%s", err, out)
	}

	cmd := exec.Command(bin, append(args, "-g", "daemon off;")...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	var logs bytes.Buffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		// SIGTERM: the master stops its workers; they would outlive a
		// killed master, so the group is killed if it does not.
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-done
		}
		if t.Failed() {
			el, _ := os.ReadFile(errorLog)
			t.Logf("nginx output:\n%s\nerror.log:\n%s", logs.String(), el)
		}
	})
	addr := "127.0.0.1:" + strconv.Itoa(port)
	testkit.Eventually(t, 10*time.Second, func() error {
		select {
		case <-done:
			return fmt.Errorf("nginx exited: %s", logs.String())
		default:
		}
		c, err := net.Dial("tcp", addr)
		if err != nil {
			return err
		}
		return c.Close()
	})
	return addr
}

// clientFrom is an HTTP client whose connections come from the loopback
// address ip (127.0.0.0/8 is all local on Linux), so that nginx sees a
// client address other than its own.
func clientFrom(ip string) *http.Client {
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}, Timeout: 5 * time.Second}
	return &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{DialContext: d.DialContext}}
}

// postVia posts a raw JSON body with c, with extra headers, and returns
// the status and body.
func postVia(t *testing.T, c *http.Client, url string, body []byte, hdr map[string]string) (int, []byte) {
	t.Helper()
	req, err := http.NewRequest("POST", url, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("POST %s: %v", url, err)
	}
	defer resp.Body.Close()
	rb, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, rb
}

// readmeDefault is a variable's default in README.md's configuration
// tables.
func readmeDefault(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot(t), "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile("(?m)^\\| `" + regexp.QuoteMeta(name) + "` \\| `([^`]*)` \\|").FindSubmatch(b)
	if m == nil {
		t.Fatalf("README.md has no default for %s", name)
	}
	return string(m[1])
}

// nginxBlock is the body of the block that opens with head ("location =
// /ws"), up to its closing brace.
func nginxBlock(t *testing.T, conf, head string) string {
	t.Helper()
	i := strings.Index(conf, head+" {")
	if i < 0 {
		t.Fatalf("deploy/nginx/wsrelay.conf has no %q block", head)
	}
	body := conf[i+len(head)+2:]
	depth := 1
	for j, r := range body {
		switch r {
		case '{':
			depth++
		case '}':
			if depth--; depth == 0 {
				return body[:j]
			}
		}
	}
	t.Fatalf("%q block is not closed", head)
	return ""
}

// nginxDirective is the value of a directive in block, "" if absent.
func nginxDirective(block, name string) string {
	m := regexp.MustCompile(`(?m)^\s*` + regexp.QuoteMeta(name) + `\s+([^;]+);`).FindStringSubmatch(block)
	if m == nil {
		return ""
	}
	return strings.TrimSpace(m[1])
}

// nginxTime parses an nginx time ("60", "90s", "1h", "1h 30m").
func nginxTime(t *testing.T, v string) time.Duration {
	t.Helper()
	units := map[string]time.Duration{"": time.Second, "ms": time.Millisecond, "s": time.Second, "m": time.Minute, "h": time.Hour, "d": 24 * time.Hour}
	if !regexp.MustCompile(`^(\d+(ms|s|m|h|d)?\s*)+$`).MatchString(v) {
		t.Fatalf("nginx time %q does not parse", v)
	}
	var d time.Duration
	for _, p := range regexp.MustCompile(`(\d+)(ms|s|m|h|d)?`).FindAllStringSubmatch(v, -1) {
		n, _ := strconv.Atoi(p[1])
		d += time.Duration(n) * units[p[2]]
	}
	return d
}

// TestNginxWebSocketTimeouts reads the shipped file's /ws timeouts: the
// egress keeps an idle socket busy with a ping every PING_INTERVAL, so
// nginx must wait well beyond that (its default, 60 s, is not much above
// the 25 s default); IDLE_TIMEOUT is off by default, so nothing else keeps
// a socket shorter.
func TestNginxWebSocketTimeouts(t *testing.T) {
	ws := nginxBlock(t, shippedNginxConf(t), "location = /ws")
	ping, err := time.ParseDuration(readmeDefault(t, "PING_INTERVAL"))
	if err != nil {
		t.Fatal(err)
	}
	if d := readmeDefault(t, "IDLE_TIMEOUT"); d != "0s" {
		t.Fatalf("README: IDLE_TIMEOUT defaults to %s; this test assumes 0s (off)", d)
	}
	for _, k := range []string{"proxy_read_timeout", "proxy_send_timeout"} {
		v := nginxDirective(ws, k)
		if v == "" {
			t.Errorf("location = /ws does not set %s: nginx's 60 s default cuts a socket whose pings are late", k)
			continue
		}
		if d := nginxTime(t, v); d < 4*ping {
			t.Errorf("location = /ws: %s %s is not well above PING_INTERVAL's default %s", k, d, ping)
		}
	}
}

// TestNginxFrontsBothFunctions runs the shipped nginx file with real nginx
// in front of both functions and checks what docs/deployment.md promises:
// publish over HTTP and receive over WebSocket through it, on one origin;
// pings and pongs pass; the ingress sees the client's address, not
// nginx's (CLIENT_IP_HEADER=X-Forwarded-For); a batch body of
// MAX_BATCH_BYTES passes, and a larger one gets the ingress's own 413;
// the internal endpoints are not routed.
func TestNginxFrontsBothFunctions(t *testing.T) {
	nginxPath(t) // skip before starting anything
	maxBatch, err := strconv.Atoi(readmeDefault(t, "MAX_BATCH_BYTES"))
	if err != nil {
		t.Fatal(err)
	}
	maxItems, err := strconv.Atoi(readmeDefault(t, "MAX_BATCH_ITEMS"))
	if err != nil {
		t.Fatal(err)
	}
	redisURL := redistest.URL(t)
	// Its keys (a 4 MiB batch among them) are deleted at the end, after
	// the functions have stopped (cleanups run last registered first).
	_, prefix := redistest.Client(t)
	ing := start(t, "ingress", env{
		"REDIS_URL": redisURL, "REDIS_KEY_PREFIX": prefix, "ALLOW_ANONYMOUS": "true",
		"CLIENT_IP_HEADER": "X-Forwarded-For",
		// One full batch per client address, refilled in about 11 days.
		"PUBLISH_RATE_PER_IP": "0.001", "PUBLISH_BURST_PER_IP": strconv.Itoa(maxItems),
		"JWT_SECRET": nginxSecret,
	})
	eg := start(t, "egress", env{
		"REDIS_URL": redisURL, "REDIS_KEY_PREFIX": prefix, "ALLOW_ANONYMOUS": "true",
		"PING_INTERVAL": "300ms", "JWT_SECRET": nginxSecret,
	})
	addr := startNginx(t, strings.TrimPrefix(ing.URL, "http://"), strings.TrimPrefix(eg.URL, "http://"))
	base := "http://" + addr
	// A page nginx serves (the demo page at /) opens its socket and
	// publishes on nginx's origin; ALLOWED_ORIGINS is empty: same host.
	pageOrigin := base

	var pings, pongs atomic.Int64
	sub := dialVia(t, "ws://"+addr+"/ws?channels=room", http.Header{"Origin": {pageOrigin}}, &pings, &pongs)
	sub.waitFrame(func(f frame) bool { return f.Type == "subscribed" && f.Channel == "room" })

	local := clientFrom("127.0.0.1")
	publish := func(c *http.Client, n int, hdr map[string]string) (int, string) {
		t.Helper()
		h := map[string]string{"Origin": pageOrigin}
		for k, v := range hdr {
			h[k] = v
		}
		st, body := postVia(t, c, base+"/v1/channels/room/messages", fmt.Appendf(nil, `{"data":{"n":%d}}`, n), h)
		var res struct{ ID string }
		_ = json.Unmarshal(body, &res)
		if st == 202 && res.ID == "" {
			t.Fatalf("publish %d: 202 without an id: %s", n, body)
		}
		return st, res.ID
	}

	t.Run("publish and receive on one origin", func(t *testing.T) {
		st, id := publish(local, 1, nil)
		if st != 202 {
			t.Fatalf("publish through nginx: %d", st)
		}
		got := sub.waitMessages("room", 1)
		checkSequence(t, "subscriber", got, []string{id})
	})

	t.Run("pings and pongs pass", func(t *testing.T) {
		// The egress drops a peer silent for 2×PING_INTERVAL (600 ms):
		// the socket outlives several of those only if our pongs reach
		// it, and counts pings only if its pings reach us.
		before := pings.Load()
		time.Sleep(3 * time.Second)
		select {
		case <-sub.closed:
			sub.mu.Lock()
			defer sub.mu.Unlock()
			t.Fatalf("socket closed while idle (code %d)", sub.closeCode)
		default:
		}
		if n := pings.Load() - before; n < 5 {
			t.Fatalf("%d pings in 3 s at PING_INTERVAL=300ms", n)
		}
		// And the other way: the egress answers a client's ping.
		if err := sub.ws.WriteControl(websocket.PingMessage, []byte("p"), time.Now().Add(time.Second)); err != nil {
			t.Fatal(err)
		}
		testkit.Eventually(t, 5*time.Second, func() error {
			if pongs.Load() == 0 {
				return fmt.Errorf("no pong to our ping")
			}
			return nil
		})
		n := len(sub.messages("room"))
		if st, _ := publish(local, 2, nil); st != 202 {
			t.Fatalf("publish after idle: %d", st)
		}
		sub.waitMessages("room", n+1)
	})

	t.Run("a batch of MAX_BATCH_BYTES passes; the client address is the client's", func(t *testing.T) {
		if runtime.GOOS != "linux" {
			t.Skip("needs 127.0.0.2 and 127.0.0.3 as client addresses, which only Linux has without setup")
		}
		// On a channel nobody here reads: 4 MiB queued to sub (nginx and
		// the kernel buffer it, so the egress's write ends long before
		// the client has read it) held the answer to the egress's next
		// ping beyond 2×PING_INTERVAL on a loaded machine, and the
		// socket was dropped as "missed pong" before the token subtest.
		body := batchOfSize(t, maxBatch, maxItems, "bulk")
		a := clientFrom("127.0.0.2")
		st, rb := postVia(t, a, base+"/v1/messages", body, map[string]string{"Origin": pageOrigin})
		if st != 202 {
			t.Fatalf("batch of %d bytes through nginx: %d %.300s", len(body), st, rb)
		}
		// 127.0.0.2's bucket is now empty, whatever it claims to be.
		for _, xff := range []string{"", "198.51.100.7", "198.51.100.7, 127.0.0.3"} {
			h := map[string]string{}
			if xff != "" {
				h["X-Forwarded-For"] = xff
			}
			if st, _ := publish(a, 3, h); st != 429 {
				t.Fatalf("publish from 127.0.0.2 (X-Forwarded-For %q) after its burst: %d, want 429", xff, st)
			}
		}
		// Other clients have their own: had the ingress keyed nginx's
		// address, they would share 127.0.0.2's.
		for _, ip := range []string{"127.0.0.1", "127.0.0.3"} {
			if st, _ := publish(clientFrom(ip), 4, nil); st != 202 {
				t.Fatalf("publish from %s: %d, want 202 (its own bucket)", ip, st)
			}
		}
	})

	t.Run("a larger body gets the ingress's 413", func(t *testing.T) {
		body := append(batchOfSize(t, maxBatch, maxItems, "bulk"), ' ')
		st, rb := postVia(t, clientFrom("127.0.0.4"), base+"/v1/messages", body, map[string]string{"Origin": pageOrigin})
		var e struct{ Error struct{ Code string } }
		if st != 413 || json.Unmarshal(rb, &e) != nil || e.Error.Code != "payload_too_large" {
			t.Fatalf("batch of %d bytes through nginx: %d %.200s, want the ingress's 413 payload_too_large", len(body), st, rb)
		}
	})

	t.Run("a token of the largest size passes", func(t *testing.T) {
		// Its header line is longer than nginx's default 8k buffer.
		tok := largestToken(t, "big")
		n := len(sub.messages("room"))
		st, id := publish(local, 5, map[string]string{"Authorization": "Bearer " + tok})
		if st != 202 {
			t.Fatalf("publish with a %d-byte token through nginx: %d", len(tok), st)
		}
		if got := sub.waitMessages("room", n+1)[n]; got.ID != id || got.From != "big" {
			t.Fatalf("delivered %s from %q, want %s from big", got.ID, got.From, id)
		}
		if w := dialToken(t, "ws://"+addr+"/ws", tok, http.Header{"Origin": {pageOrigin}}).welcome; w.User != "big" {
			t.Fatalf("welcome for user %q, want big", w.User)
		}
	})

	t.Run("routes", func(t *testing.T) {
		for path, want := range map[string]int{"/": 200, "/client.js": 200, "/metrics": 404, "/healthz": 404, "/readyz": 404} {
			if err := httpStatus(base+path, want); err != nil {
				t.Error(err)
			}
		}
	})
}

const nginxSecret = "nginx-test-secret-0123456789abcdef"

// largestToken mints a token for sub, allowed every channel, of exactly
// auth.MaxTokenBytes bytes: the longest either function takes.
func largestToken(t *testing.T, sub string) string {
	t.Helper()
	for n := 1; n < auth.MaxTokenBytes; n++ {
		// Padding patterns of up to 100 characters; "*" comes first.
		chans := []string{"*"}
		for rest := n; rest > 0; rest -= 100 {
			chans = append(chans, "pad-"+strings.Repeat("x", min(rest, 100)))
		}
		tok, err := auth.SignHS256(nginxSecret, auth.Claims{Subject: sub, Channels: chans, Publish: []string{"*"}, Expires: time.Now().Add(time.Hour)})
		if err != nil {
			t.Fatal(err)
		}
		if len(tok) == auth.MaxTokenBytes {
			return tok
		}
	}
	t.Fatalf("no padding makes a token of %d bytes", auth.MaxTokenBytes)
	return ""
}

// batchOfSize is a POST /v1/messages body of exactly size bytes in items
// messages to channel.
func batchOfSize(t *testing.T, size, items int, channel string) []byte {
	t.Helper()
	item := func(pad int) string {
		return fmt.Sprintf(`{"channel":%q,"data":%q}`, channel, strings.Repeat("x", pad))
	}
	empty := len(`{"messages":[]}`) + (items-1)*len(",") + items*len(item(0))
	per := (size - empty) / items
	var b bytes.Buffer
	b.WriteString(`{"messages":[`)
	for i := range items {
		if i > 0 {
			b.WriteByte(',')
		}
		pad := per
		if i == items-1 {
			pad += (size - empty) % items
		}
		b.WriteString(item(pad))
	}
	b.WriteString(`]}`)
	if b.Len() != size {
		t.Fatalf("batch is %d bytes, want %d", b.Len(), size)
	}
	return b.Bytes()
}

// dialVia is dial with request headers, counting the server's pings (and
// answering them, as a browser does) and its pongs.
func dialVia(t *testing.T, url string, hdr http.Header, pings, pongs *atomic.Int64) *wsClient {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ws, resp, err := websocket.DefaultDialer.DialContext(ctx, url, hdr)
	if err != nil {
		status := 0
		if resp != nil {
			status = resp.StatusCode
		}
		t.Fatalf("dial %s: %v (status %d)", url, err, status)
	}
	ws.SetPingHandler(func(data string) error {
		pings.Add(1)
		return ws.WriteControl(websocket.PongMessage, []byte(data), time.Now().Add(time.Second))
	})
	ws.SetPongHandler(func(string) error {
		pongs.Add(1)
		return nil
	})
	c := &wsClient{t: t, ws: ws, closed: make(chan struct{})}
	go c.read()
	t.Cleanup(func() { ws.Close(); <-c.closed })
	c.welcome = c.waitFrame(func(f frame) bool { return f.Type == "welcome" })
	return c
}
