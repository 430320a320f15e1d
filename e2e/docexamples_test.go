package e2e

// TestDocExamples runs the examples of README.md and docs/*.md against the
// real functions and a real Redis, as a reader would copy them.
//
// The convention: a fenced block with a language (```go, ```js, ```html,
// ```sh, ```json, ```yaml) is an example, and one of the checks below must
// claim it (by its file and a piece of its text that names it), or the
// test fails naming the block. A block without a language is a listing
// (output, a diagram, a log line) and is checked only where a check below
// claims it. A check whose block has gone (rewritten past recognition, or
// moved) fails too, so that no example stops being run unnoticed. No
// marker is needed in the markdown.
//
// What "run" means for each kind:
//   - go: every Go block is put in a function of one program (one go
//     build), its placeholders filled (the example.com URLs, `{ … }` after
//     an error as `{ return err }`, and the application's own functions
//     such as mintToken or handle, defined around it), and run.
//   - js (Node): run with node; html and js for the browser: run in
//     Chromium on a page of the egress, with `import … from` as a dynamic
//     import.
//   - sh: curl commands run with bash against the ingress; `make` lines
//     are checked for their target, variables and flags (they take
//     minutes: TestMakeRun runs `make run`); the systemd lines that write
//     the environment files run in a temporary directory, and the
//     functions start with those files.
//   - json: requests are sent; replies and frames are compared with the
//     real ones by their fields (names, recursively), not their values.
//   - yaml: the block must appear in each deploy/*/serverless.yml.

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/gorilla/websocket"

	"github.com/wsrelay/wsrelay/shared/auth"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// docBlock is one fenced block of a markdown file.
type docBlock struct {
	file    string // relative to the repository root
	line    int    // of the opening fence, 1-based
	lang    string // the info string's first word; "" for a listing
	body    string // without the fences and the fence's indentation
	claimed bool
}

func (b *docBlock) String() string { return fmt.Sprintf("%s:%d (```%s)", b.file, b.line, b.lang) }

var fenceRE = regexp.MustCompile("^( *)```(\\S*)\\s*$")

// readDocBlocks returns every fenced block of README.md and docs/*.md.
func readDocBlocks(t *testing.T, root string) []*docBlock {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(root, "docs", "*.md"))
	files = append([]string{filepath.Join(root, "README.md")}, files...)
	var blocks []*docBlock
	for _, f := range files {
		raw, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		rel, _ := filepath.Rel(root, f)
		var cur *docBlock
		var indent string
		var body []string
		for i, l := range strings.Split(string(raw), "\n") {
			m := fenceRE.FindStringSubmatch(l)
			switch {
			case cur == nil && m != nil:
				cur, indent, body = &docBlock{file: rel, line: i + 1, lang: m[2]}, m[1], nil
			case cur != nil && m != nil && m[2] == "":
				cur.body = strings.Join(body, "\n") + "\n"
				blocks = append(blocks, cur)
				cur = nil
			case cur != nil:
				body = append(body, strings.TrimPrefix(l, indent))
			}
		}
		if cur != nil {
			t.Fatalf("%s: fence not closed", cur)
		}
	}
	return blocks
}

// docExamples finds the blocks the checks claim.
type docExamples struct {
	blocks []*docBlock
}

// claim returns the one block of file in lang whose text holds has (or,
// for a has starting with ^, starts with the rest), and marks it checked.
func (d *docExamples) claim(t *testing.T, file, lang, has string) *docBlock {
	t.Helper()
	var found []*docBlock
	for _, b := range d.blocks {
		prefix, isPrefix := strings.CutPrefix(has, "^")
		if b.file == file && b.lang == lang && (isPrefix && strings.HasPrefix(b.body, prefix) || !isPrefix && strings.Contains(b.body, has)) {
			found = append(found, b)
		}
	}
	if len(found) != 1 {
		t.Fatalf("%s: %d ```%s blocks hold %q, want 1: the example this test runs was changed; update docexamples_test.go with it", file, len(found), lang, has)
	}
	found[0].claimed = true
	return found[0]
}

// claimAll marks and returns every block of lang whose text matches ok.
func (d *docExamples) claimAll(lang string, ok func(*docBlock) bool) []*docBlock {
	var found []*docBlock
	for _, b := range d.blocks {
		if b.lang == lang && ok(b) {
			b.claimed = true
			found = append(found, b)
		}
	}
	return found
}

// sub fills placeholders: each pair is (text in the example, replacement);
// every text must occur.
func sub(t *testing.T, b *docBlock, s string, pairs ...string) string {
	t.Helper()
	for i := 0; i < len(pairs); i += 2 {
		if !strings.Contains(s, pairs[i]) {
			t.Fatalf("%s: no %q to fill in: the example changed; update docexamples_test.go", b, pairs[i])
		}
		s = strings.ReplaceAll(s, pairs[i], pairs[i+1])
	}
	return s
}

// docStack is what the examples run against: one Redis, an ingress with an
// API key and a JWT secret (browser origins allowed), an egress with the
// same secret.
type docStack struct {
	redisURL, prefix, secret, apiKey string
	ingress, egress                  *proc
}

func (s *docStack) wsURL() string { return "ws" + strings.TrimPrefix(s.egress.URL, "http") + "/ws" }

