package main

import (
	"crypto/sha256"
	"encoding/hex"
	"io"
	"log/slog"
	"math"
	"net/http/httptest"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/auth"
	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redisconn"
	"github.com/wsrelay/wsrelay/shared/redistest"
)

// newSecEnvs is n ingress servers configured by env, as n instances of
// one deployment: each with a Redis client of its own, all on the test
// Redis under one key prefix.
func newSecEnvs(t *testing.T, env map[string]string, n int) []*testEnv {
	t.Helper()
	_, prefix := redistest.Client(t) // deletes the prefix's keys at the end
	var envs []*testEnv
	for range n {
		cfg, err := loadConfig(func(k string) string { return env[k] })
		if err != nil {
			t.Fatalf("config: %v", err)
		}
		cfg.Redis = redisconn.Config{URL: redistest.URL(t), KeyPrefix: prefix, Timeout: time.Second}
		rdb, err := redisconn.New(cfg.Redis)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { rdb.Close() })
		ks := keys.Scheme{Prefix: prefix}
		srv := testServer(t, cfg, slog.New(slog.NewTextHandler(io.Discard, nil)), rdb, ks)
		envs = append(envs, &testEnv{t: t, srv: srv, rdb: rdb, keys: ks})
	}
	return envs
}

// withEnv is env plus more (name, value, …).
func withEnv(env map[string]string, more ...string) map[string]string {
	e := map[string]string{}
	for k, v := range env {
		e[k] = v
	}
	for i := 0; i+1 < len(more); i += 2 {
		e[more[i]] = more[i+1]
	}
	return e
}

