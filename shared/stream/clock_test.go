package stream

import (
	"strconv"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

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
	// The third: milliseconds with one digit more than now's (the script
	// compares ids as decimal strings, by length first).
	for i, ahead := range []ID{{MS: hour, Seq: 5}, {MS: hour, Seq: 1<<60 + 1}, {MS: 10_000_000_000_000, Seq: 0}} {
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

// TestIDInPredecessorsMillisecond: the append script makes every id
// greater than the predecessor it names (appendSrc), also when Redis
// gives one in the predecessor's own millisecond with a lower sequence,
// as it does to a stream recreated in the very millisecond its eviction
// took it (T-0 after T-3): an id equal to or below the last one would be
// taken for a message already delivered. A test cannot have Redis's
// clock hit that millisecond, so the stream here is an empty one whose
// own last generated id is F-0 while its last-id key holds F-7, F an hour
// ahead: Redis gives F-1, which the script must move past F-7. So too
// past F-1 itself (an id equal to the last one), and past F-12 (a
// sequence with more digits: the script compares them as strings).
func TestIDInPredecessorsMillisecond(t *testing.T) {
	t.Parallel()
	for _, seq := range []uint64{7, 1, 12} {
		t.Run(strconv.FormatUint(seq, 10), func(t *testing.T) {
			t.Parallel()
			idInPredecessorsMillisecond(t, seq)
		})
	}
}

func idInPredecessorsMillisecond(t *testing.T, seq uint64) {
	e := newEnv(t)
	ctx := t.Context()
	key := e.keys.Stream("same")
	f := uint64(time.Now().Add(time.Hour).UnixMilli())
	prev := ID{MS: f, Seq: seq}
	if err := e.rdb.XAdd(ctx, &redis.XAddArgs{Stream: key, ID: ID{MS: f}.String(), Values: []any{"x", "1"}}).Err(); err != nil {
		t.Fatal(err)
	}
	if err := e.rdb.XTrimMaxLen(ctx, key, 0).Err(); err != nil {
		t.Fatal(err)
	}
	if err := e.rdb.Set(ctx, keys.Last(key), prev.String(), 0).Err(); err != nil {
		t.Fatal(err)
	}
	ids := e.publish("same", 2, Limits{MaxLen: 10, TTLMS: 60000})
	if id := MustParseID(ids[0]); !prev.Less(id) {
		t.Fatalf("id %s after last id %s: not greater", ids[0], prev)
	}
	b, err := e.store.Resume(ctx, key, prev, 10)
	if err != nil || !b.Continuous || len(b.Entries) != 2 || b.Entries[0].ID != ids[0] || b.Entries[1].ID != ids[1] {
		t.Fatalf("Resume from the last id = %+v, %v; want continuous with %v", b, err, ids)
	}
}