// token mints a user token for sub.
func (s *docStack) token(t *testing.T, sub string, channels, publish []string) string {
	t.Helper()
	tok, err := auth.SignHS256(s.secret, auth.Claims{Subject: sub, Channels: channels, Publish: publish, Expires: time.Now().Add(time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// do sends a request with the API key and returns the status and body.
func (s *docStack) do(t *testing.T, method, path, token, body string) (int, []byte) {
	t.Helper()
	req, _ := http.NewRequest(method, s.ingress.URL+path, strings.NewReader(body))
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

// dialToken opens a socket with the token as the shipped clients send it
// (and the request headers hdr).
func dialToken(t *testing.T, url, token string, hdr http.Header) *wsClient {
	t.Helper()
	d := websocket.Dialer{Subprotocols: []string{"wsrelay", "token." + token}, HandshakeTimeout: 10 * time.Second}
	ws, resp, err := d.Dial(url, hdr)
	if err != nil {
		status := 0
		if resp != nil {
			status = resp.StatusCode
		}
		t.Fatalf("dial with token: %v (status %d)", err, status)
	}
	c := &wsClient{t: t, ws: ws, closed: make(chan struct{})}
	go c.read()
	t.Cleanup(func() { ws.Close(); <-c.closed })
	c.welcome = c.waitFrame(func(f frame) bool { return f.Type == "welcome" })
	return c
}

// checkUserToken checks a token minted by an example for alice, allowed
// room.42 (subscribe and publish): the egress takes it, the ingress
// stamps alice as the sender.
func (s *docStack) checkUserToken(t *testing.T, what, token string) {
	t.Helper()
	c := dialToken(t, s.wsURL(), token, nil)
	if c.welcome.User != "alice" {
		t.Fatalf("%s: welcome for %q, want alice", what, c.welcome.User)
	}
	c.subscribe("room.42")
	st, b := s.do(t, "POST", "/v1/channels/room.42/messages", token, `{"data": {"text": "hi"}, "from": "mallory"}`)
	if st != 202 {
		t.Fatalf("%s: publish with the token: %d %s", what, st, b)
	}
	m := c.waitMessages("room.42", 1)
	if m[len(m)-1].From != "alice" {
		t.Fatalf("%s: delivered from %q, want alice", what, m[len(m)-1].From)
	}
}

// fields describes a JSON value by its object keys, recursively (arrays
// by their first element), to compare an example with a real answer.
func fields(v any) string {
	switch v := v.(type) {
	case map[string]any:
		keys := make([]string, 0, len(v))
		for k := range v {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		parts := make([]string, len(keys))
		for i, k := range keys {
			parts[i] = k + fields(v[k])
		}
		return "{" + strings.Join(parts, " ") + "}"
	case []any:
		if len(v) == 0 {
			return "[]"
		}
		return "[" + fields(v[0]) + "]"
	}
	return ""
}

func mustJSON(t *testing.T, what string, b []byte) any {
	t.Helper()
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatalf("%s is not JSON: %v\n%s", what, err, b)
	}
	return v
}

// sameFields fails unless the example and the real answer have the same
// fields, leaving out the real one's optional ones.
func sameFields(t *testing.T, b *docBlock, doc string, real []byte, optional ...string) {
	t.Helper()
	r := mustJSON(t, "the real answer", real)
	if m, ok := r.(map[string]any); ok {
		for _, k := range optional {
			delete(m, k)
		}
	}
	if d, g := fields(mustJSON(t, b.String(), []byte(doc))), fields(r); d != g {
		t.Fatalf("%s: the example has the fields %s, the real answer %s:\n%s", b, d, g, real)
	}
}

// wildcard turns an example holding "…" into a pattern.
func wildcard(s string) *regexp.Regexp {
	parts := strings.Split(strings.TrimSpace(s), "…")
	for i := range parts {
		parts[i] = regexp.QuoteMeta(parts[i])
	}
	return regexp.MustCompile("^" + strings.Join(parts, ".*") + "$")
}

func TestDocExamples(t *testing.T) {
	_, file, _, _ := runtime.Caller(0)
	root := filepath.Dir(filepath.Dir(file))
	d := &docExamples{blocks: readDocBlocks(t, root)}

	s := &docStack{redisURL: redistest.URL(t), prefix: redistest.Prefix(t), secret: strings.Repeat("0123456789abcdef", 4), apiKey: "doc-examples-key"}
	base := env{"REDIS_URL": s.redisURL, "REDIS_KEY_PREFIX": s.prefix, "JWT_SECRET": s.secret, "REGISTRY_TTL": "3s"}
	s.ingress = start(t, "ingress", merge(base, env{"API_KEYS": s.apiKey, "ALLOWED_ORIGINS": "*"}))
	s.egress = start(t, "egress", base)

	// Every check claims its blocks before it runs, so that the last step
	// sees them all even when one fails.
	checks := []struct {
		name string
		run  func(*testing.T)
	}{
		{"api", func(t *testing.T) { docAPI(t, d, s) }},
		{"protocol", func(t *testing.T) { docProtocol(t, d, s) }},
		{"security", func(t *testing.T) { docSecurity(t, d, s) }},
		{"configuration", func(t *testing.T) { docConfiguration(t, d) }},
		{"deployment", func(t *testing.T) { docDeployment(t, d, s, root) }},
		{"make", func(t *testing.T) { docMake(t, d, root) }},
		{"go", func(t *testing.T) { docGo(t, d, s, root) }},
		{"node", func(t *testing.T) { docNode(t, d, s) }},
		{"browser", func(t *testing.T) { docBrowser(t, d, s) }},
	}
	ran := 0
	for _, c := range checks {
		t.Run(c.name, func(t *testing.T) { ran++; c.run(t) })
	}
	if ran < len(checks) {
		return // -run chose some: the others' blocks are not claimed
	}
	for _, b := range d.blocks {
		if b.lang != "" && !b.claimed {
			t.Errorf("%s: an example no check of docexamples_test.go runs: add one there, or, for a listing, drop the block's language", b)
		}
	}
}

func merge(a, b env) env {
	out := env{}
	for k, v := range a {
		out[k] = v
	}
	for k, v := range b {
		out[k] = v
	}
	return out
}

// docAPI: docs/api.md's curl, request bodies and answers.
func docAPI(t *testing.T, d *docExamples, s *docStack) {
	const f = "docs/api.md"
	curl := d.claim(t, f, "sh", "curl -sS -X POST")
	publish := d.claim(t, f, "json", `"from": "alice"}`)
	published := d.claim(t, f, "json", `^{"id": "1700000000000-0", "channel": "room-1"}`)
	batch := d.claim(t, f, "json", "^{\"messages\": [\n")
	batched := d.claim(t, f, "json", `{"results": [`)
	batchErr := d.claim(t, f, "json", `"index": 3`)
	record := d.claim(t, f, "json", `"connected_at"`)
	history := d.claim(t, f, "json", `"next":`)

	if _, err := exec.LookPath("curl"); err != nil {
		t.Fatal("curl not found: docs/api.md's example needs it")
	}
	cmd := exec.Command("bash", "-c", sub(t, curl, curl.body, "http://localhost:8080", s.ingress.URL))
	cmd.Env = append(os.Environ(), "API_KEY="+s.apiKey)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", curl, err, out)
	}
	sameFields(t, curl, published.body, out) // answered as the 202 example shows

	st, out := s.do(t, "POST", "/v1/channels/room-1/messages", s.apiKey, publish.body)
	if st != 202 {
		t.Fatalf("%s: %d %s", publish, st, out)
	}
	sameFields(t, published, published.body, out)

	st, out = s.do(t, "POST", "/v1/messages", s.apiKey, batch.body)
	if st != 202 {
		t.Fatalf("%s: %d %s", batch, st, out)
	}
	sameFields(t, batched, batched.body, out)

	// The error example: item 3 with a bad channel.
	st, out = s.do(t, "POST", "/v1/messages", s.apiKey, `{"messages": [{"channel": "a", "data": 1}, {"channel": "a", "data": 1}, {"channel": "a", "data": 1}, {"channel": "-a", "data": 1}]}`)
	if st != 400 {
		t.Fatalf("%s: %d %s", batchErr, st, out)
	}
	sameFields(t, batchErr, batchErr.body, out)
	var doc, real struct {
		Error struct{ Code, Message string }
	}
	_ = json.Unmarshal([]byte(batchErr.body), &doc)
	_ = json.Unmarshal(out, &real)
	if doc.Error.Code != real.Error.Code || !wildcard(doc.Error.Message).MatchString(real.Error.Message) {
		t.Fatalf("%s: the example says %+v, the ingress %s", batchErr, doc.Error, out)
	}

	st, out = s.do(t, "GET", "/v1/channels/room-1/messages?after=0&limit=1", s.apiKey, "")
	if st != 200 {
		t.Fatalf("%s: %d %s", history, st, out)
	}
	sameFields(t, history, history.body, out)

	c := dialToken(t, s.wsURL(), s.token(t, "alice", []string{"room-*"}, nil), nil)
	c.subscribe("room-1")
	st, out = s.do(t, "GET", "/v1/connections/"+c.welcome.ConnectionID, s.apiKey, "")
	if st != 200 {
		t.Fatalf("%s: %d %s", record, st, out)
	}
	sameFields(t, record, record.body, out)
}

// docProtocol: docs/protocol.md's connect line, frames and log line.
func docProtocol(t *testing.T, d *docExamples, s *docStack) {
	const f = "docs/protocol.md"
	connect := d.claim(t, f, "", "GET /ws?")
	welcome := d.claim(t, f, "json", `"type":"welcome"`)
	several := d.claim(t, f, "", `{"type":"subscribe"`)
	logLine := d.claim(t, f, "json", `"msg":"connection closed"`)

	// The connect line, with a token that allows its channels.
	line := strings.TrimSpace(connect.body)
	path, ok := strings.CutPrefix(line, "GET ")
	if !ok {
		t.Fatalf("%s: not a GET line: %s", connect, line)
	}
	tok := s.token(t, "alice", []string{"room-*"}, nil)
	c := dial(t, "ws"+strings.TrimPrefix(s.egress.URL, "http")+sub(t, connect, path, "<jwt>", tok))
	var q []string
	if _, after, ok := strings.Cut(path, "channels="); ok {
		list, _, _ := strings.Cut(after, "&")
		q = strings.Split(list, ",")
	}
	for _, ch := range q {
		c.waitFrame(func(f frame) bool { return f.Type == "subscribed" && f.Channel == ch })
	}
	if len(q) == 0 {
		t.Fatalf("%s: no channels to check", connect)
	}
	var raw json.RawMessage
	{
		// The welcome as sent, all its fields.
		ws, _, err := websocket.DefaultDialer.Dial(s.wsURL()+"?token="+tok, nil)
		if err != nil {
			t.Fatal(err)
		}
		_, raw, err = ws.ReadMessage()
		ws.Close()
		if err != nil {
			t.Fatal(err)
		}
	}
	sameFields(t, welcome, welcome.body, raw, "idle_timeout_ms")

	// Several requests in one frame, as written.
	c2 := dialToken(t, s.wsURL(), tok, nil)
	if err := c2.ws.WriteMessage(websocket.TextMessage, []byte(several.body)); err != nil {
		t.Fatal(err)
	}
	var reqs []struct {
		Channel string
		Ref     json.Number
	}
	dec := json.NewDecoder(strings.NewReader(several.body))
	dec.UseNumber()
	for dec.More() {
		var r struct {
			Channel string
			Ref     json.Number
		}
		if err := dec.Decode(&r); err != nil {
			t.Fatalf("%s: %v", several, err)
		}
		reqs = append(reqs, r)
	}
	if len(reqs) < 2 {
		t.Fatalf("%s: %d requests, want several", several, len(reqs))
	}
	for _, r := range reqs {
		c2.waitFrame(func(f frame) bool { return f.Type == "subscribed" && f.Channel == r.Channel })
	}

	// The log line of a connection's end.
	c2.ws.Close()
	var got []byte
	testkit.Eventually(t, 10*time.Second, func() error {
		for _, l := range strings.Split(s.egress.Logs(), "\n") {
			if strings.Contains(l, `"connection closed"`) && strings.Contains(l, `"`+c2.welcome.ConnectionID+`"`) {
				got = []byte(l)
				return nil
			}
		}
		return fmt.Errorf("no connection closed line for %s", c2.welcome.ConnectionID)
	})
	// The example shows the fields of the connection; every line also
	// has the logger's own (time, function, instance).
	sameFields(t, logLine, logLine.body, got, "time", "function", "instance")
}

// docSecurity: docs/security.md's API_KEYS line and refresh frame (the
// token minting examples run with the Go and Node ones).
func docSecurity(t *testing.T, d *docExamples, s *docStack) {
	const f = "docs/security.md"
	keys := d.claim(t, f, "", "API_KEYS=")
	refresh := d.claim(t, f, "json", `"type":"refresh"`)

	// The API_KEYS line, as written, does what its bullets say.
	value, ok := strings.CutPrefix(strings.TrimSpace(keys.body), "API_KEYS=")
	if !ok {
		t.Fatalf("%s: not an API_KEYS line", keys)
	}
	ing := start(t, "ingress", env{"REDIS_URL": s.redisURL, "REDIS_KEY_PREFIX": s.prefix, "API_KEYS": value})
	call := func(method, path, key, body string) int {
		req, _ := http.NewRequest(method, ing.URL+path, strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+key)
		if body != "" {
			req.Header.Set("Content-Type", "application/json")
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	msg := `{"data": 1}`
	for _, c := range []struct {
		method, path, key, body string
		want                    int
	}{
		{"POST", "/v1/channels/anything/messages", "k1", msg, 202},
		{"GET", "/v1/channels/anything/connections", "k1", "", 200},
		{"POST", "/v1/channels/chat:a/messages", "k2", msg, 202},
		{"POST", "/v1/channels/news.b/messages", "k2", msg, 202},
		{"GET", "/v1/channels/news.b/messages", "k2", "", 200},
		{"POST", "/v1/channels/other/messages", "k2", msg, 403},
		{"GET", "/v1/channels/chat:a/connections", "k2", "", 403},
		{"GET", "/v1/channels/chat:a/connections", "k3", "", 200},
		{"POST", "/v1/users/alice/messages", "k3", msg, 202},
		{"POST", "/v1/channels/chat:a/messages", "k3", msg, 403},
		{"DELETE", "/v1/channels/chat:a/messages", "k3", "", 403},
		{"DELETE", "/v1/channels/chat:a/messages", "k4", "", 200},
		{"DELETE", "/v1/channels/other/messages", "k4", "", 403},
	} {
		if got := call(c.method, c.path, c.key, c.body); got != c.want {
			t.Errorf("%s: %s %s with %s: %d, want %d", keys, c.method, c.path, c.key, got, c.want)
		}
	}

	// The refresh frame, with a fresh token for the same user.
	c := dialToken(t, s.wsURL(), s.token(t, "alice", []string{"room-*"}, nil), nil)
	c.ws.WriteMessage(websocket.TextMessage, []byte(sub(t, refresh, refresh.body, "<new jwt>", s.token(t, "alice", []string{"room-*"}, nil))))
	var ref struct{ Ref json.Number }
	_ = json.Unmarshal([]byte(refresh.body), &ref)
	c.waitFrame(func(f frame) bool { return f.Type == "refreshed" })
	if ref.Ref == "" {
		t.Fatalf("%s: no ref", refresh)
	}
}

// docConfiguration: docs/configuration.md's error example.
func docConfiguration(t *testing.T, d *docExamples) {
	b := d.claim(t, "docs/configuration.md", "", "ingress: configuration:")
	ing, _ := binaries(t)
	cmd := exec.Command(ing)
	cmd.Env = append(os.Environ(), "REDIS_URL=http://127.0.0.1:1", "MAX_BATCH_ITEMS=0", "ALLOW_ANONYMOUS=true")
	out, err := cmd.CombinedOutput()
	if err == nil {
		t.Fatalf("the ingress started with a bad configuration:\n%s", out)
	}
	last := strings.TrimSpace(string(out))
	if i := strings.LastIndex(last, "\n"); i >= 0 {
		last = last[i+1:]
	}
	if !wildcard(b.body).MatchString(last) {
		t.Fatalf("%s: the example is\n%s\nthe ingress says\n%s", b, strings.TrimSpace(b.body), last)
	}
}

// docDeployment: docs/deployment.md's blocks (its make lines are docMake's).
func docDeployment(t *testing.T, d *docExamples, s *docStack, root string) {
	const f = "docs/deployment.md"
	trigger := d.claim(t, f, "yaml", "- http:")
	// Cloud credentials and a Tencent account: not run here; its make
	// line is checked with the others, and its directories must exist.
	sls := d.claim(t, f, "sh", "scf deploy")
	for _, dir := range regexp.MustCompile(`cd (deploy/\w+)`).FindAllStringSubmatch(sls.body, -1) {
		if _, err := os.Stat(filepath.Join(root, dir[1], "serverless.yml")); err != nil {
			t.Errorf("%s: %v", sls, err)
		}
	}
	systemd := d.claim(t, f, "sh", "systemctl")

	// The trigger, as each serverless.yml has it.
	for _, fn := range []string{"ingress", "egress"} {
		y, err := os.ReadFile(filepath.Join(root, "deploy", fn, "serverless.yml"))
		if err != nil {
			t.Fatal(err)
		}
		if !containsLines(string(y), trigger.body) {
			t.Errorf("%s: deploy/%s/serverless.yml does not have these lines:\n%s", trigger, fn, trigger.body)
		}
	}

	// systemd: the lines that write the environment files, in a directory
	// of the test's instead of /etc/wsrelay, for this test's Redis; each
	// function then starts with its file and the unit's variables, and the
	// API key the file holds publishes.
	for _, unit := range []string{"ingress", "egress"} {
		if _, err := os.Stat(filepath.Join(root, "deploy", "systemd", "wsrelay-"+unit+".service")); err != nil {
			t.Errorf("%s: %v", systemd, err)
		}
	}
	dir := t.TempDir()
	var script []string
	for _, l := range strings.Split(systemd.body, "\n") {
		if strings.HasPrefix(l, "secret=") || strings.HasPrefix(l, "printf ") || strings.HasPrefix(l, "chmod ") {
			script = append(script, l)
		}
	}
	sh := sub(t, systemd, strings.Join(script, "\n"), "/etc/wsrelay", dir, "redis://127.0.0.1:6379/0", s.redisURL)
	if out, err := exec.Command("bash", "-euc", sh).CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", systemd, err, out)
	}
	read := func(name string) env {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		e := env{"REDIS_KEY_PREFIX": s.prefix}
		for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
			k, v, _ := strings.Cut(l, "=")
			e[k] = v
		}
		return e
	}
	ie, ee := read("ingress.env"), read("egress.env")
	ing := start(t, "ingress", ie)
	start(t, "egress", ee)
	req, _ := http.NewRequest("POST", ing.URL+"/v1/channels/room-1/messages", strings.NewReader(`{"data": 1}`))
	req.Header.Set("Authorization", "Bearer "+ie["API_KEYS"])
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 202 {
		t.Fatalf("%s: publish with the API key of ingress.env: %d", systemd, resp.StatusCode)
	}
}

// containsLines reports whether text holds block's lines one after the
// other, at some indentation of its own; comments and blank lines do not
// count in either.
func containsLines(text, block string) bool {
	yamlLines := func(s string) []string {
		var out []string
		for _, l := range strings.Split(s, "\n") {
			if i := strings.Index(l, "#"); i >= 0 && (i == 0 || l[i-1] == ' ') {
				l = l[:i]
			}
			if l = strings.TrimRight(l, " "); l != "" {
				out = append(out, l)
			}
		}
		return out
	}
	want, lines := yamlLines(block), yamlLines(text)
	for i := range lines {
		if i+len(want) > len(lines) {
			return false
		}
		indent, ok := strings.CutSuffix(lines[i], want[0])
		if !ok || strings.TrimSpace(indent) != "" {
			continue
		}
		match := true
		for j, w := range want {
			if lines[i+j] != indent+w {
				match = false
				break
			}
		}
		if match {
			return true
		}
	}
	return false
}

// docMake: the sh blocks of make commands. They take minutes (the bench,
// the soak, packaging), so they are checked, not run: each target is the
// Makefile's, each variable set on the line is one the Makefile or the
// bench harness reads, and each flag in BENCH_ARGS / SOAK_ARGS is one the
// command defines. (TestMakeRun runs `make run`; TestPackage `make
// package`.)
func docMake(t *testing.T, d *docExamples, root string) {
	makeLine := regexp.MustCompile(`^((?:[A-Z_]+=\S+ )*)make(?: ([a-z-]+))?((?: [A-Z_]+=(?:'[^']*'|\S+))*)\s*(?:#.*)?$`)
	blocks := d.claimAll("sh", func(b *docBlock) bool {
		for _, l := range strings.Split(strings.TrimSpace(b.body), "\n") {
			if !makeLine.MatchString(l) {
				return false
			}
		}
		return true
	})
	if len(blocks) < 5 {
		t.Fatalf("%d blocks of make commands, want the README's, benchmarks.md's, soak.md's and deployment.md's", len(blocks))
	}
	mk, err := os.ReadFile(filepath.Join(root, "Makefile"))
	if err != nil {
		t.Fatal(err)
	}
	source := func(dir string) string {
		var all []byte
		files, _ := filepath.Glob(filepath.Join(root, dir, "*.go"))
		for _, f := range files {
			b, _ := os.ReadFile(f)
			all = append(all, b...)
		}
		return string(all)
	}
	benchSrc, soakSrc, harness := source("bench/cmd/bench"), source("bench/cmd/soak"), source("bench/harness")
	flagRE := regexp.MustCompile(`(?:^|\s)-([a-z][a-z0-9-]*)`)
	for _, b := range blocks {
		for _, l := range strings.Split(strings.TrimSpace(b.body), "\n") {
			m := makeLine.FindStringSubmatch(l)
			target := m[2]
			if target == "" {
				target = "build"
			}
			if !regexp.MustCompile(`(?m)^` + target + `:`).Match(mk) {
				t.Errorf("%s: %q: no target %s in the Makefile", b, l, target)
			}
			for _, kv := range strings.Fields(m[1] + " " + strings.ReplaceAll(m[3], "'", "")) {
				k, _, ok := strings.Cut(kv, "=")
				if !ok {
					continue // a flag's value of a quoted list, checked below
				}
				if !strings.Contains(string(mk), "$("+k+")") && !strings.Contains(harness, `"`+k+`"`) {
					t.Errorf("%s: %q: neither the Makefile nor bench/harness reads %s", b, l, k)
				}
			}
			for _, args := range regexp.MustCompile(`(BENCH|SOAK)_ARGS=('[^']*'|\S+)`).FindAllStringSubmatch(l, -1) {
				src := benchSrc
				if args[1] == "SOAK" {
					src = soakSrc
				}
				for _, fl := range flagRE.FindAllStringSubmatch(strings.Trim(args[2], "'"), -1) {
					if !strings.Contains(src, `"`+fl[1]+`"`) {
						t.Errorf("%s: %q: the command defines no flag -%s", b, l, fl[1])
					}
				}
			}
		}
	}
}

// docGo: every Go example, each in a function of one program, built once
// and run against the stack.
func docGo(t *testing.T, d *docExamples, s *docStack, root string) {
	const (
		clients  = "docs/clients.md"
		security = "docs/security.md"
	)
	type goExample struct {
		name, before, after string
		block               *docBlock
		fill                []string
	}
	examples := []goExample{{
		// The WebSocket client: a message published to its channel
		// reaches handle.
		name:  "client",
		block: d.claim(t, clients, "go", "client.Dial("),
		fill:  []string{`"wss://egress.example.com/ws"`, `os.Getenv("DOC_EGRESS_WS")`},
		before: `got := make(chan client.Message, 1)
	handle := func(m client.Message) { got <- m }
	reloaded := false
	reload := func() { reloaded = true }
	mintToken := func(context.Context) (string, error) {
		return jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.MapClaims{"sub": "bob", "exp": time.Now().Add(time.Hour).Unix(), "channels": []string{"room:*"}}).SignedString([]byte(os.Getenv("JWT_SECRET")))
	}
`,
		after: `if err != nil {
		return err
	}
	for deadline := time.Now().Add(10 * time.Second); sub.LastID() == ""; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			return errors.New("not subscribed within 10 s")
		}
	}
	if err := post("room:42"); err != nil {
		return err
	}
	select {
	case m := <-got:
		if reloaded || m.Channel != "room:42" || string(m.Data) != ` + "`" + `{"n":1}` + "`" + ` {
			return fmt.Errorf("got %+v (reloaded %v)", m, reloaded)
		}
	case <-time.After(10 * time.Second):
		return errors.New("no message within 10 s")
	}
	return nil`,
	}, {
		// The publisher: the call returns the message's id.
		name:  "publisher",
		block: d.claim(t, clients, "go", "publisher.New("),
		fill:  []string{`"https://ingress.example.com"`, `os.Getenv("DOC_INGRESS_URL")`},
		before: `msg := struct {
		ID   string ` + "`json:\"id\"`" + `
		Text string ` + "`json:\"text\"`" + `
	}{ID: "m1", Text: "hi"}
`,
		after: `if err != nil {
		return err
	}
	fmt.Println(res.ID)
	return nil`,
	}, {
		// Minting a token: printed, for the test to use.
		name:   "mint",
		block:  d.claim(t, security, "go", "jwt.NewWithClaims("),
		before: "userID, roomID := \"alice\", \"42\"\n",
		after: `if err != nil {
		return err
	}
	fmt.Println(token)
	return nil`,
	}}

	dir := t.TempDir()
	var cases []string
	for _, e := range examples {
		code := e.block.body
		if strings.Contains(code, "{ … }") {
			code = strings.ReplaceAll(code, "{ … }", "{ return err }")
		}
		code = sub(t, e.block, code, e.fill...)
		// A comment that lists the API (`// sub.LastID(), c.Err()`) names
		// methods that must exist: each becomes a method value.
		for _, m := range apiComment.FindAllStringSubmatch(code, -1) {
			for _, name := range apiName.FindAllStringSubmatch(m[1], -1) {
				code += "\n\t_ = " + name[1]
			}
		}
		fn := fmt.Sprintf("func example_%s(ctx context.Context) error {\n\t%s\n%s\n\t%s\n}\n", e.name, e.before, code, e.after)
		src := "package main\n\n" + goImports(fn) + "\n// " + e.block.String() + "\n" + fn
		if err := os.WriteFile(filepath.Join(dir, e.name+".go"), []byte(src), 0o644); err != nil {
			t.Fatal(err)
		}
		cases = append(cases, fmt.Sprintf("\tcase %q:\n\t\terr = example_%s(ctx)\n", e.name, e.name))
	}
	main := `package main

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"os"
)

func main() {
	ctx := context.Background()
	var err error
	switch os.Args[1] {
` + strings.Join(cases, "") + `	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

// post publishes {"n":1} to channel with the API key.
func post(channel string) error {
	req, _ := http.NewRequest("POST", os.Getenv("DOC_INGRESS_URL")+"/v1/channels/"+channel+"/messages", bytes.NewReader([]byte(` + "`" + `{"data":{"n":1}}` + "`" + `)))
	req.Header.Set("Authorization", "Bearer "+os.Getenv("WSRELAY_API_KEY"))
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != 202 {
		return fmt.Errorf("publish: %d", resp.StatusCode)
	}
	return nil
}
`
	if err := os.WriteFile(filepath.Join(dir, "main.go"), []byte(main), 0o644); err != nil {
		t.Fatal(err)
	}
	// A module of its own, as an application's: the repository's shared
	// module by a replace, and the golang-jwt version shared uses.
	sharedMod, err := os.ReadFile(filepath.Join(root, "shared", "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	jwtVersion := regexp.MustCompile(`github.com/golang-jwt/jwt/v5 (v\S+)`).FindSubmatch(sharedMod)
	if jwtVersion == nil {
		t.Fatal("shared/go.mod requires no github.com/golang-jwt/jwt/v5")
	}
	gomod := fmt.Sprintf("module docexamples\n\ngo 1.26.0\n\nrequire (\n\tgithub.com/wsrelay/wsrelay/shared v0.0.0-00010101000000-000000000000\n\tgithub.com/golang-jwt/jwt/v5 %s\n)\n\nreplace github.com/wsrelay/wsrelay/shared => %s\n", jwtVersion[1], filepath.Join(root, "shared"))
	sum, err := os.ReadFile(filepath.Join(root, "shared", "go.sum"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "go.mod"), []byte(gomod), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "go.sum"), sum, 0o644); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "examples")
	build := exec.Command("go", "build", "-mod=mod", "-o", bin, ".")
	build.Dir = dir
	build.Env = append(os.Environ(), "GOWORK=off", "GOFLAGS=")
	if out, err := build.CombinedOutput(); err != nil {
		var where []string
		for _, e := range examples {
			where = append(where, e.name+".go: "+e.block.String())
		}
		t.Fatalf("the Go examples do not compile (%s):\n%s", strings.Join(where, "; "), out)
	}
	run := func(e goExample) string {
		cmd := exec.Command(bin, e.name)
		cmd.Env = append(os.Environ(), "DOC_EGRESS_WS="+s.wsURL(), "DOC_INGRESS_URL="+s.ingress.URL, "WSRELAY_API_KEY="+s.apiKey, "JWT_SECRET="+s.secret)
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		done := make(chan error, 1)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		go func() { done <- cmd.Wait() }()
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("%s: %v\n%s%s", e.block, err, stdout.String(), stderr.String())
			}
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
			<-done
			t.Fatalf("%s: still running after 30 s\n%s%s", e.block, stdout.String(), stderr.String())
		}
		return strings.TrimSpace(stdout.String())
	}
	run(examples[0])
	id := run(examples[1])
	if st, b := s.do(t, "GET", "/v1/channels/room:42/messages?after=0", s.apiKey, ""); st != 200 || !strings.Contains(string(b), `"id":"`+id+`"`) || !strings.Contains(string(b), `"from":"alice"`) {
		t.Fatalf("%s: published %q; the history: %d %s", examples[1].block, id, st, b)
	}
	s.checkUserToken(t, examples[2].block.String(), run(examples[2]))
}

// apiComment is a comment line that lists an example's API, as
// `// sub.LastID(), sub.Unsubscribe(); c.State()`; apiName, each name in it.
var (
	apiComment = regexp.MustCompile(`(?m)^\s*// ((?:\w+\.\w+(?:\(\))?[,;]?\s*)+)$`)
	apiName    = regexp.MustCompile(`(\w+\.\w+)(?:\(\))?`)
)

// goImports is the import block of fn: the packages it names.
func goImports(fn string) string {
	var imports []string
	for _, p := range []string{"context", "errors", "fmt", "log", "os", "time",
		"github.com/wsrelay/wsrelay/shared/client", "github.com/wsrelay/wsrelay/shared/publisher", "github.com/golang-jwt/jwt/v5"} {
		name := p[strings.LastIndex(p, "/")+1:]
		if name == "v5" {
			name = "jwt"
		}
		if regexp.MustCompile(`\b` + name + `\.[A-Z]`).MatchString(fn) {
			imports = append(imports, strconv.Quote(p))
		}
	}
	return "import (\n\t" + strings.Join(imports, "\n\t") + "\n)\n"
}

// docNode: the Node example (security.md's token minting), run with node;
// the call its last comment shows mints the token, which must work.
func docNode(t *testing.T, d *docExamples, s *docStack) {
	b := d.claim(t, "docs/security.md", "js", "require(\"node:crypto\")")
	node, err := exec.LookPath("node")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("node not found: install it (apt-get install -y nodejs)")
		}
		t.Skip("node not found (apt-get install -y nodejs); this test runs under CI")
	}
	call := regexp.MustCompile(`(?m)^// (mintToken\(.*\))\s*$`).FindStringSubmatch(b.body)
	if call == nil {
		t.Fatalf("%s: no `// mintToken(…)` call to run", b)
	}
	script := filepath.Join(t.TempDir(), "mint.js")
	if err := os.WriteFile(script, []byte(b.body+"\nconsole.log("+call[1]+");\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(node, script)
	cmd.Env = append(os.Environ(), "JWT_SECRET="+s.secret)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s: %v\n%s", b, err, out)
	}
	s.checkUserToken(t, b.String(), strings.TrimSpace(string(out)))
}

// apiNamesJS is a JavaScript array of [object, name, isCall] for the
// names an example's API comment lists (`// sub.lastId, c.close()`).
func apiNamesJS(code string) string {
	var items []string
	for _, m := range apiComment.FindAllStringSubmatch(code, -1) {
		for _, n := range regexp.MustCompile(`(\w+)\.(\w+)(\(\))?`).FindAllStringSubmatch(m[1], -1) {
			items = append(items, fmt.Sprintf("[%s, %q, %v]", n[1], n[2], n[3] != ""))
		}
	}
	return "[" + strings.Join(items, ", ") + "]"
}

// docBrowser: the browser examples of clients.md, in Chromium on a page
// of the egress, their import made dynamic.
func docBrowser(t *testing.T, d *docExamples, s *docStack) {
	const f = "docs/clients.md"
	page := d.claim(t, f, "html", "new WsRelay(")
	pub := d.claim(t, f, "js", "publish(")
	tab := newBrowser(t)

	// The application's token endpoint (getToken's fetch).
	tokens := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Access-Control-Allow-Origin", "*")
		fmt.Fprint(w, s.token(t, "bob", []string{"room:*"}, []string{"room:*"}))
	}))
	t.Cleanup(tokens.Close)
	runIn(t, tab, "open a page of the egress", chromedp.Navigate(s.egress.URL+"/healthz"))
	imports := regexp.MustCompile(`(?m)^import \{([^}]*)\} from ("[^"]*");$`)
	dynamic := func(b *docBlock, code string) string {
		if !imports.MatchString(code) {
			t.Fatalf("%s: no import line", b)
		}
		return imports.ReplaceAllString(code, "const {$1} = await import($2);")
	}

	script, ok := strings.CutPrefix(strings.TrimSpace(page.body), `<script type="module">`)
	script, ok2 := strings.CutSuffix(script, "</script>")
	if !ok || !ok2 {
		t.Fatalf("%s: not one module script", page)
	}
	script = sub(t, page, dynamic(page, script),
		`"https://egress.example.com/client.js"`, strconv.Quote(s.egress.URL+"/client.js"),
		`"wss://egress.example.com/ws"`, strconv.Quote(s.wsURL()),
		`"/my-backend/wsrelay-token"`, strconv.Quote(tokens.URL))
	// The page's own functions; then a publish once the subscription is
	// live, which must be rendered.
	res := evalIn(t, tab, page.String(), chromedp.Evaluate[string](`(async () => {
  const rendered = [], reloaded = [];
  const render = (...a) => rendered.push(a);
  const reload = (ch) => reloaded.push(ch);
  `+script+`
  for (let i = 0; sub.lastId == null; i++) {
    if (i > 200) return "not subscribed within 10 s";
    await new Promise((r) => setTimeout(r, 50));
  }
  const r = await fetch(`+strconv.Quote(s.ingress.URL+"/v1/channels/room:42/messages")+`, {method: "POST",
    headers: {"Authorization": "Bearer `+s.apiKey+`", "Content-Type": "application/json"},
    body: JSON.stringify({data: {text: "hi"}, event: "chat", from: "alice"})});
  if (r.status !== 202) return "publish: " + r.status;
  for (let i = 0; rendered.length === 0; i++) {
    if (i > 200) return "nothing rendered within 10 s";
    await new Promise((r) => setTimeout(r, 50));
  }
  for (const [obj, name, call] of `+apiNamesJS(page.body)+`) {
    if (call ? typeof obj[name] !== "function" : !(name in obj)) return "no " + name + (call ? "()" : "") + " as the example's comment says";
  }
  c.close();
  const [id, event, from, data] = rendered[0];
  if (event !== "chat" || from !== "alice" || data.text !== "hi" || !id || reloaded.length) return "rendered " + JSON.stringify(rendered) + ", reloaded " + reloaded;
  return "ok";
})()`, chromedp.EvalAwaitPromise))
	if res != "ok" {
		t.Errorf("%s: %s", page, res)
	}

	code := sub(t, pub, dynamic(pub, pub.body), `"/client.js"`, strconv.Quote(s.egress.URL+"/client.js"), `"https://ingress.example.com"`, strconv.Quote(s.ingress.URL))
	res = evalIn(t, tab, pub.String(), chromedp.Evaluate[string](`(async () => {
  const fetchToken = async () => (await fetch(`+strconv.Quote(tokens.URL)+`)).text();
  `+code+`
  return JSON.stringify({ id, replayed });
})()`, chromedp.EvalAwaitPromise))
	var got struct {
		ID       string
		Replayed *bool
	}
	if err := json.Unmarshal([]byte(res), &got); err != nil || got.ID == "" || got.Replayed == nil || *got.Replayed {
		t.Fatalf("%s: %s", pub, res)
	}
	if st, b := s.do(t, "GET", "/v1/channels/room:1/messages?after=0", s.apiKey, ""); st != 200 || !strings.Contains(string(b), `"id":"`+got.ID+`"`) || !strings.Contains(string(b), `"from":"bob"`) {
		t.Fatalf("%s: published %s; the history: %d %s", pub, got.ID, st, b)
	}
}
