//go:build !wsrelay_lean

package main

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"maps"
	"net/http/httptest"
	"net/url"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/redisconn"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/stream"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

func metricValue(t *testing.T, page, name string) string {
	t.Helper()
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + ` (\S+)$`).FindStringSubmatch(page)
	if m == nil {
		t.Fatalf("no %s in:\n%s", name, page)
	}
	return m[1]
}

// outageEgress starts an egress, logging JSON to logs, on a Redis server
// of its own (rs, which a test may stop and restart) with a 300 ms
// REDIS_TIMEOUT, more settings on top, and registry outages ending 200 ms
// after their last failure.
func outageEgress(t *testing.T, more map[string]string) (rs *redistest.Server, rdb redis.UniversalClient, s *Server, srv *httptest.Server, logs *testkit.SyncBuffer) {
	t.Helper()
	rs = redistest.Start(t)
	rc := redisconn.Config{URL: rs.URL(), Timeout: 300 * time.Millisecond, KeyPrefix: redistest.Prefix(t)}
	rdb, err := redisconn.New(rc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rdb.Close() })
	env := map[string]string{"ALLOW_ANONYMOUS": "true", "REDIS_URL": rs.URL(), "REDIS_KEY_PREFIX": rc.KeyPrefix, "REDIS_TIMEOUT": "300ms", "SHUTDOWN_GRACE": "1s"}
	maps.Copy(env, more)
	cfg, err := loadConfig(func(k string) string { return env[k] })
	if err != nil {
		t.Fatal(err)
	}
	logs = &testkit.SyncBuffer{}
	s = NewServer(cfg, slog.New(slog.NewJSONHandler(logs, nil)), rdb)
	s.regFail.Quiet = 200 * time.Millisecond
	srv, _ = startEgress(t, s)
	return rs, rdb, s, srv, logs
}

