package redisconn

import (
	"bytes"
	"io"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// TestResentPipelinePartlyAnsweredKeepsItsReplies: a pipeline sent again
// (its first connection turned out closed before Redis read it: an idle
// connection a proxy or Redis had closed) whose second connection is cut
// after Redis's first reply keeps that reply, as on its first sending:
// the command answered ran, and its caller (a shared pipeline's append)
// must not be told it failed. Only the first sending was watched: the
// second gave the answered command the connection's error.
func TestResentPipelinePartlyAnsweredKeepsItsReplies(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	key := redistest.Prefix(t) + ":n"
	marker := []byte(key)
	// 1: the next chunk holding marker is cut before Redis reads it;
	// 2: the next one runs, and only its first reply comes back.
	var stage atomic.Int32
	relay := testkit.Relay(t, rs.Addr(), func() (up, down testkit.Filter) {
		var hit atomic.Bool
		up = func(b []byte, to io.Writer) bool {
			if bytes.Contains(b, marker) {
				if stage.CompareAndSwap(1, 2) {
					return false
				}
				if stage.CompareAndSwap(2, 3) {
					hit.Store(true)
				}
			}
			_, err := to.Write(b)
			return err == nil
		}
		down = func(b []byte, to io.Writer) bool {
			if hit.CompareAndSwap(true, false) {
				if i := bytes.Index(b, []byte("\r\n")); i >= 0 {
					_, _ = to.Write(b[:i+2])
				}
				return false
			}
			_, err := to.Write(b)
			return err == nil
		}
		return up, down
	})
	rdb, err := New(Config{URL: "redis://" + relay, Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rdb.Close() })
	ctx := t.Context()
	if err := rdb.Ping(ctx).Err(); err != nil { // a pooled connection
		t.Fatal(err)
	}
	stage.Store(1)
	var first, second *redis.IntCmd
	_, err = rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		first, second = p.Incr(ctx, key), p.Incr(ctx, key)
		return nil
	})
	if stage.Load() != 3 {
		t.Fatalf("stage %d: the pipeline was not sent again", stage.Load())
	}
	if err == nil || second.Err() == nil {
		t.Fatalf("a pipeline cut after its first reply: error %v, its second command's %v; want errors", err, second.Err())
	}
	if first.Err() != nil || first.Val() != 1 {
		t.Errorf("the command answered before the cut: %d, %v; want 1, no error (it ran)", first.Val(), first.Err())
	}
	if n, err := rdb.Get(ctx, key).Int(); err != nil || n != 2 {
		t.Errorf("INCRs run: %d, %v; want 2", n, err)
	}
}
