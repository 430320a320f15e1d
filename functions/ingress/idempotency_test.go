package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redisconn"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/registry"
	"github.com/wsrelay/wsrelay/shared/testkit"
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

	for _, key := range []string{"", strings.Repeat("k", 256), "tab\there", "ünï"} {
		expectError(t, e.do("POST", "/v1/channels/i/messages", body, "Idempotency-Key", key), 400, "invalid_idempotency_key")
	}
	// Sent twice, even with the same value: refused, and the message says
	// why (not that the key is malformed).
	req := httptest.NewRequest("POST", "/v1/channels/i/messages", strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	req.Header["Idempotency-Key"] = []string{"twice", "twice"}
	w := httptest.NewRecorder()
	e.srv.ServeHTTP(w, req)
	expectError(t, w, 400, "invalid_idempotency_key")
	if !strings.Contains(w.Body.String(), "once") {
		t.Errorf("a repeated Idempotency-Key: %s", w.Body.String())
	}
	if n := e.xlen("i"); n != 4 {
		t.Fatalf("XLEN = %d, want 4: a refused request wrote", n)
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

// TestIdempotencyKeyFreedBeforeRead: a retry whose claim finds the key
// taken, and then nothing there when it reads the key (the request that
// held it failed and freed it in between), claims it again and runs,
// instead of answering 409 to a key no request holds. Each read of the
// key here finds it just freed, so the retry gives up with 409 after
// claimAttempts claims.
func TestIdempotencyKeyFreedBeforeRead(t *testing.T) {
	t.Parallel()
	for _, frees := range []int{1, claimAttempts} {
		t.Run(fmt.Sprintf("freed %d times", frees), func(t *testing.T) {
			t.Parallel()
			rdb, prefix := redistest.Client(t)
			ks := keys.Scheme{Prefix: prefix}
			var left atomic.Int64
			rdb.AddHook(freeBeforeRead{left: &left, claim: `{"state":"pending","body":"x"}`})
			e := &testEnv{t: t, srv: testServer(t, testConfig(t), slog.New(slog.NewTextHandler(io.Discard, nil)), rdb, ks), rdb: rdb, keys: ks}
			t.Cleanup(e.srv.Close)

			left.Store(int64(frees))
			w := e.do("POST", "/v1/channels/freed/messages", `{"data":1}`, "Idempotency-Key", "k")
			if left.Load() != 0 {
				t.Fatalf("%d frees left: the claim did not find the key taken", left.Load())
			}
			if frees == claimAttempts {
				expectError(t, w, 409, "idempotency_in_progress")
				if n := e.xlen("freed"); n != 0 {
					t.Fatalf("XLEN = %d, want 0", n)
				}
				return
			}
			if w.Code != 202 {
				t.Fatalf("publish to a key freed before its read: %d %s, want 202", w.Code, w.Body)
			}
			if n := e.xlen("freed"); n != 1 {
				t.Fatalf("XLEN = %d, want 1", n)
			}
			w2 := e.do("POST", "/v1/channels/freed/messages", `{"data":1}`, "Idempotency-Key", "k")
			if w2.Code != 202 || w2.Header().Get("Idempotent-Replayed") != "true" {
				t.Fatalf("retry: %d %s %v, want the replay", w2.Code, w2.Body, w2.Header())
			}
		})
	}
}

// freeBeforeRead is a go-redis hook that, while left is positive, puts
// claim at an Idempotency-Key before each SET NX of it, so that the claim
// finds the key taken, and deletes it before the GET that follows, as a
// request that held the key and then failed would; each GET counts
// left down.
type freeBeforeRead struct {
	left  *atomic.Int64
	claim string
}

func (f freeBeforeRead) DialHook(next redis.DialHook) redis.DialHook { return next }

func (f freeBeforeRead) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		args := cmd.Args()
		if f.left.Load() > 0 && len(args) > 1 {
			key, _ := args[1].(string)
			if strings.Contains(key, ":{k:") {
				switch cmd.Name() {
				case "set":
					_ = next(ctx, redis.NewStatusCmd(ctx, "set", key, f.claim, "px", 60000))
				case "get":
					_ = next(ctx, redis.NewIntCmd(ctx, "del", key))
					f.left.Add(-1)
				}
			}
		}
		return next(ctx, cmd)
	}
}

func (f freeBeforeRead) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
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

