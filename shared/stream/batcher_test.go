package stream

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redistest"
)

// TestBatcherConcurrent: many concurrent callers through a Batcher each
// get their own ids, every append lands once, and per-channel order is
// the order of each caller's own appends.
func TestBatcherConcurrent(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	b := NewBatcher(NewStore(rdb), 2*time.Second, 2, 64)
	const callers, each = 32, 50
	var wg sync.WaitGroup
	got := make([][]string, callers)
	errs := make(chan error, callers)
	for c := range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ch := fmt.Sprintf("c%d", c%4)
			for i := range each {
				msg := Message{Channel: ch, TS: 1, Data: []byte(fmt.Sprintf(`{"c":%d,"i":%d}`, c, i))}
				ids, err := b.Append(context.Background(), []Append{{Stream: ks.Stream(ch), Notify: ks.Notify(ch), Msg: msg}})
				if err != nil {
					errs <- err
					return
				}
				got[c] = append(got[c], ids[0])
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	total := int64(0)
	for c := range 4 {
		n, err := rdb.XLen(context.Background(), ks.Stream(fmt.Sprintf("c%d", c))).Result()
		if err != nil {
			t.Fatal(err)
		}
		total += n
	}
	if total != callers*each {
		t.Fatalf("%d entries in the streams, want %d", total, callers*each)
	}
	seen := map[string]bool{}
	for c, ids := range got {
		if len(ids) != each {
			t.Fatalf("caller %d got %d ids", c, len(ids))
		}
		for i, id := range ids {
			k := fmt.Sprintf("c%d/%s", c%4, id) // ids are unique per stream
			if seen[k] {
				t.Fatalf("id %s handed out twice", k)
			}
			seen[k] = true
			if i > 0 && !MustParseID(ids[i-1]).Less(MustParseID(id)) {
				t.Fatalf("caller %d: ids out of order: %s then %s", c, ids[i-1], id)
			}
		}
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.leaders != 0 || len(b.pending) != 0 {
		t.Fatalf("idle batcher has %d leaders and %d pending", b.leaders, len(b.pending))
	}
}

// TestBatcherErrorsStayPerAppend: an append that fails does not fail the
// others sharing its pipeline.
func TestBatcherErrorsStayPerAppend(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	// A string where a stream should be: XADD fails for that key only.
	rdb.Set(context.Background(), ks.Stream("broken"), "x", time.Minute)
	b := NewBatcher(NewStore(rdb), 2*time.Second, 1, 64)
	var wg sync.WaitGroup
	results := make([]error, 2)
	for i, ch := range []string{"broken", "fine"} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, results[i] = b.Append(context.Background(), []Append{{Stream: ks.Stream(ch), Notify: ks.Notify(ch), Msg: Message{Channel: ch, Data: []byte(`1`)}}})
		}()
	}
	wg.Wait()
	if results[0] == nil || results[1] != nil {
		t.Fatalf("errors: broken %v, fine %v", results[0], results[1])
	}
}
