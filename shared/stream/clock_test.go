package stream

import (
	"strconv"
	"testing"
	"time"

	"github.com/wsrelay/wsrelay/shared/keys"
)

// A stream recreated after it expired, on a Redis whose clock is behind
// the last id its last-id key kept (the clock stepped back, or a failover
// to a host whose clock is behind), must still continue the chain with a
// greater id: ids that went backwards would be taken for ones already
// delivered.
func TestRecreatedStreamIDFollowsLastID(t *testing.T) {
	t.Parallel()
	hour := uint64(time.Now().Add(time.Hour).UnixMilli())
	// The second: a sequence number past what a Lua number holds exactly.
	for i, ahead := range []ID{{MS: hour, Seq: 5}, {MS: hour, Seq: 1<<60 + 1}} {
		t.Run(strconv.Itoa(i), func(t *testing.T) { recreatedStreamFollows(t, ahead) })
	}
}

func recreatedStreamFollows(t *testing.T, ahead ID) {
	e := newEnv(t)
	ctx := t.Context()
	key := e.keys.Stream("back")
	if err := e.rdb.Set(ctx, keys.Last(key), ahead.String(), 0).Err(); err != nil {
		t.Fatal(err)
	}
	ids := e.publish("back", 2, Limits{MaxLen: 10, TTLMS: 60000, MaxAgeMS: 60000})
	if id := MustParseID(ids[0]); !ahead.Less(id) {
		t.Fatalf("id %s after last id %s: not greater", ids[0], ahead)
	}
	b, err := e.store.Resume(ctx, key, ahead, 10)
	if err != nil || !b.Continuous || len(b.Entries) != 2 || b.Entries[0].ID != ids[0] || b.Entries[1].ID != ids[1] {
		t.Fatalf("Resume from the last id = %+v, %v; want continuous with %v", b, err, ids)
	}
	if n := e.rdb.XLen(ctx, key).Val(); n != 2 {
		t.Fatalf("XLEN = %d, want 2", n)
	}
	// Its ids are in the last id's millisecond, so no append of it was
	// the first of a new second: the stream still expires.
	if ttl := e.rdb.PTTL(ctx, key).Val(); ttl <= 50*time.Second || ttl > time.Minute {
		t.Fatalf("recreated stream: PTTL = %v, want about 1m", ttl)
	}
}
