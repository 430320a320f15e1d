package stream

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// TestBatcherRedisTrouble: callers append through a Batcher, each append
// with a once-key (as Idempotency-Key requests do), while Redis's
// connections are killed, Redis sleeps past the timeout and pauses
// writes. Every caller returns; an append reported written is in its
// stream once, under the id reported; one reported failed at most once;
// retried until it succeeds, each is then there once, and an append that
// was written before its failure was reported gets its first id back. The
// Batcher is idle afterwards and nothing of it keeps running.
func TestBatcherRedisTrouble(t *testing.T) {
	// Not parallel: goleak sees every goroutine of the process.
	leaks := goleak.IgnoreCurrent()
	rs := redistest.Start(t, "--enable-debug-command", "local")
	ks := keys.Scheme{Prefix: "trouble"}
	ctl := redis.NewClient(&redis.Options{Addr: rs.Addr(), DisableIdentity: true})
	defer ctl.Close()
	rdb := redis.NewClient(&redis.Options{Addr: rs.Addr(), DisableIdentity: true, MaxRetries: 1, DialerRetries: 1,
		DialTimeout: 300 * time.Millisecond, ReadTimeout: 300 * time.Millisecond, WriteTimeout: 300 * time.Millisecond, ContextTimeoutEnabled: true})
	b := NewBatcher(NewStore(rdb), 300*time.Millisecond, 2, 16)

	const callers = 12
	type outcome struct {
		a   Append
		id  string // first reported
		err error  // first attempt's error
	}
	results := make([][]outcome, callers)
	stop := make(chan struct{})
	var troubles sync.WaitGroup
	troubles.Go(func() { // three rounds of each trouble, then stop
		defer close(stop)
		ctx := context.Background()
		for i := range 9 {
			time.Sleep(50 * time.Millisecond)
			switch i % 3 {
			case 0:
				if err := ctl.ClientKillByFilter(ctx, "TYPE", "normal").Err(); err != nil {
					t.Error(err)
				}
			case 1:
				if err := ctl.Do(ctx, "DEBUG", "SLEEP", "0.4").Err(); err != nil {
					t.Error(err)
				}
			case 2:
				if err := ctl.Do(ctx, "CLIENT", "PAUSE", "400", "WRITE").Err(); err != nil {
					t.Error(err)
				}
			}
		}
	})
	var failed atomic.Int64
	var wg sync.WaitGroup
	for c := range callers {
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				ch := fmt.Sprintf("t%d", (c+i)%3)
				a := Append{Stream: ks.Stream(ch), Notify: ks.Notify(ch), Msg: Message{Channel: ch, TS: 1, Data: fmt.Appendf(nil, `"%d-%d"`, c, i)},
					Once: ks.Once(ks.Stream(ch), fmt.Sprintf("%d-%d", c, i), 0), OnceTTLMS: 60000}
				ids, err := b.Append(context.Background(), []Append{a})
				o := outcome{a: a, err: err}
				if err == nil {
					o.id = ids[0]
				} else {
					failed.Add(1)
				}
				results[c] = append(results[c], o)
			}
		})
	}
	troubles.Wait()
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("callers still waiting")
	}
	ctl.Do(context.Background(), "CLIENT", "UNPAUSE")
	if failed.Load() == 0 {
		t.Fatal("no append failed: the test made no trouble")
	}

	// What each stream holds, by data.
	held := map[string][]string{}
	for ch := range 3 {
		msgs, err := ctl.XRange(context.Background(), ks.Stream(fmt.Sprintf("t%d", ch)), "-", "+").Result()
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range entriesOf(msgs) {
			d, _ := e.Decode()
			held[string(d.Data)] = append(held[string(d.Data)], e.ID)
		}
	}
	writtenFailed := 0
	for _, rs := range results {
		for _, o := range rs {
			got := held[string(o.a.Msg.Data)]
			if o.err == nil && (len(got) != 1 || got[0] != o.id) {
				t.Errorf("%s reported written as %s, held as %v", o.a.Msg.Data, o.id, got)
			}
			if o.err != nil && len(got) == 1 {
				writtenFailed++
			}
			if o.err != nil && len(got) > 1 {
				t.Errorf("%s reported failed (%v), held as %v", o.a.Msg.Data, o.err, got)
			}
		}
	}
	// The failed ones, retried, are written once, and keep the first id
	// of those that were written.
	for _, rs := range results {
		for _, o := range rs {
			if o.err == nil {
				continue
			}
			before := held[string(o.a.Msg.Data)]
			var ids []string
			testkit.Eventually(t, 10*time.Second, func() (err error) {
				ids, err = b.Append(context.Background(), []Append{o.a})
				return err
			})
			if len(before) == 1 && ids[0] != before[0] {
				t.Errorf("%s: retry wrote %s, first written as %s", o.a.Msg.Data, ids[0], before[0])
			}
		}
	}
	for ch := range 3 {
		msgs, _ := ctl.XRange(context.Background(), ks.Stream(fmt.Sprintf("t%d", ch)), "-", "+").Result()
		seen := map[string]bool{}
		for _, e := range entriesOf(msgs) {
			d, _ := e.Decode()
			if seen[string(d.Data)] {
				t.Errorf("%s written twice", d.Data)
			}
			seen[string(d.Data)] = true
		}
	}
	total := 0
	for _, rs := range results {
		total += len(rs)
	}
	t.Logf("%d of %d appends failed at first, %d of them written all the same", failed.Load(), total, writtenFailed)
	assertIdle(t, b)
	rdb.Close()
	goleak.VerifyNone(t, leaks)
}