// publishAs publishes one message to channel c on e as the caller who:
// "user:<sub>", "key:<API key>" or "ip:<remote address>".
func publishAs(t *testing.T, e *testEnv, who, body string) *httptest.ResponseRecorder {
	t.Helper()
	path := "/v1/channels/c/messages"
	if strings.HasPrefix(body, `{"messages"`) {
		path = "/v1/messages"
	}
	req := httptest.NewRequest("POST", path, strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	kind, v, _ := strings.Cut(who, ":")
	switch kind {
	case "user":
		req.Header.Set("Authorization", "Bearer "+userToken(t, auth.Claims{Subject: v, Publish: []string{"*"}}))
	case "key":
		req.Header.Set("Authorization", "Bearer "+v)
	case "ip":
		req.RemoteAddr = v
	}
	w := httptest.NewRecorder()
	e.srv.ServeHTTP(w, req)
	return w
}

// The three limits, each at 0.2 messages/s with a burst of 4, with the
// caller each applies to and another caller with a budget of its own.
var rateLimitCases = []struct {
	name        string
	env         map[string]string
	who, other  string
	sameCallers []string // other forms of who that share its bucket
}{
	{"per user", map[string]string{"JWT_SECRET": testSecret, "PUBLISH_RATE_PER_USER": "0.2", "PUBLISH_BURST_PER_USER": "4"},
		"user:alice", "user:bob", nil},
	{"per key", map[string]string{"API_KEYS": fullKey + "," + chatKey, "PUBLISH_RATE_PER_KEY": "0.2", "PUBLISH_BURST_PER_KEY": "4"},
		"key:" + fullKey, "key:" + chatKey, nil},
	// An IPv6 client is its /64, on every instance.
	{"per ip", map[string]string{"ALLOW_ANONYMOUS": "true", "PUBLISH_RATE_PER_IP": "0.2", "PUBLISH_BURST_PER_IP": "4"},
		"ip:[2001:db8:1:2::1]:1000", "ip:[2001:db8:1:3::1]:1000", []string{"ip:[2001:db8:1:2::7]:2000", "ip:[2001:db8:1:2:aaaa::9]:3000"}},
}

// With PUBLISH_RATE_SCOPE=global, a burst spread over two instances is
// limited as one bucket; with the default (instance), each instance has
// a bucket of its own and the same requests all pass.
func TestRateLimitScopes(t *testing.T) {
	t.Parallel()
	for _, tc := range rateLimitCases {
		for _, scope := range []string{"", "instance", "global"} {
			t.Run(tc.name+" scope="+scope, func(t *testing.T) {
				t.Parallel()
				env := tc.env
				if scope != "" {
					env = withEnv(env, "PUBLISH_RATE_SCOPE", scope)
				}
				es := newSecEnvs(t, env, 2)
				callers := append([]string{tc.who}, tc.sameCallers...)
				// 8 publishes, alternately on each instance: twice the burst.
				passed := 0
				var refused *httptest.ResponseRecorder
				for i := range 8 {
					w := publishAs(t, es[i%2], callers[i%len(callers)], `{"data":1}`)
					switch w.Code {
					case 202:
						passed++
					case 429:
						expectError(t, w, 429, "rate_limited")
						if refused == nil {
							refused = w
						}
					default:
						t.Fatalf("publish %d: %d %s", i, w.Code, w.Body)
					}
				}
				if scope != "global" {
					if passed != 8 {
						t.Fatalf("%d of 8 passed, want all: each instance has a burst of 4", passed)
					}
					// Nothing about the limits is kept in Redis.
					if ks, err := es[0].rdb.Keys(t.Context(), es[0].keys.Prefix+":{l:*").Result(); err != nil || len(ks) != 0 {
						t.Errorf("rate-limit keys in instance scope: %v %v", ks, err)
					}
					return
				}
				if passed != 4 {
					t.Fatalf("%d of 8 passed over two instances, want the one burst of 4", passed)
				}
				// 0.2/s: the next message is due 5 s after the burst.
				if ra, err := strconv.Atoi(refused.Header().Get("Retry-After")); err != nil || ra < 4 || ra > 5 {
					t.Errorf("Retry-After %q, want 5 (or 4 on a slow run)", refused.Header().Get("Retry-After"))
				}
				if n := es[0].xlen("c"); n != 4 {
					t.Errorf("%d messages written, want 4", n)
				}
				// Another caller has a budget of its own, on both.
				for _, e := range es {
					expectStatus(t, publishAs(t, e, tc.other, `{"data":1}`), 202)
				}
			})
		}
	}
}

// A batch of n takes n from the shared bucket; one larger than the burst
// is refused without Retry-After, before Redis is asked.
func TestGlobalRateLimitBatch(t *testing.T) {
	t.Parallel()
	es := newSecEnvs(t, map[string]string{"API_KEYS": fullKey, "PUBLISH_RATE_PER_KEY": "0.5", "PUBLISH_BURST_PER_KEY": "2", "PUBLISH_RATE_SCOPE": "global"}, 2)
	three := `{"messages":[{"channel":"c","data":1},{"channel":"c","data":2},{"channel":"c","data":3}]}`
	w := publishAs(t, es[0], "key:"+fullKey, three)
	expectError(t, w, 429, "rate_limited")
	if ra := w.Header().Get("Retry-After"); ra != "" || !strings.Contains(w.Body.String(), "smaller batches") {
		t.Errorf("a batch that can never pass: Retry-After %q (want none), body %s", ra, w.Body)
	}
	if n, err := es[0].rdb.Keys(t.Context(), es[0].keys.Prefix+":*").Result(); err != nil || len(n) != 0 {
		t.Errorf("keys after a batch refused at once: %v %v", n, err)
	}
	two := `{"messages":[{"channel":"c","data":1},{"channel":"c","data":2}]}`
	expectStatus(t, publishAs(t, es[0], "key:"+fullKey, two), 202)
	w = publishAs(t, es[1], "key:"+fullKey, `{"data":1}`)
	expectError(t, w, 429, "rate_limited")
	if w.Header().Get("Retry-After") != "2" {
		t.Errorf("Retry-After %q, want 2", w.Header().Get("Retry-After"))
	}
	if n := es[0].xlen("c"); n != 2 {
		t.Errorf("%d messages written, want 2", n)
	}
}

// A fractional rate is kept exactly: at 0.3/s the next message is due in
// 3.33 s, a Retry-After of 4.
func TestGlobalRateLimitFractional(t *testing.T) {
	t.Parallel()
	es := newSecEnvs(t, map[string]string{"JWT_SECRET": testSecret, "PUBLISH_RATE_PER_USER": "0.3", "PUBLISH_BURST_PER_USER": "1", "PUBLISH_RATE_SCOPE": "global"}, 2)
	start := time.Now()
	expectStatus(t, publishAs(t, es[0], "user:u", `{"data":1}`), 202)
	w := publishAs(t, es[1], "user:u", `{"data":1}`)
	took := time.Since(start)
	expectError(t, w, 429, "rate_limited")
	// The wait is 10/3 s less the time between the two publishes' calls
	// to Redis (at most took), rounded up: 4 when they are less than
	// 333 ms apart, as they are on a quiet machine; down to
	// ceil(10/3 s - took) on one that stalled between them.
	want := map[string]bool{}
	for s := int(math.Ceil((10*time.Second/3 - took).Seconds())); s <= 4; s++ {
		want[strconv.Itoa(s)] = true
	}
	if ra := w.Header().Get("Retry-After"); !want[ra] {
		t.Errorf("Retry-After %q, want 4 (the publishes were %v apart)", ra, took.Round(time.Millisecond))
	}
}

// The buckets' keys: under REDIS_KEY_PREFIX, one hash tag each, named by
// the validated user id, the API key's short hash (never the key) and the
// normalised client IP (a hash of it when it is not an address), each
// with a TTL no longer than the bucket takes to refill.
func TestGlobalRateLimitKeys(t *testing.T) {
	t.Parallel()
	env := map[string]string{
		"JWT_SECRET": testSecret, "API_KEYS": fullKey, "CLIENT_IP_HEADER": "X-Forwarded-For", "PUBLISH_RATE_SCOPE": "global",
		"PUBLISH_RATE_PER_USER": "1", "PUBLISH_BURST_PER_USER": "5",
		"PUBLISH_RATE_PER_KEY": "1", "PUBLISH_BURST_PER_KEY": "5",
		"PUBLISH_RATE_PER_IP": "100", "PUBLISH_BURST_PER_IP": "100",
	}
	e := newSecEnvs(t, env, 1)[0]
	send := func(xff string, hdr ...string) {
		t.Helper()
		req := httptest.NewRequest("POST", "/v1/channels/c/messages", strings.NewReader(`{"data":1}`))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("X-Forwarded-For", xff)
		req.Header.Set(hdr[0], hdr[1])
		w := httptest.NewRecorder()
		e.srv.ServeHTTP(w, req)
		expectStatus(t, w, 202)
	}
	send("2001:db8:1:2::1", bearer(userToken(t, auth.Claims{Subject: "alice@example.com", Publish: []string{"*"}}))...)
	send("[::ffff:192.0.2.1]:4000", bearer(fullKey)...)
	send("not an address {x}", bearer(fullKey)...)

	sum := sha256.Sum256([]byte(fullKey))
	bogus := sha256.Sum256([]byte("not an address {x}"))
	p := e.keys.Prefix
	want := map[string]time.Duration{
		p + ":{l:user:alice@example.com}":                     5 * time.Second,
		p + ":{l:key:" + hex.EncodeToString(sum[:6]) + "}":    5 * time.Second,
		p + ":{l:ip:2001:db8:1:2::/64}":                       time.Second,
		p + ":{l:ip:192.0.2.1}":                               time.Second,
		p + ":{l:ip:#" + hex.EncodeToString(bogus[:16]) + "}": time.Second,
	}
	got, err := e.rdb.Keys(t.Context(), p+":*").Result()
	if err != nil {
		t.Fatal(err)
	}
	tagged := regexp.MustCompile(`^` + p + `:\{l:(user|key|ip):[^{}]+\}$`)
	for _, k := range got {
		if strings.HasPrefix(k, p+":{c:") {
			continue // the channel's stream
		}
		if !tagged.MatchString(k) || strings.Contains(k, fullKey) {
			t.Errorf("key %q is not one bucket, hash-tagged, without the API key", k)
		}
		max, ok := want[k]
		if !ok {
			t.Errorf("unexpected key %q", k)
			continue
		}
		delete(want, k)
		if ttl, err := e.rdb.PTTL(t.Context(), k).Result(); err != nil || ttl <= 0 || ttl > max {
			t.Errorf("key %s: TTL %v (%v), want in (0, %v]", k, ttl, err, max)
		}
	}
	for k := range want {
		t.Errorf("no key %s (keys: %v)", k, got)
	}
	// The library's own "rate:" prefix is not put before ours.
	if n, _ := e.rdb.Keys(t.Context(), "rate:"+p+"*").Result(); len(n) != 0 {
		t.Errorf("keys outside REDIS_KEY_PREFIX: %v", n)
	}
}

// A Redis error while a limit is checked refuses the publish (503 with
// Retry-After; 500 for a key of the wrong type, which no retry mends), and
// the publish is not written: the limit is never skipped.
func TestGlobalRateLimitRedisError(t *testing.T) {
	t.Parallel()
	env := map[string]string{"JWT_SECRET": testSecret, "PUBLISH_RATE_SCOPE": "global"}
	t.Run("script fails", func(t *testing.T) {
		t.Parallel()
		e := newSecEnvs(t, env, 1)[0]
		// Redis answers, but the bucket's key holds a hash: the script's
		// GET fails with WRONGTYPE.
		if err := e.rdb.HSet(t.Context(), e.keys.Prefix+":{l:user:u}", "x", 1).Err(); err != nil {
			t.Fatal(err)
		}
		expectError(t, publishAs(t, e, "user:u", `{"data":1}`), 500, "internal")
		if n := e.xlen("c"); n != 0 {
			t.Errorf("%d messages written", n)
		}
		// Other users are not affected.
		expectStatus(t, publishAs(t, e, "user:v", `{"data":1}`), 202)
	})
	t.Run("redis down", func(t *testing.T) {
		t.Parallel()
		rs := redistest.Start(t)
		cfg, err := loadConfig(func(k string) string { return env[k] })
		if err != nil {
			t.Fatal(err)
		}
		cfg.Redis = redisconn.Config{URL: rs.URL(), Timeout: 300 * time.Millisecond}
		rdb, err := redisconn.New(cfg.Redis)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { rdb.Close() })
		e := &testEnv{t: t, srv: testServer(t, cfg, slog.New(slog.NewTextHandler(io.Discard, nil)), rdb, keys.Scheme{Prefix: "p"}), rdb: rdb, keys: keys.Scheme{Prefix: "p"}}
		expectStatus(t, publishAs(t, e, "user:u", `{"data":1}`), 202)
		rs.Stop()
		w := publishAs(t, e, "user:u", `{"data":1}`)
		expectError(t, w, 503, "unavailable")
		if w.Header().Get("Retry-After") == "" {
			t.Error("no Retry-After")
		}
		// A bad Idempotency-Key comes before what Redis answers
		// (docs/api.md, Errors): a 503 would ask for a retry with a key
		// that can never be taken.
		tok := userToken(t, auth.Claims{Subject: "u", Publish: []string{"*"}})
		for _, keys := range [][]string{{"é"}, {"a", "b"}} {
			req := httptest.NewRequest("POST", "/v1/channels/c/messages", strings.NewReader(`{"data":1}`))
			req.Header.Set("Content-Type", "application/json")
			req.Header.Set("Authorization", "Bearer "+tok)
			req.Header["Idempotency-Key"] = keys
			w := httptest.NewRecorder()
			e.srv.ServeHTTP(w, req)
			expectError(t, w, 400, "invalid_idempotency_key")
		}
	})
}

