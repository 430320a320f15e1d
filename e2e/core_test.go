package e2e

import (
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	// Idle keep-alive connections are not goroutines a test left running
	// (redistest.Finish checks for those: the clients, publishers and
	// proxies the tests start in this process).
	http.DefaultClient.CloseIdleConnections()
	os.Exit(redistest.Finish(code))
}

// cluster is two ingress and two egress processes on one Redis.
type cluster struct {
	ingress [2]*proc
	egress  [2]*proc
	prefix  string
}

func startCluster(t *testing.T, redisURL string, extra env) *cluster {
	t.Helper()
	c := &cluster{prefix: redistest.Prefix(t)}
	e := env{"REDIS_URL": redisURL, "REDIS_KEY_PREFIX": c.prefix, "ALLOW_ANONYMOUS": "true", "REGISTRY_TTL": "3s", "PROBE_INTERVAL": "200ms"}
	for k, v := range extra {
		e[k] = v
	}
	for i := range 2 {
		c.ingress[i] = start(t, "ingress", e)
		c.egress[i] = start(t, "egress", e)
	}
	return c
}

// TestBroadcastAcrossInstances: subscribers on both egress instances get
// every message published through either ingress, once, in order.
func TestBroadcastAcrossInstances(t *testing.T) {
	c := startCluster(t, redistest.URL(t), nil)
	subs := []*wsClient{
		dial(t, c.egress[0].wsURL("channels=room-1")),
		dial(t, c.egress[1].wsURL("")),
		dial(t, c.egress[1].wsURL("channels=room-1,room-2")),
	}
	subs[0].waitFrame(func(f frame) bool { return f.Type == "subscribed" && f.Channel == "room-1" })
	subs[1].subscribe("room-1")
	subs[2].waitFrame(func(f frame) bool { return f.Type == "subscribed" && f.Channel == "room-2" })

	var ids []string
	for i := range 50 {
		var res struct{ ID, Channel string }
		st := post(t, c.ingress[i%2].URL+"/v1/channels/room-1/messages", map[string]any{"data": map[string]int{"n": i}, "event": "tick"}, &res)
		if st != 202 || res.Channel != "room-1" {
			t.Fatalf("publish %d: %d %+v", i, st, res)
		}
		ids = append(ids, res.ID)
	}
	for i, s := range subs {
		s.waitMessages("room-1", len(ids))
		time.Sleep(100 * time.Millisecond) // a duplicate would arrive now
		got := s.messages("room-1")
		checkSequence(t, fmt.Sprintf("subscriber %d", i), got, ids)
		if got[0].Event != "tick" || string(got[0].Data) != `{"n":0}` {
			t.Fatalf("first message: %+v", got[0])
		}
	}
	if n := len(subs[2].messages("room-2")); n != 0 {
		t.Fatalf("room-2 subscriber got %d messages", n)
	}
	t.Logf("published %d, delivered %d to 3 subscribers on 2 instances, lost 0, duplicated 0", len(ids), 3*len(ids))

	// The egress metrics count them, with bounded labels (no channel name).
	// A delivery is counted once its write has returned, which may be
	// after the client read it: polled, where one read 100 ms after the
	// last message missed the last counts when the egress's writer was
	// descheduled that long (a loaded machine; a 400 ms delay before the
	// count reproduces it).
	var m string
	testkit.Eventually(t, 5*time.Second, func() error {
		m = metricsText(t, c.egress[1].URL)
		for _, want := range []string{"wsrelay_egress_deliveries_total 100", "wsrelay_egress_connections 2", "wsrelay_egress_channels 2", "wsrelay_egress_stream_read_lag_seconds_count 50", "wsrelay_egress_delivery_latency_seconds_count 100"} {
			if !strings.Contains(m, want+"\n") {
				return fmt.Errorf("egress /metrics lacks %q", want)
			}
		}
		return nil
	})
	if strings.Contains(m, "room-1") {
		t.Errorf("a channel name is a metric label")
	}
}

