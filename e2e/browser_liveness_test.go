package e2e

import (
	"context"
	"fmt"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/cdproto/cdp"
	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/chromedp"

	"github.com/wsrelay/wsrelay/shared/auth"
	"github.com/wsrelay/wsrelay/shared/redistest"
)

// livenessClient is a page script that starts a browser client (/client.js)
// on wsURL with opts (a JS object literal), subscribes to ch and resolves
// once subscribed. window.t records what the tests check: the texts
// delivered, every close, the pongs, the frames sent and the welcomes.
func livenessClient(wsURL, ch, opts string) string {
	return fmt.Sprintf(`(async () => {
  const { WsRelay } = await import("/client.js");
  const t = window.t = { got: [], closes: [], pongs: 0, sent: [], welcomes: [] };
  // Records what the client sends, with the time since the last close.
  class Spy extends WebSocket { send(d) { t.sent.push(d); super.send(d); } }
  const c = window.c = new WsRelay(%q, { WebSocket: Spy, ...%s });
  c.on("close", (e) => t.closes.push({ code: e.code, reason: e.reason, sent: t.sent.length }));
  c.on("pong", () => t.pongs++);
  c.on("welcome", (f) => t.welcomes.push(f));
  await new Promise((resolve) => c.subscribe(%q, { onMessage: (m) => t.got.push(m.data.text), onSubscribed: resolve }));
  return true;
})()`, wsURL, opts, ch)
}

// waitPage polls expr in tab until it is true. A name expr uses that the
// page has not defined yet (window.t, before a client started without
// waiting has imported its module) counts as not yet true.
func waitPage(t *testing.T, tab context.Context, what, expr string, timeout time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(tab, timeout+5*time.Second)
	defer cancel()
	guarded := `(() => { try { return (` + expr + `); } catch (e) { if (e instanceof ReferenceError) return false; throw e; } })()`
	if _, err := chromedp.Run(ctx, chromedp.Poll[bool](guarded, chromedp.WithPollingTimeout(timeout), chromedp.WithPollingInterval(20*time.Millisecond))); err != nil {
		state := evalIn(t, tab, "state", chromedp.Evaluate[string](`JSON.stringify({ state: window.c?.state, t: window.t })`))
		t.Fatalf("%s: %v; page: %s", what, err, state)
	}
}

// TestBrowserClientSilentConnection: a connection that goes silent
// without closing (a proxy that stops forwarding both ways and keeps the
// sockets open, as a NAT that forgot the mapping or a laptop that slept)
// is taken for dead by the browser client's probe, dropped, and resumed
// with nothing lost. The egress pings rarely here, so that only the
// client can notice.
func TestBrowserClientSilentConnection(t *testing.T) {
	e := env{
		"REDIS_URL":        redistest.URL(t),
		"REDIS_KEY_PREFIX": redistest.Prefix(t),
		"ALLOW_ANONYMOUS":  "true",
		"ALLOWED_ORIGINS":  "*",
		"PING_INTERVAL":    "60s",
	}
	ing := start(t, "ingress", e)
	eg := start(t, "egress", e)
	u, err := url.Parse(eg.URL)
	if err != nil {
		t.Fatal(err)
	}
	proxy := newProxy(t, u.Host)
	pub := newClientPublisher(t, ing.URL)
	const ch = "e2e-silent"
	publish := func(text string) {
		t.Helper()
		if _, err := pub.publish(ch, map[string]string{"text": text}); err != nil {
			t.Fatal(err)
		}
	}

	tab := newBrowser(t)
	runIn(t, tab, "open a page of the egress", chromedp.Navigate(eg.URL+"/"))
	evalIn(t, tab, "start the client", chromedp.Evaluate[bool](
		livenessClient("ws://"+proxy.Addr()+"/ws", ch, `{ activityTimeout: 1000, pongTimeout: 1000, minBackoff: 100, maxBackoff: 200 }`),
		chromedp.EvalAwaitPromise))
	publish("m1")
	waitPage(t, tab, "m1 delivered", `t.got.join() === "m1"`, 10*time.Second)

	proxy.Stall()
	publish("m2")
	publish("m3")
	waitPage(t, tab, "the silent connection dropped", `t.closes.length > 0`, 10*time.Second)
	first := evalIn(t, tab, "first close", chromedp.Evaluate[string](`t.closes[0].code + " " + t.closes[0].reason`))
	if first != "1006 no answer to ping" {
		t.Fatalf("first close %q, want 1006 no answer to ping", first)
	}
	proxy.Unstall()
	waitPage(t, tab, "resumed", `c.state === "connected" && t.got.length >= 3`, 15*time.Second)
	publish("m4")
	waitPage(t, tab, "m4 delivered", `t.got.length >= 4`, 10*time.Second)
	if got := evalIn(t, tab, "delivered", chromedp.Evaluate[string](`t.got.join()`)); got != "m1,m2,m3,m4" {
		t.Fatalf("delivered %q, want m1,m2,m3,m4 (each once, in order)", got)
	}
}