// gcraLimit spaces messages 1/rate apart, for integer, fractional, the
// largest and tiny rates.
func TestGCRALimit(t *testing.T) {
	t.Parallel()
	for _, r := range []float64{1, 10, 0.3, 2.5, 0.000001, maxRate, 999_999.5, 1e-9, 1e-300} {
		l := gcraLimit(r, 7)
		if l.Burst != 7 || l.Rate < 1 || l.Period <= 0 {
			t.Errorf("rate %g: %+v", r, l)
			continue
		}
		got := l.Period.Seconds() / float64(l.Rate) // what the script computes
		if want := 1 / r; math.Abs(got-want) > want*1e-9 && r >= 1e-9 {
			t.Errorf("rate %g: messages %gs apart, want %gs", r, got, want)
		}
	}
}

// In Redis, a bucket's time is a Lua number (a double) of seconds since
// 2017: a bucket that takes more than 10^8 s to refill loses the
// precision the script needs (a fresh bucket refused a batch of exactly
// the burst, with Retry-After 1; a Retry-After past 292 years wrapped
// to 1). PUBLISH_RATE_SCOPE=global refuses such a limit at start.
func TestGlobalRateLimitRefillBound(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		rate, burst string
		ok          bool
	}{
		{"0.001", "1000", true}, // 10^6 s
		{"1e-6", "100", true},   // 10^8 s
		{"1e-8", "0", true},     // burst 1: 10^8 s
		{"1e-6", "101", false},  // 1.01·10^8 s
		{"1e-9", "0", false},    // burst 1: 10^9 s
		{"1e-300", "3", false},  // beyond time.Duration
		{"1000000", "2000000", true},
	} {
		for _, scope := range []string{"instance", "global"} {
			_, err := loadConfig(func(k string) string {
				return map[string]string{"JWT_SECRET": testSecret, "PUBLISH_RATE_SCOPE": scope,
					"PUBLISH_RATE_PER_IP": tc.rate, "PUBLISH_BURST_PER_IP": tc.burst}[k]
			})
			want := tc.ok || scope == "instance"
			if (err == nil) != want || err != nil && !strings.Contains(err.Error(), "PUBLISH_BURST_PER_IP / PUBLISH_RATE_PER_IP") {
				t.Errorf("rate %s burst %s scope %s: %v, want accepted %v", tc.rate, tc.burst, scope, err, want)
			}
		}
	}
	// At the bound, a fresh bucket takes a batch of the whole burst.
	two := `{"messages":[{"channel":"c","data":1},{"channel":"c","data":2}]}`
	e := newSecEnvs(t, map[string]string{"API_KEYS": fullKey, "PUBLISH_RATE_PER_KEY": "2e-8", "PUBLISH_BURST_PER_KEY": "2", "PUBLISH_RATE_SCOPE": "global"}, 1)[0]
	expectStatus(t, publishAs(t, e, "key:"+fullKey, two), 202)
	w := publishAs(t, e, "key:"+fullKey, `{"data":1}`)
	expectError(t, w, 429, "rate_limited")
	if ra := w.Header().Get("Retry-After"); ra != "50000000" {
		t.Errorf("Retry-After %q, want 50000000 (1/rate)", ra)
	}
}

