package stream

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redistest"
)

func TestMain(m *testing.M) { redistest.Main(m) }

type env struct {
	t     *testing.T
	rdb   redis.UniversalClient
	keys  keys.Scheme
	store *Store
}

func newEnv(t *testing.T) *env {
	t.Helper()
	rdb, prefix := redistest.Client(t)
	return &env{t: t, rdb: rdb, keys: keys.Scheme{Prefix: prefix}, store: NewStore(rdb)}
}

func (e *env) appendOf(ch string, data string, lim Limits) Append {
	return Append{
		Stream: e.keys.Stream(ch),
		Notify: e.keys.Notify(ch),
		Msg:    Message{Channel: ch, TS: time.Now().UnixMilli(), Data: json.RawMessage(data)},
		Limits: lim,
	}
}

// publish appends n messages to ch one pipeline each and returns their ids.
func (e *env) publish(ch string, n int, lim Limits) []string {
	e.t.Helper()
	var ids []string
	for i := range n {
		got, err := e.store.Append(e.t.Context(), []Append{e.appendOf(ch, strconv.Itoa(i), lim)})
		if err != nil {
			e.t.Fatalf("append: %v", err)
		}
		ids = append(ids, got...)
	}
	return ids
}

func TestAppendIDsIncrease(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	// One pipeline over two channels, then single appends.
	as := []Append{e.appendOf("a", "1", Limits{}), e.appendOf("b", "2", Limits{}), e.appendOf("a", "3", Limits{})}
	ids, err := e.store.Append(t.Context(), as)
	if err != nil {
		t.Fatal(err)
	}
	ids = append(ids, e.publish("a", 20, Limits{})...)
	var prev ID
	for i, s := range ids {
		if i == 1 {
			continue // channel b
		}
		id, ok := ParseID(s)
		if !ok {
			t.Fatalf("id %q does not parse", s)
		}
		if !prev.Less(id) {
			t.Fatalf("id %d %s is not after %s", i, id, prev)
		}
		prev = id
	}
	if n := e.rdb.XLen(t.Context(), e.keys.Stream("a")).Val(); n != 22 {
		t.Fatalf("XLEN a = %d, want 22", n)
	}
}

// Append loads the script itself when Redis's script cache is empty.
func TestAppendAfterScriptFlush(t *testing.T) {
	// Not parallel: SCRIPT FLUSH affects every test on this Redis, which
	// Append handles; it is this test that checks it.
	e := newEnv(t)
	if err := e.rdb.ScriptFlush(t.Context()).Err(); err != nil {
		t.Fatal(err)
	}
	if ids := e.publish("flush", 2, Limits{}); len(ids) != 2 {
		t.Fatalf("ids = %v", ids)
	}
}

// Each append announces itself on the channel's shard Pub/Sub channel;
// the payload parses back to the appended entry, and prev chains.
func TestNotification(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ps := e.rdb.SSubscribe(t.Context(), e.keys.Notify("n"))
	defer ps.Close()
	if _, err := ps.Receive(t.Context()); err != nil { // subscription confirmed
		t.Fatal(err)
	}
	a := e.appendOf("n", `{"x":[1,2]}`, Limits{})
	a.Msg.Event = "ev"
	a.Msg.From = "alice"
	ids, err := e.store.Append(t.Context(), []Append{a, a, a})
	if err != nil {
		t.Fatal(err)
	}
	ch := ps.Channel()
	prev := Zero
	for i := range 3 {
		var m *redis.Message
		select {
		case m = <-ch:
		case <-time.After(5 * time.Second):
			t.Fatalf("notification %d not received", i)
		}
		n, err := ParseNotification(m.Payload)
		if err != nil {
			t.Fatalf("parse %q: %v", m.Payload, err)
		}
		if n.IDStr != ids[i] || n.ID != MustParseID(ids[i]) || n.Prev != prev || n.TS != a.Msg.TS || n.Route != "" {
			t.Fatalf("notification %d = %+v; want id %s prev %s ts %d", i, n, ids[i], prev, a.Msg.TS)
		}
		var d Decoded
		if err := json.Unmarshal([]byte(n.Frame), &d); err != nil {
			t.Fatalf("frame %s: %v", n.Frame, err)
		}
		if d.Type != "message" || d.Channel != "n" || d.ID != ids[i] || d.Event != "ev" || d.From != "alice" || string(d.Data) != `{"x":[1,2]}` {
			t.Fatalf("frame = %s", n.Frame)
		}
		prev = n.ID
	}
}

func TestParseNotificationErrors(t *testing.T) {
	t.Parallel()
	for _, p := range []string{"", "0-0", "0-0\n1-1\n5", "0-0\n1-1\n5\nroute", "x\n1-1\n5\n\n{}", "0-0\n1-x\n5\n\n{}",
		"0-0\n1-1\n\n\n{}", "0-0\n1-1\nc:conn1\n{\n}", "0-0\n1-1\n5x\n\n{}", "\n1-1\n5\n\n{}"} {
		if _, err := ParseNotification(p); err != ErrBadNotification {
			t.Errorf("ParseNotification(%q) err = %v", p, err)
		}
	}
	n, err := ParseNotification("1-2\n3-4\n99\nc:conn1\n{\"a\":\"b\nc\"}")
	if err != nil || n.Prev != (ID{1, 2}) || n.ID != (ID{3, 4}) || n.TS != 99 || n.Route != "c:conn1" || string(n.Frame) != "{\"a\":\"b\nc\"}" {
		t.Fatalf("parsed %+v, %v", n, err)
	}
}

