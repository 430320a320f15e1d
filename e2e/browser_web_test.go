package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"maps"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/wsrelay/wsrelay/shared/auth"
	"github.com/wsrelay/wsrelay/shared/redistest"
)

// TestBrowserDemoHostileMessages: the demo page renders what others
// publish (a message's text and name, data that is not the demo's, an
// event name) as text. A message written as HTML runs nothing and adds no
// element to the page.
func TestBrowserDemoHostileMessages(t *testing.T) {
	ing, eg := startDemo(t, nil)

	tab := newBrowser(t)
	runIn(t, tab, "join",
		chromedp.Navigate(eg.URL+"/"),
		chromedp.WaitVisible(chromedp.ID("name")),
		chromedp.SetValue(chromedp.ID("name"), `<img src=x onerror="window.__xss='name'">`),
		chromedp.SetValue(chromedp.ID("room"), "e2e-hostile"),
		chromedp.Click(chromedp.ID("join")),
		chromedp.WaitVisible(chromedp.CSS(`#state[data-state="connected"]`)),
		chromedp.WaitVisible(chromedp.CSS(`#messages .notice`)),
	)
	payloads := []string{
		`<img src=x onerror="window.__xss='text'">`,
		`</div><script>window.__xss='script'</script>`,
		`<svg onload="window.__xss='svg'"></svg>`,
		`"><iframe srcdoc="<script>parent.__xss='iframe'</script>">`,
	}
	post := func(body map[string]any) {
		t.Helper()
		b, _ := json.Marshal(body)
		resp, err := http.Post(ing.URL+"/v1/channels/e2e-hostile/messages", "application/json", bytes.NewReader(b))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusAccepted {
			t.Fatalf("publish %s: %d", b, resp.StatusCode)
		}
	}
	for _, p := range payloads {
		post(map[string]any{"event": `<b onmouseover=x>`, "data": map[string]any{"text": p, "name": p, "user": p}})
	}
	// Data that is not the demo's shape is shown as its JSON.
	post(map[string]any{"data": map[string]any{"html": `<img src=x onerror="window.__xss='json'">`}})
	post(map[string]any{"data": `<img src=x onerror="window.__xss='string'">`})

	evalIn(t, tab, "messages shown", chromedp.Poll[bool](`document.querySelectorAll("#messages .msg").length >= 6`,
		chromedp.WithPollingTimeout(15*time.Second)))
	texts := pageTexts(t, tab)
	for i, p := range payloads {
		if texts[i] != p {
			t.Errorf("message %d shown as %q, want the text %q", i, texts[i], p)
		}
	}
	time.Sleep(300 * time.Millisecond) // an onerror of a broken <img> fires after a load attempt
	got := evalIn(t, tab, "injected", chromedp.Evaluate[string](
		`JSON.stringify({xss: window.__xss ?? null, elements: document.querySelectorAll("#messages img, #messages script, #messages svg, #messages iframe, #messages .text *, #messages .who b *").length})`))
	if got != `{"xss":null,"elements":0}` {
		t.Fatalf("hostile messages were rendered as HTML: %s", got)
	}
}

