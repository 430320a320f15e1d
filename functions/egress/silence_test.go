package main

import (
	"fmt"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/stream"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// quietInbox starts an egress with alice connected, and returns a sender
// of targeted messages to her (with the ingress's inbox limits at
// REGISTRY_TTL=30s) and a func that makes her instance's inbox as a
// silence of two minutes leaves it: its stream and last-id key expired.
func quietInbox(t *testing.T) (e *secEgress, ws *websocket.Conn, send func(data string), expire func()) {
	t.Helper()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	e = startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"})
	ws, _, err := e.dial(t, url.Values{"user": {"alice"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ws.Close() })
	next(t, ws, "welcome")
	inbox := ks.Inbox(e.s.instance)
	lim := stream.Limits{MaxLen: 10000, MaxAgeMS: 60000, TTLMS: 60000}
	send = func(data string) {
		t.Helper()
		_, err := stream.NewStore(rdb).Append(t.Context(), []stream.Append{{Stream: inbox, Notify: ks.InboxNotify(e.s.instance),
			Msg: stream.Message{Route: stream.ToUser("alice"), TS: time.Now().UnixMilli(), Data: []byte(data)}, Limits: lim}})
		if err != nil {
			t.Fatal(err)
		}
		if got := nextData(t, ws); got != data {
			t.Fatalf("alice got %s, want %s", got, data)
		}
	}
	expire = func() {
		t.Helper()
		if err := rdb.Del(t.Context(), inbox, keys.Last(inbox)).Err(); err != nil {
			t.Fatal(err)
		}
		afterSilence()
	}
	return e, ws, send, expire
}

// afterSilence lets the clock leave the millisecond of the last id, as
// the minutes of a real silence do. Stream ids are Redis's clock in
// milliseconds: a stream started again within the millisecond of its
// lost last entry gives its first entry that same id, which every reader
// holding it takes as already delivered, and a test on a fast machine
// got there (deleting the keys takes well under a millisecond).
func afterSilence() { time.Sleep(2 * time.Millisecond) }

// TestInboxSilenceIsNoGap: an instance's inbox that gets no targeted
// message for 2 × (2 × REGISTRY_TTL) (2 minutes at the default 30 s) loses
// its stream and its last-id key to their TTLs; the next targeted message
// then chains from 0-0. Nothing was lost: it is delivered, and no gap is
// counted (wsrelay_egress_stream_gaps_total is for alerts).
func TestInboxSilenceIsNoGap(t *testing.T) {
	t.Parallel()
	e, _, send, expire := quietInbox(t)
	send(`"1"`)
	expire()
	send(`"2"`)
	if n := e.s.hub.gaps.Load(); n != 0 {
		t.Fatalf("a quiet inbox counted %d gap(s): nothing was lost", n)
	}
}

// TestChannelSilenceIsNoGap: a live subscriber on a channel silent for
// twice HISTORY_TTL (stream and last-id key expired, the next message
// chains from 0-0) gets the next message: nothing was published
// meanwhile, and its egress was subscribed all along.
func TestChannelSilenceIsNoGap(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"})
	ws, _ := subscribedTo(t, e, "quiet")
	appendTo(t, rdb, ks, "quiet", ks.Notify("quiet"), 1)
	if got := nextData(t, ws); got != "1" {
		t.Fatalf("got %s", got)
	}
	if err := rdb.Del(t.Context(), ks.Stream("quiet"), keys.Last(ks.Stream("quiet"))).Err(); err != nil {
		t.Fatal(err)
	}
	afterSilence()
	id2 := appendTo(t, rdb, ks, "quiet", ks.Notify("quiet"), 2)
	got, code := readMessages(ws, 3*time.Second, func(string) bool { return true })
	if len(got) != 1 || got[0] != id2 {
		t.Fatalf("after a silence: messages %v, close %d; want %s delivered (gaps counted %d)", got, code, id2, e.s.hub.gaps.Load())
	}
}

// TestInboxReconnectAfterSilence: the same without any new targeted
// message: a Pub/Sub reconnect (e.g. the probe's resubscribe) catches up
// the inbox from its last id; with the inbox's keys expired by a quiet
// spell, its last id reads 0-0. Nothing was sent: no gap.
func TestInboxReconnectAfterSilence(t *testing.T) {
	t.Parallel()
	e, _, send, expire := quietInbox(t)
	send(`"1"`)
	expire()
	before := e.s.hub.reconnects.Load()
	e.s.hub.resubscribe(t.Context())
	testkit.Eventually(t, 5*time.Second, func() error { // the inbox is confirmed again
		if e.s.hub.reconnects.Load() < before+2 {
			return fmt.Errorf("resubscribes %d", e.s.hub.reconnects.Load()-before)
		}
		return nil
	})
	// A message after it comes once the confirmation's catch-up is done
	// (the receive loop handles them in order).
	send(`"2"`)
	if n := e.s.hub.gaps.Load(); n != 0 {
		t.Fatalf("a reconnect after a quiet spell counted %d gap(s): nothing was sent", n)
	}
}

// TestResumeRacesAppend: a client resumes from the channel's last id L
// while the channel's stream has expired (its last-id key lives on). A
// publish N (prev L) lands between Resume's first XRANGE and its read of
// the last id: N follows L directly and is delivered.
func TestResumeRacesAppend(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	key := ks.Stream("r")
	var armed atomic.Bool
	rdb.AddHook(redistest.Fail{Pipeline: func(cmds []redis.Cmder) bool {
		for _, c := range cmds {
			if a := c.Args(); strings.EqualFold(c.Name(), "xrevrange") && len(a) > 1 && a[1] == key && armed.CompareAndSwap(true, false) {
				appendTo(t, rdb, ks, "r", ks.Notify("r"), 2)
			}
		}
		return false
	}})
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"})
	warm, _ := subscribedTo(t, e, "r") // the hub holds the channel
	last := appendTo(t, rdb, ks, "r", ks.Notify("r"), 1)
	if got := nextData(t, warm); got != "1" {
		t.Fatalf("got %s", got)
	}
	if err := rdb.Del(t.Context(), key).Err(); err != nil { // expired, as its TTL would
		t.Fatal(err)
	}
	armed.Store(true) // Resume's read of the end is the channel's only XREVRANGE from here
	ws := resumeOn(t, e, "r", last)
	r := next(t, ws, "subscribed")
	got, _ := readMessages(ws, 2*time.Second, func(string) bool { return true })
	if len(got) != 1 || !*r.Recovered {
		t.Fatalf("resume from %s (recovered %v, position %s): got %v; want the message published right after it",
			last, *r.Recovered, r.Position, got)
	}
}
