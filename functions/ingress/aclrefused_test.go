package main

import (
	"fmt"
	"log/slog"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/redisconn"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// TestRedisRefusesCommand: an ACL user that lacks a rule the functions
// need (docs/deployment.md, "TLS and ACL users") is a configuration fault,
// not an outage. Redis answers, and answers the same to every retry until
// an operator mends the user: each request is 500 internal (as for a key
// of the wrong type), and the log says once, at error level, that Redis
// refused a command to the user, with Redis's reason; it does not say
// "redis unavailable". A refusal inside the append script (a command the
// script calls) and one of a command itself (the script call) are both
// seen as such, and so is a refused WAIT (PUBLISH_WAIT_REPLICAS on, the
// user without +wait), which is no replica being late: each retry would
// write the message again and be refused again.
func TestRedisRefusesCommand(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, rules string
		wait        bool
	}{
		// The append script may run, XADD inside it may not.
		{"inside the script", "+evalsha +eval +get +set +exists +pexpire +xinfo|stream +spublish +ping", false},
		// The script itself may not run.
		{"the script call", "+get +set +exists +ping", false},
		// The script runs, the WAIT after it may not.
		{"the WAIT", "+evalsha +eval +get +set +exists +pexpire +xadd +xtrim +xinfo|stream +spublish +ping", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			rs := redistest.Start(t)
			prefix := redistest.Prefix(t)
			admin := redis.NewClient(rs.Options())
			defer admin.Close()
			args := []any{"ACL", "SETUSER", "pub", "reset", "on", ">pw", "~" + prefix + ":*", "&" + prefix + ":*"}
			for _, r := range strings.Fields(tc.rules) {
				args = append(args, r)
			}
			if err := admin.Do(t.Context(), args...).Err(); err != nil {
				t.Fatal(err)
			}
			u, err := url.Parse(rs.URL())
			if err != nil {
				t.Fatal(err)
			}
			u.User = url.UserPassword("pub", "pw")
			logs := &testkit.SyncBuffer{}
			var opt func(*Config)
			if tc.wait {
				opt = func(c *Config) { c.PublishWaitReplicas, c.PublishWaitTimeout = 1, 100*time.Millisecond }
			}
			e := newEnvWith(t, redisconn.Config{URL: u.String(), Timeout: time.Second, KeyPrefix: prefix}, slog.New(slog.NewJSONHandler(logs, nil)), opt)
			for range 3 {
				w := e.do("POST", "/v1/channels/a/messages", `{"data":1}`)
				expectError(t, w, 500, "internal")
				if w.Header().Get("Retry-After") != "" {
					t.Errorf("refused command: Retry-After %q, want none (a retry gets the same answer)", w.Header().Get("Retry-After"))
				}
			}
			var lines []map[string]any
			for _, l := range logs.JSONLines(t) {
				if l["level"] == "WARN" || l["level"] == "ERROR" {
					lines = append(lines, l)
				}
			}
			if len(lines) != 1 || lines[0]["msg"] != "redis refused a command" || lines[0]["level"] != "ERROR" {
				t.Fatalf("3 refused publishes logged %d warnings or errors, want one error \"redis refused a command\":\n%s", len(lines), logs.String())
			}
			if s, _ := lines[0]["err"].(string); !strings.Contains(s, "NOPERM") && !strings.Contains(s, "can't run this command") {
				t.Errorf("the log line does not give Redis's reason: %v", lines[0])
			}
		})
	}
}

// TestReadyzRefusedLogs: an ACL user that may not select REDIS_URL's
// database (docs/deployment.md: `+select`) has every connection refused,
// so /readyz answers 503 from the start (Redis "refused", not "down"),
// and the log says why at once, before any request comes, and once
// however often it is probed.
func TestReadyzRefusedLogs(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	prefix := redistest.Prefix(t)
	admin := redis.NewClient(rs.Options())
	defer admin.Close()
	if err := admin.Do(t.Context(), "ACL", "SETUSER", "pub", "reset", "on", ">pw", "~"+prefix+":*", "&"+prefix+":*", "+ping", "+role").Err(); err != nil {
		t.Fatal(err)
	}
	u, err := url.Parse(rs.URL())
	if err != nil {
		t.Fatal(err)
	}
	u.User = url.UserPassword("pub", "pw")
	u.Path = "/3"
	logs := &testkit.SyncBuffer{}
	e := newEnvWith(t, redisconn.Config{URL: u.String(), Timeout: time.Second, KeyPrefix: prefix}, slog.New(slog.NewJSONHandler(logs, nil)), nil)
	for range 3 {
		if w := e.do("GET", "/readyz", ""); w.Code != 503 || !strings.Contains(w.Body.String(), `"redis":"refused"`) {
			t.Fatalf("readyz: %d %s, want 503 with \"redis\":\"refused\"", w.Code, w.Body)
		}
		e.srv.ready = redisconn.NewReadiness(e.rdb, 0) // each probe asks Redis
	}
	lines := logs.Lines(t, "redis refused a command")
	if len(lines) != 1 || lines[0]["level"] != "ERROR" {
		t.Fatalf("3 refused probes logged %d \"redis refused a command\", want one error:\n%s", len(lines), logs.String())
	}
	if s, _ := lines[0]["err"].(string); !strings.Contains(s, "NOPERM") || !strings.Contains(s, "select") {
		t.Errorf("the log line does not give Redis's reason: %v", lines[0])
	}
}