// TestIdempotentUserSendRetry: a send to a user writes one append per
// egress instance, in the order the registry returns the user's
// connections, which refreshes change. A retry after a lost reply must
// still write nothing twice: once-keys are numbered per stream, not by
// position in the request.
func TestIdempotentUserSendRetry(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.register("ca", "bob", "inst-a")
	time.Sleep(5 * time.Millisecond)
	e.register("cb", "bob", "inst-b")
	const body = `{"data":"x"}`
	if w := e.do("POST", "/v1/users/bob/messages", body, "Idempotency-Key", "u-1"); w.Code != 202 {
		t.Fatalf("%d %s", w.Code, w.Body)
	}
	// The reply was lost (the record is gone, as after an error reply),
	// and meanwhile a refresh moved ca behind cb in the user's set.
	ks, err := e.rdb.Keys(t.Context(), e.keys.Prefix+":{k:*").Result()
	if err != nil || len(ks) != 1 {
		t.Fatalf("idempotency keys %v %v", ks, err)
	}
	e.rdb.Del(t.Context(), ks...)
	time.Sleep(5 * time.Millisecond)
	e.register("ca", "bob", "inst-a")
	if w := e.do("POST", "/v1/users/bob/messages", body, "Idempotency-Key", "u-1"); w.Code != 202 {
		t.Fatalf("retry: %d %s", w.Code, w.Body)
	}
	if a, b := len(e.inbox("inst-a")), len(e.inbox("inst-b")); a != 1 || b != 1 {
		t.Fatalf("the retry wrote again: inst-a %d entries, inst-b %d, want 1 each", a, b)
	}
}

// TestIdempotentSendAfterClose: a retry of an accepted send to a
// connection gets the first reply even once the connection has gone.
func TestIdempotentSendAfterClose(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.register("conn-9", "alice", "inst-a")
	const body = `{"data":1}`
	w1 := e.do("POST", "/v1/connections/conn-9/messages", body, "Idempotency-Key", "dm-1")
	if w1.Code != 202 {
		t.Fatalf("%d %s", w1.Code, w1.Body)
	}
	if err := e.srv.reg.Remove(t.Context(), &registry.Record{ID: "conn-9", User: "alice", Instance: "inst-a"}); err != nil {
		t.Fatal(err)
	}
	w2 := e.do("POST", "/v1/connections/conn-9/messages", body, "Idempotency-Key", "dm-1")
	if w2.Code != 202 || w2.Header().Get("Idempotent-Replayed") != "true" || w2.Body.String() != w1.Body.String() {
		t.Fatalf("retry: %d %s %v, want the replay of %s", w2.Code, w2.Body, w2.Header(), w1.Body)
	}
	// A new key finds no connection.
	expectError(t, e.do("POST", "/v1/connections/conn-9/messages", body, "Idempotency-Key", "dm-2"), 404, "connection_not_found")
}

