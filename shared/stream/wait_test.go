package stream

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// TestWaitForReplicas: with a replica attached, appends are acknowledged;
// once it is gone, an append is written but reported ErrNotReplicated, so
// the ingress does not call it written (a failover could lose it).
func TestWaitForReplicas(t *testing.T) {
	t.Parallel()
	rdb, replica := startReplicated(t)
	ctx := context.Background()
	ks := keys.Scheme{Prefix: "w"}
	app := func(wait time.Duration) ([]string, error) {
		store := NewStore(rdb)
		store.WaitForReplicas(1, wait)
		return store.Append(ctx, []Append{{Stream: ks.Stream("d"), Notify: ks.Notify("d"), Msg: Message{Channel: "d", TS: 1, Data: []byte(`1`)}}})
	}
	// A wait as long as a loaded machine may need (CI once saw the
	// replica's acknowledgement take more than 300 ms): this one is to
	// be acknowledged.
	if _, err := app(2 * time.Second); err != nil { // within the client's 3 s read timeout
		t.Fatalf("append with the replica online: %v", err)
	}
	replica.Stop()
	start := time.Now()
	_, err := app(300 * time.Millisecond)
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

// TestWaitRefusedSaysWhy: a WAIT that Redis refuses (an ACL user without
// +wait) is reported ErrNotReplicated, as the append was written, with
// Redis's error in it: the operator reading the log learns it is the
// user's rules, not replication lag.
func TestWaitRefusedSaysWhy(t *testing.T) {
	t.Parallel()
	srv := redistest.Start(t)
	admin := redis.NewClient(srv.Options())
	defer admin.Close()
	ctx := context.Background()
	if err := admin.Do(ctx, "ACL", "SETUSER", "nowait", "reset", "on", ">pw", "~*", "&*", "+@all", "-wait").Err(); err != nil {
		t.Fatal(err)
	}
	o := srv.Options()
	o.Username, o.Password = "nowait", "pw"
	rdb := redis.NewClient(o)
	defer rdb.Close()
	ks := keys.Scheme{Prefix: redistest.Prefix(t)}
	store := NewStore(rdb)
	store.WaitForReplicas(1, 100*time.Millisecond)
	_, err := store.Append(ctx, []Append{{Stream: ks.Stream("d"), Notify: ks.Notify("d"), Msg: Message{Channel: "d", TS: 1, Data: []byte(`1`)}}})
	if !errors.Is(err, ErrNotReplicated) {
		t.Fatalf("append with WAIT refused: %v, want ErrNotReplicated", err)
	}
	if !strings.Contains(fmt.Sprint(err), "NOPERM") {
		t.Fatalf("append with WAIT refused: %q does not say why", err)
	}
}

// TestWaitCoversRetriedAppends: appends refused NOSCRIPT (Redis's script
// cache emptied) are sent again with the script's source, and the WAIT
// that follows them decides whether they count as written: the first
// pipeline's WAIT ran before they were written. Here the first WAIT
// (nothing of the connection's written yet) answers at once with the
// replica, which then stops acknowledging: the retried append must be
// reported ErrNotReplicated.
func TestWaitCoversRetriedAppends(t *testing.T) {
	t.Parallel()
	rdb, replica := startReplicated(t, "--enable-debug-command", "local")
	rctl := redis.NewClient(&redis.Options{Addr: replica.Addr(), DisableIdentity: true})
	defer rctl.Close()
	ctx := context.Background()
	if err := rdb.ScriptFlush(ctx).Err(); err != nil {
		t.Fatal(err)
	}
	var sleeping sync.WaitGroup
	defer sleeping.Wait()
	sleeping.Go(func() { _ = rctl.Do(ctx, "DEBUG", "SLEEP", "3").Err() })
	// Until the replica is asleep: a PING it does not answer within 100 ms.
	probe := redis.NewClient(&redis.Options{Addr: replica.Addr(), DisableIdentity: true, ReadTimeout: 100 * time.Millisecond, MaxRetries: -1})
	defer probe.Close()
	testkit.Eventually(t, 5*time.Second, func() error {
		if probe.Ping(ctx).Err() == nil {
			return errors.New("the replica still answers")
		}
		return nil
	})
	ks := keys.Scheme{Prefix: "w"}
	store := NewStore(rdb)
	store.WaitForReplicas(1, 300*time.Millisecond)
	_, err := store.Append(ctx, []Append{{Stream: ks.Stream("d"), Notify: ks.Notify("d"), Msg: Message{Channel: "d", TS: 1, Data: []byte(`1`)}}})
	if !errors.Is(err, ErrNotReplicated) {
		t.Fatalf("append retried after NOSCRIPT, replica not acknowledging: %v, want ErrNotReplicated", err)
	}
}

// startReplicated starts a Redis and a replica of it (with replicaArgs),
// and returns a client of the master once the replica is online, and the
// replica.
func startReplicated(t *testing.T, replicaArgs ...string) (*redis.Client, *redistest.Server) {
	t.Helper()
	master := redistest.Start(t)
	replica := redistest.Start(t, append([]string{"--replicaof", "127.0.0.1", strconv.Itoa(master.Port)}, replicaArgs...)...)
	rdb := redis.NewClient(&redis.Options{Addr: master.Addr(), DisableIdentity: true})
	t.Cleanup(func() { rdb.Close() })
	ctx := context.Background()
	deadline := time.Now().Add(10 * time.Second)
	for {
		info, _ := rdb.Info(ctx, "replication").Result()
		if strings.Contains(info, "connected_slaves:1") && strings.Contains(info, "state=online") {
			return rdb, replica
		}
		if time.Now().After(deadline) {
			t.Fatalf("replica never came online: %s", info)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