// TestRedisRefusesLogin: a wrong password, none where Redis wants one, or
// a user that does not exist or is disabled is a configuration fault,
// not an outage: Redis answers, the same to every retry, until an
// operator fixes REDIS_URL or the user. Each request is 503 unavailable
// with Retry-After (a password rotation ends it without the client doing
// anything), whose message does not say Redis cannot be reached; the log
// says once, at error level, that Redis refused the login, with Redis's
// reason and what to check, never the password, and once when it is
// fixed.
func TestRedisRefusesLogin(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, userinfo, reason string
		fix                    []any // what an operator does
	}{
		{"wrong password", ":wrongpw", "WRONGPASS", []any{"CONFIG", "SET", "requirepass", "wrongpw"}},
		{"no password", "", "NOAUTH|unauthenticated", []any{"CONFIG", "SET", "requirepass", ""}},
		{"disabled user", "pub:userpw", "WRONGPASS", []any{"ACL", "SETUSER", "pub", "on"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			rs := redistest.Start(t, "--requirepass", "rightpw")
			admin := redis.NewClient(&redis.Options{Addr: rs.Addr(), Password: "rightpw", DisableIdentity: true})
			defer admin.Close()
			if err := admin.Do(t.Context(), "ACL", "SETUSER", "pub", "off", ">userpw", "~*", "&*", "+@all").Err(); err != nil {
				t.Fatal(err)
			}
			u := strings.Replace(rs.URL(), "//", "//"+tc.userinfo+"@", 1)
			if tc.userinfo == "" {
				u = rs.URL()
			}
			logs := &testkit.SyncBuffer{}
			e := newEnvWith(t, redisconn.Config{URL: u, Timeout: time.Second}, slog.New(slog.NewJSONHandler(logs, nil)), nil)
			e.srv.redisLogin.Quiet = 100 * time.Millisecond
			for range 3 {
				w := e.do("POST", "/v1/channels/a/messages", `{"data":1}`)
				expectError(t, w, 503, "unavailable")
				if w.Header().Get("Retry-After") == "" {
					t.Error("refused login: no Retry-After")
				}
				if strings.Contains(w.Body.String(), "cannot be reached") {
					t.Errorf("refused login: the client is told %s", w.Body)
				}
			}
			var lines []map[string]any
			for _, l := range logs.JSONLines(t) {
				if l["level"] == "WARN" || l["level"] == "ERROR" {
					lines = append(lines, l)
				}
			}
			if len(lines) != 1 || lines[0]["msg"] != "redis refused the login" || lines[0]["level"] != "ERROR" {
				t.Fatalf("3 publishes with the login refused logged %d warnings or errors, want one error \"redis refused the login\":\n%s", len(lines), logs.String())
			}
			if s, _ := lines[0]["err"].(string); !regexp.MustCompile(tc.reason).MatchString(s) {
				t.Errorf("the log line does not give Redis's reason (%s): %v", tc.reason, lines[0])
			}
			if s, _ := lines[0]["then"].(string); !strings.Contains(s, "REDIS_URL") {
				t.Errorf("the log line does not say what to check: %v", lines[0])
			}
			if strings.Contains(logs.String(), "userpw") || strings.Contains(logs.String(), "wrongpw") {
				t.Errorf("the log holds the password:\n%s", logs.String())
			}

			if err := admin.Do(t.Context(), tc.fix...).Err(); err != nil {
				t.Fatal(err)
			}
			loginBack(t, e, logs)
		})
	}
}

