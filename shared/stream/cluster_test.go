package stream_test

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/stream"
)

// TestCluster runs the stream's cluster cases on one real three-master
// Redis Cluster.
func TestCluster(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a Redis Cluster")
	}
	c := redistest.StartCluster(t, 3, 0)
	rdb := c.Client(t)

	t.Run("append and resume", func(t *testing.T) {
		ks := keys.Scheme{Prefix: redistest.Prefix(t)}
		t.Cleanup(func() { redistest.Cleanup(rdb, ks.Prefix) })
		store := stream.NewStore(rdb)
		ctx := context.Background()
		// One pipeline across channels on different slots.
		var as []stream.Append
		for i := range 6 {
			ch := fmt.Sprintf("room-%d", i%2)
			as = append(as, stream.Append{
				Stream: ks.Stream(ch), Notify: ks.Notify(ch),
				Msg:    stream.Message{Channel: ch, Event: "e", TS: time.Now().UnixMilli(), Data: json.RawMessage(fmt.Sprintf(`{"n":%d}`, i))},
				Limits: stream.Limits{MaxLen: 100, TTLMS: 60000},
			})
		}
		ids, err := store.Append(ctx, as)
		if err != nil {
			t.Fatal(err)
		}
		for _, ch := range []string{"room-0", "room-1"} {
			off := 0
			if ch == "room-1" {
				off = 1
			}
			first := stream.MustParseID(ids[off])
			b, err := store.Resume(ctx, ks.Stream(ch), first, 10)
			if err != nil {
				t.Fatal(err)
			}
			got, recovered := b.Entries, b.Continuous
			if !recovered || len(got) != 2 || got[0].ID != ids[off+2] || got[1].ID != ids[off+4] {
				t.Fatalf("%s: resume after %s = %d entries, recovered %v; want ids %s %s", ch, first, len(got), recovered, ids[off+2], ids[off+4])
			}
			last, err := store.LastID(ctx, ks.Stream(ch))
			if err != nil || last.String() != ids[off+4] {
				t.Fatalf("%s: LastID = %v, %v", ch, last, err)
			}
			// From the end, with the stream gone and its last id kept:
			// the transaction that reads both runs on the channel's slot.
			if err := rdb.Del(ctx, ks.Stream(ch)).Err(); err != nil {
				t.Fatal(err)
			}
			if b, err := store.Resume(ctx, ks.Stream(ch), last, 10); err != nil || !b.Continuous || len(b.Entries) != 0 || b.From != last {
				t.Fatalf("%s: resume from the last id of an expired stream = %+v, %v", ch, b, err)
			}
		}
	})

	t.Run("channels spread across masters", func(t *testing.T) {
		ks := keys.Scheme{Prefix: redistest.Prefix(t)}
		t.Cleanup(func() { redistest.Cleanup(rdb, ks.Prefix) })
		store := stream.NewStore(rdb)
		ctx := context.Background()
		const channels = 100
		var as []stream.Append
		for i := range channels {
			ch := fmt.Sprintf("chan-%d", i)
			as = append(as, stream.Append{
				Stream: ks.Stream(ch), Notify: ks.Notify(ch),
				Msg:    stream.Message{Channel: ch, Event: "e", TS: time.Now().UnixMilli(), Data: json.RawMessage(`{}`)},
				Limits: stream.Limits{MaxLen: 10, TTLMS: 60000},
			})
		}
		if _, err := store.Append(ctx, as); err != nil {
			t.Fatal(err)
		}
		var mu sync.Mutex
		spread := map[string]int{}
		err := rdb.ForEachMaster(ctx, func(ctx context.Context, n *redis.Client) error {
			keys, err := n.Keys(ctx, ks.Prefix+":*}:s").Result()
			if err != nil {
				return err
			}
			mu.Lock() // ForEachMaster runs concurrently
			spread[n.Options().Addr] = len(keys)
			mu.Unlock()
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("stream keys per master: %v", spread)
		total := 0
		for addr, n := range spread {
			if n == 0 {
				t.Errorf("master %s holds no channel", addr)
			}
			total += n
		}
		if len(spread) != 3 || total != channels {
			t.Fatalf("%d masters hold %d streams, want 3 and %d", len(spread), total, channels)
		}
	})
}
