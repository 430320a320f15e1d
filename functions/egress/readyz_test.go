package main

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/wsrelay/wsrelay/shared/redisconn"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// TestReadyzSaysWhy: a 503 on /readyz names its cause, so that an
// operator looking at a failing probe knows what to fix: a Redis that
// refuses the login (a real password-protected redis-server given the
// wrong password), one that does not answer (a port nothing listens
// on), an instance draining. Ready, it answers 200.
func TestReadyzSaysWhy(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t, "--requirepass", "rightpw")
	dead, err := redistest.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, url string
		drain     bool
		status    int
		message   string
	}{
		{"ready", strings.Replace(rs.URL(), "//", "//:rightpw@", 1), false, 200, ""},
		{"draining", strings.Replace(rs.URL(), "//", "//:rightpw@", 1), true, 503, "draining"},
		{"login refused", strings.Replace(rs.URL(), "//", "//:wrongpw@", 1), false, 503, "Redis refuses the login"},
		{"redis down", "redis://127.0.0.1:" + strconv.Itoa(dead), false, 503, "Redis does not answer"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			s := newEgressOn(t, tc.url, io.Discard)
			srv, _ := startEgress(t, s)
			if tc.drain {
				s.draining.Store(true)
			}
			var status int
			var body struct {
				Error struct{ Code, Message string }
			}
			// The probe's answer is cached briefly and the inbox is
			// subscribed as the egress starts: poll until it settles.
			testkit.Eventually(t, 10*time.Second, func() error {
				resp, err := http.Get(srv.URL + "/readyz")
				if err != nil {
					return err
				}
				defer resp.Body.Close()
				status, body.Error.Code, body.Error.Message = resp.StatusCode, "", ""
				if resp.StatusCode != 200 {
					if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
						return err
					}
				}
				if status != tc.status || !strings.Contains(body.Error.Message, tc.message) {
					return fmt.Errorf("/readyz %d %q, want %d %q", status, body.Error.Message, tc.status, tc.message)
				}
				return nil
			})
			if status == 503 && body.Error.Code != "unavailable" {
				t.Errorf("code %q, want unavailable", body.Error.Code)
			}
			if strings.Contains(body.Error.Message, "rightpw") || strings.Contains(body.Error.Message, "wrongpw") {
				t.Errorf("the answer holds the password: %q", body.Error.Message)
			}
		})
	}
}

// newEgressOn makes an egress (not started) on the Redis at URL u, with
// short timeouts, anonymous sockets and a key prefix of the test's own,
// logging as JSON to logs.
func newEgressOn(t *testing.T, u string, logs io.Writer) *Server {
	t.Helper()
	rc := redisconn.Config{URL: u, Timeout: 300 * time.Millisecond, KeyPrefix: redistest.Prefix(t)}
	rdb, err := redisconn.New(rc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rdb.Close() })
	env := map[string]string{"ALLOW_ANONYMOUS": "true", "REDIS_URL": u, "REDIS_KEY_PREFIX": rc.KeyPrefix, "REDIS_TIMEOUT": "300ms", "SHUTDOWN_GRACE": "1s"}
	cfg, err := loadConfig(func(k string) string { return env[k] })
	if err != nil {
		t.Fatal(err)
	}
	return NewServer(cfg, slog.New(slog.NewJSONHandler(logs, nil)), rdb)
}
