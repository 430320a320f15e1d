package main

import (
	"encoding/json"
	"strings"
	"testing"
)

func TestIdempotentPublish(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	const body = `{"data":{"n":1}}`
	w1 := e.do("POST", "/v1/channels/i/messages", body, "Idempotency-Key", "order-42")
	w2 := e.do("POST", "/v1/channels/i/messages", body, "Idempotency-Key", "order-42")
	if w1.Code != 202 || w2.Code != 202 {
		t.Fatalf("%d %s / %d %s", w1.Code, w1.Body.String(), w2.Code, w2.Body.String())
	}
	if w1.Header().Get("Idempotent-Replayed") != "" || w2.Header().Get("Idempotent-Replayed") != "true" {
		t.Fatalf("Idempotent-Replayed: %q then %q", w1.Header().Get("Idempotent-Replayed"), w2.Header().Get("Idempotent-Replayed"))
	}
	if decode[published](t, w1) != decode[published](t, w2) {
		t.Fatalf("replay %s differs from %s", w2.Body.String(), w1.Body.String())
	}
	if n := e.xlen("i"); n != 1 {
		t.Fatalf("XLEN = %d, want 1", n)
	}

	// Same key, different body: refused, nothing written.
	expectError(t, e.do("POST", "/v1/channels/i/messages", `{"data":{"n":2}}`, "Idempotency-Key", "order-42"), 422, "idempotency_key_reused")
	// Keys are scoped to the endpoint: the same key on another channel is
	// a different request.
	if w := e.do("POST", "/v1/channels/j/messages", body, "Idempotency-Key", "order-42"); w.Code != 202 || w.Header().Get("Idempotent-Replayed") != "" {
		t.Fatalf("other channel: %d %v", w.Code, w.Header())
	}
	// Without a key every request writes.
	e.do("POST", "/v1/channels/i/messages", body)
	e.do("POST", "/v1/channels/i/messages", body)
	if n := e.xlen("i"); n != 3 {
		t.Fatalf("XLEN = %d, want 3", n)
	}
	// A rejected request does not use up its key.
	expectError(t, e.do("POST", "/v1/channels/i/messages", `{}`, "Idempotency-Key", "fresh"), 400, "missing_data")
	if w := e.do("POST", "/v1/channels/i/messages", body, "Idempotency-Key", "fresh"); w.Code != 202 || w.Header().Get("Idempotent-Replayed") != "" {
		t.Fatalf("key after a rejected request: %d %v", w.Code, w.Header())
	}

	for _, key := range []string{strings.Repeat("k", 256), "tab\there", "ünï"} {
		expectError(t, e.do("POST", "/v1/channels/i/messages", body, "Idempotency-Key", key), 400, "invalid_idempotency_key")
	}
}

func TestIdempotentBatch(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	const body = `{"messages":[{"channel":"p","data":1},{"channel":"q","data":2}]}`
	w1 := e.do("POST", "/v1/messages", body, "Idempotency-Key", "batch-1")
	w2 := e.do("POST", "/v1/messages", body, "Idempotency-Key", "batch-1")
	if w1.Code != 202 || w2.Code != 202 || w2.Header().Get("Idempotent-Replayed") != "true" {
		t.Fatalf("%d / %d %v", w1.Code, w2.Code, w2.Header())
	}
	r1, r2 := decode[batchResp](t, w1), decode[batchResp](t, w2)
	if len(r1.Results) != 2 || r1.Results[0] != r2.Results[0] || r1.Results[1] != r2.Results[1] {
		t.Fatalf("replay %s differs from %s", w2.Body.String(), w1.Body.String())
	}
	if e.xlen("p") != 1 || e.xlen("q") != 1 {
		t.Fatalf("XLEN p %d q %d, want 1 each", e.xlen("p"), e.xlen("q"))
	}
	expectError(t, e.do("POST", "/v1/messages", `{"messages":[{"channel":"p","data":3}]}`, "Idempotency-Key", "batch-1"), 422, "idempotency_key_reused")
}

