package main

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// TestIdleChannelsLeaveNoKeys: every key the ingress writes for a channel
// expires, so channels that go idle leave nothing in Redis once
// HISTORY_TTL (streams), twice it (last-id keys) and IDEMPOTENCY_WINDOW
// (idempotency records and once-keys) have passed. Channels are written
// every way the ingress writes them: single and batch publishes, with an
// Idempotency-Key, history removals, and publishes to a stream that was
// gone (evicted) while its last-id key lived on, in the same second as
// its last message, which left that stream without a TTL, in Redis for
// good.
func TestIdleChannelsLeaveNoKeys(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) {
		c.HistorySize = 5
		c.HistoryTTL = time.Second
		c.IdempotencyWindow = time.Second
		c.PublishRateScope = "global"
		c.PublishRatePerIP = 10000
	})
	ctx := t.Context()
	const channels = 40
	var first string // idle-2's first message
	for i := range channels {
		ch := fmt.Sprintf("idle-%d", i)
		w := e.do("POST", "/v1/channels/"+ch+"/messages", `{"data":1}`)
		if w.Code != 202 {
			t.Fatalf("publish: %d %s", w.Code, w.Body.String())
		}
		if i == 2 {
			first = decode[published](t, w).ID
		}
		batch := fmt.Sprintf(`{"messages":[{"channel":%q,"data":2},{"channel":%q,"data":3}]}`, ch, ch)
		if w := e.do("POST", "/v1/messages", batch, "Idempotency-Key", "k-"+ch); w.Code != 202 {
			t.Fatalf("batch: %d %s", w.Code, w.Body.String())
		}
		switch i % 3 {
		case 0:
			// Evicted (as volatile-ttl does first: the stream's TTL is
			// half its last-id key's) and published to again at once.
			if err := e.rdb.Del(ctx, e.keys.Stream(ch)).Err(); err != nil {
				t.Fatal(err)
			}
			if w := e.do("POST", "/v1/channels/"+ch+"/messages", `{"data":4}`, "Idempotency-Key", "k2-"+ch); w.Code != 202 {
				t.Fatalf("publish after eviction: %d %s", w.Code, w.Body.String())
			}
		case 1:
			if w := e.do("DELETE", "/v1/channels/"+ch+"/messages", ""); w.Code != 200 {
				t.Fatalf("clear: %d %s", w.Code, w.Body.String())
			}
		}
		if w := e.do("GET", "/v1/channels/"+ch+"/messages?after=0", ""); w.Code != 200 {
			t.Fatalf("history: %d %s", w.Code, w.Body.String())
		}
	}
	var all, noTTL []string
	iter := e.rdb.Scan(ctx, 0, e.keys.Prefix+":*", 1000).Iterator()
	for iter.Next(ctx) {
		k := iter.Val()
		all = append(all, k)
		// -1: no TTL (-2: expired since the scan found it, as it should).
		if ttl, err := e.rdb.PTTL(ctx, k).Result(); err != nil || ttl == -1 {
			noTTL = append(noTTL, fmt.Sprintf("%s (PTTL %v, %v)", k, ttl, err))
		}
	}
	if err := iter.Err(); err != nil {
		t.Fatal(err)
	}
	if len(all) == 0 {
		t.Fatal("no keys found: the scan looks in the wrong place")
	}
	if len(noTTL) > 0 {
		t.Fatalf("%d of %d keys never expire:\n%s", len(noTTL), len(all), strings.Join(noTTL, "\n"))
	}
	// Idle past every TTL: nothing is left.
	deadline := time.Now().Add(5 * time.Second)
	for {
		left, err := e.rdb.Keys(ctx, e.keys.Prefix+":*").Result()
		if err != nil {
			t.Fatal(err)
		}
		if len(left) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d keys left after the channels idled past their TTLs: %v", len(left), left)
		}
		time.Sleep(100 * time.Millisecond)
	}
	// Published to again, the channel starts a new chain: a reader from
	// before the silence is told recovered:false, with the new message.
	w := e.do("POST", "/v1/channels/idle-2/messages", `{"data":5}`)
	if w.Code != 202 {
		t.Fatalf("publish: %d %s", w.Code, w.Body.String())
	}
	id := decode[published](t, w).ID
	w = e.do("GET", "/v1/channels/idle-2/messages?after="+first, "")
	if h := decode[historyResp](t, w); w.Code != 200 || h.Recovered == nil || *h.Recovered || len(h.Messages) != 1 || h.Messages[0].ID != id {
		t.Fatalf("history after %s, from before the silence: %d %s; want recovered false and %s", first, w.Code, w.Body.String(), id)
	}
}
