package main

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/wsrelay/wsrelay/shared/keys"
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

// TestInboxesExpire: an egress instance's inbox stream expires by itself,
// 2 × REGISTRY_TTL after the last write, and its last-id key twice that
// (docs/design.md, "Inbox streams expire by themselves"), however the
// ingress writes to it: a send to a connection, to a user, a disconnect.
// So does an inbox that a late write recreates after its instance died
// and the inbox expired (here deleted), while a record of the instance
// still lives: without a TTL, a dead instance's inbox, which nobody
// reads or trims by age, would stay in Redis for good.
func TestInboxesExpire(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := t.Context()
	ttl := e.srv.cfg.RegistryTTL
	e.register("c1", "bob", "inst-a")
	e.register("c2", "bob", "inst-b")
	e.register("c3", "carol", "inst-c")
	for _, r := range [][3]string{
		{"POST", "/v1/connections/c1/messages", `{"data":1}`},
		{"POST", "/v1/users/bob/messages", `{"data":2}`},
		{"DELETE", "/v1/connections/c3", ""},
	} {
		if w := e.do(r[0], r[1], r[2]); w.Code/100 != 2 {
			t.Fatalf("%s %s: %d %s", r[0], r[1], w.Code, w.Body.String())
		}
	}
	// inst-b died and its inbox expired; a send to bob recreates it.
	if err := e.rdb.Del(ctx, e.keys.Inbox("inst-b")).Err(); err != nil {
		t.Fatal(err)
	}
	if w := e.do("POST", "/v1/users/bob/messages", `{"data":3}`); w.Code != 202 {
		t.Fatalf("send to bob after inst-b's inbox expired: %d %s", w.Code, w.Body.String())
	}
	for _, inst := range []string{"inst-a", "inst-b", "inst-c"} {
		key := e.keys.Inbox(inst)
		if n := e.rdb.XLen(ctx, key).Val(); n == 0 {
			t.Fatalf("%s: inbox empty: the test writes nothing there", inst)
		}
		if got := e.rdb.PTTL(ctx, key).Val(); got <= 0 || got > 2*ttl {
			t.Errorf("%s: inbox PTTL %v, want within 2 × REGISTRY_TTL (%v)", inst, got, 2*ttl)
		}
		if got := e.rdb.PTTL(ctx, keys.Last(key)).Val(); got <= 2*ttl || got > 4*ttl {
			t.Errorf("%s: inbox last-id key PTTL %v, want over 2 × and within 4 × REGISTRY_TTL (%v)", inst, got, ttl)
		}
	}
}
