package e2e

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redistest"
)

// TestRedisKeysBounded: what the two functions leave in Redis is bounded
// by what is live, on a platform (SCF) where egress instances live a
// connection or two each and come and go by the thousand a day. Short
// TTLs; an anchor egress with a socket of user u on channel room stays
// up throughout (so room's and u's connection sets are refreshed and
// never expire), while short-lived egress instances, each with a socket
// of u on room and on a channel of its own, take publishes (with and
// without an Idempotency-Key, rate-limited in Redis), a send to the user
// and an idempotent send to their connection, and end: half SIGKILLed,
// half drained by SIGTERM. Past every TTL (a stream's last-id key, twice
// HISTORY_TTL; an inbox's, 4 × REGISTRY_TTL) and once a new socket has
// joined room, as one does on a channel in use, what is left is the live
// sockets' records and the two sets holding their members only. Then,
// with every instance gone and REGISTRY_TTL past, nothing is left.
//
// Before, room's and u's sets kept a member of every SIGKILLed socket:
// a set whose live members keep refreshing it never expires, and the
// dead members were removed only by a reader of the set (a presence
// list, a send to the user), which a busy channel may never have.
func TestRedisKeysBounded(t *testing.T) {
	srv := redistest.Start(t)
	prefix := redistest.Prefix(t)
	rdb := redis.NewClient(srv.Options())
	defer rdb.Close()
	const registryTTL = 3 * time.Second
	e := env{"REDIS_URL": srv.URL(), "REDIS_KEY_PREFIX": prefix, "ALLOW_ANONYMOUS": "true",
		"REGISTRY_TTL": registryTTL.String(), "PROBE_INTERVAL": "200ms", "HISTORY_TTL": "1s", "IDEMPOTENCY_WINDOW": "1s",
		"PUBLISH_RATE_SCOPE": "global", "PUBLISH_RATE_PER_USER": "1000", "PUBLISH_BURST_PER_USER": "1000",
		"PUBLISH_RATE_PER_IP": "1000", "PUBLISH_BURST_PER_IP": "1000", "SHUTDOWN_GRACE": "1s"}
	in := start(t, "ingress", e)
	anchor := start(t, "egress", e)
	a := dial(t, anchor.wsURL("user=u&channels=room"))
	a.waitFrame(func(f frame) bool { return f.Type == "subscribed" })
	hc := &http.Client{Timeout: 10 * time.Second}
	send := func(path, body, key string) {
		t.Helper()
		hdr := map[string]string{}
		if key != "" {
			hdr["Idempotency-Key"] = key
		}
		if st, b := postVia(t, hc, in.URL+path, []byte(body), hdr); st != 200 && st != 202 {
			t.Fatalf("POST %s: %d %s", path, st, b)
		}
	}
	var killed []string
	// Rounds past 2 × REGISTRY_TTL, so that the first rounds' members
	// are dead a TTL past their expiry by the last ones.
	began := time.Now()
	for i := 0; i < 4 || time.Since(began) < 2*registryTTL+time.Second; i++ {
		n := strconv.Itoa(i)
		eg := start(t, "egress", e)
		cl := dial(t, eg.wsURL("user=u&channels=room,ch"+n))
		cl.waitFrame(func(f frame) bool { return f.Type == "subscribed" })
		for _, ch := range []string{"room", "ch" + n} {
			send("/v1/channels/"+ch+"/messages", `{"data":1}`, "p"+n)
			send("/v1/channels/"+ch+"/messages", `{"data":2}`, "")
		}
		send("/v1/users/u/messages", `{"data":3}`, "u"+n)
		send("/v1/connections/"+cl.welcome.ConnectionID+"/messages", `{"data":4}`, "c"+n)
		cl.waitFrame(func(f frame) bool { return f.Type == "message" && f.Target != "" })
		if i%2 == 0 {
			eg.kill()
			killed = append(killed, cl.welcome.ConnectionID)
		} else if err := eg.term(10 * time.Second); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("rounds in %s; SIGKILLed %v", time.Since(began).Round(time.Millisecond), killed)
	// Past every TTL of the last round's keys: its inbox's last-id key
	// lives 4 × REGISTRY_TTL.
	time.Sleep(4*registryTTL + time.Second)
	b := dial(t, anchor.wsURL("user=u&channels=room"))
	b.waitFrame(func(f frame) bool { return f.Type == "subscribed" })
	live := []string{a.welcome.ConnectionID, b.welcome.ConnectionID}
	slices.Sort(live)

	ks := keys.Scheme{Prefix: prefix}
	want := map[string]bool{ks.Conn(live[0]): true, ks.Conn(live[1]): true, ks.ChannelConns("room"): true, ks.UserConns("u"): true}
	left := scanKeys(t, rdb, prefix)
	var bad []string
	for k, ttl := range left {
		if !want[k] || ttl <= 0 || ttl > registryTTL {
			bad = append(bad, fmt.Sprintf("%s (TTL %s)", k, ttl))
		}
	}
	for _, set := range []string{ks.ChannelConns("room"), ks.UserConns("u")} {
		m, err := rdb.ZRange(context.Background(), set, 0, -1).Result()
		if err != nil {
			t.Fatal(err)
		}
		slices.Sort(m)
		if !slices.Equal(m, live) {
			bad = append(bad, fmt.Sprintf("%s holds %v, want the live %v", set, m, live))
		}
	}
	if len(bad) > 0 {
		slices.Sort(bad)
		t.Errorf("past every TTL, with %v live:\n%s", live, strings.Join(bad, "\n"))
	}

	anchor.kill()
	time.Sleep(registryTTL + 500*time.Millisecond)
	if left := scanKeys(t, rdb, prefix); len(left) > 0 {
		t.Errorf("with no instance left, REGISTRY_TTL later: %v", left)
	}
}

// scanKeys returns every key under prefix with its TTL (-1: none).
func scanKeys(t *testing.T, rdb *redis.Client, prefix string) map[string]time.Duration {
	t.Helper()
	ctx := context.Background()
	out := map[string]time.Duration{}
	it := rdb.Scan(ctx, 0, prefix+":*", 1000).Iterator()
	for it.Next(ctx) {
		ttl, err := rdb.PTTL(ctx, it.Val()).Result()
		if err != nil {
			t.Fatal(err)
		}
		if ttl != -2 { // expired since the SCAN
			out[it.Val()] = ttl
		}
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}
