//go:build !wsrelay_lean

package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/auth"
	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/protocol"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/stream"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// TestDeliveriesCountReplays: messages replayed by a resume are counted
// as deliveries, and left out of the live delivery latency.
func TestDeliveriesCountReplays(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"})
	ks := keys.Scheme{Prefix: prefix}
	store := stream.NewStore(rdb)
	for i := range 3 {
		if _, err := store.Append(t.Context(), []stream.Append{{Stream: ks.Stream("r"), Notify: ks.Notify("r"),
			Msg: stream.Message{Channel: "r", TS: time.Now().UnixMilli(), Data: []byte(fmt.Sprint(i))}}}); err != nil {
			t.Fatal(err)
		}
	}
	ws, _, err := websocket.DefaultDialer.Dial("ws"+strings.TrimPrefix(e.srv.URL, "http")+"/ws", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	send(t, ws, map[string]any{"type": "subscribe", "channel": "r", "after": "0-0"})
	for range 3 {
		nextData(t, ws)
	}
	testkit.Eventually(t, 5*time.Second, func() error {
		m, err := scrape(e.srv.URL)
		if err != nil {
			return err
		}
		if !strings.Contains(m, "wsrelay_egress_deliveries_total 3\n") {
			return fmt.Errorf("deliveries not 3 in:\n%s", m)
		}
		if strings.Contains(m, "wsrelay_egress_delivery_latency_seconds_count 3") {
			return fmt.Errorf("replays counted in the live latency")
		}
		return nil
	})
}

// TestRefusedAtConnect: a socket whose registration fails is closed with
// 1013 before anything else is written, leaves no record, and is counted
// among the closes like any other (SCF counts it as a server close, 439),
// and logged like any other: with its user, whom an operator looking into
// "alice cannot connect" searches for.
func TestRefusedAtConnect(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	// The pipelines writing carol's registry records fail.
	rdb.AddHook(redistest.Fail{Pipeline: func(cmds []redis.Cmder) bool {
		for _, c := range cmds {
			if a := c.Args(); len(a) > 1 && a[1] == ks.UserConns("carol") {
				return true
			}
		}
		return false
	}})
	var logs testkit.SyncBuffer
	e := startEgressLogging(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"}, &logs)
	ws, _, err := websocket.DefaultDialer.Dial("ws"+strings.TrimPrefix(e.srv.URL, "http")+"/ws?user=carol", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	_ = ws.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, b, err := ws.ReadMessage()
	if ce, ok := err.(*websocket.CloseError); !ok || ce.Code != 1013 {
		t.Fatalf("first frame %s, %v; want close 1013", b, err)
	}
	if n := len(e.s.hub.snapshotConns()); n != 0 {
		t.Errorf("%d connections left in the hub", n)
	}
	closed := refusalEnd(t, e, &logs)
	if len(closed) != 1 || closed[0]["level"] != "WARN" || closed[0]["user"] != "carol" || closed[0]["close_code"] != float64(1013) ||
		closed[0]["scf_status"] != float64(439) || closed[0]["frames_out"] != float64(0) || closed[0]["err"] == nil {
		t.Errorf("the refusal's log lines %v, want one WARN naming carol, 1013, 439, no frame out and the error", closed)
	}
}

// TestRefusedWhileDraining: a socket whose upgrade was under way when the
// drain began, past the drain check that answers 503, is closed with 1001
// right after the upgrade, as every connection ends (its close frame, then
// the end of the stream), and logged and counted as any other server
// close (docs/protocol.md: 439).
func TestRefusedWhileDraining(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	var logs testkit.SyncBuffer
	e := startEgressLogging(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"}, &logs)
	// The drain begins during the handshake, as drain does first.
	check := e.s.upgrader.CheckOrigin
	e.s.upgrader.CheckOrigin = func(r *http.Request) bool {
		e.s.draining.Store(true)
		return check(r)
	}
	c := rawUpgrade(t, e, nil, "/ws?user=dave")
	if code := c.closed(3 * time.Second); code != protocol.CloseGoingAway {
		t.Fatalf("close %d, want 1001", code)
	}
	closed := refusalEnd(t, e, &logs)
	if len(closed) != 1 || closed[0]["level"] != "INFO" || closed[0]["user"] != "dave" || closed[0]["close_code"] != float64(1001) ||
		closed[0]["closed_by"] != "server" || closed[0]["scf_status"] != float64(439) || closed[0]["frames_out"] != float64(0) {
		t.Errorf("the refusal's log lines %v, want one INFO line naming dave, 1001 by the server, 439, no frame out", closed)
	}
}

// scrape returns the egress's /metrics page.
func scrape(base string) (string, error) {
	resp, err := http.Get(base + "/metrics")
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

// TestMetricsToken: with METRICS_TOKEN set, /metrics answers only a scrape
// that carries it.
func TestMetricsToken(t *testing.T) {
	t.Parallel()
	const tok = "scrape-token-0123456789"
	e := startSecEgress(t, map[string]string{"ALLOW_ANONYMOUS": "true", "METRICS_TOKEN": tok})
	get := func(auth string) (int, string) {
		req, _ := http.NewRequest("GET", e.srv.URL+"/metrics", nil)
		if auth != "" {
			req.Header.Set("Authorization", auth)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode == 401 && resp.Header.Get("WWW-Authenticate") == "" {
			t.Errorf("401 without WWW-Authenticate")
		}
		return resp.StatusCode, string(b)
	}
	for _, auth := range []string{"", "Bearer wrong", tok} {
		if code, body := get(auth); code != 401 || !strings.Contains(body, `"unauthorized"`) {
			t.Errorf("%q: %d %.200s", auth, code, body)
		}
	}
	if code, body := get("Bearer " + tok); code != 200 || !strings.Contains(body, "wsrelay_egress_") {
		t.Errorf("with the token: %d %.200s", code, body)
	}
}

// TestResumeOverflowIsSlowConsumer: a resume whose buffer of live messages
// overflowed while its replay waited for the client is closed 4002, like
// a live queue that overflowed, once it has sent the batch of history it
// was sending, and counted as one in
// wsrelay_egress_slow_consumer_closes_total (the WsrelaySlowConsumers
// alert counts 4002 closes with it).
func TestResumeOverflowIsSlowConsumer(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	logs := &testkit.SyncBuffer{}
	e := startEgressLogging(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true", "SEND_QUEUE": "16", "WRITE_TIMEOUT": "30s"}, logs)
	<-e.s.hub.inbox.ready
	ks := keys.Scheme{Prefix: prefix}
	data := []byte(`"` + strings.Repeat("x", 64<<10) + `"`)
	publish := func(n int) []string { return appendData(t, rdb, ks, "ro", data, n) }
	// More history than the socket's buffers hold: the replay waits for
	// the client, which reads nothing for now.
	var hist []string
	for range 4 {
		hist = append(hist, publish(50)...)
	}
	ws, _, err := smallBufDialer.Dial(e.url(nil), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	readUntil(t, ws, `"welcome"`)
	send(t, ws, map[string]any{"type": "subscribe", "channel": "ro", "after": hist[0]})
	// The replay's first frame follows its first read: a batch of 100
	// entries, 6.4 MB, from Redis. Under half a second on an idle machine,
	// it took over 5 s under -race on a loaded one (the bound is on the
	// replay getting under way, not on its speed).
	readUntilWithin(t, ws, `"message"`, 30*time.Second)
	// More live messages than SEND_QUEUE arrive meanwhile: the resume's
	// buffer overflows.
	testkit.Eventually(t, 5*time.Second, func() error {
		cs := e.s.hub.state(ks.Notify("ro"))
		if cs == nil {
			return fmt.Errorf("no channel")
		}
		cs.mu.Lock()
		defer cs.mu.Unlock()
		if len(cs.resuming) != 1 {
			return fmt.Errorf("not resuming")
		}
		return nil
	})
	publish(20)
	testkit.Eventually(t, 5*time.Second, func() error {
		cs := e.s.hub.state(ks.Notify("ro"))
		cs.mu.Lock()
		defer cs.mu.Unlock()
		for _, r := range cs.resuming {
			if r.overflow {
				return nil
			}
		}
		var st []string
		for _, r := range cs.resuming {
			st = append(st, fmt.Sprintf("buf %d dropped %v caught %v gap %v live %v", len(r.buf), r.dropped, r.caught, r.gap, r.live))
		}
		return fmt.Errorf("the resume's buffer did not overflow: %d resuming %v reconnects %d last %v subs %d; log:\n%s", len(cs.resuming), st, e.s.hub.reconnects.Load(), cs.last, len(cs.subs), logs.String())
	})
	// The replay ends with the batch it is sending: the client, which
	// fell SEND_QUEUE behind the live messages, is not sent the rest of
	// the history before it is closed (a replay that never catches up
	// ends).
	// Up to 6.4 MB through a 16 KiB receive buffer, at under 1 MB/s on
	// an idle machine (delayed acknowledgements).
	if got, code := readMessages(ws, 45*time.Second, nil); code != protocol.CloseSlowConsumer || len(got) > replayBatch {
		t.Fatalf("got %d more messages, then close %d; want at most the first batch's %d, then 4002", len(got), code, replayBatch)
	}
	testkit.Eventually(t, 5*time.Second, func() error {
		m, err := scrape(e.srv.URL)
		if err != nil {
			return err
		}
		for _, want := range []string{"wsrelay_egress_slow_consumer_closes_total 1\n", `wsrelay_egress_closes_total{status="439"} 1` + "\n",
			"wsrelay_egress_connections 0\n", "wsrelay_egress_subscriptions 0\n", "wsrelay_egress_channels 0\n"} {
			if !strings.Contains(m, want) {
				return fmt.Errorf("no %q in:\n%s", want, grepMetrics(m, "wsrelay_egress_"))
			}
		}
		return nil
	})
}

// grepMetrics is the lines of a /metrics page that start with prefix.
func grepMetrics(page, prefix string) string {
	var b strings.Builder
	for l := range strings.Lines(page) {
		if strings.HasPrefix(l, prefix) {
			b.WriteString(l)
		}
	}
	return b.String()
}

// metricsStatus is what /metrics answers a scrape with the right
// token.
const metricsStatus = 200

// checkEndMetrics checks the metrics of e, whose sockets have all ended,
// against its log: n connection ends, each counted once by the status it
// was logged with (and the slow-consumer closes by their own counter),
// and the gauges back to nothing.
func checkEndMetrics(t *testing.T, e *secEgress, log string, n int) {
	t.Helper()
	m, err := scrape(e.srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	ends := loggedEnds(t, log)
	if ends.total != n {
		t.Errorf("%d connection ends logged, want %d", ends.total, n)
	}
	want := []string{"wsrelay_egress_connections 0", "wsrelay_egress_subscriptions 0", "wsrelay_egress_channels 0",
		fmt.Sprintf("wsrelay_egress_slow_consumer_closes_total %d", ends.slow)}
	for status, k := range ends.byStatus {
		want = append(want, fmt.Sprintf(`wsrelay_egress_closes_total{status="%d"} %d`, status, k))
	}
	for _, w := range want {
		if !strings.Contains(m, w+"\n") {
			t.Errorf("metrics lack %q:\n%s", w, grepMetrics(m, "wsrelay_egress_"))
		}
	}
	var total int
	for l := range strings.Lines(grepMetrics(m, "wsrelay_egress_closes_total{")) {
		var k int
		fmt.Sscanf(l[strings.LastIndexByte(l, ' ')+1:], "%d", &k)
		total += k
	}
	if total != n {
		t.Errorf("%d closes counted, want %d", total, n)
	}
}

// connectionEnds are the "connection closed" lines of an egress's log:
// how many, by scf_status, and how many were slow-consumer closes (4002).
type connectionEnds struct {
	total, slow int
	byStatus    map[int]int
}

func loggedEnds(t *testing.T, log string) connectionEnds {
	t.Helper()
	ends := connectionEnds{byStatus: map[int]int{}}
	for l := range strings.Lines(log) {
		var r struct {
			Msg       string
			CloseCode int    `json:"close_code"`
			ClosedBy  string `json:"closed_by"`
			SCFStatus int    `json:"scf_status"`
		}
		if err := json.Unmarshal([]byte(l), &r); err != nil {
			t.Fatalf("log line %q: %v", l, err)
		}
		if r.Msg != "connection closed" {
			continue
		}
		ends.total++
		ends.byStatus[r.SCFStatus]++
		if r.CloseCode == protocol.CloseSlowConsumer && r.ClosedBy == "server" {
			ends.slow++
		}
	}
	return ends
}

// TestGaugesFollowSubscriptions: the subscription, channel and connection
// gauges follow each way a subscription or a connection ends while others
// go on — an unsubscribe, a refresh that no longer allows a channel, a
// token's expiry (4004), a drain (1001); refused subscribes hold nothing —
// and each end is counted once.
func TestGaugesFollowSubscriptions(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	logs := &testkit.SyncBuffer{}
	e := startEgressLogging(t, rdb, prefix, map[string]string{"JWT_SECRET": testSecret}, logs)
	<-e.s.hub.inbox.ready
	expect := func(want ...string) {
		t.Helper()
		testkit.Eventually(t, 5*time.Second, func() error {
			m, err := scrape(e.srv.URL)
			if err != nil {
				return err
			}
			for _, w := range want {
				if !strings.Contains(m, w+"\n") {
					return fmt.Errorf("no %q in:\n%s", w, grepMetrics(m, "wsrelay_egress_"))
				}
			}
			return nil
		})
	}
	dial := func(c auth.Claims, q url.Values) *websocket.Conn {
		if q == nil {
			q = url.Values{}
		}
		q.Set("token", token(t, c))
		ws, _, err := e.dial(t, q, nil)
		if err != nil {
			t.Fatal(err)
		}
		next(t, ws, protocol.TypeWelcome)
		return ws
	}
	all := []string{"a", "b", "c", "d"}
	a := dial(auth.Claims{Subject: "alice", Channels: all, Expires: time.Now().Add(time.Hour)}, url.Values{"channels": {"a"}})
	next(t, a, protocol.TypeSubscribed)
	for _, ch := range []string{"b", "c"} {
		send(t, a, map[string]any{"type": "subscribe", "channel": ch, "after": "0-0"})
		next(t, a, protocol.TypeSubscribed)
	}
	// Refused subscribes hold nothing.
	send(t, a, map[string]any{"type": "subscribe", "channel": "a"})
	next(t, a, protocol.TypeError)
	send(t, a, map[string]any{"type": "subscribe", "channel": "x"})
	next(t, a, protocol.TypeError)
	// exp has one-second precision: expires 1–2 s from now.
	short := time.Now().Add(2 * time.Second)
	b := dial(auth.Claims{Subject: "bob", Channels: all, Expires: short}, url.Values{"channels": {"c,d"}})
	next(t, b, protocol.TypeSubscribed)
	next(t, b, protocol.TypeSubscribed)
	expect("wsrelay_egress_connections 2", "wsrelay_egress_subscriptions 5", "wsrelay_egress_channels 4")

	send(t, a, map[string]any{"type": "unsubscribe", "channel": "a"})
	next(t, a, protocol.TypeUnsubscribed)
	expect("wsrelay_egress_subscriptions 4", "wsrelay_egress_channels 3")
	send(t, a, map[string]any{"type": "refresh", "token": token(t, auth.Claims{Subject: "alice", Channels: []string{"c"}, Expires: time.Now().Add(time.Hour)})})
	next(t, a, protocol.TypeRefreshed)
	expect("wsrelay_egress_subscriptions 3", "wsrelay_egress_channels 2")

	// bob's token expires: 4004, a close the server started.
	if code := closeCode(t, b, 5*time.Second); code != protocol.CloseTokenExpired {
		t.Fatalf("bob closed %d, want 4004", code)
	}
	expect("wsrelay_egress_connections 1", "wsrelay_egress_subscriptions 1", "wsrelay_egress_channels 1",
		`wsrelay_egress_closes_total{status="439"} 1`)

	// The drain closes alice (1001); the metrics are read from the
	// handler, the listener being closed.
	e.stop()
	rec := httptest.NewRecorder()
	e.s.metrics.handler()(rec, httptest.NewRequest("GET", "/metrics", nil))
	m := rec.Body.String()
	for _, w := range []string{"wsrelay_egress_connections 0", "wsrelay_egress_subscriptions 0", "wsrelay_egress_channels 0",
		`wsrelay_egress_closes_total{status="439"} 2`, "wsrelay_egress_slow_consumer_closes_total 0"} {
		if !strings.Contains(m, w+"\n") {
			t.Errorf("after the drain, no %q in:\n%s", w, grepMetrics(m, "wsrelay_egress_"))
		}
	}
	if n := loggedEnds(t, logs.String()).total; n != 2 {
		t.Errorf("%d ends logged, want 2", n)
	}
}

// TestRefusedUpgradesCounted: every upgrade refused with an HTTP error is
// counted once, by its error code, in
// wsrelay_egress_upgrades_refused_total.
func TestRefusedUpgradesCounted(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true", "MAX_CONNECTIONS": "1"})
	wsURL := "ws" + strings.TrimPrefix(e.srv.URL, "http") + "/ws"
	refused := func(rawURL string, h http.Header, status int) {
		t.Helper()
		ws, resp, err := websocket.DefaultDialer.Dial(rawURL, h)
		if err == nil {
			ws.Close()
			t.Fatalf("%s: upgraded", rawURL)
		}
		if resp == nil || resp.StatusCode != status {
			t.Fatalf("%s: %v, want %d", rawURL, err, status)
		}
	}
	refused(wsURL+"?channels=a,b%20c", nil, http.StatusBadRequest)
	refused(wsURL, http.Header{"Origin": {"https://elsewhere.example"}}, http.StatusForbidden)
	resp, err := http.Get(e.srv.URL + "/ws") // no upgrade headers
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	held, _, err := websocket.DefaultDialer.Dial(wsURL, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	refused(wsURL, nil, http.StatusServiceUnavailable)
	refused(wsURL, nil, http.StatusServiceUnavailable)
	m, err := scrape(e.srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	got := grepMetrics(m, "wsrelay_egress_upgrades_refused_total{")
	for _, want := range []string{
		`wsrelay_egress_upgrades_refused_total{code="invalid_channel"} 1`,
		`wsrelay_egress_upgrades_refused_total{code="origin_not_allowed"} 1`,
		`wsrelay_egress_upgrades_refused_total{code="bad_handshake"} 1`,
		`wsrelay_egress_upgrades_refused_total{code="too_many_connections"} 2`,
	} {
		if !strings.Contains(got, want+"\n") {
			t.Errorf("no %s in:\n%s", want, got)
		}
	}
	if n := strings.Count(got, "\n"); n != 4 {
		t.Errorf("%d series, want 4:\n%s", n, got)
	}
}

// refusalEnd waits until e counts one server close as status 439 (a
// refusal right after the upgrade), and returns the "connection closed"
// log lines, which should be that refusal's one line.
func refusalEnd(t *testing.T, e *secEgress, logs *testkit.SyncBuffer) []map[string]any {
	t.Helper()
	testkit.Eventually(t, 5*time.Second, func() error {
		m, err := scrape(e.srv.URL)
		if err != nil {
			return err
		}
		if !strings.Contains(m, `wsrelay_egress_closes_total{status="439"} 1`+"\n") {
			return fmt.Errorf("the refusal is not counted in:\n%s", m)
		}
		return nil
	})
	var closed []map[string]any
	for _, r := range logs.JSONLines(t) {
		if r["msg"] == "connection closed" {
			closed = append(closed, r)
		}
	}
	return closed
}

// TestTargetedUndeliveredCounted: a targeted message for a connection or
// a user this instance no longer holds (it closed, or moved, between the
// ingress's registry read and the delivery) is dropped, and counted
// (wsrelay_egress_targeted_undelivered_total): it was answered 202.
func TestTargetedUndeliveredCounted(t *testing.T) {
	t.Parallel()
	rdb, ks, e, gone, goneID, live, liveID := goneAndLive(t)
	gone.Close()
	testkit.Eventually(t, 5*time.Second, func() error {
		if n := len(e.s.hub.snapshotConns()); n != 1 {
			return fmt.Errorf("%d connections", n)
		}
		return nil
	})
	if v := undeliveredAfter(t, rdb, ks, e, live, stream.ToConnection(goneID), stream.ToUser("gone"), stream.ToUser("nobody"), stream.ToConnection(liveID)); v != "3" {
		t.Fatalf("wsrelay_egress_targeted_undelivered_total %s, want 3", v)
	}
}

// TestTargetedToClosingCounted: a connection the server is closing (an
// operator's disconnect, 4003, which its client has not answered) is
// still held until the close ends, though no longer listed in the
// registry (TestClosingConnectionUnlisted); targeted messages the ingress
// routed to it before that and that reach it meanwhile are dropped with its queue,
// and counted like those for a connection already gone. A user's message
// is counted only when none of the user's connections took it.
func TestTargetedToClosingCounted(t *testing.T) {
	t.Parallel()
	// gone's client does not read, so it never answers the close.
	rdb, ks, e, _, goneID, live, liveID := goneAndLive(t)
	toInbox(t, rdb, ks, e, []byte(`1`), stream.Disconnect(goneID))
	waitClosing(t, e, goneID)
	if v := undeliveredAfter(t, rdb, ks, e, live, stream.ToConnection(goneID), stream.ToUser("gone"), stream.ToUser("live"), stream.ToConnection(liveID)); v != "2" {
		t.Fatalf("wsrelay_egress_targeted_undelivered_total %s, want 2", v)
	}
	if c := e.s.hub.snapshotConns(); len(c) != 2 {
		t.Fatalf("%d connections held, want 2: the closing one must still be held for this test to mean anything", len(c))
	}
}

// TestTargetedDroppedAtCloseCounted: targeted messages still queued for a
// connection when the server closes it (here an operator's disconnect,
// 4003, to a client that had stopped reading) are dropped with the queue
// and lost (they are not history): counted as undelivered. What the
// client reads and what was counted make up every message sent to it.
func TestTargetedDroppedAtCloseCounted(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"})
	<-e.s.hub.inbox.ready
	ws, c := smallBuffers(t, e, url.Values{"user": {"slow"}})
	id := c.id
	live, _, err := e.dial(t, url.Values{"user": {"live"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	liveID := next(t, live, "welcome").ConnectionID
	// The client reads nothing. Its first message, larger than the socket
	// buffers hold (some 50 KiB here), blocks the writer for good once
	// the writer has taken it, and the n sent only then wait queued
	// behind it. Not before: a writer busy with a write the socket still
	// takes goes on to take what is queued by then, and a loaded machine
	// had it take every message sent in halves, the writer seen busy
	// between them, and leave none queued. The inbox is read in order:
	// live's message, which it reads, marks the first one delivered.
	toInbox(t, rdb, ks, e, []byte(`"`+strings.Repeat("x", 320<<10)+`"`), stream.ToConnection(id))
	toInbox(t, rdb, ks, e, []byte(`1`), stream.ToConnection(liveID))
	next(t, live, "message")
	testkit.Eventually(t, 10*time.Second, func() error {
		c.mu.Lock()
		defer c.mu.Unlock()
		if len(c.queue) > 0 {
			return fmt.Errorf("the writer has not taken the first message yet")
		}
		return nil
	})
	const n = 20
	routes := make([]stream.Route, n)
	for i := range routes {
		routes[i] = stream.ToConnection(id)
	}
	toInbox(t, rdb, ks, e, []byte(`1`), routes...)
	toInbox(t, rdb, ks, e, []byte(`1`), stream.Disconnect(id))
	waitClosing(t, e, id)
	got, code := readMessages(ws, 10*time.Second, nil)
	if code != 4003 {
		t.Fatalf("closed %d after %d messages, want 4003", code, len(got))
	}
	m, err := scrape(e.srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	if v := metricValue(t, m, "wsrelay_egress_targeted_undelivered_total"); len(got) != 1 || v != fmt.Sprint(n) {
		t.Fatalf("%d of %d messages read, undelivered counter %s: want the first read and the rest counted", len(got), n+1, v)
	}
}

// TestUserMessageDroppedAtCloseDeliveredElsewhere: a message to a user
// is one message, whatever number of the user's connections it is queued
// for. Still queued for one of them when the server closes it (here an
// operator's disconnect, 4003, to a client that had stopped reading),
// it is dropped there, but it did not go nowhere: the user's other
// connection read it. wsrelay_egress_targeted_undelivered_total counts
// the messages that went nowhere (docs/metrics.md), as the delivery
// counts a user's message only when none of the user's connections took
// it (TestTargetedToClosingCounted); with both connections closed before
// writing it, it counts once.
func TestUserMessageDroppedAtCloseDeliveredElsewhere(t *testing.T) {
	t.Parallel()
	for _, otherReads := range []bool{true, false} {
		t.Run(fmt.Sprintf("otherReads=%v", otherReads), func(t *testing.T) {
			t.Parallel()
			rdb, prefix := redistest.Client(t)
			ks := keys.Scheme{Prefix: prefix}
			e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"})
			<-e.s.hub.inbox.ready
			const n = 5
			ws1, c1, ws2, c2 := bobHeld(t, rdb, ks, e, n)
			disconnect := []stream.Route{stream.Disconnect(c1.id)}
			if !otherReads {
				disconnect = append(disconnect, stream.Disconnect(c2.id))
			}
			toInbox(t, rdb, ks, e, []byte(`1`), disconnect...)
			waitClosing(t, e, c1.id)
			if got, code := readMessages(ws1, 10*time.Second, nil); code != 4003 {
				t.Fatalf("first connection closed %d after %d messages, want 4003", code, len(got))
			}
			want := "0"
			if otherReads {
				// The other connection reads: the big message, then bob's n.
				k := 0
				if got, _ := readMessages(ws2, 10*time.Second, func(string) bool { k++; return k == n+1 }); len(got) != n+1 {
					t.Fatalf("the other connection read %d messages, want %d", len(got), n+1)
				}
			} else {
				waitClosing(t, e, c2.id)
				if got, code := readMessages(ws2, 10*time.Second, nil); code != 4003 {
					t.Fatalf("second connection closed %d after %d messages, want 4003", code, len(got))
				}
				want = fmt.Sprint(n)
			}
			m, err := scrape(e.srv.URL)
			if err != nil {
				t.Fatal(err)
			}
			if v := metricValue(t, m, "wsrelay_egress_targeted_undelivered_total"); v != want {
				t.Fatalf("wsrelay_egress_targeted_undelivered_total %s, want %s", v, want)
			}
		})
	}
}

// TestUserMessageLeftInDeadWritersQueueCounted: a connection the server
// closes for the client's own frame (here a text frame that is not
// UTF-8, 1007) keeps its queue for its writer (keepsQueue); a client
// that reads nothing has that writer time out (WRITE_TIMEOUT), and the
// connection ends with the queue never written. Messages to the user
// queued there went nowhere if the user's other connection dropped them
// too (an operator's disconnect): each counts once, as when both
// connections drop them at their close. The dead writer's queue held on
// to them, and they were not counted at all.
func TestUserMessageLeftInDeadWritersQueueCounted(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true", "WRITE_TIMEOUT": "1s"})
	<-e.s.hub.inbox.ready
	const n = 5
	ws1, c1, ws2, c2 := bobHeld(t, rdb, ks, e, n)
	// The second client sends a frame that closes it 1007, and reads
	// nothing: its writer times out with bob's messages still queued.
	if err := ws2.WriteMessage(websocket.TextMessage, []byte{0xff, 0xfe}); err != nil {
		t.Fatal(err)
	}
	waitClosing(t, e, c2.id)
	testkit.Eventually(t, 10*time.Second, func() error {
		for _, c := range e.s.hub.snapshotConns() {
			if c == c2 {
				return fmt.Errorf("the second connection has not ended")
			}
		}
		return nil
	})
	toInbox(t, rdb, ks, e, []byte(`1`), stream.Disconnect(c1.id))
	waitClosing(t, e, c1.id)
	if got, code := readMessages(ws1, 10*time.Second, nil); code != 4003 {
		t.Fatalf("first connection closed %d after %d messages, want 4003", code, len(got))
	}
	m, err := scrape(e.srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	if v := metricValue(t, m, "wsrelay_egress_targeted_undelivered_total"); v != fmt.Sprint(n) {
		t.Fatalf("wsrelay_egress_targeted_undelivered_total %s, want %d", v, n)
	}
}

// goneAndLive starts an egress with two anonymous sockets, of the users
// "gone" and "live", each past its welcome.
func goneAndLive(t *testing.T) (rdb redis.UniversalClient, ks keys.Scheme, e *secEgress, gone *websocket.Conn, goneID string, live *websocket.Conn, liveID string) {
	t.Helper()
	rdb, prefix := redistest.Client(t)
	ks = keys.Scheme{Prefix: prefix}
	e = startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"})
	<-e.s.hub.inbox.ready
	dial := func(user string) (*websocket.Conn, string) {
		ws, _, err := e.dial(t, url.Values{"user": {user}}, nil)
		if err != nil {
			t.Fatal(err)
		}
		return ws, next(t, ws, "welcome").ConnectionID
	}
	gone, goneID = dial("gone")
	live, liveID = dial("live")
	return rdb, ks, e, gone, goneID, live, liveID
}

// undeliveredAfter appends a message to e's inbox for each route, the
// last of which must reach live, waits for it there (the inbox was read
// through), and returns wsrelay_egress_targeted_undelivered_total.
func undeliveredAfter(t *testing.T, rdb redis.UniversalClient, ks keys.Scheme, e *secEgress, live *websocket.Conn, routes ...stream.Route) string {
	t.Helper()
	toInbox(t, rdb, ks, e, []byte(`1`), routes...)
	next(t, live, "message")
	m, err := scrape(e.srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	return metricValue(t, m, "wsrelay_egress_targeted_undelivered_total")
}

// TestUnknownRouteCounted: an inbox entry whose route this release does
// not know (another release's route, or a field renamed: make
// upgrade-check's catch-up scenarios) reaches nobody. It is counted as
// undelivered and logged once per episode, not dropped without a word.
func TestUnknownRouteCounted(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	logs := &testkit.SyncBuffer{}
	e := startEgressLogging(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"}, logs)
	<-e.s.hub.inbox.ready
	live, _, err := e.dial(t, url.Values{"user": {"live"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	liveID := next(t, live, "welcome").ConnectionID
	if v := undeliveredAfter(t, rdb, ks, e, live, "z:"+stream.Route(liveID), "", "z:x", stream.ToConnection(liveID)); v != "3" {
		t.Errorf("wsrelay_egress_targeted_undelivered_total %s, want 3", v)
	}
	lines := logs.Lines(t, "targeted messages with an unknown route")
	if len(lines) != 1 || lines[0]["level"] != "WARN" || lines[0]["err"] == nil {
		t.Fatalf("3 entries with unknown routes logged %d warnings, want one with the error:\n%s", len(lines), logs.String())
	}
}

// TestResumesCounted: each resume is counted by the recovered flag it
// was told, so that an operator sees how often clients came back to a
// gap (wsrelay_egress_resumes_total{recovered}); a plain subscribe is not
// a resume.
func TestResumesCounted(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"})
	ks := keys.Scheme{Prefix: prefix}
	store := stream.NewStore(rdb)
	var ids []string
	for i := range 3 {
		res, err := store.Append(t.Context(), []stream.Append{{Stream: ks.Stream("r"), Notify: ks.Notify("r"),
			Msg: stream.Message{Channel: "r", TS: time.Now().UnixMilli(), Data: []byte(fmt.Sprint(i))}}})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, res[0])
	}
	ws, _, err := websocket.DefaultDialer.Dial("ws"+strings.TrimPrefix(e.srv.URL, "http")+"/ws", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	// subscribed sends req and returns the "subscribed" reply.
	subscribed := func(ws *websocket.Conn, req map[string]any) string {
		t.Helper()
		send(t, ws, req)
		_ = ws.SetReadDeadline(time.Now().Add(5 * time.Second))
		for {
			_, b, err := ws.ReadMessage()
			if err != nil {
				t.Fatalf("waiting for the reply to %v: %v", req, err)
			}
			if strings.Contains(string(b), `"subscribed"`) {
				return string(b)
			}
		}
	}
	if got := subscribed(ws, map[string]any{"type": "subscribe", "channel": "r", "after": "0-0"}); !strings.Contains(got, `"recovered":true`) {
		t.Fatalf("resume from 0-0: %s, want recovered:true", got)
	}
	// Lost: the entry after ids[0] is trimmed away.
	if err := rdb.XTrimMaxLen(t.Context(), ks.Stream("r"), 1).Err(); err != nil {
		t.Fatal(err)
	}
	if got := subscribed(ws, map[string]any{"type": "subscribe", "channel": "s", "after": "0-0"}); strings.Contains(got, `"recovered":false`) {
		t.Fatalf("resume of an empty channel: %s, want recovered:true", got)
	}
	ws2, _, err := websocket.DefaultDialer.Dial("ws"+strings.TrimPrefix(e.srv.URL, "http")+"/ws", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws2.Close()
	if got := subscribed(ws2, map[string]any{"type": "subscribe", "channel": "r", "after": ids[0]}); !strings.Contains(got, `"recovered":false`) {
		t.Fatalf("resume past a trimmed entry: %s, want recovered:false", got)
	}
	subscribed(ws2, map[string]any{"type": "subscribe", "channel": "live"})
	testkit.Eventually(t, 5*time.Second, func() error {
		m, err := scrape(e.srv.URL)
		if err != nil {
			return err
		}
		got := grepMetrics(m, "wsrelay_egress_resumes_total{")
		want := "wsrelay_egress_resumes_total{recovered=\"false\"} 1\nwsrelay_egress_resumes_total{recovered=\"true\"} 2\n"
		if got != want {
			return fmt.Errorf("resumes:\n%s\nwant:\n%s", got, want)
		}
		return nil
	})
}

// TestCatchUpsOverBudgetCounted: the catch-up waits the wait budget
// skipped or cut short, and the connections catch-ups gave up waiting
// for, are counted (wsrelay_egress_catchup_waits_over_budget_total,
// wsrelay_egress_catchup_given_up_total), so that a burst of 4002 closes
// after a Redis blip can be told from slow consumers; both are 0 before
// any catch-up.
func TestCatchUpsOverBudgetCounted(t *testing.T) {
	t.Parallel()
	rdb, e := stuckReadersEgress(t, io.Discard, nil)
	h := e.s.hub
	m, err := scrape(e.srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"wsrelay_egress_catchup_waits_over_budget_total", "wsrelay_egress_catchup_given_up_total"} {
		if v := metricValue(t, m, name); v != "0" {
			t.Fatalf("%s is %s before any catch-up, want 0", name, v)
		}
	}
	catchUpStuckReaders(t, rdb, e, 12)
	// The last catch-up may still be counting its last wait: the scrape
	// agrees with the hub's counts once it is over.
	testkit.Eventually(t, 5*time.Second, func() error {
		over, gaveUp := h.pacing.overBudget.Load(), h.pacing.gaveUp.Load()
		m, err := scrape(e.srv.URL)
		if err != nil {
			return err
		}
		if over == 0 || gaveUp == 0 {
			t.Fatalf("%d waits over budget, %d connections given up on: the budget was not spent", over, gaveUp)
		}
		if v := metricValue(t, m, "wsrelay_egress_catchup_waits_over_budget_total"); v != fmt.Sprint(over) {
			return fmt.Errorf("wsrelay_egress_catchup_waits_over_budget_total is %s, want %d", v, over)
		}
		if v := metricValue(t, m, "wsrelay_egress_catchup_given_up_total"); v != fmt.Sprint(gaveUp) {
			return fmt.Errorf("wsrelay_egress_catchup_given_up_total is %s, want %d", v, gaveUp)
		}
		return nil
	})
}

// TestReadLagCountsCatchUps: messages a catch-up reads from the stream
// (their notifications lost) are observed in the read lag when read, as
// those whose notification arrives are, so that a delivery latency made
// of late reading shows in the read lag too (the delivery-slow alert's
// runbook tells the two apart by it); each message delivered is
// observed once.
func TestReadLagCountsCatchUps(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"})
	ws, _ := subscribedTo(t, e, "r")
	store := stream.NewStore(rdb)
	add := func(notify string, ts int64, n int) {
		t.Helper()
		if _, err := store.Append(t.Context(), []stream.Append{{Stream: ks.Stream("r"), Notify: notify,
			Msg: stream.Message{Channel: "r", TS: ts, Data: []byte(fmt.Sprint(n))}}}); err != nil {
			t.Fatal(err)
		}
	}
	old := time.Now().Add(-3 * time.Second).UnixMilli() // published 3 s ago
	for i := 1; i <= 3; i++ {
		add(ks.Notify("r")+"-lost", old, i) // their notifications are lost
	}
	add(ks.Notify("r"), time.Now().UnixMilli(), 4) // shows the gap: a catch-up
	for i := 1; i <= 4; i++ {
		if got := nextData(t, ws); got != fmt.Sprint(i) {
			t.Fatalf("message %d: %s", i, got)
		}
	}
	testkit.Eventually(t, 5*time.Second, func() error {
		m, err := scrape(e.srv.URL)
		if err != nil {
			return err
		}
		for _, want := range []string{
			`wsrelay_egress_delivery_latency_seconds_count 4` + "\n",
			`wsrelay_egress_delivery_latency_seconds_bucket{le="2"} 1` + "\n",
			`wsrelay_egress_stream_read_lag_seconds_count 4` + "\n",
			`wsrelay_egress_stream_read_lag_seconds_bucket{le="2"} 1` + "\n",
		} {
			if !strings.Contains(m, want) {
				return fmt.Errorf("no %q in:\n%s", want, grepMetrics(m, "wsrelay_egress_"))
			}
		}
		return nil
	})
}

// bobHeld opens two connections of user bob that read nothing: each gets
// a message larger than the socket buffers hold, which blocks its writer
// once taken (TestTargetedDroppedAtCloseCounted), and then n messages to
// bob, which wait queued for both.
func bobHeld(t *testing.T, rdb redis.UniversalClient, ks keys.Scheme, e *secEgress, n int) (ws1 *websocket.Conn, c1 *conn, ws2 *websocket.Conn, c2 *conn) {
	t.Helper()
	ws1, c1 = smallBuffers(t, e, url.Values{"user": {"bob"}})
	ws2, c2 = smallBuffers(t, e, url.Values{"user": {"bob"}})
	big := []byte(`"` + strings.Repeat("x", 320<<10) + `"`)
	toInbox(t, rdb, ks, e, big, stream.ToConnection(c1.id), stream.ToConnection(c2.id))
	testkit.Eventually(t, 10*time.Second, func() error {
		for _, c := range []*conn{c1, c2} {
			c.mu.Lock()
			k := len(c.queue)
			c.mu.Unlock()
			if k > 0 || !c.busyWrite() {
				return fmt.Errorf("a writer is not held in its first message yet")
			}
		}
		return nil
	})
	routes := make([]stream.Route, n)
	for i := range routes {
		routes[i] = stream.ToUser("bob")
	}
	toInbox(t, rdb, ks, e, []byte(`1`), routes...)
	testkit.Eventually(t, 10*time.Second, func() error {
		for _, c := range []*conn{c1, c2} {
			c.mu.Lock()
			k := len(c.queue)
			c.mu.Unlock()
			if k != n {
				return fmt.Errorf("%d of bob's messages queued for %s, want %d", k, c.id, n)
			}
		}
		return nil
	})
	return ws1, c1, ws2, c2
}
