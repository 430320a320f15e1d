package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/wsrelay/wsrelay/shared/auth"
	"github.com/wsrelay/wsrelay/shared/redistest"
)

// chromiumPath finds the headless browser; under CI its absence fails the
// test (make test installs Debian's chromium), elsewhere it skips.
func chromiumPath(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("chromium not found: install it (apt-get install -y chromium)")
	}
	t.Skip("chromium not found (apt-get install -y chromium); this test runs under CI")
	return ""
}

// newBrowser starts headless Chromium with a fresh profile and returns a
// context for its first tab.
func newBrowser(t *testing.T) context.Context {
	t.Helper()
	return newBrowserWithPrefs(t, "")
}

// newBrowserWithPrefs is newBrowser with prefs (JSON, as a profile's
// Default/Preferences file holds them: a user's settings) in its profile,
// and the extra options (flags) given.
func newBrowserWithPrefs(t *testing.T, prefs string, extra ...chromedp.ExecAllocatorOption) context.Context {
	t.Helper()
	profile := t.TempDir()
	if prefs != "" {
		if err := os.MkdirAll(filepath.Join(profile, "Default"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(profile, "Default", "Preferences"), []byte(prefs), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	opts := []chromedp.ExecAllocatorOption{
		chromedp.ExecPath(chromiumPath(t)),
		chromedp.Flag("headless", true),
		chromedp.Flag("no-sandbox", true),
		chromedp.Flag("disable-gpu", true),
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("no-first-run", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("disable-dev-shm-usage", true),
		chromedp.UserDataDir(profile),
		chromedp.WindowSize(1100, 720),
	}
	opts = append(opts, extra...)
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	bctx, cancelBrowser := chromedp.NewContext(actx, chromedp.WithLogf(t.Logf))
	t.Cleanup(func() { cancelBrowser(); cancelAlloc() })
	if err := chromedp.Do(bctx); err != nil { // starts the browser
		t.Fatalf("start chromium: %v", err)
	}
	return bctx
}

// runIn runs actions in tab with a timeout.
func runIn(t *testing.T, tab context.Context, what string, actions ...chromedp.Action[chromedp.Void]) {
	t.Helper()
	ctx, cancel := context.WithTimeout(tab, 20*time.Second)
	defer cancel()
	if err := chromedp.Do(ctx, actions...); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

// evalIn evaluates a JavaScript expression in tab.
func evalIn[T any](t *testing.T, tab context.Context, what string, a chromedp.Action[T]) T {
	t.Helper()
	return evalWithin(t, tab, what, 20*time.Second, a)
}

// evalWithin is evalIn with a budget of its own, for a script that does
// more than one step's work.
func evalWithin[T any](t *testing.T, tab context.Context, what string, budget time.Duration, a chromedp.Action[T]) T {
	t.Helper()
	ctx, cancel := context.WithTimeout(tab, budget)
	defer cancel()
	v, err := chromedp.Run(ctx, a)
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	return v
}

// pageTexts returns the texts of the chat messages shown in tab.
func pageTexts(t *testing.T, tab context.Context) []string {
	t.Helper()
	return evalIn(t, tab, "read messages", chromedp.Evaluate[[]string](
		`[...document.querySelectorAll("#messages .msg .text")].map(e => e.textContent)`))
}

// waitTexts polls tab until its messages end with want (and carry each of
// want exactly once).
func waitTexts(t *testing.T, tab context.Context, who string, want ...string) {
	t.Helper()
	var last []string
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		last = pageTexts(t, tab)
		if len(last) >= len(want) && equalStrings(last[len(last)-len(want):], want) {
			for _, w := range want {
				if n := countString(last, w); n != 1 {
					t.Fatalf("%s: %q shown %d times: %q", who, w, n, last)
				}
			}
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("%s: messages %q, want them to end with %q", who, last, want)
}

func equalStrings(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func countString(list []string, s string) int {
	n := 0
	for _, x := range list {
		if x == s {
			n++
		}
	}
	return n
}

// TestBrowserChatDemo drives the demo page in headless Chromium against
// real functions: two tabs in one room see each other's messages, and a
// tab whose socket is dropped gets the messages published meanwhile, in
// order, once.
func TestBrowserChatDemo(t *testing.T) {
	const secret = "browser-test-secret-0123456789abcdef0123"
	e := env{
		"REDIS_URL":        redistest.URL(t),
		"REDIS_KEY_PREFIX": redistest.Prefix(t),
		// Tab 1 uses a user token; tab 2 and the presence list are
		// anonymous (ALLOW_ANONYMOUS still checks every token presented).
		"ALLOW_ANONYMOUS": "true",
		"JWT_SECRET":      secret,
		"ALLOWED_ORIGINS": "*",
	}
	aliceToken, err := auth.SignHS256(secret, auth.Claims{Subject: "alice", Channels: []string{"e2e-*"}, Publish: []string{"e2e-*"}, Expires: time.Now().Add(time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	ing := start(t, "ingress", e)
	e["INGRESS_URL"] = ing.URL
	eg := start(t, "egress", e)
	pub := newClientPublisher(t, ing.URL)

	browser := newBrowser(t)
	tab1 := browser
	tab2, cancel2 := chromedp.NewContext(browser)
	t.Cleanup(cancel2)
	// A tab lives as long as the context of its first Run: open it without
	// a timeout.
	if err := chromedp.Do(tab2); err != nil {
		t.Fatalf("open tab 2: %v", err)
	}

	join := func(tab context.Context, name, query string) {
		t.Helper()
		runIn(t, tab, "join as "+name,
			chromedp.Navigate(eg.URL+"/"+query),
			chromedp.WaitVisible(chromedp.ID("name")),
			chromedp.SetValue(chromedp.ID("name"), name),
			chromedp.SetValue(chromedp.ID("room"), "e2e-room"),
			chromedp.Click(chromedp.ID("join")),
			chromedp.WaitVisible(chromedp.CSS(`#state[data-state="connected"]`)),
			chromedp.WaitVisible(chromedp.CSS(`#messages .notice`)), // "joined": subscribed
		)
	}
	join(tab1, "Alice", "?token="+aliceToken)
	join(tab2, "Bob", "")

	// Both are listed in the room (presence through the ingress).
	evalIn(t, tab1, "members", chromedp.Poll[bool](
		`(() => { const t = document.querySelector("#members").textContent; return t.includes("alice") && t.includes("Bob"); })()`,
		chromedp.WithPollingTimeout(15*time.Second)))

	// Typed in tab 1, shown in tab 2 (and in tab 1).
	runIn(t, tab1, "send",
		chromedp.SendKeys(chromedp.ID("text"), "hello from Alice"),
		chromedp.Click(chromedp.ID("send")),
	)
	waitTexts(t, tab2, "tab 2", "hello from Alice")
	// Published with Alice's user token from the page: the sender shown is
	// the token's sub, stamped by the server.
	evalIn(t, tab2, "verified sender", chromedp.Poll[bool](
		`[...document.querySelectorAll("#messages .msg")].some(li => li.textContent.includes("hello from Alice") && li.querySelector(".who b").textContent === "alice")`,
		chromedp.WithPollingTimeout(10*time.Second)))
	waitTexts(t, tab1, "tab 1", "hello from Alice")

	// Drop tab 2's socket and publish while it is down. The page's client
	// reconnects on its own (backoff ≤ 0.5 s first), so pin it down by
	// holding the reconnect until the three messages are in.
	evalIn(t, tab2, "hold reconnects", chromedp.Evaluate[bool](
		`(() => { const c = window.wsrelayClient; c.__connect = c.connect; c.connect = () => {}; return true; })()`))
	runIn(t, tab2, "drop",
		chromedp.Click(chromedp.ID("drop")),
		chromedp.WaitVisible(chromedp.CSS(`#state[data-state="disconnected"]`)),
	)
	want := []string{"while down 1", "while down 2", "while down 3"}
	for _, text := range want {
		if _, err := pub.publish("e2e-room", map[string]string{"text": text, "name": "test"}); err != nil {
			t.Fatal(err)
		}
	}
	evalIn(t, tab2, "release reconnects", chromedp.Evaluate[bool](
		`(() => { const c = window.wsrelayClient; c.connect = c.__connect; c.connect(); return true; })()`))
	runIn(t, tab2, "reconnect",
		chromedp.WaitVisible(chromedp.CSS(`#state[data-state="connected"]`)),
	)
	waitTexts(t, tab2, "tab 2 after reconnect", append([]string{"hello from Alice"}, want...)...)
	if got := pageTexts(t, tab2); len(got) != 4 {
		t.Fatalf("tab 2 shows %q, want exactly the 4 messages", got)
	}
	notices := evalIn(t, tab2, "notices", chromedp.Text(chromedp.ID("messages")))
	if !strings.Contains(notices, "resumed with no gap") {
		t.Errorf("tab 2 shows no resume notice: %q", notices)
	}
	waitTexts(t, tab1, "tab 1", append([]string{"hello from Alice"}, want...)...)

	// A screenshot of tab 2 after the resume, outside the repository.
	dir := os.Getenv("SCREENSHOT_DIR")
	if dir == "" {
		dir = t.TempDir()
		if os.Getenv("KEEP_SCREENSHOT") != "" {
			dir = os.TempDir()
		}
	}
	png := evalIn(t, tab2, "screenshot", chromedp.FullScreenshot(100))
	path := filepath.Join(dir, fmt.Sprintf("wsrelay-demo-%d.png", time.Now().UnixNano()))
	if err := os.WriteFile(path, png, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshot: %s", path)
}
