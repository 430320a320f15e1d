package stream

import (
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redisconn"
	"github.com/wsrelay/wsrelay/shared/redistest"
)

// TestClearLateReplyNotResent: on a Redis Cluster, a clear whose reply
// came later than the client's timeout (Redis ran it) fails (the
// ingress answers 503, and the caller may clear again); it is not sent
// again, which would remove what was appended in between too. The
// cluster client's loop sent it again: the second run found the stream
// empty and Clear answered 0 removed, no error.
func TestClearLateReplyNotResent(t *testing.T) {
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
	ks := keys.Scheme{Prefix: prefix}
	s := NewStore(rdb)
	ctx := t.Context()
	add := func() {
		t.Helper()
		a := Append{Stream: ks.Stream("clr"), Notify: ks.Notify("clr"), Msg: Message{Channel: "clr", Data: []byte(`1`)}}
		if _, err := s.Append(ctx, []Append{a, a}); err != nil {
			t.Fatal(err)
		}
	}
	add()
	// The first clear loads the script on the stream's node.
	if n, err := s.Clear(ctx, ks.Stream("clr")); err != nil || n != 2 {
		t.Fatalf("Clear = %d, %v; want 2", n, err)
	}
	add()
	arm()
	if n, err := s.Clear(ctx, ks.Stream("clr")); err == nil {
		t.Fatalf("a clear whose reply came late: %d removed, no error (run again)", n)
	}
	if armed() {
		t.Fatal("the late clear did not reach the node")
	}
	if n, err := rdb.XLen(ctx, ks.Stream("clr")).Result(); err != nil || n != 0 {
		t.Fatalf("XLEN after the late clear = %d, %v; want 0 (it ran)", n, err)
	}
}
