package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/wsrelay/wsrelay/shared/client"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// payloadCase is a publish body at an edge of what JSON, UTF-8 or the
// ingress's limits allow, and what the ingress answers it: 202, or a
// status and code of docs/api.md.
type payloadCase struct {
	name   string
	body   string
	status int
	code   string
}

func payloadCases() []payloadCase {
	nest := func(n int) string { return strings.Repeat("[", n) + strings.Repeat("]", n) }
	const limit = 65536 // MAX_MESSAGE_BYTES's default
	fill := limit - len(`{"data":""}`)
	return []payloadCase{
		// Numbers are kept as written: a browser reads these as Infinity,
		// 0, a rounded double or 0 (docs/clients.md), the Go client hands
		// the bytes over.
		{"1e999", `{"data":1e999}`, 202, ""},
		{"-1e999", `{"data":-1e999}`, 202, ""},
		{"1e-999", `{"data":1e-999}`, 202, ""},
		{"exponent past int64", `{"data":{"n":1e99999999999999999999}}`, 202, ""},
		{"2^64+1", `{"data":18446744073709551617}`, 202, ""},
		{"30 digits", `{"data":-123456789012345678901234567890}`, 202, ""},
		{"-0", `{"data":-0}`, 202, ""},
		// Escapes are kept as written, lone surrogates among them: valid
		// JSON, and the frame stays valid UTF-8.
		{"escaped NUL", `{"data":"a\u0000b"}`, 202, ""},
		{"escaped NUL key", `{"data":{"\u0000":1}}`, 202, ""},
		{"lone surrogates", `{"data":"\ud800 \udc00x\uDBFF"}`, 202, ""},
		{"lone surrogate keys", `{"data":{"\ud800":1,"\udfff":2}}`, 202, ""},
		{"U+2028, U+2029, noncharacters", "{\"data\":\"a\u2028b\u2029\uffff\ufffe\"}", 202, ""},
		{"duplicate keys in data", `{"data":{"a":1,"a":2}}`, 202, ""},
		{"__proto__", `{"data":{"__proto__":{"polluted":1},"constructor":{"prototype":{"x":1}}}}`, 202, ""},
		{"markup", `{"data":"</script><script>alert(1)</script>&"}`, 202, ""},
		{"empty string", `{"data":""}`, 202, ""},
		{"whitespace", "{\"data\" : [ 1 , { \"a\" : \" x \" } ]\n}", 202, ""},
		{"depth 64", `{"data":` + nest(64) + `}`, 202, ""},
		{"at the size limit", `{"data":"` + strings.Repeat("x", fill) + `"}`, 202, ""},
		{"at the size limit, escapes", `{"data":"` + strings.Repeat(`\u0000`, fill/6) + strings.Repeat("x", fill%6) + `"}`, 202, ""},

		{"depth 65", `{"data":` + nest(65) + `}`, 400, "invalid_json"},
		{"over the size limit", `{"data":"` + strings.Repeat("x", fill+1) + `"}`, 413, "payload_too_large"},
		{"data absent", `{}`, 400, "missing_data"},
		{"data null", `{"data":null}`, 400, "missing_data"},
		{"invalid UTF-8", "{\"data\":\"\xff\"}", 400, "invalid_json"},
		{"a surrogate as UTF-8 bytes", "{\"data\":\"\xed\xa0\x80\"}", 400, "invalid_json"},
		{"invalid UTF-8 outside data", "{\"data\":1,\"x\":\"\xc3\"}", 400, "invalid_json"},
		{"byte order mark", "\xef\xbb\xbf{\"data\":1}", 400, "invalid_json"},
		{"raw NUL", "{\"data\":\"a\x00b\"}", 400, "invalid_json"},
	}
}

// compactData is the data of a publish body as the ingress stores it.
func compactData(t *testing.T, body string) string {
	t.Helper()
	var b struct{ Data json.RawMessage }
	var c bytes.Buffer
	if err := json.Unmarshal([]byte(body), &b); err != nil || json.Compact(&c, b.Data) != nil {
		t.Fatalf("%.40q: %v", body, err)
	}
	return c.String()
}

