package stream

import (
	"bytes"
	"encoding/json"
	"io"
	"sync/atomic"
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
	// Once armed, the connection that sends the marker (the stream's
	// key) has Redis's reply dropped and is cut: Redis ran the append.
	var armed atomic.Pointer[[]byte]
	var dropped atomic.Int32
	addr := testkit.Relay(t, rs.Addr(), func() (up, down testkit.Filter) {
		var drop atomic.Bool
		up = func(b []byte, to io.Writer) bool {
			if m := armed.Load(); m != nil && bytes.Contains(b, *m) && armed.CompareAndSwap(m, nil) {
				drop.Store(true)
			}
			_, err := to.Write(b)
			return err == nil
		}
		down = func(b []byte, to io.Writer) bool {
			if drop.Load() {
				dropped.Add(1)
				return false
			}
			_, err := to.Write(b)
			return err == nil
		}
		return up, down
	})
	rdb, err := redisconn.New(redisconn.Config{URL: "redis://" + addr, Timeout: time.Second})
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
	marker := []byte(ks.Stream("lost"))
	armed.Store(&marker)
	err = appendTo("lost")
	if dropped.Load() != 1 {
		t.Fatalf("%d replies dropped, want 1 (the append's)", dropped.Load())
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