// TestBrowserClientIdleTimeout: with the egress's IDLE_TIMEOUT announced
// in its welcome, a client that would probe much sooner sends no ping on
// an idle connection before the server closes it (4000), and reconnects
// after that close.
func TestBrowserClientIdleTimeout(t *testing.T) {
	e := env{
		"REDIS_URL":        redistest.URL(t),
		"REDIS_KEY_PREFIX": redistest.Prefix(t),
		"ALLOW_ANONYMOUS":  "true",
		"IDLE_TIMEOUT":     "2s",
	}
	eg := start(t, "egress", e)
	tab := newBrowser(t)
	runIn(t, tab, "open a page of the egress", chromedp.Navigate(eg.URL+"/"))
	evalIn(t, tab, "start the client", chromedp.Evaluate[bool](
		livenessClient(strings.Replace(eg.URL, "http:", "ws:", 1)+"/ws", "e2e-idle", `{ activityTimeout: 300, pongTimeout: 300, minBackoff: 100, maxBackoff: 200 }`),
		chromedp.EvalAwaitPromise))
	if ms := evalIn(t, tab, "welcome", chromedp.Evaluate[int](`t.welcomes[0].idle_timeout_ms ?? 0`)); ms != 2000 {
		t.Fatalf("welcome idle_timeout_ms %d, want 2000", ms)
	}
	waitPage(t, tab, "the server's idle close", `t.closes.length > 0`, 10*time.Second)
	got := evalIn(t, tab, "close and pings", chromedp.Evaluate[string](
		`t.closes[0].code + ", " + t.sent.slice(0, t.closes[0].sent).filter((s) => s.includes('"ping"')).length + " pings"`))
	if got != "4000, 0 pings" {
		t.Fatalf("first close: %s; want the server's idle close 4000 with no ping before it", got)
	}
	waitPage(t, tab, "reconnected", `c.state === "connected" && t.welcomes.length === 2`, 10*time.Second)
}

// TestBrowserClientNetworkEvents: Chromium's network events as DevTools
// emulates them. "offline" and "online" probe a connected client (the
// server's pong answers); "online" ends a client's wait to reconnect.
func TestBrowserClientNetworkEvents(t *testing.T) {
	e := env{
		"REDIS_URL":        redistest.URL(t),
		"REDIS_KEY_PREFIX": redistest.Prefix(t),
		"ALLOW_ANONYMOUS":  "true",
	}
	eg := start(t, "egress", e)
	tab := newBrowser(t)
	runIn(t, tab, "open a page of the egress", chromedp.Navigate(eg.URL+"/"))
	setOffline := func(offline bool) {
		t.Helper()
		runIn(t, tab, fmt.Sprintf("offline %v", offline), chromedp.Func(func(ctx context.Context, tgt *chromedp.Target) error {
			_, err := cdp.Call(ctx, tgt, network.OverrideNetworkState, network.OverrideNetworkStateParams{
				Offline: offline, DownloadThroughput: -1, UploadThroughput: -1,
			})
			return err
		}))
		waitPage(t, tab, "navigator.onLine", fmt.Sprintf(`navigator.onLine === %v`, !offline), 5*time.Second)
	}
	// Every backoff its longest (60 s): only "online" can end the wait.
	evalIn(t, tab, "start the client", chromedp.Evaluate[bool](
		`(Math.random = () => 1, `+livenessClient(strings.Replace(eg.URL, "http:", "ws:", 1)+"/ws", "e2e-net", `{ pongTimeout: 2000, minBackoff: 60000, maxBackoff: 60000 }`)+`)`,
		chromedp.EvalAwaitPromise))

	setOffline(true)
	waitPage(t, tab, "probed on offline", `t.pongs === 1`, 5*time.Second)
	setOffline(false)
	waitPage(t, tab, "probed on online", `t.pongs === 2`, 5*time.Second)

	evalIn(t, tab, "drop", chromedp.Evaluate[bool](`(c.drop(), c.state === "disconnected")`))
	setOffline(true)
	setOffline(false)
	waitPage(t, tab, "reconnected on online", `c.state === "connected" && t.welcomes.length === 2`, 5*time.Second)

	// A closed client does not react to the network any more.
	evalIn(t, tab, "close", chromedp.Evaluate[bool](`(c.close(), true)`))
	setOffline(true)
	setOffline(false)
	if n := evalIn(t, tab, "pings after close", chromedp.Evaluate[int](`t.sent.filter((s) => s.includes('"ping"')).length`)); n != 2 {
		t.Fatalf("%d pings sent, want the 2 probes before close()", n)
	}
}

