package e2e

import (
	"fmt"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

func wsURLs(ps []*proc, q string) []string {
	var out []string
	for _, p := range ps {
		out = append(out, p.wsURL(q))
	}
	return out
}

func urls(ps []*proc) []string {
	var out []string
	for _, p := range ps {
		out = append(out, p.URL)
	}
	return out
}

// TestResumeSeam: clients subscribing with "after" while messages are
// published get every message once, in order, across the replay/live
// seam, and are told recovered=true.
func TestResumeSeam(t *testing.T) {
	onEachRedis(t, testResumeSeam)
}

// onEachRedis runs a test against a single Redis and against a real
// three-master Redis Cluster (REDIS_CLUSTER_ADDRS wins over REDIS_URL).
func onEachRedis(t *testing.T, test func(t *testing.T, redisURL string, e env)) {
	t.Run("single", func(t *testing.T) { test(t, redistest.URL(t), env{}) })
	t.Run("cluster", func(t *testing.T) {
		rc := redistest.StartCluster(t, 3, 0)
		test(t, "redis://127.0.0.1:1/0", env{"REDIS_CLUSTER_ADDRS": rc.AddrsEnv()})
	})
}

func testResumeSeam(t *testing.T, redisURL string, e env) {
	c := startCluster(t, redisURL, e)
	ing := urls(c.ingress[:])
	// History before anyone subscribes.
	var first struct{ ID string }
	postAccepted(t, ing[0]+"/v1/channels/seam/messages", map[string]any{"data": "zero"}, &first)
	pub := startPublisher(t, ing, "seam", time.Millisecond)
	testkit.Eventually(t, 5*time.Second, func() error {
		if pub.count() < 300 {
			return fmt.Errorf("%d published", pub.count())
		}
		return nil
	})
	// Subscribe mid-stream, resuming from the first message.
	var clients []*wsClient
	for i := range 4 {
		w := dial(t, c.egress[i%2].wsURL(""))
		w.send(map[string]any{"type": "subscribe", "channel": "seam", "after": first.ID})
		clients = append(clients, w)
		time.Sleep(20 * time.Millisecond)
	}
	testkit.Eventually(t, 5*time.Second, func() error {
		if pub.count() < 600 {
			return fmt.Errorf("%d published", pub.count())
		}
		return nil
	})
	ids := pub.Stop()
	for i, w := range clients {
		s := w.waitFrame(func(f frame) bool { return f.Type == "subscribed" })
		if s.Recovered == nil || !*s.Recovered {
			t.Fatalf("client %d: subscribed %+v, want recovered true", i, s)
		}
		w.waitMessages("seam", len(ids))
		time.Sleep(100 * time.Millisecond) // a duplicate would arrive now
		got := w.messages("seam")
		checkSequence(t, fmt.Sprintf("client %d", i), got, ids)
	}
	t.Logf("published %d during 4 resumes; delivered %d; lost 0, duplicated 0", len(ids), 4*len(ids))
}

// TestRecoveredFalse: a resume is not recovered when the history was
// trimmed past its position, or when Redis lost the data.
func TestRecoveredFalse(t *testing.T) {
	srv := redistest.Start(t)
	e := env{"REDIS_URL": srv.URL(), "ALLOW_ANONYMOUS": "true", "HISTORY_SIZE": "10", "PROBE_INTERVAL": "200ms"}
	in := start(t, "ingress", e)
	eg := start(t, "egress", e)
	var ids []string
	for i := range 300 {
		var res struct{ ID string }
		postAccepted(t, in.URL+"/v1/channels/trim/messages", map[string]any{"data": i}, &res)
		ids = append(ids, res.ID)
	}
	check := func(after string, want bool) {
		t.Helper()
		w := dial(t, eg.wsURL(""))
		w.send(map[string]any{"type": "subscribe", "channel": "trim", "after": after})
		s := w.waitFrame(func(f frame) bool { return f.Type == "subscribed" })
		if s.Recovered == nil || *s.Recovered != want {
			t.Fatalf("after %s: recovered %v, want %v", after, s.Recovered, want)
		}
	}
	check(ids[0], false)         // trimmed long ago
	check(ids[len(ids)-2], true) // still retained
	check(ids[len(ids)-1], true) // the newest
	// Redis restarts empty; new messages get newer ids.
	srv.Restart(t)
	testkit.Eventually(t, 10*time.Second, func() error { return httpStatus(in.URL+"/readyz", 200) })
	testkit.Eventually(t, 10*time.Second, func() error {
		if st := postQuiet(in.URL+"/v1/channels/trim/messages", map[string]any{"data": "after restart"}, nil); st != 202 {
			return fmt.Errorf("publish: %d", st)
		}
		return nil
	})
	testkit.Eventually(t, 10*time.Second, func() error { return httpStatus(eg.URL+"/readyz", 200) })
	check(ids[len(ids)-1], false)
}

// TestSlowConsumer: a reader that stops reading is closed with 4002; fast
// subscribers on the same channel get everything; the slow one resumes
// and loses nothing still retained.
func TestSlowConsumer(t *testing.T) {
	// The stalled reader resumes reading before WRITE_TIMEOUT, so it gets
	// the close frame after what was already in flight to it. It resumes
	// once all 32 MiB are published and read by the fast readers: 12 s on
	// an idle machine, and 110 s beside 20 busy loops, where a 60 s
	// WRITE_TIMEOUT gave up on its write first and it saw 1006 instead of
	// 4002. The server's close is made when its queue overflows, long
	// before: the timeout only has to outlast the publishing.
	c := startCluster(t, redistest.URL(t), env{"SEND_QUEUE": "256", "WRITE_TIMEOUT": "10m", "HISTORY_SIZE": "10000"})
	fast := []*wsClient{dial(t, c.egress[0].wsURL("channels=firehose")), dial(t, c.egress[0].wsURL("channels=firehose"))}
	for _, f := range fast {
		f.waitFrame(func(f frame) bool { return f.Type == "subscribed" })
	}
	stalled := newStalledReader(t, c.egress[0].wsURL("channels=firehose"))

	var ids []string
	payload := make([]byte, 16*1024)
	for i := range payload {
		payload[i] = 'a' + byte(i%26)
	}
	// 32 MiB in batches: more than the kernel's socket buffers hold.
	for b := range 20 {
		var items []map[string]any
		for i := range 100 {
			items = append(items, map[string]any{"channel": "firehose", "data": string(payload), "event": fmt.Sprint(b*100 + i)})
		}
		var res struct{ Results []struct{ ID string } }
		if st := post(t, c.ingress[b%2].URL+"/v1/messages", map[string]any{"messages": items}, &res); st != 202 {
			t.Fatalf("publish batch %d: %d", b, st)
		}
		for _, r := range res.Results {
			ids = append(ids, r.ID)
		}
		// Fast readers keep up (this test's machine may be slow).
		for _, f := range fast {
			f.waitMessages("firehose", len(ids))
		}
	}
	code := stalled.waitClosed()
	if code != 4002 {
		t.Fatalf("stalled reader closed with %d, want 4002", code)
	}
	for i, f := range fast {
		got := f.waitMessages("firehose", len(ids))
		checkSequence(t, fmt.Sprintf("fast %d", i), got, ids)
	}
	// It comes back and resumes from the last id it had read.
	r := newResumingClientFrom(t, []string{c.egress[1].wsURL("")}, map[string]string{"firehose": stalled.lastID}, "firehose")
	rest := ids[slices.Index(ids, stalled.lastID)+1:]
	if stalled.lastID == "" {
		rest = ids
	}
	r.waitAll("firehose", rest)
	r.mu.Lock()
	rec := r.recovered
	r.mu.Unlock()
	if len(rec) == 0 || !rec[0] {
		t.Fatalf("resume after the slow-consumer close: recovered %v, want true", rec)
	}
	t.Logf("stalled reader read %d of %d before close 4002, then resumed the other %d; fast readers got all %d", len(ids)-len(rest), len(ids), len(rest), len(ids))
}

// TestRedisOutage: Redis connections are cut for a while under a
// continuous publisher; ingress answers 503 quickly meanwhile, egress keeps
// its sockets and, once Redis is back, delivers everything acknowledged.
func TestRedisOutage(t *testing.T) {
	srv := redistest.Start(t)
	proxy := newProxy(t, srv.Addr())
	c := startCluster(t, "redis://"+proxy.Addr()+"/0", nil)
	r := newResumingClient(t, wsURLs(c.egress[:], ""), "outage")
	testkit.Eventually(t, 5*time.Second, func() error {
		if len(r.ids("outage")) == 0 {
			postQuiet(c.ingress[0].URL+"/v1/channels/outage/messages", map[string]any{"data": "warmup"}, nil)
			return fmt.Errorf("not subscribed yet")
		}
		return nil
	})
	warm := r.ids("outage")
	pub := startPublisher(t, urls(c.ingress[:]), "outage", 2*time.Millisecond)
	time.Sleep(300 * time.Millisecond)
	proxy.Cut()
	// Ingress fails fast while Redis is unreachable.
	start := time.Now()
	st := postQuiet(c.ingress[0].URL+"/v1/channels/outage/messages", map[string]any{"data": "x"}, nil)
	if st != http.StatusServiceUnavailable || time.Since(start) > 2500*time.Millisecond {
		t.Fatalf("publish during outage: %d after %s, want 503 within ~1s", st, time.Since(start))
	}
	time.Sleep(time.Second)
	proxy.Heal()
	time.Sleep(time.Second)
	ids := append(warm, pub.Stop()...)
	r.waitAcked("outage", ids)
	// The egress kept its sockets: the client's socket, open since before
	// the outage, was never closed (a close would be recorded, and only
	// then would the client reconnect).
	if codes := r.closeCodes(); len(codes) != 0 {
		t.Fatalf("the egress closed sockets during the outage (close codes %v), want none closed", codes)
	}
	pub.mu.Lock()
	fails := pub.fails
	pub.mu.Unlock()
	t.Logf("published %d (acknowledged), %d refused with 503 during the outage; delivered %d; lost 0, duplicated 0; socket closes: %v", len(ids), fails, len(r.ids("outage")), r.closeCodes())
}

// TestEgressSigtermAndSigkill: clients of an instance that is drained
// (SIGTERM: close 1001, records removed, exit) or killed reconnect to the
// other instance and lose nothing.
func TestEgressSigtermAndSigkill(t *testing.T) {
	onEachRedis(t, testEgressSigtermAndSigkill)
}

func testEgressSigtermAndSigkill(t *testing.T, redisURL string, e env) {
	e["SHUTDOWN_GRACE"] = "5s"
	c := startCluster(t, redisURL, e)
	var egs []*proc
	egs = append(egs, c.egress[:]...)
	third := start(t, "egress", env{"REDIS_URL": redisURL, "REDIS_CLUSTER_ADDRS": e["REDIS_CLUSTER_ADDRS"], "REDIS_KEY_PREFIX": c.prefix, "ALLOW_ANONYMOUS": "true", "REGISTRY_TTL": "3s"})
	egs = append(egs, third)
	// Each client starts on egress 0 and falls over to the next ones.
	var clients []*resumingClient
	for i := range 3 {
		clients = append(clients, newResumingClient(t, wsURLs([]*proc{egs[0], egs[1], egs[2]}, fmt.Sprintf("user=u%d", i)), "drain"))
	}
	pub := startPublisher(t, urls(c.ingress[:]), "drain", 2*time.Millisecond)
	testkit.Eventually(t, 5*time.Second, func() error {
		for _, cl := range clients {
			if len(cl.ids("drain")) < 20 {
				return fmt.Errorf("clients not receiving yet")
			}
		}
		return nil
	})
	var list connList
	getJSON(t, c.ingress[0].URL+"/v1/channels/drain/connections", &list)
	if len(list.Connections) != 3 {
		t.Fatalf("registry before drain: %+v", list)
	}
	t0 := time.Now()
	if err := egs[0].term(8 * time.Second); err != nil {
		t.Fatal(err)
	}
	t.Logf("egress drained and exited in %s", time.Since(t0).Round(time.Millisecond))
	// Its records were removed as it drained (the others re-registered).
	for _, cl := range clients {
		testkit.Eventually(t, 5*time.Second, func() error {
			if codes := cl.closeCodes(); len(codes) == 0 || codes[0] != 1001 {
				return fmt.Errorf("close codes %v, want 1001 first", codes)
			}
			return nil
		})
	}
	time.Sleep(300 * time.Millisecond)
	egs[1].kill()
	time.Sleep(300 * time.Millisecond)
	ids := pub.Stop()
	for i, cl := range clients {
		cl.waitFrom("drain", ids)
		t.Logf("client %d: closes %v, received %d of %d", i, cl.closeCodes(), len(cl.ids("drain")), len(ids))
	}
	t.Logf("published %d through SIGTERM and SIGKILL of egress instances; lost 0, duplicated 0", len(ids))
}

// TestIdleAndLifetimeResume: the server's idle (4000) and lifetime (4001)
// closes are followed by a lossless resume. They are logged with the status
// SCF reports for a close the server started (439; SCF's 455 and 433 are
// for its own cuts) and counted apart by kind.
func TestIdleAndLifetimeResume(t *testing.T) {
	for _, tc := range []struct {
		name   string
		e      env
		code   int
		log    string
		metric string
	}{
		{"idle", env{"IDLE_TIMEOUT": "1s"}, 4000, `"close_code":4000,"closed_by":"server","reason":"idle timeout`, `wsrelay_egress_timeout_closes_total{reason="idle"}`},
		{"lifetime", env{"MAX_LIFETIME": "1s"}, 4001, `"close_code":4001,"closed_by":"server","reason":"maximum lifetime reached`, `wsrelay_egress_timeout_closes_total{reason="lifetime"}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := startCluster(t, redistest.URL(t), tc.e)
			r := newResumingClient(t, wsURLs(c.egress[:], ""), "cut")
			var ids []string
			deadline := time.Now().Add(4 * time.Second)
			for time.Now().Before(deadline) {
				var res struct{ ID string }
				if st := postQuiet(c.ingress[0].URL+"/v1/channels/cut/messages", map[string]any{"data": len(ids)}, &res); st == 202 {
					ids = append(ids, res.ID)
				}
				// Bursts with pauses longer than the idle timeout and
				// the check's period (1 s) together: every pause ends
				// in a 4000 in the idle case, whatever the check's phase
				// (a 1.5 s pause did only about half the time, and on a
				// loaded machine, with slow bursts, 4 s held two pauses
				// at about the same phase).
				if len(ids)%50 == 0 {
					time.Sleep(2500 * time.Millisecond)
				}
			}
			r.waitFrom("cut", ids)
			codes := r.closeCodes()
			if !slices.Contains(codes, tc.code) {
				t.Fatalf("close codes %v, want %d among them", codes, tc.code)
			}
			logs := c.egress[0].Logs() + c.egress[1].Logs()
			if !containsAll(logs, tc.log) {
				t.Fatalf("no connection log line with %s", tc.log)
			}
			if !contains(logs, `"scf_status":439`) || contains(logs, `"scf_status":455`) || contains(logs, `"scf_status":433`) {
				t.Errorf("timeout closes logged with another status than 439")
			}
			if m := metricsText(t, c.egress[0].URL) + metricsText(t, c.egress[1].URL); !contains(m, tc.metric) {
				t.Errorf("egress /metrics lack %s", tc.metric)
			}
			t.Logf("published %d; closes %v; lost 0, duplicated 0", len(ids), codes)
		})
	}
}

func containsAll(s string, subs ...string) bool {
	for _, x := range subs {
		if !contains(s, x) {
			return false
		}
	}
	return true
}

func contains(s, sub string) bool {
	return len(sub) == 0 || (len(s) >= len(sub) && indexOf(s, sub) >= 0)
}

func indexOf(s, sub string) int {
	for i := 0; i+len(sub) <= len(s); i++ {
		if s[i:i+len(sub)] == sub {
			return i
		}
	}
	return -1
}

// TestRedisStall: Redis hangs without an error (connections open, nothing
// answered) under a continuous publisher. Ingress answers 503 within about
// a second instead of hanging; egress keeps its sockets, its probes notice
// the silent read path and /readyz turns 503; when Redis answers again,
// every acknowledged message is delivered once, in order.
func TestRedisStall(t *testing.T) {
	srv := redistest.Start(t)
	proxy := newProxy(t, srv.Addr())
	c := startCluster(t, "redis://"+proxy.Addr()+"/0", env{"PROBE_INTERVAL": "250ms"})
	r := newResumingClient(t, wsURLs(c.egress[:], ""), "stall")
	testkit.Eventually(t, 5*time.Second, func() error {
		if len(r.ids("stall")) == 0 {
			postQuiet(c.ingress[0].URL+"/v1/channels/stall/messages", map[string]any{"data": "warmup"}, nil)
			return fmt.Errorf("not subscribed yet")
		}
		return nil
	})
	pub := startPublisher(t, urls(c.ingress[:]), "stall", 2*time.Millisecond)
	time.Sleep(300 * time.Millisecond)
	proxy.Stall()
	start := time.Now()
	st := postQuiet(c.ingress[0].URL+"/v1/channels/stall/messages", map[string]any{"data": "x"}, nil)
	if st != http.StatusServiceUnavailable || time.Since(start) > 3*time.Second {
		t.Fatalf("publish while Redis hangs: %d after %s, want 503 within ~1s", st, time.Since(start))
	}
	testkit.Eventually(t, 10*time.Second, func() error { return httpStatus(c.egress[0].URL+"/readyz", 503) })
	proxy.Unstall()
	testkit.Eventually(t, 10*time.Second, func() error { return httpStatus(c.egress[0].URL+"/readyz", 200) })
	time.Sleep(500 * time.Millisecond)
	ids := pub.Stop()
	r.waitAcked("stall", ids)
	// The egress kept its sockets: the client's socket, open since before
	// the stall, was never closed (a close would be recorded, and only then
	// would the client reconnect).
	if codes := r.closeCodes(); len(codes) != 0 {
		t.Fatalf("the egress closed sockets during the stall (close codes %v), want none closed", codes)
	}
	pub.mu.Lock()
	fails := pub.fails
	pub.mu.Unlock()
	t.Logf("published %d acknowledged (%d refused with 503 during the stall); delivered all, in order; lost 0, duplicated 0; socket closes %v", len(ids), fails, r.closeCodes())
}

// TestResumeFromPosition: a client cut before its first message on a
// channel resumes from the position in its "subscribed" reply and gets
// what was published while it was away.
func TestResumeFromPosition(t *testing.T) {
	c := startCluster(t, redistest.URL(t), nil)
	var before struct{ ID string }
	postAccepted(t, c.ingress[0].URL+"/v1/channels/pos/messages", map[string]any{"data": "before"}, &before)
	w := dial(t, c.egress[0].wsURL("channels=pos"))
	sub := w.waitFrame(func(f frame) bool { return f.Type == "subscribed" })
	if sub.Position != before.ID {
		t.Fatalf("position %q, want the last id before the subscription %q", sub.Position, before.ID)
	}
	w.ws.Close()
	var ids []string
	for i := range 3 {
		var res struct{ ID string }
		postAccepted(t, c.ingress[1].URL+"/v1/channels/pos/messages", map[string]any{"data": i}, &res)
		ids = append(ids, res.ID)
	}
	w2 := dial(t, c.egress[1].wsURL(""))
	w2.send(map[string]any{"type": "subscribe", "channel": "pos", "after": sub.Position})
	s2 := w2.waitFrame(func(f frame) bool { return f.Type == "subscribed" })
	if s2.Recovered == nil || !*s2.Recovered {
		t.Fatalf("resume from position: %+v", s2)
	}
	w2.waitMessages("pos", 3)
	time.Sleep(100 * time.Millisecond)
	checkSequence(t, "resumed client", w2.messages("pos"), ids)
}

// TestClearHistoryLive: removing a channel's history (DELETE
// /v1/channels/{channel}/messages) does not disturb its live subscribers,
// which get what follows with no gap; a client resuming from a removed
// message is told recovered false and gets what followed the removal; one
// resuming from the last message removed missed nothing.
func TestClearHistoryLive(t *testing.T) {
	e := env{"REDIS_URL": redistest.URL(t), "REDIS_KEY_PREFIX": redistest.Prefix(t), "ALLOW_ANONYMOUS": "true"}
	in := start(t, "ingress", e)
	eg := start(t, "egress", e)
	publish := func(i int) string {
		var res struct{ ID string }
		if st := post(t, in.URL+"/v1/channels/clr/messages", map[string]any{"data": i}, &res); st != 202 {
			t.Fatalf("publish: %d", st)
		}
		return res.ID
	}
	live := dial(t, eg.wsURL(""))
	live.subscribe("clr")
	before := []string{publish(0), publish(1), publish(2)}
	live.waitMessages("clr", 3)

	req, _ := http.NewRequest(http.MethodDelete, in.URL+"/v1/channels/clr/messages", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("clear: %d", resp.StatusCode)
	}
	after := []string{publish(3), publish(4)}
	checkSequence(t, "live subscriber", live.waitMessages("clr", 5), append(slices.Clone(before), after...))
	select {
	case <-live.closed:
		t.Fatalf("the live subscriber was closed (%d)", live.closeCode)
	default:
	}

	for _, tc := range []struct {
		after     string
		recovered bool
	}{{before[0], false}, {before[2], true}} {
		w := dial(t, eg.wsURL(""))
		w.send(map[string]any{"type": "subscribe", "channel": "clr", "after": tc.after})
		s := w.waitFrame(func(f frame) bool { return f.Type == "subscribed" })
		if s.Recovered == nil || *s.Recovered != tc.recovered {
			t.Fatalf("resume after %s: recovered %v, want %v", tc.after, s.Recovered, tc.recovered)
		}
		checkSequence(t, "resume after "+tc.after, w.waitMessages("clr", 2), after)
	}
}
