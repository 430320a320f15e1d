package main

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// TestClusterResubscribeRefusedThenGranted: a master (not the inbox's,
// whose probes would notice) takes the egress's channels away (its ACL
// loses the channel rule): Redis drops the Pub/Sub connection, and
// go-redis's reconnect subscribes the channels again in one SSUBSCRIBE,
// which Redis refuses (NOPERM). Once the rule is back, the channels must
// be subscribed again, as a refused SSUBSCRIBE of the subscriber's own
// is, and the messages published from then on delivered; they were never
// sent again, and the socket got nothing more.
func TestClusterResubscribeRefusedThenGranted(t *testing.T) {
	c := redistest.StartOwnedCluster(t, 3, 0, "the test changes the ACL of a cluster's node")
	rdb := c.Client(t)
	e := startClusterEgress(t, rdb, c.AddrsEnv())
	s := e.srv.Config.Handler.(*Server)
	ctx := context.Background()
	inbox := inboxMaster(t, rdb, s).Options().Addr
	chans, owner := channelsOnEveryMaster(t, rdb, e.ks, 3, 1)
	var ch string
	for _, x := range chans {
		if owner[x] != inbox {
			ch = x
			break
		}
	}
	col := dialCollector(t, e.srv, []string{ch})
	acked := map[string][]string{}
	id, err := e.publish(ctx, ch, 0)
	if err != nil {
		t.Fatal(err)
	}
	acked[ch] = append(acked[ch], id)
	col.check(t, acked, 5*time.Second)

	node := masterAt(t, rdb, owner[ch])
	if err := node.Do(ctx, "ACL", "SETUSER", "default", "resetchannels").Err(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { node.Do(context.Background(), "ACL", "SETUSER", "default", "allchannels") })
	// Redis refuses the reconnected connection's SSUBSCRIBE.
	testkit.Eventually(t, 5*time.Second, func() error {
		n, err := node.Do(ctx, "ACL", "LOG").Slice()
		if err != nil {
			return err
		}
		if len(n) == 0 {
			return errors.New("no refusal in the ACL LOG yet")
		}
		return nil
	})
	if err := node.Do(ctx, "ACL", "SETUSER", "default", "allchannels").Err(); err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= 5; i++ {
		id, err := e.publish(ctx, ch, i)
		if err != nil {
			t.Fatal(err)
		}
		acked[ch] = append(acked[ch], id)
		time.Sleep(200 * time.Millisecond)
	}
	col.check(t, acked, 15*time.Second)
}
