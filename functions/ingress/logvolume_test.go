package main

import (
	"strings"
	"testing"
	"time"

	"github.com/wsrelay/wsrelay/shared/auth"
)

// TestClientErrorsLogNothing: the 4xx a hostile client can repeat at will
// (bad credentials, forbidden channels, malformed or oversized bodies,
// bad parameters, unknown routes) write no log line at all: the metrics
// count them, and a line each would let any client fill the log (SCF's
// log service bills per line). Nor is a 5xx any of them.
func TestClientErrorsLogNothing(t *testing.T) {
	t.Parallel()
	e, logs := newSecEnv(t, map[string]string{"API_KEYS": testKeys, "JWT_SECRET": testSecret, "MAX_MESSAGE_BYTES": "1024", "METRICS_TOKEN": "scrape-token-0123456789"})
	user := userToken(t, auth.Claims{Subject: "u1", Publish: []string{"room.*"}})
	forged, _ := auth.SignHS256("another-secret-0123456789abcdef0123456789", auth.Claims{Subject: "u1", Expires: time.Now().Add(time.Hour)})
	for range 20 {
		for _, r := range []struct {
			method, path, body string
			hdr                []string
		}{
			{"POST", "/v1/channels/room.1/messages", `{"data":1}`, bearer(forged)},
			{"POST", "/v1/channels/room.1/messages", `{"data":1}`, bearer("no-such-key")},
			{"POST", "/v1/channels/other/messages", `{"data":1}`, bearer(user)},
			{"POST", "/v1/channels/room.1/messages", `{"data":`, bearer(fullKey)},
			{"POST", "/v1/channels/room.1/messages", `{"data":1,"x":"` + strings.Repeat("a\n", 100) + `"}`, bearer(fullKey)},
			{"POST", "/v1/channels/room.1/messages", `{"data":"` + strings.Repeat("x", 2000) + `"}`, bearer(fullKey)},
			{"POST", "/v1/channels/b%20d/messages", `{"data":1}`, bearer(fullKey)},
			{"POST", "/v1/messages", `{"messages":[{"channel":"room.1"},{}]}`, bearer(fullKey)},
			{"POST", "/v1/channels/room.1/messages", `{"data":1}`, append(bearer(fullKey), "Idempotency-Key", strings.Repeat("k", 300))},
			{"GET", "/v1/channels/room.1/messages?after=nonsense", "", bearer(fullKey)},
			{"GET", "/v1/connections/c1", "", bearer(chatKey)},
			{"DELETE", "/v1/users/u1/connections", "", bearer(chatKey)},
			{"GET", "/v1/users/b%20d/connections", "", bearer(fullKey)},
			{"PUT", "/v1/channels/room.1/messages", `{}`, bearer(fullKey)},
			{"GET", "/v1/nothing/here", "", nil},
			{"GET", "/metrics", "", bearer("wrong")},
		} {
			if w := e.do(r.method, r.path, r.body, r.hdr...); w.Code < 400 || w.Code >= 500 {
				t.Fatalf("%s %s: %d %s, want a 4xx", r.method, r.path, w.Code, w.Body)
			}
		}
	}
	if out := logs.String(); out != "" {
		t.Fatalf("320 refused requests wrote:\n%s", out)
	}
}
