package stream

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redisconn"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// TestAppendResentOnlyIfNotRun: on the client redisconn.New makes, an
// append is sent again only when Redis cannot have run it.
//
// Its reply later than REDIS_TIMEOUT (a Redis stalled by a fork, a slow
// network; Redis ran it all the same): the append fails, and the message
// is in its stream once. go-redis's retry (MaxRetries 1) sent it again on
// a new connection, and it was written twice, under two ids, and
// delivered twice, with no error (a publisher without an
// Idempotency-Key never knew). The error is what lets a publisher retry
// with its key.
//
// Its connection closed before it reached Redis (a pooled connection
// Redis had closed, which go-redis does not see over TLS): it is sent
// again on a new connection, written once, and succeeds.
//
// A pipeline of appends whose connection Redis closed after answering
// some of them: not sent again (they ran); the appends fail.
func TestAppendResentOnlyIfNotRun(t *testing.T) {
	t.Parallel()
	relay, s, admin, ks := relayedStore(t)
	appendTo := func(ch string) error {
		_, err := s.Append(t.Context(), []Append{{Stream: ks.Stream(ch), Notify: ks.Notify(ch),
			Msg: Message{Channel: ch, TS: time.Now().UnixMilli(), Data: json.RawMessage(`{"n":1}`)}}})
		return err
	}
	xlen := func(ch string) int64 {
		n, err := admin.XLen(t.Context(), ks.Stream(ch)).Result()
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	// The script is loaded and the connection pooled first.
	if err := appendTo("warm"); err != nil {
		t.Fatal(err)
	}

	relay.ArmHold(ks.Stream("late"), time.Second)
	err := appendTo("late")
	if relay.Dropped() != 1 {
		t.Fatalf("%d replies held, want 1 (the append's)", relay.Dropped())
	}
	if n := xlen("late"); n != 1 || err == nil {
		t.Fatalf("after its reply came too late the append returned %v, and its stream holds %d entries; want an error and 1 entry", err, n)
	}

	relay.ArmCut(ks.Stream("cut"))
	err = appendTo("cut")
	if relay.Dropped() != 2 {
		t.Fatalf("%d chunks acted on, want 2 (the cut append's too)", relay.Dropped())
	}
	if n := xlen("cut"); n != 1 || err != nil {
		t.Fatalf("after its connection was cut before it reached Redis the append returned %v, and its stream holds %d entries; want no error and 1 entry", err, n)
	}

	// Two appends in one pipeline, the connection cut after the first
	// reply: both ran, and neither runs again. The pipeline was sent
	// again (go-redis gives its error to the answered command too), and
	// both messages were written twice.
	relay.ArmFirstReply(ks.Stream("partial"))
	a := Append{Stream: ks.Stream("partial"), Notify: ks.Notify("partial"),
		Msg: Message{Channel: "partial", TS: time.Now().UnixMilli(), Data: json.RawMessage(`{"n":1}`)}}
	_, err = s.Append(t.Context(), []Append{a, a})
	if relay.Dropped() != 3 {
		t.Fatalf("%d chunks acted on, want 3 (the partly answered pipeline's too)", relay.Dropped())
	}
	if n := xlen("partial"); n != 2 || err == nil {
		t.Fatalf("after a pipeline of two appends was cut after its first reply, Append returned %v, and the stream holds %d entries; want an error and 2 entries", err, n)
	}
}

// relayedStore is a Store on a client redisconn.New makes (300 ms
// REDIS_TIMEOUT) to a Redis of its own behind a ReplyDropper, a client
// to that Redis that bypasses the relay, and a key scheme for the test.
func relayedStore(t *testing.T) (*testkit.ReplyDropper, *Store, *redis.Client, keys.Scheme) {
	t.Helper()
	rs := redistest.Start(t)
	relay := testkit.NewReplyDropper(t, rs.Addr())
	rdb, err := redisconn.New(redisconn.Config{URL: "redis://" + relay.Addr, Timeout: 300 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rdb.Close() })
	admin := redis.NewClient(rs.Options())
	t.Cleanup(func() { admin.Close() })
	return relay, NewStore(rdb), admin, keys.Scheme{Prefix: redistest.Prefix(t)}
}