// A retry while the first attempt is still writing gets 409 with
// Retry-After.
func TestIdempotencyInProgress(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	const body = `{"data":1}`
	if w := e.do("POST", "/v1/channels/i/messages", body, "Idempotency-Key", "slow"); w.Code != 202 {
		t.Fatalf("%d", w.Code)
	}
	// Turn the stored outcome back into "pending", as it is while the first
	// request is between its claim and its append.
	keys, err := e.rdb.Keys(t.Context(), e.keys.Prefix+":{k:*").Result()
	if err != nil || len(keys) != 1 {
		t.Fatalf("idempotency keys %v %v", keys, err)
	}
	var rec map[string]any
	if err := json.Unmarshal([]byte(e.rdb.Get(t.Context(), keys[0]).Val()), &rec); err != nil {
		t.Fatal(err)
	}
	if ttl := e.rdb.PTTL(t.Context(), keys[0]).Val(); ttl <= 0 {
		t.Fatalf("idempotency record has no TTL (%v)", ttl)
	}
	rec["state"] = "pending"
	b, _ := json.Marshal(rec)
	e.rdb.Set(t.Context(), keys[0], b, 0)

	w := e.do("POST", "/v1/channels/i/messages", body, "Idempotency-Key", "slow")
	expectError(t, w, 409, "idempotency_in_progress")
	if w.Header().Get("Retry-After") == "" {
		t.Fatal("409 without Retry-After")
	}
	if n := e.xlen("i"); n != 1 {
		t.Fatalf("XLEN = %d", n)
	}
}

// TestIdempotentRetryAfterLostReply: the first attempt wrote but its
// outcome was lost (here: its idempotency record is gone, as after an
// error reply); the retry with the same key and body returns the first
// ids and writes nothing, because each append carries a once-key checked
// inside the append script. Batches and single publishes alike.
func TestIdempotentRetryAfterLostReply(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	forget := func() {
		t.Helper()
		ctx := t.Context()
		iter := e.rdb.Scan(ctx, 0, e.keys.Prefix+":{k:*", 100).Iterator()
		n := 0
		for iter.Next(ctx) {
			e.rdb.Del(ctx, iter.Val())
			n++
		}
		if n == 0 {
			t.Fatal("no idempotency record to forget")
		}
	}
	const body = `{"data":"once"}`
	w1 := e.do("POST", "/v1/channels/lost/messages", body, "Idempotency-Key", "k1")
	forget()
	w2 := e.do("POST", "/v1/channels/lost/messages", body, "Idempotency-Key", "k1")
	if w1.Code != 202 || w2.Code != 202 || decode[published](t, w1) != decode[published](t, w2) {
		t.Fatalf("retry: %d %s then %d %s", w1.Code, w1.Body, w2.Code, w2.Body)
	}
	if n := e.xlen("lost"); n != 1 {
		t.Fatalf("XLEN = %d after the retry, want 1", n)
	}

	const batch = `{"messages":[{"channel":"lb1","data":1},{"channel":"lb2","data":2},{"channel":"lb1","data":3}]}`
	b1 := e.do("POST", "/v1/messages", batch, "Idempotency-Key", "k2")
	forget()
	b2 := e.do("POST", "/v1/messages", batch, "Idempotency-Key", "k2")
	if b1.Code != 202 || b2.Code != 202 || b1.Body.String() != b2.Body.String() {
		t.Fatalf("batch retry: %d %s then %d %s", b1.Code, b1.Body, b2.Code, b2.Body)
	}
	if e.xlen("lb1") != 2 || e.xlen("lb2") != 1 {
		t.Fatalf("batch retry wrote again: lb1 %d, lb2 %d", e.xlen("lb1"), e.xlen("lb2"))
	}

	// The same key with another body is another request (once-keys cover
	// the body): it writes.
	forget()
	if w := e.do("POST", "/v1/channels/lost/messages", `{"data":"other"}`, "Idempotency-Key", "k1"); w.Code != 202 {
		t.Fatalf("other body: %d %s", w.Code, w.Body)
	}
	if n := e.xlen("lost"); n != 2 {
		t.Fatalf("XLEN = %d, want 2", n)
	}
}
