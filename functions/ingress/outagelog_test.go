package main

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/wsrelay/wsrelay/shared/redisconn"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// TestRedisOutageLogsOnce: a steady publisher during a Redis outage gets
// its 503s, and the log says so once (the error, and what happens next),
// not once per request: SCF's log service bills per line. The recovery
// is one line too, with how many requests were refused meanwhile.
func TestRedisOutageLogsOnce(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	logs := &testkit.SyncBuffer{}
	e := newEnvWith(t, redisconn.Config{URL: rs.URL(), Timeout: 300 * time.Millisecond}, slog.New(slog.NewJSONHandler(logs, nil)), nil)
	e.srv.redisDown.Quiet = 100 * time.Millisecond

	if w := e.do("POST", "/v1/channels/up/messages", `{"data":1}`); w.Code != 202 {
		t.Fatalf("publish with Redis up: %d %s", w.Code, w.Body.String())
	}
	rs.Stop()
	const requests = 60
	for i := range requests {
		path := "/v1/channels/down/messages"
		if i%3 == 1 {
			path = "/v1/users/u1/messages"
		}
		expectError(t, e.do("POST", path, `{"data":1}`), 503, "unavailable")
	}
	var warns []map[string]any
	for _, l := range logs.JSONLines(t) {
		if l["level"] == "WARN" || l["level"] == "ERROR" {
			warns = append(warns, l)
		}
	}
	if len(warns) == 0 || len(warns) > 3 {
		t.Fatalf("%d requests refused during the outage wrote %d warnings, want 1–3:\n%s", requests, len(warns), logs.String())
	}
	if warns[0]["err"] == nil {
		t.Errorf("the outage's line does not say the error: %v", warns[0])
	}

	rs.Restart(t)
	testkit.Eventually(t, 10*time.Second, func() error {
		if w := e.do("POST", "/v1/channels/up/messages", `{"data":1}`); w.Code != 202 {
			return fmt.Errorf("publish: %d %s", w.Code, w.Body.String())
		}
		return nil
	})
	// The outage ends with a success and no failure for Quiet.
	var back []map[string]any
	testkit.Eventually(t, 5*time.Second, func() error {
		back = logs.Lines(t, "redis back")
		if len(back) != 1 {
			return fmt.Errorf("recovery logged %d times, want once:\n%s", len(back), logs.String())
		}
		return nil
	})
	if n, _ := back[0]["failures"].(float64); n < requests {
		t.Errorf("recovery line counts %v failed requests, want at least %d: %v", back[0]["failures"], requests, back[0])
	}
}

// TestReadyzOutageLogs: an ingress that no request reaches while Redis is
// down is asked only /readyz, by the platform or a load balancer. Its
// 503s are logged as the outage they are, once, with the error: before,
// nothing said why it never became ready.
func TestReadyzOutageLogs(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	logs := &testkit.SyncBuffer{}
	e := newEnvWith(t, redisconn.Config{URL: rs.URL(), Timeout: 300 * time.Millisecond}, slog.New(slog.NewJSONHandler(logs, nil)), nil)
	rs.Stop()
	for range 3 {
		if w := e.do("GET", "/readyz", ""); w.Code != 503 || !strings.Contains(w.Body.String(), `"redis":"down"`) {
			t.Fatalf("readyz with Redis down: %d %s", w.Code, w.Body)
		}
		e.srv.ready = redisconn.NewReadiness(e.rdb, 0) // each probe asks Redis
	}
	lines := logs.Lines(t, "redis unavailable")
	if len(lines) != 1 || lines[0]["level"] != "WARN" || lines[0]["err"] == nil || lines[0]["route"] != "/readyz" {
		t.Fatalf("3 probes with Redis down logged %d \"redis unavailable\", want one warning with the error and the route:\n%s", len(lines), logs.String())
	}
}

// TestReadyzReplica: an ingress whose REDIS_URL names a replica (or whose
// master a failover demoted) cannot publish (Redis refuses every write),
// so it is not ready although Redis answers: /readyz 503 "down" with
// Retry-After (docs/api.md), and the log says it is a replica.
func TestReadyzReplica(t *testing.T) {
	t.Parallel()
	master := redistest.Start(t)
	replica := redistest.Start(t, "--replicaof", "127.0.0.1", strconv.Itoa(master.Port))
	logs := &testkit.SyncBuffer{}
	e := newEnvWith(t, redisconn.Config{URL: replica.URL(), Timeout: time.Second}, slog.New(slog.NewJSONHandler(logs, nil)), nil)
	w := e.do("GET", "/readyz", "")
	if w.Code != 503 || !strings.Contains(w.Body.String(), `"redis":"down"`) || w.Header().Get("Retry-After") != "1" {
		t.Fatalf("readyz on a replica: %d %s (Retry-After %q), want 503 \"redis\":\"down\", Retry-After 1", w.Code, w.Body, w.Header().Get("Retry-After"))
	}
	lines := logs.Lines(t, "redis unavailable")
	if len(lines) != 1 || !strings.Contains(fmt.Sprint(lines[0]["err"]), "replica") {
		t.Fatalf("readyz on a replica logged %v, want one \"redis unavailable\" whose err says replica:\n%s", lines, logs.String())
	}
}

