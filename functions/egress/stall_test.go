package main

import (
	"testing"
	"time"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redistest"
)

// TestUnreadableStreamHoldsUpOnlyItsChannel: one channel's stream cannot
// be read (here a key of the wrong type; in a cluster, its master just
// died) while the hub must catch up on it. The read is retried, but the
// other channels go on being delivered meanwhile; once the stream can be
// read again, its channel gets what was published.
func TestUnreadableStreamHoldsUpOnlyItsChannel(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"})
	wsA, _ := subscribedTo(t, e, "a")
	wsB, _ := subscribedTo(t, e, "b")

	ctx := t.Context()
	if err := rdb.Set(ctx, ks.Stream("a"), "not a stream", 0).Err(); err != nil {
		t.Fatal(err)
	}
	// A notification on a's channel whose predecessor the hub has not
	// delivered: it catches up from a's stream, and that read fails.
	appendTo(t, rdb, ks, "other", ks.Notify("other"), 1)
	appendTo(t, rdb, ks, "other", ks.Notify("other"), 2)
	appendTo(t, rdb, ks, "other", ks.Notify("a"), 3)

	for i := range 3 {
		id := appendTo(t, rdb, ks, "b", ks.Notify("b"), 10+i)
		if got, code := readMessages(wsB, 5*time.Second, func(string) bool { return true }); len(got) != 1 || got[0] != id {
			t.Fatalf("b while a cannot be read: got %v (close %d), want %s", got, code, id)
		}
	}

	if err := rdb.Del(ctx, ks.Stream("a")).Err(); err != nil {
		t.Fatal(err)
	}
	id := appendTo(t, rdb, ks, "a", ks.Notify("a"), 20)
	if got, code := readMessages(wsA, 5*time.Second, func(string) bool { return true }); len(got) != 1 || got[0] != id {
		t.Fatalf("a once readable: got %v (close %d), want %s", got, code, id)
	}
}

// TestUnreadablePositionHoldsUpOnlyItsChannel: the first read of a new
// channel's position fails and keeps failing. The subscribe is answered
// "unavailable" as for any subscription that does not go live in time,
// the other channels go on being delivered meanwhile, and once the
// stream can be read the channel can be subscribed.
func TestUnreadablePositionHoldsUpOnlyItsChannel(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"})
	wsB, _ := subscribedTo(t, e, "b")
	ctx := t.Context()
	if err := rdb.Set(ctx, ks.Stream("c"), "not a stream", 0).Err(); err != nil {
		t.Fatal(err)
	}
	wsC, _, err := e.dial(t, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer wsC.Close()
	next(t, wsC, "welcome")
	send(t, wsC, map[string]any{"type": "subscribe", "channel": "c"})
	time.Sleep(300 * time.Millisecond) // c's subscription is confirmed, its position read fails

	id := appendTo(t, rdb, ks, "b", ks.Notify("b"), 1)
	if got, code := readMessages(wsB, 3*time.Second, func(string) bool { return true }); len(got) != 1 || got[0] != id {
		t.Fatalf("b while c's position cannot be read: got %v (close %d), want %s", got, code, id)
	}
	if r := next(t, wsC, "error"); r.Code != "unavailable" {
		t.Fatalf("subscribe to c: error %q, want unavailable", r.Code)
	}

	if err := rdb.Del(ctx, ks.Stream("c")).Err(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(1500 * time.Millisecond) // the next retry reads the position
	wsC2, r := subscribedTo(t, e, "c")
	if r.Position != "0-0" {
		t.Fatalf("c's position %s, want 0-0", r.Position)
	}
	id = appendTo(t, rdb, ks, "c", ks.Notify("c"), 2)
	if got, code := readMessages(wsC2, 5*time.Second, func(string) bool { return true }); len(got) != 1 || got[0] != id {
		t.Fatalf("c once readable: got %v (close %d), want %s", got, code, id)
	}
}
