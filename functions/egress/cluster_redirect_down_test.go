package main

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// TestClusterDownAfterRedirect: a reshard moves a subscribed channel's
// slot off a master where another, quiet, channel stays subscribed (the
// channel placed again with the slot map from before the move is
// answered MOVED there, not logged). That master then stops: its
// subscription's failure is logged as such at once, as for any node.
func TestClusterDownAfterRedirect(t *testing.T) {
	c := redistest.StartOwnedCluster(t, 3, 0, "the test cannot stop its nodes")
	rdb := c.Client(t)
	e := startClusterEgress(t, rdb, c.AddrsEnv())
	ctx := context.Background()
	chans, owner := channelsOnEveryMaster(t, rdb, e.ks, 3, 2)
	moved := chans[0]
	src := owner[moved]
	var quiet, other string
	for _, ch := range chans[1:] {
		if owner[ch] == src && quiet == "" {
			quiet = ch
		} else if owner[ch] != src && other == "" {
			other = ch
		}
	}
	slot := int(rdb.ClusterKeySlot(ctx, e.ks.Stream(moved)).Val())
	if int(rdb.ClusterKeySlot(ctx, e.ks.Stream(quiet)).Val()) == slot {
		t.Skip("same slot")
	}
	dst := owner[other]
	_ = dialCollector(t, e.srv, chans)
	publishAcross(t, e, []string{moved}, moved, func() { c.MoveSlot(t, slot, src, dst) })
	noWarnings(t, e.logs) // the reshard is routine
	c.StopNode(t, c.Index(src))
	stopped := time.Now()
	testkit.Eventually(t, 8*time.Second, func() error {
		for _, l := range e.logs.JSONLines(t) {
			if l["msg"] == "redis subscription error" && l["node"] == src {
				t.Logf("logged %v after the stop: %v", time.Since(stopped).Round(time.Millisecond), l["err"])
				return nil
			}
		}
		return fmt.Errorf("the stop of %s (subscribed to %s) not logged", src, quiet)
	})
}