func metricsText(t *testing.T, base string) string {
	t.Helper()
	resp, err := http.Get(base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// TestTargetedSends: to one connection and to every connection of a user,
// wherever they are connected.
func TestTargetedSends(t *testing.T) {
	c := startCluster(t, redistest.URL(t), nil)
	a1 := dial(t, c.egress[0].wsURL("user=alice"))
	a2 := dial(t, c.egress[1].wsURL("user=alice"))
	b := dial(t, c.egress[1].wsURL("user=bob"))

	var res map[string]any
	if st := post(t, c.ingress[0].URL+"/v1/connections/"+a2.welcome.ConnectionID+"/messages", map[string]any{"data": "only a2"}, &res); st != 202 {
		t.Fatalf("to connection: %d %v", st, res)
	}
	f := a2.waitFrame(func(f frame) bool { return f.Type == "message" })
	if string(f.Data) != `"only a2"` || f.Target != "connection" || f.Channel != "" {
		t.Fatalf("targeted frame: %+v", f)
	}
	if st := post(t, c.ingress[1].URL+"/v1/users/alice/messages", map[string]any{"data": "all alice"}, &res); st != 202 || res["connections"] != float64(2) {
		t.Fatalf("to user: %d %v", st, res)
	}
	for _, cl := range []*wsClient{a1, a2} {
		cl.waitFrame(func(f frame) bool {
			return f.Type == "message" && string(f.Data) == `"all alice"` && f.Target == "user"
		})
	}
	if st := post(t, c.ingress[0].URL+"/v1/connections/nope123/messages", map[string]any{"data": 1}, &res); st != 404 {
		t.Fatalf("unknown connection: %d", st)
	}
	time.Sleep(100 * time.Millisecond)
	if n := len(b.messages("")); n != 0 {
		t.Fatalf("bob got %d messages", n)
	}
	if n := len(a1.messages("")); n != 1 {
		t.Fatalf("a1 got %d messages, want 1", n)
	}
}

// TestTargetedNamesAtTheLimits: a user id of the full 128 characters,
// made of every character the rule allows besides letters and digits
// (:@.-_, a leading one too), is addressed as any other: given to the
// egress in the query and to the ingress in the path, its two sockets on
// one instance and one on another each get a send to the user once, and
// the user whose id is one character shorter (a prefix of it) gets
// nothing, nor the other way round.
func TestTargetedNamesAtTheLimits(t *testing.T) {
	c := startCluster(t, redistest.URL(t), nil)
	long := strings.Repeat("-:@._Zz9", 16) // 128
	short := long[:127]
	q := func(u string) string { return "user=" + url.QueryEscape(u) }
	l1 := dial(t, c.egress[0].wsURL(q(long)))
	l2 := dial(t, c.egress[0].wsURL(q(long)))
	l3 := dial(t, c.egress[1].wsURL(q(long)))
	s1 := dial(t, c.egress[0].wsURL(q(short)))
	if l1.welcome.User != long || s1.welcome.User != short {
		t.Fatalf("welcome users %q, %q", l1.welcome.User, s1.welcome.User)
	}
	var list connList
	if st := getJSON(t, c.ingress[0].URL+"/v1/users/"+long+"/connections", &list); st != 200 || len(list.Connections) != 3 {
		t.Fatalf("the long user's connections: %d %+v", st, list)
	}
	var res map[string]any
	if st := post(t, c.ingress[0].URL+"/v1/users/"+long+"/messages", map[string]any{"data": "long"}, &res); st != 202 || res["connections"] != 3.0 || res["user"] != long {
		t.Fatalf("to the long user: %d %v", st, res)
	}
	if st := post(t, c.ingress[1].URL+"/v1/users/"+short+"/messages", map[string]any{"data": "short"}, &res); st != 202 || res["connections"] != 1.0 {
		t.Fatalf("to the shorter user: %d %v", st, res)
	}
	if st := post(t, c.ingress[1].URL+"/v1/connections/"+l2.welcome.ConnectionID+"/messages", map[string]any{"data": "l2"}, &res); st != 202 {
		t.Fatalf("to l2: %d %v", st, res)
	}
	exactlyOnce(t, "user", `"long"`, l1, l2, l3)
	exactlyOnce(t, "user", `"short"`, s1)
	exactlyOnce(t, "connection", `"l2"`, l2)
	for _, cl := range []*wsClient{l1, l2, l3, s1} {
		want := 1 + map[*wsClient]int{l2: 1}[cl]
		if n := len(cl.messages("")); n != want {
			t.Errorf("%s got %d messages, want %d: %+v", cl.welcome.ConnectionID, n, want, cl.messages(""))
		}
	}
}

// TestUnsubscribe stops delivery to that socket only.
func TestUnsubscribe(t *testing.T) {
	c := startCluster(t, redistest.URL(t), nil)
	x := dial(t, c.egress[0].wsURL("channels=news"))
	y := dial(t, c.egress[0].wsURL("channels=news"))
	x.waitFrame(func(f frame) bool { return f.Type == "subscribed" })
	y.waitFrame(func(f frame) bool { return f.Type == "subscribed" })
	x.send(map[string]any{"type": "unsubscribe", "channel": "news", "ref": "u1"})
	x.waitFrame(func(f frame) bool { return f.Type == "unsubscribed" && f.Channel == "news" })
	postAccepted(t, c.ingress[0].URL+"/v1/channels/news/messages", map[string]any{"data": 1}, nil)
	y.waitMessages("news", 1)
	time.Sleep(100 * time.Millisecond)
	if n := len(x.messages("news")); n != 0 {
		t.Fatalf("unsubscribed socket got %d messages", n)
	}
	x.send(map[string]any{"type": "unsubscribe", "channel": "news"})
	x.waitFrame(func(f frame) bool { return f.Type == "error" && f.Code == "not_subscribed" })
}

type connList struct {
	Connections []struct {
		ID, User, Instance string
		ConnectedAt        string `json:"connected_at"`
	}
}

// TestRegistryCleanup: a record disappears at once on disconnect, and
// within REGISTRY_TTL after its egress process is killed.
func TestRegistryCleanup(t *testing.T) {
	url := redistest.URL(t)
	c := startCluster(t, url, nil)
	live := dial(t, c.egress[0].wsURL("channels=lobby&user=carol"))
	doomed := dial(t, c.egress[1].wsURL("channels=lobby&user=dave"))
	live.waitFrame(func(f frame) bool { return f.Type == "subscribed" })
	doomed.waitFrame(func(f frame) bool { return f.Type == "subscribed" })

	var list connList
	getJSON(t, c.ingress[0].URL+"/v1/channels/lobby/connections", &list)
	if len(list.Connections) != 2 {
		t.Fatalf("registry: %+v", list)
	}
	var rec map[string]any
	if st := getJSON(t, c.ingress[0].URL+"/v1/connections/"+live.welcome.ConnectionID, &rec); st != 200 || rec["user"] != "carol" || rec["instance"] != live.welcome.Instance {
		t.Fatalf("record: %d %v", st, rec)
	}

	// Disconnect: gone at once. On an egress (and ingress) whose records
	// live 60 s on their own, far beyond the wait: only the removal on
	// disconnect can make the record go within it, not its expiry.
	long := env{"REDIS_URL": url, "REDIS_KEY_PREFIX": c.prefix, "ALLOW_ANONYMOUS": "true", "REGISTRY_TTL": "60s", "PROBE_INTERVAL": "200ms"}
	longIn, longEg := start(t, "ingress", long), start(t, "egress", long)
	third := dial(t, longEg.wsURL("user=erin"))
	if st := getJSON(t, longIn.URL+"/v1/connections/"+third.welcome.ConnectionID, nil); st != 200 {
		t.Fatalf("record of a live connection: %d", st)
	}
	third.ws.Close()
	testkit.Eventually(t, 5*time.Second, func() error {
		return statusIs(getJSON(t, longIn.URL+"/v1/connections/"+third.welcome.ConnectionID, nil), 404)
	})

	// Kill -9: gone within REGISTRY_TTL (3 s) from the last refresh.
	killed := time.Now()
	c.egress[1].kill()
	testkit.Eventually(t, 8*time.Second, func() error {
		if err := statusIs(getJSON(t, c.ingress[0].URL+"/v1/connections/"+doomed.welcome.ConnectionID, nil), 404); err != nil {
			return err
		}
		var l connList
		getJSON(t, c.ingress[0].URL+"/v1/channels/lobby/connections", &l)
		if len(l.Connections) != 1 || l.Connections[0].User != "carol" {
			return fmt.Errorf("lobby still lists %+v", l.Connections)
		}
		return nil
	})
	t.Logf("killed instance's records gone after %s (REGISTRY_TTL=3s)", time.Since(killed).Round(100*time.Millisecond))
}

func statusIs(got, want int) error {
	if got != want {
		return fmt.Errorf("status %d, want %d", got, want)
	}
	return nil
}

// TestReadyzFollowsRedis: both functions' /readyz turn 503 when Redis goes
// away and 200 again when it is back.
func TestReadyzFollowsRedis(t *testing.T) {
	srv := redistest.Start(t)
	e := env{"REDIS_URL": srv.URL(), "ALLOW_ANONYMOUS": "true", "PROBE_INTERVAL": "200ms"}
	in := start(t, "ingress", e)
	eg := start(t, "egress", e)
	for _, p := range []*proc{in, eg} {
		testkit.Eventually(t, 5*time.Second, func() error { return httpStatus(p.URL+"/readyz", 200) })
	}
	srv.Stop()
	for _, p := range []*proc{in, eg} {
		testkit.Eventually(t, 5*time.Second, func() error { return httpStatus(p.URL+"/readyz", 503) })
		if err := httpStatus(p.URL+"/healthz", 200); err != nil {
			t.Fatal(err)
		}
	}
	srv.Restart(t)
	for _, p := range []*proc{in, eg} {
		testkit.Eventually(t, 10*time.Second, func() error { return httpStatus(p.URL+"/readyz", 200) })
	}
}

// TestBadFrames: every bad frame gets its documented error and the
// connection stays open.
func TestBadFrames(t *testing.T) {
	c := startCluster(t, redistest.URL(t), nil)
	w := dial(t, c.egress[0].wsURL(""))
	cases := []struct {
		raw  string
		code string
	}{
		{`not json`, "invalid_json"},
		{`{"type":"dance"}`, "unknown_type"},
		{`{"channel":"x"}`, "invalid_frame"},
		{`{"type":"subscribe","channel":"bad name"}`, "invalid_channel"},
		{`{"type":"subscribe","channel":42}`, "invalid_frame"},
		{`{"type":"subscribe","channel":"ok","after":"nope"}`, "invalid_after"},
		{`{"type":"unsubscribe","channel":"never"}`, "not_subscribed"},
		{`[1,2]`, "invalid_json"},
		{`null`, "invalid_json"},
	}
	// Each case must be answered by the first frame that arrives after it
	// was sent: an earlier case's reply with the same code does not count.
	for _, tc := range cases {
		w.mu.Lock()
		before := len(w.frames)
		w.mu.Unlock()
		if err := w.ws.WriteMessage(1, []byte(tc.raw)); err != nil {
			t.Fatal(err)
		}
		var got frame
		testkit.Eventually(t, 10*time.Second, func() error {
			w.mu.Lock()
			defer w.mu.Unlock()
			if len(w.frames) <= before {
				return fmt.Errorf("no reply to %s yet", tc.raw)
			}
			got = w.frames[before]
			return nil
		})
		if got.Type != "error" || got.Code != tc.code {
			t.Fatalf("reply to %s: %+v, want error %s", tc.raw, got, tc.code)
		}
	}
	w.subscribe("ok")
	w.send(map[string]any{"type": "subscribe", "channel": "ok"})
	w.waitFrame(func(f frame) bool { return f.Type == "error" && f.Code == "already_subscribed" })
	if err := w.ws.WriteMessage(2, []byte{1, 2, 3}); err != nil {
		t.Fatal(err)
	}
	w.waitFrame(func(f frame) bool { return f.Type == "error" && f.Code == "binary_frame" })
	w.send(map[string]any{"type": "ping", "ref": 7})
	w.waitFrame(func(f frame) bool { return f.Type == "pong" })
	// An oversized frame closes with 1009.
	big := strings.Repeat("x", 70000)
	_ = w.ws.WriteMessage(1, []byte(`{"type":"ping","ref":"`+big+`"}`))
	select {
	case <-w.closed:
	case <-time.After(5 * time.Second):
		t.Fatal("oversized frame did not close the connection")
	}
	if w.closeCode != 1009 {
		t.Fatalf("close code %d, want 1009", w.closeCode)
	}
}

// maskedFrame is a raw client frame (RFC 6455 §5.2, payload < 126 bytes),
// written under gorilla's client so a test can send what gorilla would
// not: fragments, a ping between them, protocol violations.
func maskedFrame(b0 byte, payload string) []byte {
	key := [4]byte{9, 8, 7, 6}
	b := []byte{b0, 0x80 | byte(len(payload)), key[0], key[1], key[2], key[3]}
	for i := range len(payload) {
		b = append(b, payload[i]^key[i%4])
	}
	return b
}

// TestFramesOnTheWire: the egress reads frames itself (docs/design.md):
// a fragmented request with a ping between its fragments works, and each
// protocol violation closes the connection with 1002.
func TestFramesOnTheWire(t *testing.T) {
	c := startCluster(t, redistest.URL(t), nil)
	w := dial(t, c.egress[0].wsURL(""))
	raw := append(maskedFrame(0x01, `{"type":"subscribe",`), maskedFrame(0x89, "hi")...)
	raw = append(raw, maskedFrame(0x80, `"channel":"frag"}`)...)
	if _, err := w.ws.NetConn().Write(raw); err != nil {
		t.Fatal(err)
	}
	w.waitFrame(func(f frame) bool { return f.Type == "subscribed" && f.Channel == "frag" })

	for name, bad := range map[string][]byte{
		"unmasked":            {0x81, 0x01, 'x'},
		"reserved bit":        maskedFrame(0xC1, "x"),
		"unknown opcode":      maskedFrame(0x83, "x"),
		"fragmented ping":     maskedFrame(0x09, ""),
		"stray continuation":  maskedFrame(0x80, "x"),
		"close code 1005":     maskedFrame(0x88, "\x03\xed"),
		"one-byte close body": maskedFrame(0x88, "\x03"),
	} {
		w := dial(t, c.egress[0].wsURL(""))
		if _, err := w.ws.NetConn().Write(bad); err != nil {
			t.Fatal(err)
		}
		select {
		case <-w.closed:
		case <-time.After(5 * time.Second):
			t.Fatalf("%s: the connection stayed open", name)
		}
		w.mu.Lock()
		code := w.closeCode
		w.mu.Unlock()
		if code != 1002 {
			t.Fatalf("%s: close code %d, want 1002", name, code)
		}
	}
}

// TestTargetedSendToFreshInstance: on serverless platforms an instance is
// started for one connection. A targeted send made right after that first
// socket's "welcome" must arrive even though the instance had just
// started (its inbox subscription is live before "welcome").
func TestTargetedSendToFreshInstance(t *testing.T) {
	e := env{"REDIS_URL": redistest.URL(t), "REDIS_KEY_PREFIX": redistest.Prefix(t), "ALLOW_ANONYMOUS": "true"}
	in := start(t, "ingress", e)
	for i := range 3 {
		eg := start(t, "egress", e) // returns as soon as /healthz answers
		w := dial(t, eg.wsURL("user=fresh"))
		var res map[string]any
		if st := post(t, in.URL+"/v1/connections/"+w.welcome.ConnectionID+"/messages", map[string]any{"data": i}, &res); st != 202 {
			t.Fatalf("send %d: %d %v", i, st, res)
		}
		w.waitFrame(func(f frame) bool {
			return f.Type == "message" && f.Target == "connection" && string(f.Data) == fmt.Sprint(i)
		})
		eg.kill()
	}
}
