package main

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/redisconn"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// TestReadyzSaysWhy: a 503 on /readyz names its cause, so that an
// operator looking at a failing probe knows what to fix: a Redis that
// refuses the login (a real password-protected redis-server given the
// wrong password), one that refuses the probe's command to the ACL user
// (a user without +ping), one that does not answer (a port nothing
// listens on), one that answers the probe with an error (a replica cut
// from its master, MASTERDOWN), a replica (a REDIS_URL that names one, or a master
// demoted), an instance draining. Ready, it answers 200. The read path
// not live is TestReadyzStaysDownWhileReadPathDead's.
func TestReadyzSaysWhy(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t, "--requirepass", "rightpw")
	dead, err := redistest.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	// A user that may do all but PING, the probe's command (as one
	// without +select for REDIS_URL's database may do nothing).
	admin := redis.NewClient(&redis.Options{Addr: rs.Addr(), Password: "rightpw", DisableIdentity: true})
	defer admin.Close()
	if err := admin.Do(t.Context(), "ACL", "SETUSER", "noping", "on", ">userpw", "~*", "&*", "+@all", "-ping").Err(); err != nil {
		t.Fatal(err)
	}
	// A replica answers PING, and refuses every write.
	replica := redistest.Start(t, "--replicaof", "127.0.0.1", strconv.Itoa(rs.Port))
	// A replica whose master is gone, told not to serve stale data,
	// answers PING with an error (MASTERDOWN): Redis answers, so the
	// 503 must not say it does not.
	stale := redistest.Start(t, "--replicaof", "127.0.0.1", strconv.Itoa(dead), "--replica-serve-stale-data", "no")
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
		{"command refused", strings.Replace(rs.URL(), "//", "//noping:userpw@", 1), false, 503, "Redis refuses a command to the functions' ACL user"},
		{"replica", replica.URL(), false, 503, "Redis is a replica"},
		{"error reply", stale.URL(), false, 503, "Redis answers the probe with an error: MASTERDOWN"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			s := newEgressOn(t, tc.url, io.Discard)
			srv, _ := startEgress(t, s)
			if tc.drain {
				s.draining.Store(true)
			}
			var a readyzAnswer
			// The probe's answer is cached briefly and the inbox is
			// subscribed as the egress starts: poll until it settles.
			testkit.Eventually(t, 10*time.Second, func() error {
				var err error
				if a, err = getReadyz(srv.URL); err != nil {
					return err
				}
				if a.status != tc.status || !strings.Contains(a.message, tc.message) {
					return fmt.Errorf("/readyz %d %q, want %d %q", a.status, a.message, tc.status, tc.message)
				}
				return nil
			})
			if a.status == 503 && (a.code != "unavailable" || a.retryAfter != "1") {
				t.Errorf("code %q, Retry-After %q, want unavailable and 1", a.code, a.retryAfter)
			}
			for _, pw := range []string{"rightpw", "wrongpw", "userpw"} {
				if strings.Contains(a.message, pw) {
					t.Errorf("the answer holds the password: %q", a.message)
				}
			}
		})
	}
}

// readyzAnswer is what /readyz answered: its status and, for a 503, the
// error's code and message and the Retry-After header.
type readyzAnswer struct {
	status                    int
	code, message, retryAfter string
}

// getReadyz asks the egress at base for /readyz.
func getReadyz(base string) (readyzAnswer, error) {
	resp, err := http.Get(base + "/readyz")
	if err != nil {
		return readyzAnswer{}, err
	}
	defer resp.Body.Close()
	a := readyzAnswer{status: resp.StatusCode, retryAfter: resp.Header.Get("Retry-After")}
	if resp.StatusCode != 200 {
		var body struct {
			Error struct{ Code, Message string }
		}
		if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
			return a, fmt.Errorf("/readyz %d: %w", resp.StatusCode, err)
		}
		a.code, a.message = body.Error.Code, body.Error.Message
	}
	return a, nil
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

// TestReadyzReadPathSilence: /readyz answers 503 once the instance's own
// probe has not come back through Pub/Sub for 3 × PROBE_INTERVAL (the
// README's table: "/readyz is 503 after 3 misses"; docs/metrics.md), and
// 200 before. TestReadyzStaysDownWhileReadPathDead waits 5 s for the 503
// at PROBE_INTERVAL=100ms, which a threshold ten times too long passes.
// The server's loops are not run here: no probe comes back to move the
// last one seen, which the test sets.
func TestReadyzReadPathSilence(t *testing.T) {
	t.Parallel()
	s := newEgressOn(t, redistest.URL(t), io.Discard)
	probe := s.cfg.ProbeInterval
	close(s.hub.inbox.ready) // as the receive loop does once Redis confirms the inbox
	for _, tc := range []struct {
		silent  time.Duration
		status  int
		message string
	}{
		{3*probe - probe/2, 200, ""},
		{3*probe + probe/2, 503, "the Redis subscription (the read path) is not live"},
	} {
		s.hub.lastRecv.Store(monoNow() - int64(tc.silent))
		w := httptest.NewRecorder()
		s.handleReadyz(w, httptest.NewRequest(http.MethodGet, "/readyz", nil))
		if w.Code != tc.status || !strings.Contains(w.Body.String(), tc.message) {
			t.Fatalf("the last probe back %v ago (PROBE_INTERVAL %v): /readyz %d %s, want %d %q", tc.silent, probe, w.Code, w.Body, tc.status, tc.message)
		}
	}
}
