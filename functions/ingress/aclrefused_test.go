package main

import (
	"log/slog"
	"net/url"
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
// seen as such.
func TestRedisRefusesCommand(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, rules string
	}{
		// The append script may run, XADD inside it may not.
		{"inside the script", "+evalsha +eval +get +set +exists +pexpire +xinfo|stream +spublish +ping"},
		// The script itself may not run.
		{"the script call", "+get +set +exists +ping"},
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
			e := newEnvWith(t, redisconn.Config{URL: u.String(), Timeout: time.Second, KeyPrefix: prefix}, slog.New(slog.NewJSONHandler(logs, nil)), nil)
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
// so /readyz answers 503 from the start, and the log says why at once,
// before any request comes, and once however often it is probed.
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
		if w := e.do("GET", "/readyz", ""); w.Code != 503 {
			t.Fatalf("readyz: %d %s, want 503", w.Code, w.Body)
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
