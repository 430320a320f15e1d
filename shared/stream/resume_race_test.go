package stream

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redistest"
)

// TestResumeRacesAppend: a client at the channel's last id L resumes
// while the stream has expired (its last-id key lives on). Resume's XRANGE
// finds nothing, and an append N (prev L) lands before its read of the
// last id. N follows L directly: read apart, the two would say "not
// continuous, from N", and the caller would continue from N without ever
// delivering it.
func TestResumeRacesAppend(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := t.Context()
	key := e.keys.Stream("race")
	last := MustParseID(e.publish("race", 1, Limits{})[0])
	if err := e.rdb.Del(ctx, key).Err(); err != nil { // as its TTL would
		t.Fatal(err)
	}
	var fired atomic.Bool
	var published string
	e.rdb.AddHook(redistest.Fail{Pipeline: func(cmds []redis.Cmder) bool {
		for _, c := range cmds {
			if a := c.Args(); strings.EqualFold(c.Name(), "xrevrange") && len(a) > 1 && a[1] == key && fired.CompareAndSwap(false, true) {
				ids, err := e.store.Append(context.Background(), []Append{e.appendOf("race", "1", Limits{})})
				if err != nil {
					t.Error(err)
				}
				published = ids[0]
			}
		}
		return false
	}})
	b, err := e.store.Resume(ctx, key, last, 100)
	if err != nil {
		t.Fatal(err)
	}
	// The stream now holds N with prev = last: nothing is missing after last.
	if v, _ := e.rdb.Get(ctx, keys.Last(key)).Result(); v != published {
		t.Fatalf("setup: last-id %s, published %s", v, published)
	}
	if !b.Continuous || b.From != last {
		t.Fatalf("resume from %s with %s appended right after it: continuous %v, from %s, %d entries; "+
			"want continuous from %s (%s would be skipped)", last, published, b.Continuous, b.From, len(b.Entries), last, published)
	}
}

// sameNode matches a MOVED answer's address with go-redis's name for the
// node: IPv6 hosts come without brackets, and a node announcing a
// loopback host is named by the host the client reached the cluster at.
func TestSameNode(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		target, addr string
		want         bool
	}{
		{"127.0.0.1:7001", "127.0.0.1:7001", true},
		{"127.0.0.1:7001", "127.0.0.1:7002", false},
		{"::1:7001", "[::1]:7001", true},
		{"2001:db8::5:7001", "[2001:db8::5]:7001", true},
		{"127.0.0.1:7001", "redis.internal:7001", true}, // loopback announced, renamed by go-redis
		{"10.0.0.5:7001", "10.0.0.6:7001", false},
		{"10.0.0.5:7001", "redis.internal:7001", false},
		{"junk", "127.0.0.1:7001", false},
	} {
		if got := sameNode(tc.target, tc.addr); got != tc.want {
			t.Errorf("sameNode(%q, %q) = %v, want %v", tc.target, tc.addr, got, tc.want)
		}
	}
}