// TestReadyzLoginRefusedLogs: an ingress whose login Redis refuses is
// never ready, and the log says why at once, before any request comes,
// and once however often it is probed; /readyz says Redis refused it.
func TestReadyzLoginRefusedLogs(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t, "--requirepass", "rightpw")
	logs := &testkit.SyncBuffer{}
	e := newEnvWith(t, redisconn.Config{URL: strings.Replace(rs.URL(), "//", "//:wrongpw@", 1), Timeout: time.Second}, slog.New(slog.NewJSONHandler(logs, nil)), nil)
	for range 3 {
		w := e.do("GET", "/readyz", "")
		if w.Code != 503 || !strings.Contains(w.Body.String(), `"redis":"refused"`) {
			t.Fatalf("readyz: %d %s, want 503 with \"redis\":\"refused\"", w.Code, w.Body)
		}
		e.srv.ready = redisconn.NewReadiness(e.rdb, 0) // each probe asks Redis
	}
	lines := logs.Lines(t, "redis refused the login")
	if len(lines) != 1 || lines[0]["level"] != "ERROR" || lines[0]["route"] != "/readyz" {
		t.Fatalf("3 probes with the login refused logged %d \"redis refused the login\", want one error with the route:\n%s", len(lines), logs.String())
	}
	if s, _ := lines[0]["err"].(string); !strings.Contains(s, "WRONGPASS") {
		t.Errorf("the log line does not give Redis's reason: %v", lines[0])
	}
	if n := len(logs.Lines(t, "redis unavailable")); n != 0 {
		t.Errorf("a refused login logged as \"redis unavailable\":\n%s", logs.String())
	}
}

// TestLoginRefusedEndsOnlyOnALogin: Redis goes on serving the
// connections that logged in before their password changed or their
// user was disabled (a password rotated in Redis before the functions'
// setting), and refuses only the new ones. A command carried out on one
// of the old connections says nothing of the login, and must not end
// "redis refused the login" with "redis accepts the login again" while
// publishes that need a new connection are still refused: only a login
// Redis accepts ends it.
func TestLoginRefusedEndsOnlyOnALogin(t *testing.T) {
	t.Parallel()
	rs, admin := redistest.StartWithPassword(t, "pw1")
	logs := &testkit.SyncBuffer{}
	e := newEnvWith(t, redisconn.Config{URL: strings.Replace(rs.URL(), "//", "//:pw1@", 1), Timeout: time.Second}, slog.New(slog.NewJSONHandler(logs, nil)), nil)
	e.srv.redisLogin.Quiet = time.Nanosecond // a success that counts ends it at once
	if w := e.do("POST", "/v1/channels/a/messages", `{"data":1}`); w.Code != 202 {
		t.Fatalf("publish: %d %s", w.Code, w.Body)
	}
	// A connection of the ingress's client logged in now, as a pooled
	// one would be.
	held := e.rdb.(*redis.Client).Conn()
	defer held.Close()
	if err := held.Ping(t.Context()).Err(); err != nil {
		t.Fatal(err)
	}
	if err := admin.ConfigSet(t.Context(), "requirepass", "pw2").Err(); err != nil {
		t.Fatal(err)
	}
	// Every other connection of the ingress ends: its next ones must log in.
	if err := held.Do(t.Context(), "CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes").Err(); err != nil {
		t.Fatal(err)
	}
	expectError(t, e.do("POST", "/v1/channels/a/messages", `{"data":1}`), 503, "unavailable")
	if n := len(logs.Lines(t, "redis refused the login")); n != 1 {
		t.Fatalf("%d \"redis refused the login\", want 1:\n%s", n, logs.String())
	}
	if err := held.Ping(t.Context()).Err(); err != nil {
		t.Fatalf("a connection logged in before the password changed: %v", err)
	}
	expectError(t, e.do("POST", "/v1/channels/a/messages", `{"data":1}`), 503, "unavailable")
	if n := len(logs.Lines(t, "redis accepts the login again")); n != 0 {
		t.Fatalf("\"redis accepts the login again\" while Redis refuses every new login:\n%s", logs.String())
	}

	if err := admin.ConfigSet(t.Context(), "requirepass", "pw1").Err(); err != nil {
		t.Fatal(err)
	}
	loginBack(t, e, logs)
	if n := len(logs.Lines(t, "redis refused the login")); n != 1 {
		t.Errorf("%d \"redis refused the login\" for one episode, want 1:\n%s", n, logs.String())
	}
}

// loginBack waits until, Redis taking the functions' login again, a
// publish is written and the log has ended the episode of the refused
// login with exactly one "redis accepts the login again".
func loginBack(t *testing.T, e *testEnv, logs *testkit.SyncBuffer) {
	t.Helper()
	testkit.Eventually(t, 5*time.Second, func() error {
		if w := e.do("POST", "/v1/channels/a/messages", `{"data":1}`); w.Code != 202 {
			return fmt.Errorf("publish: %d %s", w.Code, w.Body)
		}
		if n := len(logs.Lines(t, "redis accepts the login again")); n != 1 {
			return fmt.Errorf("%d \"redis accepts the login again\":\n%s", n, logs.String())
		}
		return nil
	})
}

