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

// TestAppendLostReplyNotWrittenTwice: an append whose reply is lost after
// Redis ran it (the connection cut then, or the reply later than
// REDIS_TIMEOUT: a Redis busy forking, a slow network) fails, and the
// message is in its stream once. go-redis retried it, on the client
// redisconn.New made (MaxRetries 1), on a new connection: the script ran
// again and the message was written twice, under two ids, and delivered
// twice (a publisher without an Idempotency-Key, and the publisher never
// knew). The caller's error is what lets a publisher retry with its key.
func TestAppendLostReplyNotWrittenTwice(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	relay := testkit.NewReplyDropper(t, rs.Addr())
	rdb, err := redisconn.New(redisconn.Config{URL: "redis://" + relay.Addr, Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rdb.Close() })
	ks := keys.Scheme{Prefix: redistest.Prefix(t)}
	s := NewStore(rdb)
	appendTo := func(ch string) error {
		_, err := s.Append(t.Context(), []Append{{Stream: ks.Stream(ch), Notify: ks.Notify(ch),
			Msg: Message{Channel: ch, TS: time.Now().UnixMilli(), Data: json.RawMessage(`{"n":1}`)}}})
		return err
	}
	// The script is loaded and the connection pooled first.
	if err := appendTo("warm"); err != nil {
		t.Fatal(err)
	}
	relay.Arm(ks.Stream("lost"))
	err = appendTo("lost")
	if relay.Dropped() != 1 {
		t.Fatalf("%d replies dropped, want 1 (the append's)", relay.Dropped())
	}
	admin := redis.NewClient(rs.Options())
	defer admin.Close()
	n, xerr := admin.XLen(t.Context(), ks.Stream("lost")).Result()
	if xerr != nil {
		t.Fatal(xerr)
	}
	if n != 1 || err == nil {
		t.Fatalf("after its reply was lost the append returned %v, and its stream holds %d entries; want an error and 1 entry", err, n)
	}
}
