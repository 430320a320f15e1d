package redisconn

import (
	"context"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/redistest"
)

// TestNoResendInCluster: a script whose reply came later than Timeout
// (Redis ran it; the client gave up waiting) is not sent again through
// NoResend, on a cluster. Through the cluster client itself, its loop
// sends it again, and Redis runs it twice: what the ingress's global
// publish rate limit did (a publish charged twice) and what a history
// clear would (a message appended meanwhile removed too).
func TestNoResendInCluster(t *testing.T) {
	t.Parallel()
	c := redistest.StartCluster(t, 3, 0)
	rdb, err := New(Config{ClusterAddrs: c.AddrsEnv(), Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer rdb.Close()
	arm, armed := redistest.LateReplies(rdb.(*redis.ClusterClient), "evalsha")
	ctx := t.Context()
	key := redistest.Prefix(t) + ":runs"
	defer rdb.Del(context.Background(), key)
	script := redis.NewScript("return redis.call('INCR', KEYS[1])")
	if err := script.Load(ctx, rdb).Err(); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		via  redis.Scripter
		runs int64 // by the one call
		fail bool
	}{
		{"NoResend", NoResend(rdb), 1, true},
		{"the cluster client", rdb, 2, false},
	} {
		before, _ := rdb.Get(ctx, key).Int64()
		arm()
		err := script.Run(ctx, tc.via, []string{key}).Err()
		if armed() {
			t.Fatalf("%s: the script did not reach a node", tc.name)
		}
		if (err != nil) != tc.fail {
			t.Errorf("%s: error %v after a late reply, want an error: %v", tc.name, err, tc.fail)
		}
		after, gerr := rdb.Get(ctx, key).Int64()
		if gerr != nil {
			t.Fatal(gerr)
		}
		if after-before != tc.runs {
			t.Errorf("%s: the script ran %d times after a late reply, want %d", tc.name, after-before, tc.runs)
		}
	}
}
