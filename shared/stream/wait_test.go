package stream

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redistest"
)

// TestWaitForReplicas: with a replica attached, appends are acknowledged;
// once it is gone, an append is written but reported ErrNotReplicated, so
// the ingress does not call it written (a failover could lose it).
func TestWaitForReplicas(t *testing.T) {
	t.Parallel()
	master := redistest.Start(t)
	replica := redistest.Start(t, "--replicaof", "127.0.0.1", strconv.Itoa(master.Port))
	rdb := redis.NewClient(&redis.Options{Addr: master.Addr(), DisableIdentity: true})
	defer rdb.Close()
	ctx := context.Background()
	deadline := time.Now().Add(10 * time.Second)
	for {
		info, _ := rdb.Info(ctx, "replication").Result()
		if strings.Contains(info, "connected_slaves:1") && strings.Contains(info, "state=online") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("replica never came online: %s", info)
		}
		time.Sleep(20 * time.Millisecond)
	}
	ks := keys.Scheme{Prefix: "w"}
	store := NewStore(rdb)
	store.WaitForReplicas(1, 300*time.Millisecond)
	app := func() ([]string, error) {
		return store.Append(ctx, []Append{{Stream: ks.Stream("d"), Notify: ks.Notify("d"), Msg: Message{Channel: "d", TS: 1, Data: []byte(`1`)}}})
	}
	if _, err := app(); err != nil {
		t.Fatalf("append with the replica online: %v", err)
	}
	replica.Stop()
	start := time.Now()
	_, err := app()
	if !errors.Is(err, ErrNotReplicated) {
		t.Fatalf("append without the replica: %v, want ErrNotReplicated", err)
	}
	if took := time.Since(start); took < 300*time.Millisecond || took > 3*time.Second {
		t.Fatalf("WAIT took %s, want about the 300ms timeout", took)
	}
	if n, _ := rdb.XLen(ctx, ks.Stream("d")).Result(); n != 2 {
		t.Fatalf("stream has %d entries, want 2 (the second written, not acknowledged)", n)
	}
}