// TestBrowserPublishRefusals: publish(), loaded from a real egress in
// Chromium, against a real ingress on another origin, reports each
// refusal docs/clients.md lists as that refusal (a PublishError with
// the ingress's status and code), not as a network error: the browser
// hands a cross-origin page only what CORS lets it see.
func TestBrowserPublishRefusals(t *testing.T) {
	const secret = "browser-web-test-secret-0123456789abcdef"
	e := env{
		"REDIS_URL":              redistest.URL(t),
		"REDIS_KEY_PREFIX":       redistest.Prefix(t),
		"ALLOW_ANONYMOUS":        "true",
		"ALLOWED_ORIGINS":        "*",
		"JWT_SECRET":             secret,
		"MAX_MESSAGE_BYTES":      "1024",
		"PUBLISH_RATE_PER_USER":  "1",
		"PUBLISH_BURST_PER_USER": "1",
	}
	ing := start(t, "ingress", e)
	eg := start(t, "egress", e)
	token := func(sub string, publish []string) string {
		tok, err := auth.SignHS256(secret, auth.Claims{Subject: sub, Channels: []string{"e2e-*"}, Publish: publish, Expires: time.Now().Add(time.Hour)})
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	tab := newBrowser(t)
	runIn(t, tab, "open the demo page", chromedp.Navigate(eg.URL+"/"))
	script := `(async () => {
  const { publish, PublishError } = await import("/client.js");
  const ingress = ` + jsString(ing.URL) + `;
  const out = {};
  const run = async (name, data, opts) => {
    try {
      const r = await publish(ingress, "e2e-pub", data, { minBackoff: 1, maxBackoff: 2, ...opts });
      out[name] = "published " + r.id;
    } catch (e) {
      out[name] = e instanceof PublishError ? e.status + " " + e.code + " retryAfter=" + (e.retryAfter != null) + " unknown=" + e.outcomeUnknown : "threw " + e;
    }
  };
  await run("ok", { text: "hi" }, { token: ` + jsString(token("ada", []string{"e2e-*"})) + ` });
  await run("429", { text: "again" }, { token: ` + jsString(token("ada", []string{"e2e-*"})) + `, maxAttempts: 1 });
  await run("401", { text: "hi" }, { token: "not.a.jwt" });
  await run("403", { text: "hi" }, { token: ` + jsString(token("bob", []string{"other-*"})) + ` });
  await run("413 small", "x".repeat(4000), { token: ` + jsString(token("cy", []string{"e2e-*"})) + ` });
  await run("413 large", "x".repeat(4 << 20), { token: ` + jsString(token("dee", []string{"e2e-*"})) + ` });
  return out;
})()`
	got := evalIn(t, tab, "publish", chromedp.Evaluate[map[string]string](script, chromedp.EvalAwaitPromise))
	want := map[string]string{
		"429":       "429 rate_limited retryAfter=true unknown=false",
		"401":       "401 invalid_token retryAfter=false unknown=false",
		"403":       "403 forbidden retryAfter=false unknown=false",
		"413 small": "413 payload_too_large retryAfter=false unknown=false",
		"413 large": "413 payload_too_large retryAfter=false unknown=false",
	}
	if !strings.HasPrefix(got["ok"], "published ") {
		t.Errorf("ok: %s", got["ok"])
	}
	for k, w := range want {
		if got[k] != w {
			t.Errorf("%s: %s, want %s", k, got[k], w)
		}
	}
}

// startDemo starts an ingress and an egress in anonymous mode, any
// origin allowed, with extra on top, the egress's page pointed at the
// ingress: the demo page as `make run` serves it.
func startDemo(t *testing.T, extra env) (ing, eg *proc) {
	t.Helper()
	e := env{
		"REDIS_URL":        redistest.URL(t),
		"REDIS_KEY_PREFIX": redistest.Prefix(t),
		"ALLOW_ANONYMOUS":  "true",
		"ALLOWED_ORIGINS":  "*",
	}
	maps.Copy(e, extra)
	ing = start(t, "ingress", e)
	e["INGRESS_URL"] = ing.URL
	return ing, start(t, "egress", e)
}

// joinDemo opens the demo page at egURL in tab and joins room as Ada,
// until the page is connected.
func joinDemo(t *testing.T, tab context.Context, egURL, room string) {
	t.Helper()
	runIn(t, tab, "join "+room,
		chromedp.Navigate(egURL+"/"),
		chromedp.WaitVisible(chromedp.ID("name")),
		chromedp.SetValue(chromedp.ID("name"), "Ada"),
		chromedp.SetValue(chromedp.ID("room"), room),
		chromedp.Click(chromedp.ID("join")),
		chromedp.WaitVisible(chromedp.CSS(`#state[data-state="connected"]`)),
	)
}

func jsString(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}

// TestBrowserDemoJoinRefusesEmptyNames: a name of spaces, or a room name
// with nothing the demo can keep (no letter or digit), is refused by the
// form with the browser's own message, where Join did nothing without a
// word.
func TestBrowserDemoJoinRefusesEmptyNames(t *testing.T) {
	_, eg := startDemo(t, nil)
	tab := newBrowser(t)
	runIn(t, tab, "open", chromedp.Navigate(eg.URL+"/"), chromedp.WaitVisible(chromedp.ID("name")))
	for _, c := range []struct{ name, room, bad string }{{"   ", "lobby", "name"}, {"Ada", "-- !", "room"}} {
		runIn(t, tab, "join as "+jsString(c.name)+" in "+jsString(c.room),
			chromedp.SetValue(chromedp.ID("name"), c.name),
			chromedp.SetValue(chromedp.ID("room"), c.room),
			chromedp.Click(chromedp.ID("join")),
		)
		got := evalIn(t, tab, "form state", chromedp.Evaluate[string](`JSON.stringify({
			formShown: !document.getElementById("join-form").hidden,
			state: document.getElementById("state").dataset.state,
			mismatch: document.getElementById(`+jsString(c.bad)+`).validity.patternMismatch,
			message: document.getElementById(`+jsString(c.bad)+`).validationMessage !== "",
		})`))
		if got != `{"formShown":true,"state":"idle","mismatch":true,"message":true}` {
			t.Errorf("name %q, room %q: %s, want the form shown with its %s refused", c.name, c.room, got, c.bad)
		}
	}
}

// TestBrowserDemoPresenceOfRoomLeft: a presence read of a room left,
// answered once the page has joined another, does not replace the new
// room's members.
func TestBrowserDemoPresenceOfRoomLeft(t *testing.T) {
	_, eg := startDemo(t, nil)
	tab := newBrowser(t)
	runIn(t, tab, "open", chromedp.Navigate(eg.URL+"/"), chromedp.WaitVisible(chromedp.ID("name")))
	// The old room's reads are held until released; the real read is
	// made then, when that room has no one left.
	evalIn(t, tab, "hold", chromedp.Evaluate[bool](`(() => {
		const real = window.fetch;
		window.__held = [];
		window.fetch = (u, init) => String(u).includes("/channels/e2e-left/")
			? new Promise((resolve) => window.__held.push(() => { const p = real(u, init); resolve(p); return p; }))
			: real(u, init);
		return true;
	})()`))
	for _, step := range []struct{ room string }{{"e2e-left"}, {"e2e-joined"}} {
		runIn(t, tab, "join "+step.room,
			chromedp.SetValue(chromedp.ID("name"), "Ada"),
			chromedp.SetValue(chromedp.ID("room"), step.room),
			chromedp.Click(chromedp.ID("join")),
			chromedp.WaitVisible(chromedp.CSS(`#state[data-state="connected"]`)),
		)
		if step.room == "e2e-left" {
			runIn(t, tab, "leave", chromedp.Click(chromedp.ID("leave")), chromedp.WaitVisible(chromedp.ID("name")))
		}
	}
	evalIn(t, tab, "the new room's members", chromedp.Poll[bool](`document.querySelectorAll("#members li").length === 1 && !document.getElementById("members").textContent.includes("unavailable")`,
		chromedp.WithPollingTimeout(10*time.Second)))
	got := evalIn(t, tab, "release the old room's reads", chromedp.Evaluate[string](`(async () => {
		const held = window.__held.splice(0);
		if (held.length === 0) return "no read of the old room was held";
		await Promise.allSettled(held.map((release) => release().then((r) => r.clone().json())));
		await new Promise((r) => setTimeout(r, 200));
		return document.querySelectorAll("#members li").length + " members: " + document.getElementById("members").textContent;
	})()`, chromedp.EvalAwaitPromise))
	if !strings.HasPrefix(got, "1 members: ") {
		t.Fatalf("after the old room's read answered: %s, want the new room's one member", got)
	}
}

// TestBrowserDemoMessageListBounded: the demo page keeps the newest
// entries of its message list, not every message of a long session: a
// page left open in a busy room grew its DOM (and memory) without end.
func TestBrowserDemoMessageListBounded(t *testing.T) {
	ing, eg := startDemo(t, nil)

	tab := newBrowser(t)
	joinDemo(t, tab, eg.URL, "e2e-busy")
	runIn(t, tab, "joined notice", chromedp.WaitVisible(chromedp.CSS(`#messages .notice`)))
	const n = 700
	items := make([]map[string]any, n)
	for i := range items {
		items[i] = map[string]any{"channel": "e2e-busy", "data": map[string]any{"text": "m" + strconv.Itoa(i), "name": "test"}}
	}
	if code := post(t, ing.URL+"/v1/messages", map[string]any{"messages": items}, nil); code != http.StatusAccepted {
		t.Fatalf("batch publish: %d", code)
	}
	last := "m" + strconv.Itoa(n-1)
	evalIn(t, tab, "all delivered", chromedp.Poll[bool](
		`(() => { const m = document.querySelectorAll("#messages .msg .text"); return m.length > 0 && m[m.length-1].textContent === `+jsString(last)+`; })()`,
		chromedp.WithPollingTimeout(15*time.Second)))
	if got := evalIn(t, tab, "entries", chromedp.Evaluate[int](`document.querySelectorAll("#messages > li").length`)); got > 500 {
		t.Fatalf("the message list holds %d entries after %d messages, want at most 500", got, n)
	}
}

// TestBrowserDemoTokenTroubleShown: a token the page cannot use is said
// so on the page, rather than leaving it "not connected" (a token the
// WebSocket cannot carry: the client's constructor threw, unseen) or
// "reconnecting…" for ever with only close codes (an expired token, or
// one the egress's JWT_SECRET did not sign: refused at the upgrade,
// which a browser sees only as a close).
func TestBrowserDemoTokenTroubleShown(t *testing.T) {
	const secret = "browser-web-test-secret-0123456789abcdef"
	_, eg := startDemo(t, env{"JWT_SECRET": secret})
	expired, err := auth.SignHS256(secret, auth.Claims{Subject: "ada", Channels: []string{"e2e-*"}, Publish: []string{"e2e-*"}, Expires: time.Now().Add(-time.Minute)})
	if err != nil {
		t.Fatal(err)
	}
	otherSecret, err := auth.SignHS256("another-secret-0123456789abcdef0123456789", auth.Claims{Subject: "ada", Channels: []string{"e2e-*"}, Publish: []string{"e2e-*"}, Expires: time.Now().Add(time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	tab := newBrowser(t)
	for _, c := range []struct{ name, token, want string }{
		{"not sendable", "not%20a%20token", "token"},
		{"expired", expired, "expired"},
		{"another secret", otherSecret, "token"},
	} {
		runIn(t, tab, "join with a token "+c.name,
			chromedp.Navigate(eg.URL+"/?token="+c.token),
			chromedp.WaitVisible(chromedp.ID("name")),
			chromedp.SetValue(chromedp.ID("name"), "Ada"),
			chromedp.SetValue(chromedp.ID("room"), "e2e-tok"),
			chromedp.Click(chromedp.ID("join")),
		)
		ok := false
		for deadline := time.Now().Add(8 * time.Second); !ok && time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
			ok = evalIn(t, tab, "notice", chromedp.Evaluate[bool](
				`[...document.querySelectorAll("#messages .notice")].some(n => n.textContent.includes(`+jsString(c.want)+`))`))
		}
		if !ok {
			got := evalIn(t, tab, "page", chromedp.Evaluate[string](`document.querySelector("#state-text").textContent + " | " + document.querySelector("#messages").textContent`))
			t.Errorf("token %s: the page shows %q, want a notice saying %q", c.name, got, c.want)
		}
	}
}

// TestBrowserDemoStopsPollingWhenClosed: once its connection is closed
// for good (4003: an operator's disconnect), the page stops polling the
// room's presence every 3 s, as "Leave room" does.
func TestBrowserDemoStopsPollingWhenClosed(t *testing.T) {
	ing, eg := startDemo(t, nil)

	tab := newBrowser(t)
	joinDemo(t, tab, eg.URL, "e2e-closed")
	id := evalIn(t, tab, "connection id", chromedp.Poll[string](
		`(document.querySelector("#conn-info").textContent.match(/^connection (\S+) /) || [])[1]`,
		chromedp.WithPollingTimeout(10*time.Second)))
	req, _ := http.NewRequest(http.MethodDelete, ing.URL+"/v1/connections/"+id, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		t.Fatalf("disconnect: %d", resp.StatusCode)
	}
	runIn(t, tab, "closed", chromedp.WaitVisible(chromedp.CSS(`#state[data-state="closed"]`)))
	evalIn(t, tab, "count polls", chromedp.Evaluate[bool](
		`(() => { window.__polls = 0; const f = window.fetch; window.fetch = (...a) => { if (String(a[0]).includes("/connections")) window.__polls++; return f(...a); }; return true; })()`))
	time.Sleep(3500 * time.Millisecond)
	if n := evalIn(t, tab, "polls", chromedp.Evaluate[int](`window.__polls`)); n != 0 {
		t.Fatalf("%d presence polls after the connection closed for good, want none", n)
	}
}

// TestBrowserDemoWithoutSiteStorage: the demo page works in a browser
// that blocks sites' data (Chromium's "Block all cookies", which makes
// any use of localStorage throw a SecurityError): it only forgets the
// last name and room. Its first read of localStorage threw, the module
// stopped there, and Join did nothing, with nothing shown.
func TestBrowserDemoWithoutSiteStorage(t *testing.T) {
	_, eg := startDemo(t, nil)

	tab := newBrowserWithPrefs(t, `{"profile":{"default_content_setting_values":{"cookies":2}}}`)
	runIn(t, tab, "open the demo page", chromedp.Navigate(eg.URL+"/"), chromedp.WaitVisible(chromedp.ID("name")))
	blocked := evalIn(t, tab, "localStorage", chromedp.Evaluate[bool](`(() => { try { localStorage.length; return false; } catch { return true; } })()`))
	if !blocked {
		// The test would prove nothing: fail rather than pass unseen.
		t.Fatal("this Chromium does not block localStorage with cookies blocked, so the page's use of it is not tested")
	}
	runIn(t, tab, "join",
		chromedp.SetValue(chromedp.ID("name"), "Ada"),
		chromedp.SetValue(chromedp.ID("room"), "e2e-nostorage"),
		chromedp.Click(chromedp.ID("join")),
		chromedp.WaitVisible(chromedp.CSS(`#state[data-state="connected"]`)),
		chromedp.WaitVisible(chromedp.CSS(`#messages .notice`)),
		chromedp.SendKeys(chromedp.ID("text"), "no storage"),
		chromedp.Click(chromedp.ID("send")),
	)
	waitTexts(t, tab, "tab", "no storage")
}

// TestBrowserDemoAtStageURL: behind a gateway that serves the egress
// under a stage prefix (API Gateway's …/release, stripped before the
// function sees the path), the demo page opened at the stage's URL
// without its trailing slash works: it loads its client.js and connects
// its socket within the stage. Before, "./client.js" resolved to
// /client.js, outside the stage (the gateway's 404), and the page could
// not join.
func TestBrowserDemoAtStageURL(t *testing.T) {
	_, eg := startDemo(t, nil)
	target, err := url.Parse(eg.URL)
	if err != nil {
		t.Fatal(err)
	}
	const stage = "/release"
	proxy := &httputil.ReverseProxy{Rewrite: func(r *httputil.ProxyRequest) {
		r.SetURL(target)
		r.Out.Host = r.In.Host // as a gateway: the function sees the address the browser used
		r.Out.URL.Path = strings.TrimPrefix(r.In.URL.Path, stage)
		if r.Out.URL.Path == "" {
			r.Out.URL.Path = "/"
		}
		r.Out.URL.RawPath = ""
	}}
	front := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != stage && !strings.HasPrefix(r.URL.Path, stage+"/") {
			http.NotFound(w, r) // outside the stage, the gateway has nothing
			return
		}
		proxy.ServeHTTP(w, r)
	}))
	t.Cleanup(front.Close)

	tab := newBrowser(t)
	runIn(t, tab, "join at the stage URL",
		chromedp.Navigate(front.URL+stage+"?x=1"),
		chromedp.WaitVisible(chromedp.ID("name")),
		chromedp.SetValue(chromedp.ID("name"), "Ada"),
		chromedp.SetValue(chromedp.ID("room"), "stage-room"),
		chromedp.Click(chromedp.ID("join")),
		chromedp.WaitVisible(chromedp.CSS(`#state[data-state="connected"]`)),
	)
	if got := evalIn(t, tab, "location", chromedp.Evaluate[string](`location.pathname + location.search`)); got != stage+"/?x=1" {
		t.Errorf("the page is at %q, want %q", got, stage+"/?x=1")
	}
}
