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

// TestUndecodableHistoryLogsOnce: entries no ingress wrote (another
// application under the prefix, another release's format) are left out
// of history pages and logged once while reads keep finding them, not
// once per entry per read: a page of 1000 of them, read again and again,
// would otherwise write a line per entry each time, at any reader's
// pace.
func TestUndecodableHistoryLogsOnce(t *testing.T) {
	t.Parallel()
	e, logs := newSecEnv(t, map[string]string{"ALLOW_ANONYMOUS": "true"})
	if w := e.do("POST", "/v1/channels/h/messages", `{"data":"good"}`); w.Code != 202 {
		t.Fatalf("publish: %d %s", w.Code, w.Body)
	}
	prev := ""
	for range 50 {
		prev = e.xaddRaw("h", prev, `{"type":"message","channel":"h","id":"`, `","ts":1,"data":{"a":1}`)
	}
	for range 20 {
		for _, q := range []string{"?limit=1000", "?after=0&limit=1000"} {
			w := e.do("GET", "/v1/channels/h/messages"+q, "")
			if w.Code != 200 || !strings.Contains(w.Body.String(), `"good"`) || strings.Contains(w.Body.String(), `"a":1`) {
				t.Fatalf("history%s: %d %s", q, w.Code, w.Body)
			}
		}
	}
	recs := logs.JSONLines(t)
	if len(recs) != 1 || recs[0]["level"] != "WARN" || recs[0]["channel"] != "h" || recs[0]["left_out"] != float64(50) {
		t.Fatalf("40 reads of 50 undecodable entries logged %d lines: %v, want one warning saying 50 were left out", len(recs), recs)
	}
}