// MAXLEN trimming is approximate: the stream never drops below the limit
// and stays within a node's worth (100 entries by default) of it.
func TestMaxLenTrim(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.publish("m", 450, Limits{MaxLen: 100})
	n := e.rdb.XLen(t.Context(), e.keys.Stream("m")).Val()
	if n < 100 || n > 250 {
		t.Fatalf("XLEN = %d after 450 appends with MaxLen 100", n)
	}
	// Latest still reads the newest entries.
	es, err := e.store.Latest(t.Context(), e.keys.Stream("m"), 1)
	if err != nil || len(es) != 1 || es[0].Tail == "" {
		t.Fatalf("latest: %v %v", es, err)
	}
	if d, _ := es[0].Decode(); string(d.Data) != "449" {
		t.Fatalf("newest data = %s", d.Data)
	}
}

// MaxAge trims every entry older than the limit, not only whole stream
// nodes of them: a node that also holds a young entry (a quiet
// channel's, whose one node takes long to fill) is trimmed too, and so
// is a backlog of more than the 10,000 entries an approximate trim
// removes per call.
func TestMaxAgeTrim(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	key := e.keys.Stream("age")
	old := time.Now().Add(-time.Hour).UnixMilli()
	_, err := e.rdb.Pipelined(t.Context(), func(p redis.Pipeliner) error {
		for i := range 250 {
			p.XAdd(t.Context(), &redis.XAddArgs{Stream: key, ID: fmt.Sprintf("%d-%d", old, i+1), Values: []any{"h", "x"}})
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	ids := e.publish("age", 1, Limits{MaxAgeMS: time.Minute.Milliseconds()})
	if n := e.rdb.XLen(t.Context(), key).Val(); n != 1 {
		t.Fatalf("XLEN = %d after trimming 250 old entries, want 1", n)
	}
	if last, _ := e.store.LastID(t.Context(), key); last.String() != ids[0] {
		t.Fatalf("newest entry %s was trimmed", ids[0])
	}
	// Entries younger than the limit are kept.
	e.publish("age", 300, Limits{MaxAgeMS: time.Minute.Milliseconds()})
	if n2 := e.rdb.XLen(t.Context(), key).Val(); n2 != 301 {
		t.Fatalf("XLEN = %d: young entries were trimmed", n2)
	}
}

// TestMaxAgeTrimQuietChannel: a channel with a message an hour and a 2 h
// limit never expires, and all its messages share one stream node: an
// approximate trim kept them all, 50 hours old.
func TestMaxAgeTrimQuietChannel(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	key := e.keys.Stream("quiet")
	now := time.Now()
	for h := 50; h >= 1; h-- {
		ms := now.Add(-time.Duration(h) * time.Hour).UnixMilli()
		if err := e.rdb.XAdd(t.Context(), &redis.XAddArgs{Stream: key, ID: fmt.Sprintf("%d-0", ms), Values: []any{"h", "x"}}).Err(); err != nil {
			t.Fatal(err)
		}
	}
	lim := Limits{MaxLen: 1000, MaxAgeMS: (2 * time.Hour).Milliseconds(), TTLMS: (2 * time.Hour).Milliseconds()}
	e.publish("quiet", 1, lim)
	es, err := e.store.Latest(t.Context(), key, 1000)
	if err != nil {
		t.Fatal(err)
	}
	if len(es) != 2 { // the hour-old one and the new one
		t.Fatalf("%d entries kept, want 2; the oldest is %v old", len(es), time.Since(time.UnixMilli(int64(MustParseID(es[0].ID).MS))).Round(time.Minute))
	}
}

// TestMaxAgeTrimBacklog: an approximate trim removes at most 10,000
// entries a call (100 × stream-node-max-entries), and the age trim runs
// once per second of a stream's traffic: a stream without a count limit
// taking more than that a second, or a backlog after HISTORY_TTL was
// lowered, was never trimmed to its age.
func TestMaxAgeTrimBacklog(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	key := e.keys.Stream("backlog")
	old := time.Now().Add(-time.Hour).UnixMilli()
	for b := range 3 {
		_, err := e.rdb.Pipelined(t.Context(), func(p redis.Pipeliner) error {
			for i := range 10000 {
				p.XAdd(t.Context(), &redis.XAddArgs{Stream: key, ID: fmt.Sprintf("%d-%d", old+int64(b), i+1), Values: []any{"h", "x"}})
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	e.publish("backlog", 1, Limits{MaxAgeMS: time.Minute.Milliseconds()})
	if n := e.rdb.XLen(t.Context(), key).Val(); n != 1 {
		t.Fatalf("XLEN = %d after one age trim of 30,000 hour-old entries, want 1", n)
	}
}

// TTL: the whole stream expires after its last append.
func TestStreamTTL(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.publish("ttl", 1, Limits{TTLMS: 60000})
	ttl := e.rdb.PTTL(t.Context(), e.keys.Stream("ttl")).Val()
	if ttl <= 50*time.Second || ttl > time.Minute {
		t.Fatalf("PTTL = %v", ttl)
	}
	e.publish("nottl", 1, Limits{})
	if ttl := e.rdb.PTTL(t.Context(), e.keys.Stream("nottl")).Val(); ttl != -1 {
		t.Fatalf("PTTL without TTL = %v", ttl)
	}
	// The last-id key lives twice as long as its stream.
	if ttl := e.rdb.PTTL(t.Context(), keys.Last(e.keys.Stream("ttl"))).Val(); ttl <= 110*time.Second || ttl > 2*time.Minute {
		t.Fatalf("last-id key PTTL = %v", ttl)
	}
	if ttl := e.rdb.PTTL(t.Context(), keys.Last(e.keys.Stream("nottl"))).Val(); ttl != -1 {
		t.Fatalf("last-id key PTTL without TTL = %v", ttl)
	}
}

// A stream that is gone while its last-id key lives on (evicted: under
// volatile-ttl Redis evicts it first, its TTL being half the key's; or
// deleted by hand) and is written again in the same second as its last
// entry must still get its TTL. The TTL was refreshed only by the first
// append in each second, so the stream was recreated without one and, if
// its channel went quiet then, stayed in Redis for good (and, under a
// volatile-* policy, could never be evicted again).
func TestRecreatedStreamExpires(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := t.Context()
	lim := Limits{MaxLen: 100, MaxAgeMS: 60000, TTLMS: 60000}
	key := e.keys.Stream("gone")
	for try := 0; ; try++ {
		first := e.publish("gone", 1, lim)[0]
		if err := e.rdb.Del(ctx, key).Err(); err != nil {
			t.Fatal(err)
		}
		second := e.publish("gone", 1, lim)[0]
		if MustParseID(first).MS/1000 != MustParseID(second).MS/1000 {
			if try < 5 {
				continue // across a second: what is tested did not happen
			}
			t.Fatal("no two appends in one second in 5 tries")
		}
		if ttl := e.rdb.PTTL(ctx, key).Val(); ttl <= 50*time.Second || ttl > time.Minute {
			t.Fatalf("stream written again after it was gone: PTTL = %v, want about 1m", ttl)
		}
		return
	}
}

// HISTORY_TTL turned to 0 (keep forever) on a deployment whose streams
// were written with an expiry: the next appends take it off, or a busy
// channel's whole stream expired one old HISTORY_TTL later.
func TestTTLTurnedOff(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := t.Context()
	key := e.keys.Stream("off")
	first := MustParseID(e.publish("off", 1, Limits{TTLMS: 60000})[0])
	// The next append is in a later second: the once-a-second step runs.
	time.Sleep(time.Until(time.UnixMilli(int64(first.MS/1000+1)*1000)) + 10*time.Millisecond)
	e.publish("off", 1, Limits{})
	if ttl := e.rdb.PTTL(ctx, key).Val(); ttl != -1 {
		t.Fatalf("stream PTTL = %v after an append with no TTL, want none (-1)", ttl)
	}
	if ttl := e.rdb.PTTL(ctx, keys.Last(key)).Val(); ttl != -1 {
		t.Fatalf("last-id key PTTL = %v after an append with no TTL, want none (-1)", ttl)
	}
}

// The predecessor an append records (field p and the notification's prev)
// is the previous append's id, whether it comes from the last-id key or,
// when that key is gone, from the stream itself.
func TestPredecessor(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := t.Context()
	key := e.keys.Stream("pred")
	prevOf := func(id string) string {
		t.Helper()
		msgs, err := e.rdb.XRangeN(ctx, key, id, id, 1).Result()
		if err != nil || len(msgs) != 1 {
			t.Fatalf("XRANGE %s: %v, %v", id, msgs, err)
		}
		p, _ := msgs[0].Values["p"].(string)
		return p
	}
	ids := e.publish("pred", 3, Limits{TTLMS: 60000})
	if got := prevOf(ids[0]); got != "0-0" {
		t.Fatalf("first entry's p = %s, want 0-0", got)
	}
	if got := e.rdb.Get(ctx, keys.Last(key)).Val(); got != ids[2] {
		t.Fatalf("last-id key = %q, want %s", got, ids[2])
	}
	// Key gone (expired or evicted apart from the stream): read from the stream.
	if err := e.rdb.Del(ctx, keys.Last(key)).Err(); err != nil {
		t.Fatal(err)
	}
	ids = append(ids, e.publish("pred", 1, Limits{TTLMS: 60000})...)
	for i := 1; i < len(ids); i++ {
		if got := prevOf(ids[i]); got != ids[i-1] {
			t.Fatalf("entry %d's p = %s, want %s", i, got, ids[i-1])
		}
	}
	// Stream gone, key still there (it outlives the stream by up to a
	// second): the new entry names the last append, which is still the
	// truth about what was published, so a client holding it resumes.
	if err := e.rdb.Del(ctx, key).Err(); err != nil {
		t.Fatal(err)
	}
	// A recreated stream numbers from the clock again: let the millisecond
	// of the last id pass, as the stream's TTL always does.
	time.Sleep(2 * time.Millisecond)
	next := e.publish("pred", 1, Limits{TTLMS: 60000})[0]
	if got := prevOf(next); got != ids[len(ids)-1] {
		t.Fatalf("after the stream expired, p = %s, want %s", got, ids[len(ids)-1])
	}
	b, err := e.store.Resume(ctx, key, MustParseID(ids[len(ids)-1]), 10)
	if err != nil || !b.Continuous || len(b.Entries) != 1 || b.Entries[0].ID != next {
		t.Fatalf("Resume from the last delivered id = %+v, %v", b, err)
	}
	if b, _ := e.store.Resume(ctx, key, MustParseID(ids[0]), 10); b.Continuous {
		t.Fatal("Resume from an id whose successors expired reports recovered")
	}
}

func TestResume(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	const atAfter, atZero = -1, -2 // wantFrom: `after` itself, or Zero
	for _, tc := range []struct {
		name      string
		setup     func(e *env, key string, ids []string) ID // returns after
		wantRec   bool
		wantFirst int // index into ids of the first entry returned; -1 none
		wantFrom  int // index into ids of the position returned, or atAfter, atZero
	}{
		{"from the start of an intact stream", func(e *env, key string, ids []string) ID { return Zero }, true, 0, atAfter},
		{"from an entry still in the stream", func(e *env, key string, ids []string) ID { return MustParseID(ids[4]) }, true, 5, atAfter},
		{"from the newest entry", func(e *env, key string, ids []string) ID { return MustParseID(ids[9]) }, true, -1, atAfter},
		{"after trimming past it", func(e *env, key string, ids []string) ID {
			e.rdb.XTrimMaxLen(ctx, key, 3)
			return MustParseID(ids[2])
		}, false, 7, 6},
		{"from exactly the last entry trimmed", func(e *env, key string, ids []string) ID {
			// The oldest retained entry names it as its predecessor.
			e.rdb.XTrimMaxLen(ctx, key, 6)
			return MustParseID(ids[3])
		}, true, 4, atAfter},
		{"from before the last entry trimmed", func(e *env, key string, ids []string) ID {
			e.rdb.XTrimMaxLen(ctx, key, 6)
			return MustParseID(ids[2])
		}, false, 4, 3},
		{"from an id that was never in the stream", func(e *env, key string, ids []string) ID {
			return ID{MS: MustParseID(ids[0]).MS - 1, Seq: 7}
		}, false, 0, atZero},
		{"from an id ahead of the stream", func(e *env, key string, ids []string) ID {
			// Its messages must not be skipped until the clock gets there:
			// the position is the stream's own.
			return ID{MS: MustParseID(ids[9]).MS + 3_600_000}
		}, false, -1, 9},
		{"from the largest id", func(e *env, key string, ids []string) ID { return Max }, false, -1, 9},
		{"from the start after trimming", func(e *env, key string, ids []string) ID {
			e.rdb.XTrimMaxLen(ctx, key, 6)
			return Zero
		}, false, 4, 3},
		{"after the stream was deleted (data loss)", func(e *env, key string, ids []string) ID {
			e.rdb.Del(ctx, key)
			return MustParseID(ids[4])
		}, false, -1, 9},
		{"from the last id of a stream that expired since", func(e *env, key string, ids []string) ID {
			// Its last-id key outlives it: nothing was missed.
			e.rdb.Del(ctx, key)
			return MustParseID(ids[9])
		}, true, -1, atAfter},
		{"after the stream and its last id were lost", func(e *env, key string, ids []string) ID {
			e.rdb.Del(ctx, key, keys.Last(key))
			return MustParseID(ids[9])
		}, false, -1, atZero},
		{"after the stream was recreated (data loss)", func(e *env, key string, ids []string) ID {
			e.rdb.Del(ctx, key)
			// Recreated within the millisecond of its last entry, the
			// stream would reuse that entry's ids (they are Redis's clock),
			// which no chain can tell apart; a loss and a new publish take
			// longer than that, a test on a fast machine need not.
			time.Sleep(2 * time.Millisecond)
			e.publish("r", 2, Limits{})
			return MustParseID(ids[4])
		}, false, 10, 9},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t)
			key := e.keys.Stream("r")
			ids := e.publish("r", 10, Limits{})
			after := tc.setup(e, key, ids)
			b, err := e.store.Resume(ctx, key, after, 100)
			if err != nil {
				t.Fatal(err)
			}
			es := b.Entries
			if b.Continuous != tc.wantRec {
				t.Errorf("recovered = %v, want %v", b.Continuous, tc.wantRec)
			}
			switch {
			case tc.wantFirst < 0:
				if len(es) != 0 {
					t.Errorf("got %d entries, want none", len(es))
				}
			case tc.wantFirst >= len(ids):
				if len(es) == 0 || !after.Less(MustParseID(es[0].ID)) {
					t.Errorf("entries %v", es)
				}
			default:
				if len(es) != len(ids)-tc.wantFirst || es[0].ID != ids[tc.wantFirst] {
					t.Errorf("got %d entries from %v, want %d from %s", len(es), first(es), len(ids)-tc.wantFirst, ids[tc.wantFirst])
				}
			}
			want := after
			switch {
			case tc.wantFrom == atZero:
				want = Zero
			case tc.wantFrom >= 0:
				want = MustParseID(ids[tc.wantFrom])
			}
			if b.From != want {
				t.Errorf("from %s, want %s", b.From, want)
			}
		})
	}
}

// TestResumePastForeignEntries: entries another application wrote under
// the key prefix name no predecessor, and the append after them names the
// message before them. Resumed from a message trimmed since, the first
// entry that names its predecessor decides: it names `after`, so nothing
// is missing. The first entry read decided, and its predecessor does not
// parse: a reader that missed nothing was told it had (Continuous false).
func TestResumePastForeignEntries(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	key := e.keys.Stream("f")
	ids := e.publish("f", 2, Limits{})
	var foreign []string
	for range 2 {
		id, err := e.rdb.XAdd(t.Context(), &redis.XAddArgs{Stream: key, Values: []any{"x", "y"}}).Result()
		if err != nil {
			t.Fatal(err)
		}
		foreign = append(foreign, id)
	}
	ids = append(ids, e.publish("f", 1, Limits{})...)
	if err := e.rdb.XTrimMinID(t.Context(), key, foreign[0]).Err(); err != nil {
		t.Fatal(err)
	}
	after := MustParseID(ids[1])
	b, err := e.store.Resume(t.Context(), key, after, 10)
	if err != nil {
		t.Fatal(err)
	}
	if !b.Continuous || b.From != after || len(b.Entries) != 3 || b.Entries[2].ID != ids[2] {
		t.Errorf("from %s, trimmed, before foreign entries: continuous %v from %s, %d entries; want true, %s, the 2 foreign and %s", after, b.Continuous, b.From, len(b.Entries), after, ids[2])
	}
	// From a message before it, the chain proves a loss.
	b, err = e.store.Resume(t.Context(), key, MustParseID(ids[0]), 10)
	if err != nil {
		t.Fatal(err)
	}
	if b.Continuous || b.From != after {
		t.Errorf("from %s: continuous %v from %s; want false, %s", ids[0], b.Continuous, b.From, after)
	}
}

// A channel nothing was published on gives position 0-0, and a resume from
// it, with the channel still quiet, missed nothing.
func TestResumeQuietChannel(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	key := e.keys.Stream("quiet")
	pos, err := e.store.LastID(t.Context(), key)
	if err != nil || !pos.IsZero() {
		t.Fatalf("position %v, %v; want 0-0", pos, err)
	}
	b, err := e.store.Resume(t.Context(), key, pos, 10)
	if err != nil || !b.Continuous || len(b.Entries) != 0 || b.From != Zero {
		t.Fatalf("resume from 0-0 of a quiet channel = %+v, %v; want recovered, nothing", b, err)
	}
}

// After the stream expired, the position handed out is the last id
// appended (kept by the last-id key), so that a client given it and
// resuming after the next message was published missed nothing.
func TestPositionAfterExpiry(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := t.Context()
	key := e.keys.Stream("exp")
	lim := Limits{TTLMS: 1000, MaxAgeMS: 1000}
	last := e.publish("exp", 1, lim)[0]
	waitExpired(t, e.rdb, key)
	pos, err := e.store.LastID(ctx, key)
	if err != nil || pos.String() != last {
		t.Fatalf("position of an expired stream = %v, %v; want the last id %s", pos, err, last)
	}
	next := e.publish("exp", 1, lim)[0]
	b, err := e.store.Resume(ctx, key, pos, 10)
	if err != nil || !b.Continuous || len(b.Entries) != 1 || b.Entries[0].ID != next {
		t.Fatalf("resume from %s = %+v, %v; want recovered with %s", pos, b, err, next)
	}
}

func first(es []Entry) string {
	if len(es) == 0 {
		return "none"
	}
	return es[0].ID
}

// Reads come in bounded batches that page through the stream in order.
func TestBoundedBatches(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	key := e.keys.Stream("b")
	ids := e.publish("b", 25, Limits{})

	b, err := e.store.Resume(t.Context(), key, MustParseID(ids[0]), 10)
	if err != nil || !b.Continuous || len(b.Entries) != 10 || b.Entries[0].ID != ids[1] {
		t.Fatalf("resume: %d entries, recovered %v, %v", len(b.Entries), b.Continuous, err)
	}
	b, err = e.store.Resume(t.Context(), key, Zero, 10)
	if err != nil || !b.Continuous || len(b.Entries) != 10 || b.Entries[0].ID != ids[0] {
		t.Fatalf("resume from zero: %d entries, recovered %v, %v", len(b.Entries), b.Continuous, err)
	}

	var got []string
	after := Zero
	for {
		r, err := e.store.Resume(t.Context(), key, after, 10)
		if err != nil || !r.Continuous {
			t.Fatalf("page after %s: continuous %v, %v", after, r.Continuous, err)
		}
		es := r.Entries
		if len(es) > 10 {
			t.Fatalf("batch of %d", len(es))
		}
		if len(es) == 0 {
			break
		}
		for _, x := range es {
			got = append(got, x.ID)
		}
		after = MustParseID(es[len(es)-1].ID)
	}
	if fmt.Sprint(got) != fmt.Sprint(ids) {
		t.Fatalf("paged %v, want %v", got, ids)
	}

	latest, err := e.store.Latest(t.Context(), key, 3)
	if err != nil || len(latest) != 3 || latest[0].ID != ids[22] || latest[2].ID != ids[24] {
		t.Fatalf("latest: %v %v", latest, err)
	}
	last, err := e.store.LastID(t.Context(), key)
	if err != nil || last.String() != ids[24] {
		t.Fatalf("LastID = %v, %v", last, err)
	}
	if last, err := e.store.LastID(t.Context(), e.keys.Stream("missing")); err != nil || !last.IsZero() {
		t.Fatalf("LastID of missing stream = %v, %v", last, err)
	}
}

// LatestBefore pages back from Latest: the newest entries below an id,
// oldest first, in bounded reads.
func TestLatestBefore(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	key := e.keys.Stream("lb")
	ids := e.publish("lb", 10, Limits{})

	es, err := e.store.LatestBefore(t.Context(), key, MustParseID(ids[5]), 3)
	if err != nil || fmt.Sprint(idsOfEntries(es)) != fmt.Sprint(ids[2:5]) {
		t.Fatalf("3 before %s: %v, %v; want %v", ids[5], idsOfEntries(es), err, ids[2:5])
	}
	// Paging back from Latest reads every entry once.
	got, err := e.store.Latest(t.Context(), key, 4)
	for err == nil {
		var older []Entry
		older, err = e.store.LatestBefore(t.Context(), key, MustParseID(got[0].ID), 4)
		if len(older) == 0 {
			break
		}
		got = append(older, got...)
	}
	if err != nil || fmt.Sprint(idsOfEntries(got)) != fmt.Sprint(ids) {
		t.Fatalf("paged back %v, %v; want %v", idsOfEntries(got), err, ids)
	}
	// Nothing is below the oldest entry, nor below 0-0 (which Redis
	// would refuse as an exclusive bound), nor in a missing stream.
	for _, before := range []ID{MustParseID(ids[0]), Zero} {
		if es, err := e.store.LatestBefore(t.Context(), key, before, 3); err != nil || len(es) != 0 {
			t.Fatalf("before %s: %v, %v", before, idsOfEntries(es), err)
		}
	}
	if es, err := e.store.LatestBefore(t.Context(), e.keys.Stream("missing"), Max, 3); err != nil || len(es) != 0 {
		t.Fatalf("missing stream: %v, %v", idsOfEntries(es), err)
	}
}

func idsOfEntries(es []Entry) []string {
	out := []string{}
	for _, x := range es {
		out = append(out, x.ID)
	}
	return out
}

// Entries read back carry the route and ts they were appended with.
func TestEntryFields(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	a := Append{
		Stream: e.keys.Inbox("i1"), Notify: e.keys.InboxNotify("i1"),
		Msg: Message{Route: ToUser("bob"), TS: 1234, Data: json.RawMessage(`"hi"`)},
	}
	if _, err := e.store.Append(context.Background(), []Append{a}); err != nil {
		t.Fatal(err)
	}
	es, err := e.store.Latest(t.Context(), e.keys.Inbox("i1"), 10)
	if err != nil || len(es) != 1 {
		t.Fatalf("%v %v", es, err)
	}
	if es[0].Route != ToUser("bob") || es[0].TS != 1234 {
		t.Fatalf("entry %+v", es[0])
	}
	d, err := es[0].Decode()
	if err != nil || d.Target != "user" || d.Channel != "" || d.ID != es[0].ID || string(d.Data) != `"hi"` {
		t.Fatalf("decoded %+v %v", d, err)
	}
}

// TestResumeFromZeroAfterExpiry: a client that subscribed while the
// channel was empty holds position 0-0. Messages are published, the
// stream expires, and a new one starts: the client missed the first ones,
// and Resume must say so, although the new stream's first entry follows
// nothing it holds (its chain continues from the last-id key, which
// outlives the stream, instead of starting again at 0-0).
func TestResumeFromZeroAfterExpiry(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := t.Context()
	key := e.keys.Stream("z")
	pos, err := e.store.LastID(ctx, key) // what the egress hands out
	if err != nil || !pos.IsZero() {
		t.Fatalf("position %v, %v; want 0-0", pos, err)
	}
	lim := Limits{TTLMS: 1000, MaxAgeMS: 1000}
	lost := e.publish("z", 2, lim)
	waitExpired(t, e.rdb, key)
	e.publish("z", 1, lim)
	b, err := e.store.Resume(ctx, key, pos, 100)
	if err != nil {
		t.Fatal(err)
	}
	if b.Continuous {
		t.Fatalf("recovered after 0-0 although %v are gone (replayed %s)", lost, first(b.Entries))
	}
}

// TestRefusedConnectionIsAnError: when Redis refuses a new connection with
// an error reply (a wrong password: WRONGPASS), go-redis reports it as the
// pipeline's error and leaves the pipelined commands without one. Reads
// must fail with it rather than answer "empty stream", and appends must
// name it rather than "unexpected reply <nil>".
func TestRefusedConnectionIsAnError(t *testing.T) {
	t.Parallel()
	srv := redistest.Start(t, "--requirepass", "right-password")
	rdb := redis.NewClient(&redis.Options{Addr: srv.Addr(), Password: "wrong-password", DisableIdentity: true, MaxRetries: -1})
	defer rdb.Close()
	ks := keys.Scheme{Prefix: "wrongpass"}
	store := NewStore(rdb)

	if id, err := store.LastID(t.Context(), ks.Stream("c")); err == nil || !strings.Contains(err.Error(), "WRONGPASS") {
		t.Errorf("LastID = %v, %v; want a WRONGPASS error", id, err)
	}
	_, err := store.Append(t.Context(), []Append{{Stream: ks.Stream("c"), Notify: ks.Notify("c"), Msg: Message{Channel: "c", TS: 1, Data: json.RawMessage(`1`)}}})
	if err == nil || !strings.Contains(err.Error(), "WRONGPASS") {
		t.Errorf("Append: %v; want a WRONGPASS error", err)
	}
}

// The command appendArgs builds, its pointers read through, is the one
// go-redis's typed Script.EvalSha and Eval built from the same append
// (the arguments as strings and int64s), with and without a once-key; and
// it allocates no more than its own strings, the keys' boxes and the call.
func TestAppendArgs(t *testing.T) {
	ks := keys.Scheme{Prefix: "p"}
	// A client that never connects: its pipeline only builds commands.
	rdb := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1"})
	defer rdb.Close()
	p := rdb.Pipeline()
	script := redis.NewScript(appendSrc)
	deref := func(args []any) []any {
		out := make([]any, len(args))
		for i, a := range args {
			switch v := a.(type) {
			case *string:
				out[i] = *v
			case *int64:
				out[i] = *v
			default:
				out[i] = v
			}
		}
		return out
	}
	for _, a := range []Append{
		{Stream: ks.Stream("c"), Notify: ks.Notify("c"), Msg: Message{Channel: "c", Event: "e", From: "u", TS: 1700000000123, Data: []byte(`{"x":1}`)},
			Limits: Limits{MaxLen: 1000, MaxAgeMS: 86400000, TTLMS: 86400000}},
		{Stream: ks.Inbox("i"), Notify: ks.InboxNotify("i"), Msg: Message{Route: ToUser("bob"), TS: 1, Data: []byte(`2`)},
			Limits: Limits{MaxLen: 10000, TTLMS: 60000}, Once: ks.Inbox("i") + ":once:d:0", OnceTTLMS: 3600000},
	} {
		head, tail := a.Msg.Frame()
		ksOld := []string{a.Stream, a.Notify, keys.Last(a.Stream)}
		if a.Once != "" {
			ksOld = append(ksOld, a.Once)
		}
		argsOld := []any{head, tail, string(a.Msg.Route), a.Msg.TS, a.Limits.MaxLen, a.Limits.MaxAgeMS, a.Limits.TTLMS, a.OnceTTLMS}
		for _, load := range []bool{false, true} {
			want := script.EvalSha(context.Background(), p, ksOld, argsOld...).Args()
			if load {
				want = script.Eval(context.Background(), p, ksOld, argsOld...).Args()
			}
			if got := deref(appendArgs(&a, load)); fmt.Sprintf("%#v", got) != fmt.Sprintf("%#v", want) {
				t.Errorf("load %v:\n got %#v\nwant %#v", load, got, want)
			}
		}
		want := 7.0 // Frame's two strings, the last-id key, the call, three keys' boxes
		if a.Once != "" {
			want++ // the once-key's box
		}
		if n := testing.AllocsPerRun(100, func() { appendArgs(&a, false) }); n > want {
			t.Errorf("appendArgs allocates %v times, want at most %v", n, want)
		}
	}
}

// TestClear: Clear empties the stream and the chain goes on from the last
// message removed, also when the last-id key was missing (evicted, or a
// stream last written before the key existed): Clear writes it then, with
// twice the stream's remaining TTL, since an empty stream leaves the
// append script nothing to read its predecessor from. Otherwise the next
// message chained from 0-0: a client at 0-0, which never got the removed
// messages, was told it missed nothing, and one at the last message
// removed that it missed something.
func TestClear(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name    string
		dropKey bool
		lim     Limits
	}{
		{"last-id key kept", false, Limits{TTLMS: 60000}},
		{"last-id key missing", true, Limits{TTLMS: 60000}},
		{"last-id key missing, no TTL", true, Limits{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t)
			ctx := t.Context()
			key := e.keys.Stream("clr")
			ids := e.publish("clr", 3, tc.lim)
			if tc.dropKey {
				if err := e.rdb.Del(ctx, keys.Last(key)).Err(); err != nil {
					t.Fatal(err)
				}
			}
			if n, err := e.store.Clear(ctx, key); err != nil || n != 3 {
				t.Fatalf("Clear = %d, %v; want 3", n, err)
			}
			if tc.dropKey { // lost again once the stream is empty: Clear still knows
				if err := e.rdb.Del(ctx, keys.Last(key)).Err(); err != nil {
					t.Fatal(err)
				}
			}
			if n, err := e.store.Clear(ctx, key); err != nil || n != 0 {
				t.Fatalf("Clear again = %d, %v; want 0", n, err)
			}
			last := MustParseID(ids[2])
			if pos, err := e.store.LastID(ctx, key); err != nil || pos != last {
				t.Fatalf("LastID after Clear = %v, %v; want %s", pos, err, last)
			}
			pttl := e.rdb.PTTL(ctx, keys.Last(key)).Val()
			switch {
			case tc.lim.TTLMS == 0 && pttl != -1:
				t.Fatalf("last-id key PTTL %v, want none", pttl)
			case tc.lim.TTLMS > 0 && (pttl < time.Duration(tc.lim.TTLMS)*time.Millisecond || pttl > 2*time.Duration(tc.lim.TTLMS)*time.Millisecond):
				t.Fatalf("last-id key PTTL %v, want it to outlive the stream (TTL %d ms)", pttl, tc.lim.TTLMS)
			}
			if b, err := e.store.Resume(ctx, key, last, 10); err != nil || !b.Continuous {
				t.Fatalf("Resume from the last removed, nothing since = %+v, %v; want recovered", b, err)
			}
			next := e.publish("clr", 1, tc.lim)[0]
			if b, err := e.store.Resume(ctx, key, last, 10); err != nil || !b.Continuous || first(b.Entries) != next {
				t.Fatalf("Resume from the last removed = %+v, %v; want recovered with %s", b, err, next)
			}
			for _, after := range []ID{Zero, MustParseID(ids[0])} {
				if b, err := e.store.Resume(ctx, key, after, 10); err != nil || b.Continuous || b.From != last {
					t.Fatalf("Resume from %s = %+v, %v; want not recovered, from %s", after, b, err, last)
				}
			}
			// Nothing to clear: no key is written.
			if n, err := e.store.Clear(ctx, e.keys.Stream("none")); err != nil || n != 0 {
				t.Fatalf("Clear of a missing stream = %d, %v", n, err)
			}
			if n := e.rdb.Exists(ctx, e.keys.Stream("none"), keys.Last(e.keys.Stream("none"))).Val(); n != 0 {
				t.Fatalf("Clear of a missing stream wrote %d keys", n)
			}
		})
	}
}

// TestAppendToClearedStreamWithoutLastIDKey: the last-id key lost after a
// Clear (evicted): the append script reads its predecessor from the
// stream, which is empty but keeps its last generated id. Reading only the
// stream's last entry, it chained from 0-0.
func TestAppendToClearedStreamWithoutLastIDKey(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := t.Context()
	key := e.keys.Stream("clr")
	lim := Limits{TTLMS: 60000}
	ids := e.publish("clr", 2, lim)
	if _, err := e.store.Clear(ctx, key); err != nil {
		t.Fatal(err)
	}
	if err := e.rdb.Del(ctx, keys.Last(key)).Err(); err != nil {
		t.Fatal(err)
	}
	next := e.publish("clr", 1, lim)[0]
	b, err := e.store.Resume(ctx, key, MustParseID(ids[1]), 10)
	if err != nil || !b.Continuous || first(b.Entries) != next {
		t.Fatalf("Resume from the last removed = %+v, %v; want recovered with %s", b, err, next)
	}
	if b, err := e.store.Resume(ctx, key, Zero, 10); err != nil || b.Continuous {
		t.Fatalf("Resume from 0-0 = %+v, %v; want not recovered", b, err)
	}
}

// TestClearOutOfMemory: removing a channel's history is what an operator
// reaches for when Redis is full, so it must work at maxmemory
// (noeviction), also when the stream's last-id key is missing and Clear
// has to write it. Redis refuses a script's first write that may grow
// memory, not later ones: the script removes first, then writes the key.
func TestClearOutOfMemory(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	rdb := redis.NewClient(&redis.Options{Addr: "127.0.0.1:" + strconv.Itoa(rs.Port)})
	t.Cleanup(func() { _ = rdb.Close() })
	e := &env{t: t, rdb: rdb, keys: keys.Scheme{Prefix: redistest.Prefix(t)}, store: NewStore(rdb)}
	ctx := t.Context()
	key := e.keys.Stream("full")
	ids := e.publish("full", 3, Limits{TTLMS: 60000})
	if err := rdb.Del(ctx, keys.Last(key)).Err(); err != nil {
		t.Fatal(err)
	}
	free := redistest.OutOfMemory(t, rdb, e.keys.Prefix)
	if _, err := e.store.Append(ctx, []Append{e.appendOf("full", "4", Limits{TTLMS: 60000})}); err == nil || !strings.Contains(err.Error(), "OOM command not allowed") {
		t.Fatalf("append at maxmemory: %v, want Redis's OOM refusal", err)
	}
	if n, err := e.store.Clear(ctx, key); err != nil || n != 3 {
		t.Fatalf("Clear at maxmemory = %d, %v; want 3", n, err)
	}
	free()
	last := MustParseID(ids[2])
	if pos, err := e.store.LastID(ctx, key); err != nil || pos != last {
		t.Fatalf("LastID after Clear = %v, %v; want %s", pos, err, last)
	}
	if pttl := rdb.PTTL(ctx, keys.Last(key)).Val(); pttl < time.Minute || pttl > 2*time.Minute {
		t.Fatalf("last-id key PTTL %v, want it to outlive the stream (TTL 60 s)", pttl)
	}
	next := e.publish("full", 1, Limits{TTLMS: 60000})[0]
	if b, err := e.store.Resume(ctx, key, last, 10); err != nil || !b.Continuous || first(b.Entries) != next {
		t.Fatalf("Resume from the last removed = %+v, %v; want recovered with %s", b, err, next)
	}
}

// TestAppendOnce: an append with a once-key happens at most once. Sent
// again under the same key (an Idempotency-Key retry after a lost
// reply), it returns the first id and writes and announces nothing. The
// key lives OnceTTLMS and is renewed by every append that finds it (a
// write, so that a WAIT after the retry counts it).
func TestAppendOnce(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := t.Context()
	key := e.keys.Stream("once")
	ps := e.rdb.SSubscribe(ctx, e.keys.Notify("once"))
	defer ps.Close()
	if _, err := ps.Receive(ctx); err != nil { // subscription confirmed
		t.Fatal(err)
	}
	a := e.appendOf("once", "1", Limits{TTLMS: 60000})
	a.Once, a.OnceTTLMS = e.keys.Once(key, "d", 0), 60000
	ids, err := e.store.Append(ctx, []Append{a})
	if err != nil {
		t.Fatal(err)
	}
	if ttl := e.rdb.PTTL(ctx, a.Once).Val(); ttl <= 50*time.Second || ttl > time.Minute {
		t.Fatalf("once-key PTTL = %v, want about 1m", ttl)
	}
	// Nearly expired when the retry comes: the retry renews it.
	if err := e.rdb.PExpire(ctx, a.Once, time.Second).Err(); err != nil {
		t.Fatal(err)
	}
	b := a
	b.Msg.Data = json.RawMessage("2") // whatever the retry carries, nothing is written
	again, err := e.store.Append(ctx, []Append{b, a})
	if err != nil || len(again) != 2 || again[0] != ids[0] || again[1] != ids[0] {
		t.Fatalf("appends under the same once-key = %v, %v; want the first id %s", again, err, ids[0])
	}
	if n := e.rdb.XLen(ctx, key).Val(); n != 1 {
		t.Fatalf("XLEN = %d after one append and two under its once-key, want 1", n)
	}
	if ttl := e.rdb.PTTL(ctx, a.Once).Val(); ttl <= 50*time.Second || ttl > time.Minute {
		t.Fatalf("once-key PTTL = %v after a retry, want it renewed to about 1m", ttl)
	}
	// One notification: the first append's. A later append (another
	// key) is announced next, naming it as its predecessor.
	c := e.appendOf("once", "3", Limits{TTLMS: 60000})
	c.Once, c.OnceTTLMS = e.keys.Once(key, "d", 1), 60000
	next, err := e.store.Append(ctx, []Append{c})
	if err != nil || next[0] == ids[0] {
		t.Fatalf("append under another once-key = %v, %v", next, err)
	}
	for i, want := range []string{ids[0], next[0]} {
		select {
		case m := <-ps.Channel():
			n, err := ParseNotification(m.Payload)
			if err != nil || n.IDStr != want {
				t.Fatalf("notification %d = %+v, %v; want id %s", i, n, err, want)
			}
			if i == 1 && n.Prev.String() != ids[0] {
				t.Fatalf("notification of %s names prev %s, want %s", want, n.Prev, ids[0])
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("notification %d not received", i)
		}
	}
}

// TestAppendReplyLostNotSentAgain: an append whose reply was lost (the
// connection broke after Redis ran the script) may have been written, so
// it fails and is not sent again: only an append refused with NOSCRIPT,
// which did not run, is. Sending again any append that failed wrote this
// one twice.
func TestAppendReplyLostNotSentAgain(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	key := e.keys.Stream("lost")
	e.publish("lost", 1, Limits{}) // the script cached: EVALSHA runs it
	var lose atomic.Bool
	e.rdb.(*redis.Client).AddHook(redistest.Fail{Sent: true, Pipeline: func([]redis.Cmder) bool { return lose.CompareAndSwap(true, false) }})
	lose.Store(true)
	if _, err := e.store.Append(t.Context(), []Append{e.appendOf("lost", "2", Limits{})}); !errors.Is(err, redistest.ErrFailed) {
		t.Fatalf("Append whose reply was lost = %v, want ErrFailed", err)
	}
	if n := e.rdb.XLen(t.Context(), key).Val(); n != 2 {
		t.Fatalf("XLEN = %d after a first append and one whose reply was lost, want 2 (each written once)", n)
	}
}

// TestMaxAgeBeyondEpoch: a maximum age longer than the time since 1970
// (a "keep for ever" set as a large age) trims nothing and fails nothing:
// the trim's bound would be an id before 0-0, which Redis refuses.
func TestMaxAgeBeyondEpoch(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	lim := Limits{MaxAgeMS: 200 * 365 * 24 * time.Hour.Milliseconds()}
	for i := range 2 {
		if _, err := e.store.Append(t.Context(), []Append{e.appendOf("forever", strconv.Itoa(i), lim)}); err != nil {
			t.Fatalf("append %d with a maximum age of 200 years: %v", i, err)
		}
	}
	if n := e.rdb.XLen(t.Context(), e.keys.Stream("forever")).Val(); n != 2 {
		t.Fatalf("XLEN = %d, want 2", n)
	}
}

// waitExpired waits for key, given a TTL of a second, to expire: for at
// most 10 s, so that a stream left without a TTL fails the test instead
// of hanging it (and the package's others) until go test's timeout.
func waitExpired(t *testing.T, rdb redis.UniversalClient, key string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for rdb.Exists(t.Context(), key).Val() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%s has not expired after 10 s (PTTL %v)", key, rdb.PTTL(t.Context(), key).Val())
		}
		time.Sleep(50 * time.Millisecond)
	}
}
