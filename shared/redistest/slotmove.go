package redistest

import (
	"context"
	"net"
	"testing"

	"github.com/redis/go-redis/v9"
)

// SlotMove is a slot on its way from one master to another, moved as
// redis-cli --cluster reshard moves it, in steps that a test can put
// traffic between: Cluster.BeginSlotMove marks it importing on the
// target and migrating on the source, MigrateKeys moves its keys, and
// Finish gives it to the target on every master. Cluster.MoveSlot does
// all three.
type SlotMove struct {
	c            *Cluster
	Slot         int
	Src, Dst     *redis.Client // the two masters' clients, closed at the end of the test
	srcID, dstID string
}

// BeginSlotMove starts moving slot from the master at src to the one at
// dst: from then on, until Finish, Redis refuses the commands on the
// slot's keys that the source cannot serve alone (ASK, TRYAGAIN).
func (c *Cluster) BeginSlotMove(t testing.TB, slot int, src, dst string) *SlotMove {
	t.Helper()
	ctx := context.Background()
	m := &SlotMove{c: c, Slot: slot, Src: c.nodeClient(t, src), Dst: c.nodeClient(t, dst)}
	var err error
	if m.srcID, err = m.Src.ClusterMyID(ctx).Result(); err != nil {
		t.Fatalf("redistest: CLUSTER MYID of %s: %v", src, err)
	}
	if m.dstID, err = m.Dst.ClusterMyID(ctx).Result(); err != nil {
		t.Fatalf("redistest: CLUSTER MYID of %s: %v", dst, err)
	}
	m.must(t, m.Dst.Do(ctx, "CLUSTER", "SETSLOT", slot, "IMPORTING", m.srcID).Err())
	m.must(t, m.Src.Do(ctx, "CLUSTER", "SETSLOT", slot, "MIGRATING", m.dstID).Err())
	return m
}

// BeginKeySlotMove starts moving the slot of key from its master to
// another master of the cluster (BeginSlotMove).
func (c *Cluster) BeginKeySlotMove(t testing.TB, key string) *SlotMove {
	t.Helper()
	ctx := context.Background()
	cc := c.Client(t)
	slot, err := cc.ClusterKeySlot(ctx, key).Result()
	if err != nil {
		t.Fatalf("redistest: CLUSTER KEYSLOT %s: %v", key, err)
	}
	owner, err := cc.MasterForKey(ctx, key)
	if err != nil {
		t.Fatalf("redistest: the master of %s: %v", key, err)
	}
	src := owner.Options().Addr
	masters, err := slotOwners(ctx, c.nodeClient(t, src))
	if err != nil {
		t.Fatalf("redistest: CLUSTER SHARDS: %v", err)
	}
	for dst := range masters {
		if dst != src {
			return c.BeginSlotMove(t, int(slot), src, dst)
		}
	}
	t.Fatalf("redistest: no master but %s to move slot %d to", src, slot)
	return nil
}

// MigrateKeys moves every key of the slot to the target, 100 to a
// MIGRATE.
func (m *SlotMove) MigrateKeys(t testing.TB) {
	t.Helper()
	ctx := context.Background()
	host, port, _ := net.SplitHostPort(m.Dst.Options().Addr)
	for {
		keys, err := m.Src.ClusterGetKeysInSlot(ctx, m.Slot, 100).Result()
		m.must(t, err)
		if len(keys) == 0 {
			return
		}
		args := []any{"MIGRATE", host, port, "", 0, 5000, "KEYS"}
		for _, k := range keys {
			args = append(args, k)
		}
		m.must(t, m.Src.Do(ctx, args...).Err())
	}
}

// Finish gives the slot to the target: on the target, then the source,
// then the other masters, which would otherwise learn it through the
// cluster bus a little later.
func (m *SlotMove) Finish(t testing.TB) {
	t.Helper()
	ctx := context.Background()
	m.must(t, m.Dst.Do(ctx, "CLUSTER", "SETSLOT", m.Slot, "NODE", m.dstID).Err())
	m.must(t, m.Src.Do(ctx, "CLUSTER", "SETSLOT", m.Slot, "NODE", m.dstID).Err())
	src, dst := m.Src.Options().Addr, m.Dst.Options().Addr
	for _, a := range m.c.addrs {
		if a != src && a != dst {
			_ = m.c.nodeClient(t, a).Do(ctx, "CLUSTER", "SETSLOT", m.Slot, "NODE", m.dstID).Err()
		}
	}
}

// MoveSlot moves slot, and its keys, from the master at src to the one
// at dst.
func (c *Cluster) MoveSlot(t testing.TB, slot int, src, dst string) *SlotMove {
	t.Helper()
	m := c.BeginSlotMove(t, slot, src, dst)
	m.MigrateKeys(t)
	m.Finish(t)
	return m
}

func (m *SlotMove) must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatalf("redistest: moving slot %d: %v", m.Slot, err)
	}
}

// nodeClient is a client of the node at addr, closed at the end of the
// test.
func (c *Cluster) nodeClient(t testing.TB, addr string) *redis.Client {
	rc := redis.NewClient(c.nodeOptions(addr))
	t.Cleanup(func() { rc.Close() })
	return rc
}