// TestIdempotencyClaimLeftBehind: when Redis goes away mid-request, the
// 503 cannot free the key (freeing it fails too). While Redis stays away
// the claim left behind answers 409, and it expires soon after any request
// could have ended, not after the whole IDEMPOTENCY_WINDOW. Once Redis
// answers again, the ingress frees it at once (claims.go): the retry runs
// and writes once.
func TestIdempotencyClaimLeftBehind(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	// Appends and the claim's release fail while on, as a Redis that goes
	// away right after the request's idempotency claim.
	var on atomic.Bool
	rdb.AddHook(redistest.Fail{
		Cmd: func(cmd redis.Cmder) bool {
			return on.Load() && (cmd.Name() == "del" || cmd.Name() == "evalsha" || cmd.Name() == "eval")
		},
		Pipeline: func(cmds []redis.Cmder) bool {
			return on.Load() && (cmds[0].Name() == "evalsha" || cmds[0].Name() == "eval")
		},
	})
	ks := keys.Scheme{Prefix: prefix}
	cfg := testConfig(t)
	// A claim that lives 35.5 s: longer than the test waits for its release.
	cfg.Redis.Timeout = 3 * time.Second
	e := &testEnv{t: t, srv: testServer(t, cfg, slog.New(slog.NewTextHandler(io.Discard, nil)), rdb, ks), rdb: rdb, keys: ks}
	t.Cleanup(e.srv.Close)

	on.Store(true)
	expectError(t, e.do("POST", "/v1/channels/p/messages", `{"data":1}`, "Idempotency-Key", "k"), 503, "unavailable")
	claims, err := rdb.Keys(t.Context(), prefix+":{k:*").Result()
	if err != nil || len(claims) != 1 {
		t.Fatalf("claims left %v %v, want the one", claims, err)
	}
	ttl := rdb.PTTL(t.Context(), claims[0]).Val()
	if ttl <= 0 || ttl > e.srv.pendingTTL() || ttl > time.Minute {
		t.Fatalf("claim expires in %v, want within %v", ttl, e.srv.pendingTTL())
	}
	expectError(t, e.do("POST", "/v1/channels/p/messages", `{"data":1}`, "Idempotency-Key", "k"), 409, "idempotency_in_progress")

	on.Store(false)
	deadline := time.Now().Add(15 * time.Second)
	for rdb.Exists(t.Context(), claims[0]).Val() == 1 {
		if time.Now().After(deadline) {
			t.Fatalf("claim still there 15 s after Redis came back (expires in %v)", rdb.PTTL(t.Context(), claims[0]).Val())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if w := e.do("POST", "/v1/channels/p/messages", `{"data":1}`, "Idempotency-Key", "k"); w.Code != 202 {
		t.Fatalf("retry after the claim was freed: %d %s", w.Code, w.Body)
	}
	if n := e.xlen("p"); n != 1 {
		t.Fatalf("XLEN = %d, want 1", n)
	}
	// Nothing left to free: the background goroutine has ended.
	for {
		e.srv.claims.mu.Lock()
		running := e.srv.claims.running
		e.srv.claims.mu.Unlock()
		if !running {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("releaser still running with nothing to free")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestReleaserFreesOnlyItsOwnClaim: a claim is freed only while it holds
// the value its request set, not once another request has claimed the key.
func TestReleaserFreesOnlyItsOwnClaim(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	r := newReleaser(rdb, time.Second, slog.New(slog.NewTextHandler(io.Discard, nil)))
	t.Cleanup(r.Close)
	key := prefix + ":claim"
	rdb.Set(t.Context(), key, "theirs", time.Minute)
	r.release(t.Context(), key, "mine", time.Now().Add(time.Minute))
	if v := rdb.Get(t.Context(), key).Val(); v != "theirs" {
		t.Fatalf("key = %q after releasing another's claim, want it kept", v)
	}
	rdb.Set(t.Context(), key, "mine", time.Minute)
	r.release(t.Context(), key, "mine", time.Now().Add(time.Minute))
	if n := rdb.Exists(t.Context(), key).Val(); n != 0 {
		t.Fatal("own claim not freed")
	}
}

// TestCanceledClaimsNotLogged: a client that hangs up before its
// Idempotency-Key is claimed (the claim's SET fails with its canceled
// context) leaves its key to the releaser, in case Redis set it; finding
// nothing to free is not a key freed. Each such request wrote an info
// line saying keys were freed "while Redis could not be reached": a
// client hanging up in a loop wrote one per request, with Redis fine.
// A claim really left behind is still logged, and counted.
func TestCanceledClaimsNotLogged(t *testing.T) {
	t.Parallel()
	e, logs := newSecEnv(t, map[string]string{"ALLOW_ANONYMOUS": "true"})
	t.Cleanup(e.srv.Close)
	rdb, ks := e.rdb, e.keys
	waitIdle := func() {
		t.Helper()
		testkit.Eventually(t, 5*time.Second, func() error {
			e.srv.claims.mu.Lock()
			defer e.srv.claims.mu.Unlock()
			if e.srv.claims.running {
				return fmt.Errorf("releaser still running")
			}
			return nil
		})
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel() // the client has gone: net/http canceled the request
	for i := range 20 {
		req := httptest.NewRequestWithContext(ctx, "POST", "/v1/channels/gone/messages", strings.NewReader(`{"data":1}`))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Idempotency-Key", fmt.Sprint("gone-", i))
		e.srv.ServeHTTP(httptest.NewRecorder(), req)
		waitIdle()
	}
	if n := strings.Count(logs.String(), "\n"); n != 0 {
		t.Fatalf("20 requests whose clients hung up wrote %d lines:\n%s", n, logs.String())
	}
	key := ks.Idempotency("left-behind")
	rdb.Set(t.Context(), key, "mine", time.Minute)
	e.srv.claims.later(key, "mine", time.Now().Add(time.Minute))
	e.srv.claims.later(ks.Idempotency("never-set"), "mine", time.Now().Add(time.Minute))
	waitIdle()
	recs := logs.JSONLines(t)
	if len(recs) != 1 || recs[0]["msg"] != "idempotency keys freed" || recs[0]["keys"] != float64(1) {
		t.Fatalf("a claim left behind and one never set: %v, want one line counting 1 key", recs)
	}
}

// TestIdempotencyRace: requests with one Idempotency-Key racing each
// other, most with the same body, some with another. One body wins and is
// written once; every 202 is its reply (the first, or the replay); the
// others with its body get 409 (with Retry-After) while it runs, the ones
// with another body 422, and nothing else is written.
func TestIdempotencyRace(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	for round := range 20 {
		key := fmt.Sprintf("race-%d", round)
		path, bodies := "/v1/channels/race/messages", []string{fmt.Sprintf(`{"data":"a%d"}`, round), fmt.Sprintf(`{"data":"b%d"}`, round)}
		if round%2 == 1 {
			path = "/v1/messages"
			bodies = []string{
				fmt.Sprintf(`{"messages":[{"channel":"race","data":"a%d"},{"channel":"race2","data":"a%d"},{"channel":"race","data":"a%d+"}]}`, round, round, round),
				fmt.Sprintf(`{"messages":[{"channel":"race","data":"b%d"}]}`, round),
			}
		}
		const n = 10
		ws := make([]*httptest.ResponseRecorder, n)
		var wg sync.WaitGroup
		for i := range n {
			wg.Go(func() { ws[i] = e.do("POST", path, bodies[min(i/8, 1)], "Idempotency-Key", key) })
		}
		wg.Wait()
		var first string
		winner := -1
		for i, w := range ws {
			b := min(i/8, 1)
			switch w.Code {
			case 202:
				if first == "" {
					first = w.Body.String()
				}
				if w.Body.String() != first || winner >= 0 && winner != b {
					t.Fatalf("round %d: 202s %s and %s", round, first, w.Body.String())
				}
				winner = b
			case 409:
				if w.Header().Get("Retry-After") == "" {
					t.Fatalf("409 without Retry-After")
				}
			case 422:
			default:
				t.Fatalf("round %d: %d %s", round, w.Code, w.Body.String())
			}
		}
		for i, w := range ws {
			if w.Code == 422 && min(i/8, 1) == winner {
				t.Fatalf("round %d: the winning body was refused as another", round)
			}
		}
		if winner < 0 {
			t.Logf("round %d: no request got 202 (all 409 behind the first)", round)
		}
	}
	held := map[string]int{}
	for _, ch := range []string{"race", "race2"} {
		w := e.do("GET", "/v1/channels/"+ch+"/messages?after=0&limit=1000", "")
		var page struct{ Messages []struct{ Data string } }
		if err := json.Unmarshal(w.Body.Bytes(), &page); err != nil {
			t.Fatal(err)
		}
		for _, m := range page.Messages {
			held[ch+"/"+m.Data]++
		}
	}
	for d, c := range held {
		if c != 1 {
			t.Errorf("%s written %d times", d, c)
		}
	}
	if len(held) < 20 {
		t.Errorf("%d messages written, want one request's of each round: %v", len(held), held)
	}
}

// TestIdempotencyClaimReplyLost: a claim Redis set but whose reply was
// lost is freed with the 503, so that the retry runs (and writes once)
// instead of getting 409 until the claim expires.
func TestIdempotencyClaimReplyLost(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	var on atomic.Bool
	// The claim's (SET NX) reply is lost while on, after Redis ran it.
	rdb.AddHook(redistest.Fail{Sent: true, Cmd: func(cmd redis.Cmder) bool {
		return on.Load() && cmd.Name() == "set" && cmd.Args()[len(cmd.Args())-1] == "nx"
	}})
	ks := keys.Scheme{Prefix: prefix}
	e := &testEnv{t: t, srv: testServer(t, testConfig(t), slog.New(slog.NewTextHandler(io.Discard, nil)), rdb, ks), rdb: rdb, keys: ks}
	t.Cleanup(e.srv.Close)

	on.Store(true)
	expectError(t, e.do("POST", "/v1/channels/p/messages", `{"data":1}`, "Idempotency-Key", "k"), 503, "unavailable")
	on.Store(false)
	waitClaimsFreed(t, rdb, prefix)
	if w := e.do("POST", "/v1/channels/p/messages", `{"data":1}`, "Idempotency-Key", "k"); w.Code != 202 {
		t.Fatalf("retry: %d %s", w.Code, w.Body)
	}
	if n := e.xlen("p"); n != 1 {
		t.Fatalf("XLEN = %d, want 1", n)
	}
}

// resentClaimThenFail is a Redis, while on, whose idempotency claim (SET
// NX) runs but answers "taken", as a resend of a claim whose reply was
// lost does, and whose next GET (the request reading the record it
// found) fails without running.
type resentClaimThenFail struct{ on, resent *atomic.Bool }

func (h resentClaimThenFail) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h resentClaimThenFail) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if h.on.Load() && h.resent.Load() && cmd.Name() == "get" {
			h.on.Store(false)
			cmd.SetErr(redistest.ErrFailed)
			return redistest.ErrFailed
		}
		err := next(ctx, cmd)
		if b, ok := cmd.(*redis.BoolCmd); ok && err == nil && h.on.Load() && cmd.Name() == "set" && cmd.Args()[len(cmd.Args())-1] == "nx" {
			b.SetVal(false)
			h.resent.Store(true)
		}
		return err
	}
}

func (h resentClaimThenFail) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

// TestIdempotencyResentClaimUnread: a resent claim found its own first
// sending, and the read of what it found failed: the request answers 503
// and frees its claim, as when the claim's own reply is lost, so that the
// retry runs at once instead of getting 409 until the claim expires.
func TestIdempotencyResentClaimUnread(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	var on, resent atomic.Bool
	rdb.AddHook(resentClaimThenFail{on: &on, resent: &resent})
	ks := keys.Scheme{Prefix: prefix}
	e := &testEnv{t: t, srv: testServer(t, testConfig(t), slog.New(slog.NewTextHandler(io.Discard, nil)), rdb, ks), rdb: rdb, keys: ks}
	t.Cleanup(e.srv.Close)

	on.Store(true)
	expectError(t, e.do("POST", "/v1/channels/u/messages", `{"data":1}`, "Idempotency-Key", "k"), 503, "unavailable")
	if !resent.Load() || on.Load() {
		t.Fatal("the claim was not resent, or the read after it did not fail")
	}
	waitClaimsFreed(t, rdb, prefix)
	if w := e.do("POST", "/v1/channels/u/messages", `{"data":1}`, "Idempotency-Key", "k"); w.Code != 202 {
		t.Fatalf("retry: %d %s", w.Code, w.Body)
	}
	if n := e.xlen("u"); n != 1 {
		t.Fatalf("XLEN = %d, want 1", n)
	}
}

// waitClaimsFreed waits for every Idempotency-Key claim under prefix to
// be gone: freed from the background, well before a claim's 15.5 s
// expiry.
func waitClaimsFreed(t *testing.T, rdb redis.UniversalClient, prefix string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		claims, err := rdb.Keys(t.Context(), prefix+":{k:*").Result()
		if err == nil && len(claims) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("claims left %v %v, want none", claims, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// isDone reports the value of an Idempotency-Key's result record.
func isDone(v any) bool {
	b, ok := v.([]byte)
	return ok && strings.Contains(string(b), `"state":"done"`)
}

// TestIdempotencyRecordLost: Redis fails between the append and the
// result record. The 202 stands, and the claim is freed, so that a retry
// (its reply was lost too) runs at once, gets the first attempt's id from
// the once-keys and writes nothing, instead of 409 until the claim
// expires.
func TestIdempotencyRecordLost(t *testing.T) {
	t.Parallel()
	e, on := newEnvRecordsFail(t, slog.New(slog.NewTextHandler(io.Discard, nil)))

	on.Store(true)
	w1 := e.do("POST", "/v1/channels/r/messages", `{"data":1}`, "Idempotency-Key", "k")
	on.Store(false)
	if w1.Code != 202 {
		t.Fatalf("first: %d %s", w1.Code, w1.Body)
	}
	w2 := e.do("POST", "/v1/channels/r/messages", `{"data":1}`, "Idempotency-Key", "k")
	if w2.Code != 202 || decode[published](t, w2) != decode[published](t, w1) {
		t.Fatalf("retry: %d %s, want 202 %s", w2.Code, w2.Body, w1.Body)
	}
	if n := e.xlen("r"); n != 1 {
		t.Fatalf("XLEN = %d, want 1", n)
	}
}

// TestIdempotencyRecordNotSavedLogsOnce: the result records that cannot be
// saved during a Redis outage (each publish written and answered 202, its
// record lost) are logged once for the whole outage, not once per
// publish, and a record saved again ends it with one line counting them.
func TestIdempotencyRecordNotSavedLogsOnce(t *testing.T) {
	t.Parallel()
	logs := &testkit.SyncBuffer{}
	e, on := newEnvRecordsFail(t, slog.New(slog.NewJSONHandler(logs, nil)))
	e.srv.unsaved.Quiet = 100 * time.Millisecond

	on.Store(true)
	const publishes = 40
	for i := range publishes {
		if w := e.do("POST", "/v1/channels/r/messages", `{"data":1}`, "Idempotency-Key", fmt.Sprint("k", i)); w.Code != 202 {
			t.Fatalf("publish %d: %d %s", i, w.Code, w.Body)
		}
	}
	var warns []map[string]any
	for _, l := range logs.JSONLines(t) {
		if l["level"] == "WARN" || l["level"] == "ERROR" {
			warns = append(warns, l)
		}
	}
	if len(warns) != 1 || warns[0]["msg"] != "idempotency record not saved" || warns[0]["err"] == nil {
		t.Fatalf("%d records not saved wrote %d warnings, want one that says the error:\n%s", publishes, len(warns), logs.String())
	}

	on.Store(false)
	if w := e.do("POST", "/v1/channels/r/messages", `{"data":1}`, "Idempotency-Key", "saved"); w.Code != 202 {
		t.Fatalf("publish with Redis back: %d %s", w.Code, w.Body)
	}
	var back []map[string]any
	testkit.Eventually(t, 5*time.Second, func() error {
		back = logs.Lines(t, "idempotency records saved again")
		if len(back) != 1 {
			return fmt.Errorf("recovery logged %d times, want once:\n%s", len(back), logs.String())
		}
		return nil
	})
	if n, _ := back[0]["failures"].(float64); n != publishes {
		t.Errorf("recovery line counts %v records not saved, want %d: %v", back[0]["failures"], publishes, back[0])
	}
}

// TestCorruptIdempotencyRecord: a record that is not one (an operator's
// write, another application under the prefix) answers 500 internal,
// which no retry mends, with an error line naming the key, as api.md
// says of every 500 ("the log has the detail").
func TestCorruptIdempotencyRecord(t *testing.T) {
	t.Parallel()
	e, logs := newSecEnv(t, map[string]string{"ALLOW_ANONYMOUS": "true"})
	t.Cleanup(e.srv.Close)
	rdb, ks := e.rdb, e.keys
	expectStatus(t, e.do("POST", "/v1/channels/c/messages", `{"data":1}`, "Idempotency-Key", "k1"), 202)
	recs, err := rdb.Keys(t.Context(), ks.Prefix+":{k:*").Result()
	if err != nil || len(recs) != 1 {
		t.Fatalf("idempotency records %v (%v), want one", recs, err)
	}
	if err := rdb.Set(t.Context(), recs[0], "not a record", time.Minute).Err(); err != nil {
		t.Fatal(err)
	}
	expectError(t, e.do("POST", "/v1/channels/c/messages", `{"data":1}`, "Idempotency-Key", "k1"), 500, "internal")
	lines := logs.JSONLines(t)
	if len(lines) != 1 || lines[0]["msg"] != "corrupt idempotency record" || lines[0]["key"] != recs[0] || lines[0]["level"] != "ERROR" {
		t.Fatalf("log %v, want one error line naming %s", lines, recs[0])
	}
}

// TestIdempotencyClaimResent: the connection breaks after Redis has set a
// request's claim but before its reply (or its reply comes after
// REDIS_TIMEOUT), and the claim is sent again on a new connection, where
// it finds the key taken (by itself).
// The request goes on with its claim: it writes once and answers 202, and
// its retry gets the replay; not 409 for a request that is not running,
// and again to every retry until the claim expires.
func TestIdempotencyClaimResent(t *testing.T) {
	t.Parallel()
	for _, late := range []bool{false, true} {
		t.Run(fmt.Sprintf("late=%v", late), func(t *testing.T) {
			t.Parallel()
			rs := redistest.Start(t)
			p := testkit.NewReplyDropper(t, rs.Addr())
			e := newEnvWith(t, redisconn.Config{URL: "redis://" + p.Addr + "/0", Timeout: 300 * time.Millisecond}, nil, nil)
			t.Cleanup(e.srv.Close)

			const body = `{"data":"resent"}`
			if late {
				// Its reply after REDIS_TIMEOUT: the Redis client does not
				// send it again (an append would run twice); the ingress
				// does (resendable).
				p.ArmHold(`"state":"pending"`, time.Second)
			} else {
				p.Arm(`"state":"pending"`) // the claim
			}
			w1 := e.do("POST", "/v1/channels/resent/messages", body, "Idempotency-Key", "k")
			if p.Dropped() != 1 {
				t.Fatal("the claim's reply was not dropped")
			}
			if w1.Code != 202 {
				t.Fatalf("publish whose claim was resent: %d %s, want 202", w1.Code, w1.Body)
			}
			w2 := e.do("POST", "/v1/channels/resent/messages", body, "Idempotency-Key", "k")
			if w2.Code != 202 || w2.Header().Get("Idempotent-Replayed") != "true" || decode[published](t, w2) != decode[published](t, w1) {
				t.Fatalf("retry: %d %s %v, want the replay of %s", w2.Code, w2.Body, w2.Header(), w1.Body)
			}
			if n := e.xlen("resent"); n != 1 {
				t.Fatalf("XLEN = %d, want 1", n)
			}
		})
	}
}

// newEnvRecordsFail is a server, logging to log, whose writes of an
// Idempotency-Key's result record ("done") fail without running while
// the returned switch is on.
func newEnvRecordsFail(t *testing.T, log *slog.Logger) (*testEnv, *atomic.Bool) {
	t.Helper()
	rdb, prefix := redistest.Client(t)
	on := new(atomic.Bool)
	rdb.AddHook(redistest.Fail{Cmd: func(cmd redis.Cmder) bool {
		return on.Load() && slices.ContainsFunc(cmd.Args(), isDone)
	}})
	ks := keys.Scheme{Prefix: prefix}
	e := &testEnv{t: t, srv: testServer(t, testConfig(t), log, rdb, ks), rdb: rdb, keys: ks}
	t.Cleanup(e.srv.Close)
	return e, on
}

// TestIdempotencyClaimOutlived: a request still running when its claim
// expires (pendingTTL) keeps its 202 but does not store its reply over
// the claim or reply of a request that took the key meanwhile; with no
// such request, it stores it as usual.
func TestIdempotencyClaimOutlived(t *testing.T) {
	t.Parallel()
	for _, taken := range []bool{true, false} {
		t.Run(fmt.Sprintf("taken=%v", taken), func(t *testing.T) {
			t.Parallel()
			e, logs := newSecEnv(t, map[string]string{"ALLOW_ANONYMOUS": "true"})
			t.Cleanup(e.srv.Close)
			// A's reply from Redis is held once its append has run.
			hold := redistest.NewHold(func(cmds []redis.Cmder) bool {
				for _, c := range cmds {
					for _, a := range c.Args() {
						if s, ok := a.(*string); ok && strings.Contains(*s, `"A"`) {
							return true
						}
					}
				}
				return false
			})
			e.rdb.AddHook(hold)
			t.Cleanup(hold.Release)
			doneA := make(chan *httptest.ResponseRecorder, 1)
			go func() { doneA <- e.do("POST", "/v1/channels/room/messages", `{"data":"A"}`, "Idempotency-Key", "k1") }()
			select {
			case <-hold.Hit():
			case <-time.After(10 * time.Second):
				t.Fatal("A's append never reached Redis")
			}
			// A's claim expires while A runs.
			claims, err := e.rdb.Keys(t.Context(), e.keys.Prefix+":{k:*").Result()
			if err != nil || len(claims) != 1 {
				t.Fatalf("claim keys %v, %v: want A's one", claims, err)
			}
			e.rdb.Del(t.Context(), claims[0])
			var wB *httptest.ResponseRecorder
			if taken {
				wB = e.do("POST", "/v1/channels/room/messages", `{"data":"B"}`, "Idempotency-Key", "k1")
				expectStatus(t, wB, 202)
			}
			hold.Release()
			wA := <-doneA
			expectStatus(t, wA, 202)

			if !taken {
				w := e.do("POST", "/v1/channels/room/messages", `{"data":"A"}`, "Idempotency-Key", "k1")
				expectStatus(t, w, 202)
				if w.Header().Get("Idempotent-Replayed") != "true" || w.Body.String() != wA.Body.String() {
					t.Fatalf("A's retry: %s (replayed %q), want A's reply %s replayed", w.Body, w.Header().Get("Idempotent-Replayed"), wA.Body)
				}
				if l := logs.Lines(t, "idempotency key claimed again before the reply was saved"); len(l) != 0 {
					t.Errorf("logged a key claimed again with no other request: %v", l)
				}
				return
			}
			// B's key keeps B's reply: B's retry is answered with it, and
			// A's retry, another body under B's key, is 422.
			w := e.do("POST", "/v1/channels/room/messages", `{"data":"B"}`, "Idempotency-Key", "k1")
			expectStatus(t, w, 202)
			if w.Header().Get("Idempotent-Replayed") != "true" || w.Body.String() != wB.Body.String() {
				t.Fatalf("B's retry: %s (replayed %q), want B's reply %s replayed (A's was %s)", w.Body, w.Header().Get("Idempotent-Replayed"), wB.Body, wA.Body)
			}
			expectStatus(t, e.do("POST", "/v1/channels/room/messages", `{"data":"A"}`, "Idempotency-Key", "k1"), 422)
			if n := e.xlen("room"); n != 2 {
				t.Errorf("XLEN = %d, want 2 (A and B, each once)", n)
			}
			l := logs.Lines(t, "idempotency key claimed again before the reply was saved")
			if len(l) != 1 || l[0]["level"] != "WARN" || l[0]["key"] != claims[0] {
				t.Errorf("want one WARN naming the key %s, got %v", claims[0], l)
			}
			// A duration as every other line writes one ("15s"), not
			// slog's JSON default for a time.Duration: a bare count of
			// nanoseconds.
			if len(l) == 1 && l[0]["claim_ttl"] != e.srv.pendingTTL().String() {
				t.Errorf("claim_ttl %v (%T), want %q", l[0]["claim_ttl"], l[0]["claim_ttl"], e.srv.pendingTTL().String())
			}
		})
	}
}

// TestIdempotencyClaimFreedPastRetries: a request's claim left behind by
// a Redis outage is freed once Redis answers again even though the client
// retried during the outage, as the 503's Retry-After: 1 tells it to. The
// retry's claim, which Redis never set, took the first's place among the
// claims to free: the first's was left to answer 409 until it expired.
func TestIdempotencyClaimFreedPastRetries(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	// down: appends and the claim's release fail, as a Redis that goes away
	// right after a request's claim; claims: the claims (SET NX) fail too.
	var down, claims atomic.Bool
	rdb.AddHook(redistest.Fail{
		Cmd: func(cmd redis.Cmder) bool {
			switch cmd.Name() {
			case "del", "evalsha", "eval":
				return down.Load()
			case "set":
				return claims.Load()
			}
			return false
		},
		Pipeline: func(cmds []redis.Cmder) bool {
			return down.Load() && (cmds[0].Name() == "evalsha" || cmds[0].Name() == "eval")
		},
	})
	ks := keys.Scheme{Prefix: prefix}
	cfg := testConfig(t)
	// A claim that lives 35.5 s: longer than the test waits for its release.
	cfg.Redis.Timeout = 3 * time.Second
	e := &testEnv{t: t, srv: testServer(t, cfg, slog.New(slog.NewTextHandler(io.Discard, nil)), rdb, ks), rdb: rdb, keys: ks}
	t.Cleanup(e.srv.Close)

	const body = `{"data":1}`
	down.Store(true)
	expectError(t, e.do("POST", "/v1/channels/p/messages", body, "Idempotency-Key", "k"), 503, "unavailable")
	left, err := rdb.Keys(t.Context(), prefix+":{k:*").Result()
	if err != nil || len(left) != 1 {
		t.Fatalf("claims left %v %v, want the one", left, err)
	}
	// The client retries while Redis is still away: its claim fails.
	claims.Store(true)
	expectError(t, e.do("POST", "/v1/channels/p/messages", body, "Idempotency-Key", "k"), 503, "unavailable")
	claims.Store(false)
	down.Store(false)

	deadline := time.Now().Add(10 * time.Second)
	for rdb.Exists(t.Context(), left[0]).Val() == 1 {
		if time.Now().After(deadline) {
			t.Fatalf("first claim still there 10 s after Redis came back (expires in %v): its retry answered 409", rdb.PTTL(t.Context(), left[0]).Val())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if w := e.do("POST", "/v1/channels/p/messages", body, "Idempotency-Key", "k"); w.Code != 202 {
		t.Fatalf("retry after the claim was freed: %d %s", w.Code, w.Body)
	}
	if n := e.xlen("p"); n != 1 {
		t.Fatalf("XLEN = %d, want 1", n)
	}
}

// TestIdempotencyReplySaveResent: the connection breaks after Redis has
// stored a request's reply but before it answered, and the ingress sends
// the save again on a new connection, where it finds the key holding that
// very reply. That is the request's own save, not another request having
// claimed the key meanwhile, nor a record not saved: nothing is logged,
// and the retry gets the replay.
func TestIdempotencyReplySaveResent(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	relay := testkit.NewReplyDropper(t, rs.Addr())
	logs := &testkit.SyncBuffer{}
	e := newEnvWith(t, redisconn.Config{URL: "redis://" + relay.Addr + "/0", Timeout: time.Second}, slog.New(slog.NewJSONHandler(logs, nil)), nil)
	t.Cleanup(e.srv.Close)
	// The save's script loaded, so that the save dropped is the one that
	// runs (not an EVALSHA answered NOSCRIPT).
	expectStatus(t, e.do("POST", "/v1/channels/other/messages", `{"data":0}`, "Idempotency-Key", "warm"), 202)

	const body = `{"data":"saved"}`
	relay.Arm(`"state":"done"`) // the save
	w1 := e.do("POST", "/v1/channels/saved/messages", body, "Idempotency-Key", "k")
	if relay.Dropped() != 1 {
		t.Fatal("the save's reply was not dropped")
	}
	expectStatus(t, w1, 202)
	if l := logs.Lines(t, "idempotency key claimed again before the reply was saved"); len(l) != 0 {
		t.Errorf("a save resent after its reply was lost logged another request's claim: %v", l)
	}
	if l := logs.Lines(t, "idempotency record not saved"); len(l) != 0 {
		t.Errorf("a save whose reply was lost, and that was saved, logged it was not: %v", l)
	}
	w2 := e.do("POST", "/v1/channels/saved/messages", body, "Idempotency-Key", "k")
	if w2.Code != 202 || w2.Header().Get("Idempotent-Replayed") != "true" || w2.Body.String() != w1.Body.String() {
		t.Fatalf("retry: %d %s %v, want the replay of %s", w2.Code, w2.Body, w2.Header(), w1.Body)
	}
	if n := e.xlen("saved"); n != 1 {
		t.Fatalf("XLEN = %d, want 1", n)
	}
}
