package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/wsrelay/wsrelay/shared/auth"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// TestAuthenticatedRunLeaksNoSecret runs both functions with every kind
// of secret (API key, JWT secret, user tokens, a Redis password), goes
// through the allowed and refused paths, then greps every log line of both
// processes for each secret.
func TestAuthenticatedRunLeaksNoSecret(t *testing.T) {
	const (
		redisPassword = "redis-pw-5b3c9e1f7a"
		apiKey        = "key-live-0f9e8d7c6b5a49382716"
		jwtSecret     = "jwt-secret-a1b2c3d4e5f60718293a4b5c6d7e8f90"
	)
	srv := redistest.Start(t, "--requirepass", redisPassword)
	redisURL := "redis://:" + redisPassword + "@" + srv.Addr() + "/0"
	e := env{"REDIS_URL": redisURL, "API_KEYS": apiKey, "JWT_SECRET": jwtSecret, "LOG_LEVEL": "debug", "PROBE_INTERVAL": "500ms"}
	in := start(t, "ingress", e)
	eg := start(t, "egress", e)
	testkit.Eventually(t, 5*time.Second, func() error { return httpStatus(eg.URL+"/readyz", 200) })

	userToken, err := auth.SignHS256(jwtSecret, auth.Claims{Subject: "alice", Channels: []string{"room-*"}, Publish: []string{"room-*"}, Expires: time.Now().Add(time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	forged, _ := auth.SignHS256("not-the-secret-but-long-enough-000000", auth.Claims{Subject: "mallory", Channels: []string{"*"}, Expires: time.Now().Add(time.Hour)})

	// Subscriber with a token in the query; a forged one is refused.
	w := dial(t, eg.wsURL("token="+userToken+"&channels=room-1"))
	w.waitFrame(func(f frame) bool { return f.Type == "subscribed" })
	if _, resp, err := websocket.DefaultDialer.Dial(eg.wsURL("token="+forged), nil); err == nil || resp == nil || resp.StatusCode != 401 {
		t.Fatalf("forged token: err %v, resp %v", err, resp)
	}
	w.send(map[string]any{"type": "subscribe", "channel": "secret-room"})
	w.waitFrame(func(f frame) bool { return f.Type == "error" && f.Code == "forbidden" })

	call := func(method, path, bearer string, body any) int {
		t.Helper()
		b, _ := json.Marshal(body)
		req, _ := http.NewRequest(method, in.URL+path, bytes.NewReader(b))
		req.Header.Set("Content-Type", "application/json")
		if bearer != "" {
			req.Header.Set("Authorization", "Bearer "+bearer)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		rb, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		for _, s := range []string{apiKey, jwtSecret, redisPassword, userToken} {
			if strings.Contains(string(rb), s) {
				t.Fatalf("%s %s: a secret is in the response body: %s", method, path, rb)
			}
		}
		return resp.StatusCode
	}
	checks := []struct {
		method, path, bearer string
		want                 int
	}{
		{"POST", "/v1/channels/room-1/messages", apiKey, 202},
		{"POST", "/v1/channels/room-1/messages", userToken, 202},
		{"POST", "/v1/channels/room-1/messages", "", 401},
		{"POST", "/v1/channels/room-1/messages", apiKey + "x", 401},
		{"POST", "/v1/channels/room-1/messages", forged, 401},
		{"POST", "/v1/channels/other/messages", userToken, 403},
		{"POST", "/v1/users/alice/messages", userToken, 403},
		{"POST", "/v1/users/alice/messages", apiKey, 202},
		{"GET", "/v1/channels/room-1/connections", userToken, 403},
		{"GET", "/v1/channels/room-1/connections", apiKey, 200},
	}
	for _, c := range checks {
		if got := call(c.method, c.path, c.bearer, map[string]any{"data": "hello"}); got != c.want {
			t.Errorf("%s %s with %q…: %d, want %d", c.method, c.path, prefix(c.bearer), got, c.want)
		}
	}
	// The user's message carries an unforgeable from.
	f := w.waitFrame(func(f frame) bool { return f.Type == "message" && f.From == "alice" })
	if f.Channel != "room-1" {
		t.Fatalf("message from alice: %+v", f)
	}
	w.waitFrame(func(f frame) bool { return f.Type == "message" && f.Target == "user" })

	// Let everything be logged, then grep.
	w.ws.Close()
	// The egress logs the close once it has seen it: waited for, where a
	// 300 ms sleep was trusted to cover it, and an egress process slow to
	// run (a loaded machine) failed the test with no such line yet.
	testkit.Eventually(t, 10*time.Second, func() error {
		if !strings.Contains(eg.Logs(), "connection closed") {
			return fmt.Errorf("no connection log line: the grep below would prove nothing")
		}
		return nil
	})
	logs := in.Logs() + eg.Logs()
	for name, s := range map[string]string{"API key": apiKey, "JWT secret": jwtSecret, "Redis password": redisPassword, "user token": userToken, "forged token": forged} {
		if strings.Contains(logs, s) {
			t.Errorf("the %s appears in the logs", name)
		}
		// A token's signature alone would be a leak too.
		if i := strings.LastIndexByte(s, '.'); i > 0 && strings.Contains(logs, s[i+1:]) {
			t.Errorf("the %s's signature appears in the logs", name)
		}
	}
	t.Logf("grepped %d log lines of both functions for 5 secrets: none found", strings.Count(logs, "\n"))
}

func prefix(s string) string {
	if len(s) > 6 {
		return s[:6]
	}
	return s
}