// A publish one limit refuses takes nothing from the others' buckets:
// a key's batch larger than its burst, or a key over its rate, does not
// spend its IP's share, which other keys behind the same address (one
// NAT, one backend host) publish from. With the buckets in Redis only a
// batch larger than a burst is checked before any bucket is taken from
// (the GCRA script has no refund): a key over its rate there spends its
// IP's share, and the last step is skipped.
func TestRateLimitRefusalSpendsNothing(t *testing.T) {
	t.Parallel()
	for _, scope := range []string{"instance", "global"} {
		t.Run(scope, func(t *testing.T) {
			t.Parallel()
			// httptest's requests all come from 192.0.2.1.
			e := newSecEnvs(t, map[string]string{"API_KEYS": fullKey + "," + chatKey, "PUBLISH_RATE_SCOPE": scope,
				"PUBLISH_RATE_PER_IP": "0.001", "PUBLISH_BURST_PER_IP": "3",
				"PUBLISH_RATE_PER_KEY": "0.001", "PUBLISH_BURST_PER_KEY": "2"}, 1)[0]
			batch := func(n int) string {
				items := make([]string, n)
				for i := range items {
					items[i] = `{"channel":"c","data":1}`
				}
				return `{"messages":[` + strings.Join(items, ",") + `]}`
			}
			// 3 fit the IP's burst, not the key's: refused for good.
			w := publishAs(t, e, "key:"+fullKey, batch(3))
			expectError(t, w, 429, "rate_limited")
			if !strings.Contains(w.Body.String(), "per-API key burst") {
				t.Errorf("refused by %s, want the per-key burst", w.Body)
			}
			// The IP's 3 are all left: 2 for this key, then 1 for another.
			expectStatus(t, publishAs(t, e, "key:"+fullKey, batch(2)), 202)
			if scope == "global" {
				expectStatus(t, publishAs(t, e, "key:"+chatKey, `{"data":1}`), 202)
				return
			}
			// The key is over its rate: refused, and the IP's last one
			// stays for the other key.
			w = publishAs(t, e, "key:"+fullKey, `{"data":1}`)
			expectError(t, w, 429, "rate_limited")
			if !strings.Contains(w.Body.String(), "per API key") {
				t.Errorf("refused by %s, want the per-key rate", w.Body)
			}
			expectStatus(t, publishAs(t, e, "key:"+chatKey, `{"data":1}`), 202)
			expectError(t, publishAs(t, e, "key:"+chatKey, `{"data":1}`), 429, "rate_limited")
		})
	}
}

