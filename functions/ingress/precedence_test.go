package main

import "testing"

// TestErrorPrecedence holds the order docs/api.md gives for a request
// with several faults: each case has two, and must get the earlier one's
// error.
func TestErrorPrecedence(t *testing.T) {
	e, _ := newSecEnv(t, map[string]string{
		"API_KEYS":              testKeys,
		"PUBLISH_RATE_PER_KEY":  "0.001",
		"PUBLISH_BURST_PER_KEY": "1",
	})
	// Spend fullKey's one-message budget, so that its next publish is over
	// the limit.
	expectStatus(t, e.do("POST", "/v1/channels/spent/messages", `{"data":1}`, bearer(fullKey)...), 202)
	badKey := bearer("no-such-key-0123456789")
	for _, tc := range []struct {
		name, method, path, body string
		hdr                      []string
		status                   int
		code                     string
	}{
		{"origin before channel name", "POST", "/v1/channels/-bad/messages", `{"data":1}`,
			append(badKey, "Origin", "http://elsewhere.example"), 403, "origin_not_allowed"},
		{"origin before no such endpoint", "GET", "/v1/nope", "", []string{"Origin", "http://elsewhere.example"}, 403, "origin_not_allowed"},
		{"channel name before credential", "POST", "/v1/channels/-bad/messages", `{"data":1}`, badKey, 400, "invalid_channel"},
		{"credential before body", "POST", "/v1/channels/a/messages", `{`, badKey, 401, "unauthorized"},
		{"permission before body", "POST", "/v1/channels/a/messages", `{`, bearer(chatKey), 403, "forbidden"},
		{"credential before user id", "POST", "/v1/users/bad!/messages", `{"data":1}`, badKey, 401, "unauthorized"},
		{"permission before user id", "POST", "/v1/users/bad!/messages", `{"data":1}`, bearer(chatKey), 403, "forbidden"},
		{"user id before body", "POST", "/v1/users/bad!/messages", `{`, bearer(adminKey), 400, "invalid_user"},
		{"credential before user id (list)", "GET", "/v1/users/bad!/connections?limit=x", "", badKey, 401, "unauthorized"},
		{"permission before user id (disconnect)", "DELETE", "/v1/users/bad!/connections", "", bearer(chatKey), 403, "forbidden"},
		{"user id before query", "GET", "/v1/users/bad!/connections?limit=x", "", bearer(adminKey), 400, "invalid_user"},
		{"credential before batch body", "POST", "/v1/messages", `{`, badKey, 401, "unauthorized"},
		{"batch items in order, permission with fields", "POST", "/v1/messages",
			`{"messages":[{"channel":"a","data":1},{"channel":"chat:x"}]}`, bearer(chatKey), 403, "forbidden"},
		{"batch item fields in order", "POST", "/v1/messages",
			`{"messages":[{"channel":"chat:x"},{"channel":"a","data":1}]}`, bearer(chatKey), 400, "missing_data"},
		{"batch item fields before its permission", "POST", "/v1/messages",
			`{"messages":[{"channel":"secret"}]}`, bearer(chatKey), 400, "missing_data"},
		{"body before rate limit", "POST", "/v1/channels/a/messages", `{"data":null}`, bearer(fullKey), 400, "missing_data"},
		{"rate limit before Idempotency-Key", "POST", "/v1/channels/a/messages", `{"data":1}`,
			append(bearer(fullKey), "Idempotency-Key", "\x01"), 429, "rate_limited"},
		{"Idempotency-Key before the connection lookup", "POST", "/v1/connections/no-such-conn/messages", `{"data":1}`,
			append(bearer(adminKey), "Idempotency-Key", "\x01"), 400, "invalid_idempotency_key"},
		{"query after permission", "GET", "/v1/channels/a/messages?limit=x", "", bearer(chatKey), 403, "forbidden"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			expectError(t, e.do(tc.method, tc.path, tc.body, tc.hdr...), tc.status, tc.code)
		})
	}
}