// TestBrowserClientConnectTimeout: with probes off, a dial whose upgrade
// hangs (a proxy that accepts the connection and forwards nothing) is
// dropped after connectTimeout, not left to Chromium (which waits four
// minutes on an upgrade, and for ever on a welcome), and the next dial,
// through the proxy working again, subscribes.
func TestBrowserClientConnectTimeout(t *testing.T) {
	e := env{
		"REDIS_URL":        redistest.URL(t),
		"REDIS_KEY_PREFIX": redistest.Prefix(t),
		"ALLOW_ANONYMOUS":  "true",
		"ALLOWED_ORIGINS":  "*",
	}
	ing := start(t, "ingress", e)
	eg := start(t, "egress", e)
	u, err := url.Parse(eg.URL)
	if err != nil {
		t.Fatal(err)
	}
	proxy := newProxy(t, u.Host)
	proxy.Stall()
	const ch = "e2e-connect-timeout"
	tab := newBrowser(t)
	runIn(t, tab, "open a page of the egress", chromedp.Navigate(eg.URL+"/"))
	// Not awaited: the subscribe cannot be answered while the proxy stalls.
	evalIn(t, tab, "start the client", chromedp.Evaluate[bool](
		`(window.subscribed = `+livenessClient("ws://"+proxy.Addr()+"/ws", ch, `{ activityTimeout: -1, connectTimeout: 1000, minBackoff: 100, maxBackoff: 200 }`)+`, true)`))
	// Within 5 s: the egress itself gives up on the upgrade request it
	// never received after 10 s (ReadHeaderTimeout), which a proxy that
	// hangs would not do.
	waitPage(t, tab, "the hanging dial dropped", `t.closes.length > 0`, 5*time.Second)
	if first := evalIn(t, tab, "first close", chromedp.Evaluate[string](`t.closes[0].code + " " + t.closes[0].reason`)); first != "1006 no welcome" {
		t.Fatalf("first close %q, want 1006 no welcome", first)
	}
	proxy.Unstall()
	evalIn(t, tab, "subscribed", chromedp.Evaluate[bool](`window.subscribed`, chromedp.EvalAwaitPromise))
	pub := newClientPublisher(t, ing.URL)
	if _, err := pub.publish(ch, map[string]string{"text": "m1"}); err != nil {
		t.Fatal(err)
	}
	waitPage(t, tab, "m1 delivered", `t.got.join() === "m1"`, 10*time.Second)
}

// TestBrowserClientTokenExpired: a client given a token (no getToken)
// whose token expires is closed by the egress with 4004 and stops there,
// with the close in its final state: a reconnect with the expired token
// would be refused at the upgrade, which the browser sees only as a
// close, and the client would dial for ever.
func TestBrowserClientTokenExpired(t *testing.T) {
	const secret = "browser-expiry-secret-0123456789abcdef0123"
	e := env{
		"REDIS_URL":        redistest.URL(t),
		"REDIS_KEY_PREFIX": redistest.Prefix(t),
		"JWT_SECRET":       secret,
	}
	eg := start(t, "egress", e)
	tab := newBrowser(t)
	runIn(t, tab, "open a page of the egress", chromedp.Navigate(eg.URL+"/"))
	token, err := auth.SignHS256(secret, auth.Claims{Subject: "alice", Channels: []string{"e2e-*"}, Expires: time.Now().Add(3 * time.Second)})
	if err != nil {
		t.Fatal(err)
	}
	evalIn(t, tab, "start the client", chromedp.Evaluate[bool](
		livenessClient(strings.Replace(eg.URL, "http:", "ws:", 1)+"/ws", "e2e-expiry", fmt.Sprintf(`{ token: %q, minBackoff: 100, maxBackoff: 200 }`, token)),
		chromedp.EvalAwaitPromise))
	evalIn(t, tab, "record states", chromedp.Evaluate[bool](
		`(t.states = [], c.on("state", (s, d) => t.states.push(s + (d?.code ? " " + d.code : ""))), true)`))
	waitPage(t, tab, "the 4004 close", `t.closes.length > 0`, 10*time.Second)
	// Time for the reconnects the client must not make.
	time.Sleep(time.Second)
	got := evalIn(t, tab, "closes and states", chromedp.Evaluate[string](
		`t.closes.map((e) => e.code) + " | " + t.states + " | " + c.state + " | " + t.welcomes.length`))
	if want := "4004 | closed 4004 | closed | 1"; got != want {
		t.Fatalf("closes | states | state | welcomes: %s; want %s", got, want)
	}
}