// TestGlobalRateLimitLateReplyChargedOnce: on a Redis Cluster, a global
// rate limit's charge whose reply came later than REDIS_TIMEOUT (Redis ran
// it) is not sent again: the publish is answered 503 (an error here) and
// its tokens are taken once. The cluster client's loop sent it again, and
// the caller lost twice the tokens: here, a burst of 5 with 1 taken and
// then 2 by the late charge had nothing left for 2 more.
func TestGlobalRateLimitLateReplyChargedOnce(t *testing.T) {
	t.Parallel()
	c := redistest.StartCluster(t, 3, 0)
	rdb, err := redisconn.New(redisconn.Config{ClusterAddrs: c.AddrsEnv(), Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer rdb.Close()
	arm, armed := redistest.LateReplies(rdb.(*redis.ClusterClient), "evalsha")
	prefix := redistest.Prefix(t)
	defer redistest.Cleanup(rdb, prefix)
	rl := newRedisLimits(rdb, keys.Scheme{Prefix: prefix})
	ls := newLimiterSet(0.001, 5)
	ctx := t.Context()
	// The first charge loads the script on the bucket's node.
	if wait, err := rl.reserve(ctx, ls, "user:a", 1); err != nil || wait != 0 {
		t.Fatalf("first charge: wait %v, %v", wait, err)
	}
	arm()
	if wait, err := rl.reserve(ctx, ls, "user:a", 2); err == nil {
		t.Fatalf("a charge whose reply came late: wait %v, no error", wait)
	}
	if armed() {
		t.Fatal("the late charge did not reach the node")
	}
	if wait, err := rl.reserve(ctx, ls, "user:a", 2); err != nil || wait != 0 {
		t.Fatalf("2 of the 2 tokens left refused (wait %v, %v): the late charge was taken twice", wait, err)
	}
}