// TestPayloadFidelity: what a publisher may send at the edges of JSON,
// UTF-8 and the ingress's limits either is refused with its documented
// error, on every route that takes a message, or reaches every
// subscriber as it was sent (compacted): the Go client, a plain
// WebSocket, the browser client in Chromium, history, a resume from
// history and targeted sends. No such payload costs a client its
// connection or a later message.
func TestPayloadFidelity(t *testing.T) {
	e := env{
		"REDIS_URL":        redistest.URL(t),
		"REDIS_KEY_PREFIX": redistest.Prefix(t),
		"ALLOW_ANONYMOUS":  "true",
		"ALLOWED_ORIGINS":  "*",
	}
	ing := start(t, "ingress", e)
	eg := start(t, "egress", e)
	const ch = "payloads"
	wsURL := strings.TrimSuffix(eg.wsURL(""), "?")

	hc := &http.Client{Transport: &http.Transport{}, Timeout: 10 * time.Second}
	t.Cleanup(hc.CloseIdleConnections)
	type answer struct {
		status int
		code   string
		index  *int
		id     string
	}
	post := func(path, body string) answer {
		t.Helper()
		resp, err := hc.Post(ing.URL+path, "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		rb, _ := io.ReadAll(resp.Body)
		var out struct {
			ID    string
			Error struct {
				Code  string
				Index *int
			}
		}
		if err := json.Unmarshal(rb, &out); err != nil {
			t.Fatalf("POST %s: %d %s", path, resp.StatusCode, rb)
		}
		return answer{resp.StatusCode, out.Error.Code, out.Error.Index, out.ID}
	}

	// The Go client: channel messages and those sent to its connection.
	var (
		mu       sync.Mutex
		goGot    []client.Message
		goTarget []client.Message
		goStates []string
		goConn   = make(chan string, 1)
	)
	c, err := client.Dial(client.Options{
		URL:        wsURL,
		User:       "go-user",
		MinBackoff: 100 * time.Millisecond,
		MaxBackoff: time.Second,
		OnState: func(s client.State, err error) {
			mu.Lock()
			goStates = append(goStates, fmt.Sprint(s, err))
			mu.Unlock()
		},
		OnWelcome: func(w client.Welcome) {
			select {
			case goConn <- w.ConnectionID:
			default:
			}
		},
		OnMessage: func(m client.Message) {
			mu.Lock()
			goTarget = append(goTarget, m)
			mu.Unlock()
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	live := make(chan bool, 4)
	if _, err := c.Subscribe(ch, client.Handler{
		OnSubscribed: func(bool) { live <- true },
		OnMessage: func(m client.Message) {
			mu.Lock()
			goGot = append(goGot, m)
			mu.Unlock()
		},
	}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-live:
	case <-time.After(10 * time.Second):
		t.Fatal("the Go client did not subscribe")
	}
	conn := <-goConn

	// A plain WebSocket: the frames' bytes.
	raw := dial(t, eg.wsURL("user=raw-user"))
	raw.subscribe(ch)

	// The browser client, whose raw frames a subclass of WebSocket keeps.
	tab := newBrowser(t)
	runIn(t, tab, "open a page of the egress", chromedp.Navigate(eg.URL+"/"))
	evalIn(t, tab, "start the browser client", chromedp.Evaluate[bool](fmt.Sprintf(`(async () => {
  const { WsRelay } = await import("/client.js");
  const t = window.p = { got: [], targeted: [], raw: [], closes: [], errors: [], states: [] };
  class Keep extends WebSocket { constructor(...a) { super(...a); this.addEventListener("message", (e) => t.raw.push(e.data)); } }
  window.addEventListener("error", (e) => t.errors.push(String(e.message)));
  const c = window.c = new WsRelay(%q, { WebSocket: Keep, user: "js-user" });
  c.on("close", (e) => t.closes.push(e.code + " " + e.reason));
  c.on("state", (s) => t.states.push(s));
  c.on("message", (m) => t.targeted.push(m));
  await new Promise((resolve) => c.subscribe(%q, { onMessage: (m) => t.got.push(m), onSubscribed: resolve }));
  return true;
})()`, wsURL, ch), chromedp.EvalAwaitPromise))

	// Every case on every route. The refused ones write nothing anywhere;
	// each accepted one is a channel message, a batch's item (but the
	// two at the size limit: the item's channel takes it past), a send to
	// the Go client's connection and one to the browser client's user.
	cases := payloadCases()
	want := map[string]string{} // channel message id: its data
	var order []string          // the channel's data, in publish order
	var targeted []string       // the targeted messages' data, in order
	for _, pc := range cases {
		a := post("/v1/channels/"+ch+"/messages", pc.body)
		if a.status != pc.status || a.code != pc.code {
			t.Errorf("%s: publish answered %d %q, want %d %q", pc.name, a.status, a.code, pc.status, pc.code)
			continue
		}
		if pc.status == 202 {
			data := compactData(t, pc.body)
			want[a.id] = data
			order = append(order, data)
			targeted = append(targeted, data)
		}
		item := `{"channel":"` + ch + `",` + strings.TrimPrefix(pc.body, "{")
		if pc.body == "{}" {
			item = `{"channel":"` + ch + `"}`
		}
		batchStatus, batchCode := pc.status, pc.code
		if strings.HasPrefix(pc.name, "at the size limit") {
			batchStatus, batchCode = 413, "payload_too_large"
		}
		if pc.name == "byte order mark" || pc.name == "invalid UTF-8 outside data" {
			item = `{"channel":"` + ch + `","data":1}` // no item form: the batch body's case below
		} else {
			// A raw NUL makes the batch's body as a whole no JSON: refused
			// as such, without an index.
			wantIndex := pc.name != "raw NUL"
			b := post("/v1/messages", `{"messages":[{"channel":"`+ch+`","data":0},`+item+`]}`)
			if b.status != batchStatus || b.code != batchCode || (b.status != 202 && (b.index != nil) != wantIndex) || (b.index != nil && *b.index != 1) {
				t.Errorf("%s: batch answered %d %q index %v, want %d %q (index 1: %v)", pc.name, b.status, b.code, b.index, batchStatus, batchCode, wantIndex)
			}
			if b.status == 202 {
				order = append(order, "0", compactData(t, item))
			}
		}
		for _, path := range []string{"/v1/connections/" + conn + "/messages", "/v1/users/js-user/messages"} {
			if s := post(path, pc.body); s.status != pc.status || s.code != pc.code {
				t.Errorf("%s: POST %s answered %d %q, want %d %q", pc.name, path, s.status, s.code, pc.status, pc.code)
			}
		}
	}
	for name, body := range map[string]string{
		"byte order mark":            "\xef\xbb\xbf" + `{"messages":[{"channel":"` + ch + `","data":1}]}`,
		"invalid UTF-8 outside data": `{"messages":[{"channel":"` + ch + `","data":1}],"x":"` + "\xc3" + `"}`,
	} {
		if b := post("/v1/messages", body); b.status != 400 || b.code != "invalid_json" || b.index != nil {
			t.Errorf("batch body, %s: answered %d %q index %v, want 400 invalid_json without an index", name, b.status, b.code, b.index)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	// Later messages still arrive, to everyone.
	end := post("/v1/channels/"+ch+"/messages", `{"data":"end"}`)
	order = append(order, `"end"`)
	post("/v1/connections/"+conn+"/messages", `{"data":"end"}`)
	post("/v1/users/js-user/messages", `{"data":"end"}`)
	targeted = append(targeted, `"end"`)

	testkit.Eventually(t, 20*time.Second, func() error {
		mu.Lock()
		defer mu.Unlock()
		if len(goGot) < len(order) || len(goTarget) < len(targeted) {
			return fmt.Errorf("the Go client has %d of %d channel messages, %d of %d targeted (states %v)", len(goGot), len(order), len(goTarget), len(targeted), goStates)
		}
		return nil
	})
	raw.waitFrame(func(f frame) bool { return f.ID == end.id })
	// (window.p, not window.t: waitPage's report of the page would hold
	// every frame, megabytes.)
	testkit.Eventually(t, 20*time.Second, func() error {
		s := evalIn(t, tab, "the browser client's progress", chromedp.Evaluate[string](
			`JSON.stringify({ got: p.got.length, targeted: p.targeted.length, closes: p.closes, errors: p.errors, state: c.state })`))
		var n struct{ Got, Targeted int }
		_ = json.Unmarshal([]byte(s), &n)
		if n.Got < len(order) || n.Targeted < len(targeted) {
			return fmt.Errorf("the browser client, with %d channel messages and %d targeted to come: %s", len(order), len(targeted), s)
		}
		return nil
	})

	datas := func(ms []client.Message) []string {
		var out []string
		for _, m := range ms {
			out = append(out, string(m.Data))
		}
		return out
	}
	mu.Lock()
	gotGo, gotGoTarget, states := datas(goGot), datas(goTarget), slices.Clone(goStates)
	mu.Unlock()
	var gotRaw []string
	for _, f := range raw.messages(ch) {
		gotRaw = append(gotRaw, string(f.Data))
	}
	for who, got := range map[string][]string{"Go client": gotGo, "plain WebSocket": gotRaw} {
		if !slices.Equal(got, order) {
			t.Errorf("%s: channel messages differ: %s", who, diff(got, order))
		}
	}
	if !slices.Equal(gotGoTarget, targeted) {
		t.Errorf("Go client: targeted messages differ: %s", diff(gotGoTarget, targeted))
	}
	if len(states) != 2 {
		t.Errorf("Go client states %v, want connecting and connected only", states)
	}

	// The browser: each frame's bytes carry the data as sent, and the
	// client handed every message on (JSON.parse's reading of it).
	var page struct {
		Channel, Targeted []string // the data's bytes in the frames, in order
		Handed, HandedT   int
		Closes, Errors    []string
		States            []string
	}
	if err := json.Unmarshal([]byte(evalIn(t, tab, "the browser client's messages", chromedp.Evaluate[string](`(() => {
  const data = (f) => f.slice(f.indexOf(',"data":') + 8, -1); // data is the frame's last field
  const frames = p.raw.filter((f) => f.startsWith('{"type":"message",'));
  return JSON.stringify({
    channel: frames.filter((f) => !f.includes('"target":')).map(data),
    targeted: frames.filter((f) => f.includes('"target":"user"')).map(data),
    handed: p.got.length, handedT: p.targeted.length, closes: p.closes, errors: p.errors, states: p.states,
  });
})()`))), &page); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(page.Channel, order) {
		t.Errorf("browser: channel frames differ: %s", diff(page.Channel, order))
	}
	if !slices.Equal(page.Targeted, targeted) {
		t.Errorf("browser: targeted frames differ: %s", diff(page.Targeted, targeted))
	}
	if page.Handed != len(order) || page.HandedT != len(targeted) || len(page.Closes) != 0 || len(page.Errors) != 0 || !slices.Equal(page.States, []string{"connecting", "connected"}) {
		t.Errorf("browser client: handed on %d of %d channel messages and %d of %d targeted; closes %q, errors %q, states %q",
			page.Handed, len(order), page.HandedT, len(targeted), page.Closes, page.Errors, page.States)
	}

	// History has the data as sent.
	resp, err := hc.Get(ing.URL + "/v1/channels/" + ch + "/messages?limit=1000")
	if err != nil {
		t.Fatal(err)
	}
	var hist struct {
		Messages []struct {
			ID   string
			Data json.RawMessage
		}
	}
	err = json.NewDecoder(resp.Body).Decode(&hist)
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	var gotHist []string
	for _, m := range hist.Messages {
		gotHist = append(gotHist, string(m.Data))
		if w, ok := want[m.ID]; ok && w != string(m.Data) {
			t.Errorf("history: %s has data %.60q, want %.60q", m.ID, m.Data, w)
		}
	}
	if !slices.Equal(gotHist, order) {
		t.Errorf("history differs: %s", diff(gotHist, order))
	}

	// A resume from the start replays it all, to either client.
	var (
		rmu     sync.Mutex
		resumed []string
	)
	c2, err := client.Dial(client.Options{URL: wsURL, User: "go-user-2"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c2.Close() })
	if _, err := c2.Subscribe(ch, client.Handler{After: "0", OnMessage: func(m client.Message) {
		rmu.Lock()
		resumed = append(resumed, string(m.Data))
		rmu.Unlock()
	}}); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, 20*time.Second, func() error {
		rmu.Lock()
		defer rmu.Unlock()
		if len(resumed) < len(order) {
			return fmt.Errorf("the resuming Go client has %d of %d", len(resumed), len(order))
		}
		return nil
	})
	rmu.Lock()
	if !slices.Equal(resumed, order) {
		t.Errorf("Go client resuming from the start: %s", diff(resumed, order))
	}
	rmu.Unlock()
	n := evalIn(t, tab, "a browser client resuming from the start", chromedp.Evaluate[int](fmt.Sprintf(`(async () => {
  const { WsRelay } = await import("/client.js");
  const c = new WsRelay(%q, { user: "js-user-2" });
  let n = 0;
  await new Promise((resolve) => c.subscribe(%q, { after: "0", onMessage: (m) => { if (++n, m.id === %q) resolve(); } }));
  c.close();
  return n;
})()`, wsURL, ch, end.id), chromedp.EvalAwaitPromise))
	if n != len(order) {
		t.Errorf("browser client resuming from the start: %d messages, want %d", n, len(order))
	}
}