// TestReadyzSaysWhy: the ingress's 503 on /readyz names its cause in
// "reason", in the egress's words (redisconn.Why, whose every cause the
// egress's TestReadyzSaysWhy shows), so that an operator looking at a
// failing probe knows what to fix without the log: here a Redis that
// does not answer (a port nothing listens on), a replica, and one that
// answers the probe with an error of its own (a replica cut from its
// master told not to serve stale data: MASTERDOWN). Before, that last
// one said "down", as a Redis gone does: the operator looked at the
// network, not at Redis.
func TestReadyzSaysWhy(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	dead, err := redistest.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	replica := redistest.Start(t, "--replicaof", "127.0.0.1", strconv.Itoa(rs.Port))
	stale := redistest.Start(t, "--replicaof", "127.0.0.1", strconv.Itoa(dead), "--replica-serve-stale-data", "no")
	for _, tc := range []struct {
		name, url     string
		status        int
		redis, reason string
	}{
		{"ready", rs.URL(), 200, "", ""},
		{"redis down", "redis://127.0.0.1:" + strconv.Itoa(dead), 503, "down", "Redis does not answer"},
		{"replica", replica.URL(), 503, "down", "Redis is a replica"},
		{"error reply", stale.URL(), 503, "down", "Redis answers the probe with an error: MASTERDOWN"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e := newEnvWith(t, redisconn.Config{URL: tc.url, Timeout: time.Second}, nil, nil)
			w := e.do("GET", "/readyz", "")
			var body struct{ Status, Redis, Reason string }
			if err := json.Unmarshal(w.Body.Bytes(), &body); err != nil {
				t.Fatalf("readyz %d %s: %v", w.Code, w.Body, err)
			}
			if w.Code != tc.status || body.Redis != tc.redis || !strings.Contains(body.Reason, tc.reason) {
				t.Fatalf("readyz %d %s, want %d with redis %q and a reason holding %q", w.Code, w.Body, tc.status, tc.redis, tc.reason)
			}
			if tc.status == 200 && body.Reason != "" {
				t.Errorf("ready, yet a reason: %s", w.Body)
			}
		})
	}
}

// TestClosedConnectionResentNotCounted: a publish whose pooled connection
// turns out closed by Redis before the append reached it (over TLS,
// go-redis does not see such a connection before using it: Redis's idle
// timeout, a proxy) is sent again on a new connection and answered 202,
// written once, with nothing logged and no Redis error counted: else
// every idle connection Redis closed counted one, and the Redis-errors
// alert (for: 10m of a rate above 0) fired on a quiet deployment whose
// Redis closes idle connections. A Redis that is gone still counts (its
// dial fails: TestReadyzOutageLogs and the cluster metrics tests).
func TestClosedConnectionResentNotCounted(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	relay := testkit.NewReplyDropper(t, rs.Addr())
	logs := &testkit.SyncBuffer{}
	e := newEnvWith(t, redisconn.Config{URL: "redis://" + relay.Addr, Timeout: time.Second}, slog.New(slog.NewJSONHandler(logs, nil)), nil)
	if w := e.do("POST", "/v1/channels/warm/messages", `{"data":0}`); w.Code != 202 {
		t.Fatalf("publish: %d %s", w.Code, w.Body)
	}
	before := e.redisErrors()
	relay.ArmCut(e.keys.Stream("cut"))
	w := e.do("POST", "/v1/channels/cut/messages", `{"data":1}`)
	if relay.Dropped() != 1 {
		t.Fatal("the append's connection was not cut")
	}
	if w.Code != 202 || e.xlen("cut") != 1 {
		t.Fatalf("publish on a connection Redis had closed: %d %s, %d written; want 202 and 1", w.Code, w.Body, e.xlen("cut"))
	}
	if n := e.redisErrors() - before; n != 0 {
		t.Errorf("wsrelay_ingress_redis_errors_total rose by %d for a connection closed and the append sent again, want 0", n)
	}
	if lines := logs.JSONLines(t); len(lines) != 0 {
		t.Errorf("logged %v, want nothing", lines)
	}
}

// TestRedisBehindClosingProxyCounted: a Redis that is down behind a proxy
// (a TLS terminator, a TCP load balancer) is reached by every dial, and
// each connection is closed before any reply. The publishes are answered
// 503 and each failure counts in wsrelay_ingress_redis_errors_total: the
// command sent again on a new connection, whose outcome counts, was
// closed as well. Not counted, an outage behind a proxy left the counter,
// and the alert on it, at zero.
func TestRedisBehindClosingProxyCounted(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	proxy := testkit.Relay(t, rs.Addr(), nil)
	e := newEnvWith(t, redisconn.Config{URL: "redis://" + proxy, Timeout: time.Second}, slog.New(slog.DiscardHandler), nil)
	if w := e.do("POST", "/v1/channels/warm/messages", `{"data":0}`); w.Code != 202 {
		t.Fatalf("publish: %d %s", w.Code, w.Body)
	}
	rs.Stop()
	before := e.redisErrors()
	expectError(t, e.do("POST", "/v1/channels/down/messages", `{"data":1}`), 503, "unavailable")
	if n := e.redisErrors() - before; n < 1 {
		t.Errorf("wsrelay_ingress_redis_errors_total rose by %d for a publish refused with Redis down behind a proxy, want at least 1", n)
	}
}
