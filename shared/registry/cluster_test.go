package registry_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/registry"
)

// TestClusterRegistry writes, reads and removes records whose keys live
// on different slots of a real three-master Redis Cluster: every pipeline
// crosses nodes, and no command touches keys of two slots.
func TestClusterRegistry(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a Redis Cluster")
	}
	c := redistest.StartCluster(t, 3, 0)
	rdb := c.Client(t)
	ks := keys.Scheme{Prefix: redistest.Prefix(t)}
	t.Cleanup(func() { redistest.Cleanup(rdb, ks.Prefix) })
	reg := registry.New(rdb, ks, 5*time.Second)
	ctx := context.Background()

	var recs []*registry.Record
	for i := range 20 {
		recs = append(recs, &registry.Record{
			ID:          fmt.Sprintf("conn-%d", i),
			User:        fmt.Sprintf("user-%d", i%4),
			Instance:    "i1",
			Channels:    []string{fmt.Sprintf("room-%d", i%5), "lobby"},
			ConnectedAt: time.Now().UTC().Truncate(time.Millisecond),
		})
	}
	if err := reg.Refresh(ctx, recs); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		read func() ([]*registry.Record, error)
		want int
	}{
		{"lobby", func() ([]*registry.Record, error) { return reg.Channel(ctx, "lobby", 100) }, 20},
		{"room-3", func() ([]*registry.Record, error) { return reg.Channel(ctx, "room-3", 100) }, 4},
		{"user-1", func() ([]*registry.Record, error) { return reg.User(ctx, "user-1", 100) }, 5},
	} {
		got, err := tc.read()
		if err != nil || len(got) != tc.want {
			t.Fatalf("%s: %d records, %v; want %d", tc.name, len(got), err, tc.want)
		}
	}
	rec, err := reg.Get(ctx, "conn-7")
	if err != nil || rec.User != "user-3" || len(rec.Channels) != 2 {
		t.Fatalf("Get conn-7 = %+v, %v", rec, err)
	}
	for _, r := range recs[:10] {
		if err := reg.Remove(ctx, r); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := reg.Get(ctx, "conn-3"); !errors.Is(err, registry.ErrNotFound) {
		t.Fatalf("Get removed conn-3: %v, want ErrNotFound", err)
	}
	got, err := reg.Channel(ctx, "lobby", 100)
	if err != nil || len(got) != 10 {
		t.Fatalf("lobby after removing 10: %d records, %v", len(got), err)
	}
}
