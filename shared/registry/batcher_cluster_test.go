package registry_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/wsrelay/wsrelay/shared/registry"
)

// TestClusterBatcherPastHungMaster: a shared pipeline carrying records
// on every master of a cluster, one of which does not answer, fails only
// the Puts with a key on that master (Batcher.Put's contract): those
// whose keys all live on masters that answer were written and succeed.
// go-redis sets the pipeline's own deadline on every command without an
// error of its own when it runs out between its attempts, those the
// masters that answered carried out included; read as theirs, every
// socket opening on the egress during a failover was refused 1013 and
// its written record removed.
func TestClusterBatcherPastHungMaster(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a Redis Cluster")
	}
	const timeout = 200 * time.Millisecond
	h := startHungCluster(t, timeout)
	ks, reg, admin, ctx := h.ks, h.reg, h.admin, context.Background()
	var recs []*registry.Record
	onHung := map[string]bool{}
	for i := range 30 {
		r := &registry.Record{ID: fmt.Sprintf("c%d", i), User: fmt.Sprintf("u%d", i), Instance: "i1"}
		onHung[r.ID] = h.onHung(t, r)
		recs = append(recs, r)
	}
	if err := reg.Refresh(ctx, recs); err != nil { // all warm, every node dialled
		t.Fatal(err)
	}
	for _, r := range recs {
		admin.Del(ctx, ks.Conn(r.ID))
	}
	h.pause(t)
	// One pipeline in flight at a time: the first Put's, then the rest's.
	b := registry.NewBatcher(reg, timeout, 1, 256)
	errs := make([]error, len(recs))
	var wg sync.WaitGroup
	for i, r := range recs {
		wg.Go(func() {
			pctx, cancel := context.WithTimeout(ctx, 10*timeout)
			defer cancel()
			errs[i] = b.Put(pctx, r)
		})
	}
	wg.Wait()
	up, bad := 0, 0
	for i, r := range recs {
		if onHung[r.ID] {
			if errs[i] == nil {
				t.Errorf("Put %s, with a key on the hung master, reported no error", r.ID)
			}
			continue
		}
		up++
		if errs[i] != nil {
			bad++
			t.Errorf("Put %s, whose keys are all on masters that answer: %v", r.ID, errs[i])
		}
		if n := admin.Exists(ctx, ks.Conn(r.ID)).Val(); n != 1 {
			t.Errorf("record %s, whose keys are all on masters that answer, not written", r.ID)
		}
	}
	t.Logf("%d of %d Puts whose keys are all on masters that answer failed", bad, up)
}