// TestRedisOutageLogsOnce: sockets that subscribe, unsubscribe and end
// while Redis is down each fail a registry write. The log says so once
// (what failed, and what happens meanwhile), not once per socket (a few
// hundred sockets ending during an outage wrote a few hundred warnings),
// and once more when writes succeed again; the subscription's loss and
// return are one line each. wsrelay_egress_redis_errors_total counts the
// failures (it stayed 0 through a whole outage), and the gauges match
// the sockets left.
func TestRedisOutageLogsOnce(t *testing.T) {
	t.Parallel()
	rs, _, s, srv, logs := outageEgress(t, nil)
	const sockets = 20
	var conns []*websocket.Conn
	for i := range sockets {
		u := "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws?" + url.Values{"channels": {fmt.Sprintf("o%d,o%d", i%5, (i+1)%5)}}.Encode()
		ws, _, err := websocket.DefaultDialer.Dial(u, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ws.Close() })
		next(t, ws, "subscribed")
		next(t, ws, "subscribed")
		conns = append(conns, ws)
	}

	rs.Stop()
	// Half of them unsubscribe from a channel, then end.
	for _, ws := range conns[:sockets/2] {
		send(t, ws, map[string]any{"type": "unsubscribe", "channel": "o0"})
		_ = ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(1000, ""), time.Now().Add(time.Second))
		closeCode(t, ws, 5*time.Second)
	}
	testkit.Eventually(t, 5*time.Second, func() error {
		if n := s.open.Load(); n != sockets/2 {
			return fmt.Errorf("%d sockets open", n)
		}
		return nil
	})
	var warns []string
	for _, r := range logs.JSONLines(t) {
		if (r["level"] == "WARN" || r["level"] == "ERROR") && r["msg"] != "connection closed" {
			warns = append(warns, fmt.Sprint(r))
		}
	}
	if len(warns) == 0 || len(warns) > 3 {
		t.Fatalf("%d sockets ending during the outage: %d warnings besides their close lines, want 1–3:\n%s", sockets/2, len(warns), strings.Join(warns, "\n"))
	}
	m, err := scrape(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	if metricValue(t, m, "wsrelay_egress_redis_errors_total") == "0" {
		t.Errorf("redis errors not counted during the outage:\n%s", m)
	}

	rs.Restart(t)
	testkit.Eventually(t, 15*time.Second, func() error {
		seen := map[string]int{}
		for _, r := range logs.JSONLines(t) {
			seen[fmt.Sprint(r["msg"])]++
		}
		if seen["registry writes back"] != 1 || seen["redis subscription back"] != 1 {
			return fmt.Errorf("recovery lines: %v", seen)
		}
		return nil
	})
	m, err = scrape(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	if c, sub := metricValue(t, m, "wsrelay_egress_connections"), metricValue(t, m, "wsrelay_egress_subscriptions"); c != fmt.Sprint(sockets/2) || sub != fmt.Sprint(sockets) {
		t.Errorf("gauges: connections %s, subscriptions %s; want %d and %d", c, sub, sockets/2, sockets)
	}
}

// TestRedisRefusesLoginLogsOnce: an egress whose login Redis refuses (a
// wrong password, here) sees it on its Pub/Sub connection, its probe and
// every socket it must refuse. The log says so plainly once, at error
// level, with Redis's reason and what to check, never the password: not
// "redis subscription error" and a line per retry or per probe. The
// refused socket's own line keeps its reason. Once the password is put
// right, one line ends it and sockets are served again.
func TestRedisRefusesLoginLogsOnce(t *testing.T) {
	t.Parallel()
	rs, admin := redistest.StartWithPassword(t, "rightpw")
	u := strings.Replace(rs.URL(), "//", "//:wrongpw@", 1)
	logs := &testkit.SyncBuffer{}
	s := newEgressOn(t, u, logs)
	s.hub.loginRefused.Quiet = 200 * time.Millisecond
	srv, _ := startEgress(t, s)
	wsURL := "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws?channels=a"
	ws, _, err := websocket.DefaultDialer.Dial(wsURL, nil)
	if err != nil {
		t.Fatal(err)
	}
	if code := closeCode(t, ws, 10*time.Second); code != 1013 {
		t.Fatalf("socket with the login refused: closed %d, want 1013", code)
	}
	ws.Close()
	var lines []map[string]any
	for _, r := range logs.JSONLines(t) {
		if (r["level"] == "WARN" || r["level"] == "ERROR") && r["msg"] != "connection closed" {
			lines = append(lines, r)
		}
	}
	if len(lines) != 1 || lines[0]["msg"] != "redis refused the login" || lines[0]["level"] != "ERROR" {
		t.Fatalf("the login refused for 5s (a socket, a probe): %d warnings or errors besides the socket's, want one error \"redis refused the login\":\n%s", len(lines), logs.String())
	}
	if e, _ := lines[0]["err"].(string); !strings.Contains(e, "WRONGPASS") {
		t.Errorf("the log line does not give Redis's reason: %v", lines[0])
	}
	if then, _ := lines[0]["then"].(string); !strings.Contains(then, "REDIS_URL") {
		t.Errorf("the log line does not say what to check: %v", lines[0])
	}
	if strings.Contains(logs.String(), "wrongpw") {
		t.Errorf("the log holds the password:\n%s", logs.String())
	}

	if err := admin.ConfigSet(t.Context(), "requirepass", "wrongpw").Err(); err != nil {
		t.Fatal(err)
	}
	loginBack(t, logs)
	ws, _, err = websocket.DefaultDialer.Dial(wsURL, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	next(t, ws, "subscribed")
	if n := len(logs.Lines(t, "redis subscription back")); n != 0 {
		t.Errorf("\"redis subscription back\" ends no line that began:\n%s", logs.String())
	}
}

// TestLoginRefusedEndsOnlyOnALogin: Redis goes on serving the
// connections that logged in before their password changed or their
// user was disabled (a password rotated in Redis before the functions'
// setting), and refuses only the new ones. A message on the Pub/Sub
// connection, or a command on a pooled connection, logged in before
// says nothing of the login, and must not end "redis refused the login"
// with "redis accepts the login again" while new sockets are still
// refused for want of a connection: only a login Redis accepts ends it.
func TestLoginRefusedEndsOnlyOnALogin(t *testing.T) {
	t.Parallel()
	rs, admin := redistest.StartWithPassword(t, "pw1")
	u := strings.Replace(rs.URL(), "//", "//:pw1@", 1)
	logs := &testkit.SyncBuffer{}
	s := newEgressOn(t, u, logs)
	s.hub.loginRefused.Quiet = time.Nanosecond // a success that counts ends it at once
	srv, _ := startEgress(t, s)
	wsURL := "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws?channels=a"
	ws, _, err := websocket.DefaultDialer.Dial(wsURL, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	next(t, ws, "subscribed")
	held := s.hub.rdb.(*redis.Client).Conn() // logged in now, as a pooled one would be
	defer held.Close()
	if err := held.Ping(t.Context()).Err(); err != nil {
		t.Fatal(err)
	}
	if err := admin.ConfigSet(t.Context(), "requirepass", "pw2").Err(); err != nil {
		t.Fatal(err)
	}
	// Every other connection of the egress but its Pub/Sub one ends: its
	// next ones must log in.
	if err := held.Do(t.Context(), "CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes").Err(); err != nil {
		t.Fatal(err)
	}
	refused := func() {
		t.Helper()
		ws2, _, err := websocket.DefaultDialer.Dial(wsURL, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer ws2.Close()
		if code := closeCode(t, ws2, 10*time.Second); code != 1013 {
			t.Fatalf("a socket with new logins refused: closed %d, want 1013", code)
		}
	}
	refused()
	if n := len(logs.Lines(t, "redis refused the login")); n != 1 {
		t.Fatalf("%d \"redis refused the login\", want 1:\n%s", n, logs.String())
	}
	if err := held.Ping(t.Context()).Err(); err != nil {
		t.Fatalf("a connection logged in before the password changed: %v", err)
	}
	store := stream.NewStore(admin)
	ks := s.hub.keys
	if _, err := store.Append(t.Context(), []stream.Append{{Stream: ks.Stream("a"), Notify: ks.Notify("a"),
		Msg: stream.Message{Channel: "a", TS: time.Now().UnixMilli(), Data: json.RawMessage(`1`)}}}); err != nil {
		t.Fatal(err)
	}
	nextMessage(t, ws, "a") // through the Pub/Sub connection logged in before
	refused()
	if n := len(logs.Lines(t, "redis accepts the login again")); n != 0 {
		t.Fatalf("\"redis accepts the login again\" while Redis refuses every new login:\n%s", logs.String())
	}

	if err := admin.ConfigSet(t.Context(), "requirepass", "pw1").Err(); err != nil {
		t.Fatal(err)
	}
	loginBack(t, logs)
	ws3, _, err := websocket.DefaultDialer.Dial(wsURL, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws3.Close()
	next(t, ws3, "subscribed")
	if n := len(logs.Lines(t, "redis refused the login")); n != 1 {
		t.Errorf("%d \"redis refused the login\" for one episode, want 1:\n%s", n, logs.String())
	}
}

// loginBack waits until the log has ended the episode of a refused login
// with exactly one "redis accepts the login again".
func loginBack(t *testing.T, logs *testkit.SyncBuffer) {
	t.Helper()
	testkit.Eventually(t, 10*time.Second, func() error {
		if n := len(logs.Lines(t, "redis accepts the login again")); n != 1 {
			return fmt.Errorf("%d \"redis accepts the login again\":\n%s", n, logs.String())
		}
		return nil
	})
}

// TestRegistryOutageEndsWithNoSocketLeft: every socket of an instance
// ends while Redis is down, so their records' removals fail ("registry
// write failed"). Redis comes back while the instance holds no socket
// (one socket per instance is SCF's usual case): the outage still ends
// ("registry writes back"), from the refresh's own check, not only once
// a new socket registers.
func TestRegistryOutageEndsWithNoSocketLeft(t *testing.T) {
	t.Parallel()
	rs, rdb, s, srv, logs := outageEgress(t, map[string]string{"REGISTRY_TTL": "3s"})
	ws, _, err := websocket.DefaultDialer.Dial("ws"+strings.TrimPrefix(srv.URL, "http")+"/ws?channels=o1", nil)
	if err != nil {
		t.Fatal(err)
	}
	next(t, ws, "subscribed")

	rs.Stop()
	_ = ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(1000, ""), time.Now().Add(time.Second))
	closeCode(t, ws, 5*time.Second)
	testkit.Eventually(t, 5*time.Second, func() error {
		if len(logs.Lines(t, "registry write failed")) == 0 {
			return fmt.Errorf("no registry write failed yet")
		}
		return nil
	})
	if n := len(s.hub.snapshotConns()); n != 0 {
		t.Fatalf("%d connections held, want none", n)
	}
	rs.Restart(t)
	testkit.Eventually(t, 10*time.Second, func() error {
		if n := len(logs.Lines(t, "registry writes back")); n != 1 {
			return fmt.Errorf("registry writes back logged %d times, want once", n)
		}
		return nil
	})
	if keys, err := rdb.Keys(t.Context(), s.hub.keys.Prefix+":*:check").Result(); err != nil || len(keys) > 1 {
		t.Errorf("check keys %v (%v): want at most the last one, living a second", keys, err)
	}
}