// TestRefusedCommandEndsOnlyWhenCarriedOut: a user that lacks one rule
// still has the others carried out: other requests, readiness PINGs.
// Those say nothing of the refused command, and must not end "redis
// refused a command" with "redis accepts the commands again" while it is
// still refused (before, any command carried out 5 s after the last
// refusal did: a request refused every few seconds logged the pair each
// time). Only the refused command carried out ends it, once: a command
// Redis refused, or a script that called one (the same script, sent by
// its hash or with its source). The user also lacks +role, which
// readiness does without (docs/deployment.md): ROLE refused at every
// probe is no refusal that keeps the episode going.
func TestRefusedCommandEndsOnlyWhenCarriedOut(t *testing.T) {
	t.Parallel()
	// docs/deployment.md's line, but for +role and the rules each case
	// takes away.
	const line = "+ping +evalsha +eval +time +get +set +del +exists +pexpire +pttl +persist +xadd +xtrim +xdel +xsetid +xinfo|stream +xrange +xrevrange +zadd +zrem +zrevrangebyscore +zremrangebyscore +multi +exec +wait +spublish"
	publish := [3]string{"POST", "/v1/channels/a/messages", `{"data":1}`}
	history := [3]string{"GET", "/v1/channels/a/messages", ""}
	for _, tc := range []struct {
		name    string
		missing []string
		refused [3]string // a request Redis refuses a command of
		ok      [3]string // one it carries out
		okCode  int
	}{
		{"a command", []string{"+xrange", "+xrevrange"}, history, publish, 202},
		{"inside the script", []string{"+xadd"}, publish, history, 200},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			rs := redistest.Start(t)
			prefix := redistest.Prefix(t)
			admin := redis.NewClient(rs.Options())
			defer admin.Close()
			args := []any{"ACL", "SETUSER", "pub", "reset", "on", ">pw", "~" + prefix + ":*", "&" + prefix + ":*"}
			for _, r := range strings.Fields(line) {
				if !slices.Contains(tc.missing, r) {
					args = append(args, r)
				}
			}
			if err := admin.Do(t.Context(), args...).Err(); err != nil {
				t.Fatal(err)
			}
			u, err := url.Parse(rs.URL())
			if err != nil {
				t.Fatal(err)
			}
			u.User = url.UserPassword("pub", "pw")
			logs := &testkit.SyncBuffer{}
			e := newEnvWith(t, redisconn.Config{URL: u.String(), Timeout: time.Second, KeyPrefix: prefix}, slog.New(slog.NewJSONHandler(logs, nil)), nil)
			e.srv.redisRefused.Quiet = time.Nanosecond // a success that counts ends it at once
			for range 2 {
				expectError(t, e.do(tc.refused[0], tc.refused[1], tc.refused[2]), 500, "internal")
				if w := e.do(tc.ok[0], tc.ok[1], tc.ok[2]); w.Code != tc.okCode {
					t.Fatalf("%s %s: %d %s", tc.ok[0], tc.ok[1], w.Code, w.Body)
				}
				if w := e.do("GET", "/readyz", ""); w.Code != 200 {
					t.Fatalf("readyz: %d %s", w.Code, w.Body)
				}
				e.srv.ready = redisconn.NewReadiness(e.rdb, 0) // each probe asks Redis
				if n := len(logs.Lines(t, "redis accepts the commands again")); n != 0 {
					t.Fatalf("\"redis accepts the commands again\" while %s is still refused:\n%s", tc.refused[1], logs.String())
				}
			}

			args = []any{"ACL", "SETUSER", "pub"}
			for _, r := range tc.missing {
				args = append(args, r)
			}
			if err := admin.Do(t.Context(), args...).Err(); err != nil {
				t.Fatal(err)
			}
			if w := e.do(tc.refused[0], tc.refused[1], tc.refused[2]); w.Code >= 300 {
				t.Fatalf("%s %s with the rule given: %d %s", tc.refused[0], tc.refused[1], w.Code, w.Body)
			}
			if n := len(logs.Lines(t, "redis accepts the commands again")); n != 1 {
				t.Fatalf("%d \"redis accepts the commands again\" once the refused command is carried out, want 1:\n%s", n, logs.String())
			}
			if n := len(logs.Lines(t, "redis refused a command")); n != 1 {
				t.Errorf("%d \"redis refused a command\" for one episode, want 1:\n%s", n, logs.String())
			}
		})
	}
}
