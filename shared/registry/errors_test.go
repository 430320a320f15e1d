package registry

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/redistest"
)

// nodeDown fails, after Redis ran them, the commands of a pipeline on the
// key down, as a go-redis ClusterClient does when the node owning that key
// does not answer: the other nodes' commands keep their replies, and the
// pipeline's error is its first command's error, which may be a mere
// redis.Nil.
type nodeDown struct{ down string }

func (h nodeDown) DialHook(next redis.DialHook) redis.DialHook          { return next }
func (h nodeDown) ProcessHook(next redis.ProcessHook) redis.ProcessHook { return next }
func (h nodeDown) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		_ = next(ctx, cmds)
		for _, c := range cmds {
			if a := c.Args(); len(a) > 1 && a[1] == h.down {
				c.SetErr(redistest.ErrFailed)
			}
		}
		for _, c := range cmds {
			if err := c.Err(); err != nil {
				return err
			}
		}
		return nil
	}
}

// TestMembersNodeDown: when the record of a live member cannot be read
// (its cluster node is down), the read fails (the ingress answers 503)
// instead of leaving that connection out: a send to the user would be
// accepted, report fewer connections and never reach the one left out.
// A stale member (no record) ahead of it in the set makes the pipeline's
// own error a redis.Nil.
func TestMembersNodeDown(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	r, ks := newRegistry(t, time.Minute)
	for _, id := range []string{"c1", "c2", "c3"} {
		if err := r.Put(ctx, &Record{ID: id, User: "u", Instance: "i", Channels: []string{"a"}}); err != nil {
			t.Fatal(err)
		}
	}
	// c1 is stale: its record is gone while its membership lives (its
	// Remove's ZREM failed, say). It scores highest, so it is read first
	// (newest first).
	r.rdb.Del(ctx, ks.Conn("c1"))
	r.rdb.ZAdd(ctx, ks.UserConns("u"), redis.Z{Score: float64(time.Now().Add(2 * time.Minute).UnixMilli()), Member: "c1"})
	r.rdb.ZAdd(ctx, ks.ChannelConns("a"), redis.Z{Score: float64(time.Now().Add(2 * time.Minute).UnixMilli()), Member: "c1"})
	r.rdb.(*redis.Client).AddHook(nodeDown{down: ks.Conn("c3")})
	for name, read := range map[string]func() ([]*Record, error){
		"user":    func() ([]*Record, error) { return r.User(ctx, "u", 10) },
		"channel": func() ([]*Record, error) { return r.Channel(ctx, "a", 10) },
	} {
		recs, err := read()
		if err == nil {
			t.Errorf("%s: %v, no error, with c3's record unreadable", name, ids(recs))
		} else if errors.Is(err, redis.Nil) {
			t.Errorf("%s: error %v", name, err)
		}
	}
}

// TestChannelsNeverNull: a record without channels is written and read
// back with "channels": [] (docs/api.md shows an array), also when an
// older writer stored null.
func TestChannelsNeverNull(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	r, ks := newRegistry(t, time.Minute)
	if err := r.Put(ctx, &Record{ID: "c1", User: "u", Instance: "i"}); err != nil {
		t.Fatal(err)
	}
	if b := r.rdb.Get(ctx, ks.Conn("c1")).Val(); !strings.Contains(b, `"channels":[]`) {
		t.Errorf("record written as %s", b)
	}
	r.rdb.Set(ctx, ks.Conn("c2"), `{"id":"c2","user":"u","instance":"i","channels":null}`, time.Minute)
	r.rdb.ZAdd(ctx, ks.UserConns("u"), redis.Z{Score: float64(time.Now().Add(time.Minute).UnixMilli()), Member: "c2"})
	got, err := r.Get(ctx, "c2")
	if err != nil || got.Channels == nil {
		t.Errorf("Get of a record stored with null channels: %+v, %v", got, err)
	}
	recs, err := r.User(ctx, "u", 10)
	if err != nil || len(recs) != 2 {
		t.Fatalf("User = %v, %v", ids(recs), err)
	}
	for _, rec := range recs {
		if b, _ := json.Marshal(rec); !strings.Contains(string(b), `"channels":[]`) {
			t.Errorf("User lists %s", b)
		}
	}
}

// TestCorruptRecords: a connection record no egress wrote (not JSON, or
// without the connection's id or instance, which a send needs to reach it)
// is ErrCorruptRecord to Get, and left out, without an error, of a user's
// connections.
func TestCorruptRecords(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	r, ks := newRegistry(t, time.Minute)
	if err := r.Put(ctx, &Record{ID: "good", User: "u", Instance: "i"}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ id, stored string }{
		{"not-json", `{"id":"not-json",`},
		{"no-id", `{"user":"u","instance":"i","channels":[]}`},
		{"no-instance", `{"id":"no-instance","user":"u","channels":[]}`},
	} {
		r.rdb.Set(ctx, ks.Conn(tc.id), tc.stored, time.Minute)
		r.rdb.ZAdd(ctx, ks.UserConns("u"), redis.Z{Score: float64(time.Now().Add(time.Minute).UnixMilli()), Member: tc.id})
		if got, err := r.Get(ctx, tc.id); !errors.Is(err, ErrCorruptRecord) {
			t.Errorf("Get %s (stored %s) = %+v, %v; want ErrCorruptRecord", tc.id, tc.stored, got, err)
		}
	}
	recs, err := r.User(ctx, "u", 10)
	if err != nil || len(recs) != 1 || recs[0].ID != "good" {
		t.Errorf("User = %v, %v; want [good]", ids(recs), err)
	}
}
