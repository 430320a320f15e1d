package stream

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// marksConn writes a pipeline in parts: before the command holding each
// mark (in the order they appear), it runs that mark's hook, once per
// mark over every connection that shares marks.
type marksConn struct {
	net.Conn
	m *marks
}

type marks struct {
	mu    sync.Mutex
	marks [][]byte
	hooks []func()
}

func (c *marksConn) Write(p []byte) (int, error) {
	written := 0
	for {
		c.m.mu.Lock()
		at, which := -1, -1
		for i, mk := range c.m.marks {
			if mk == nil {
				continue
			}
			if j := bytes.Index(p, mk); j >= 0 && (at < 0 || j < at) {
				at, which = j, i
			}
		}
		var hook func()
		if which >= 0 {
			c.m.marks[which] = nil
			hook = c.m.hooks[which]
		}
		c.m.mu.Unlock()
		if which < 0 {
			n, err := c.Conn.Write(p)
			return written + n, err
		}
		cut := bytes.LastIndex(p[:at], []byte("\r\n*")) + 2 // the start of the mark's command
		n, err := c.Conn.Write(p[:cut])
		written += n
		if err != nil {
			return written, err
		}
		hook()
		p = p[cut:]
	}
}

// TestClusterBatchOrderAcrossSlotMove: one caller's appends to one
// stream, in one pipeline, while the stream's slot is migrated under
// it: the first runs on the source, the second meets the migration
// (TRYAGAIN or ASK: refused, nothing written) and the third arrives once the slot has
// moved (MOVED). docs/api.md promises that a batch's messages to one
// channel are appended in request order, and that a retry with the same
// Idempotency-Key (the same once-keys) makes a batch exactly-once. The
// third must therefore not be written before the second: after the
// retry the stream must read a, b, c.
func TestClusterBatchOrderAcrossSlotMove(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a Redis Cluster")
	}
	c := redistest.StartCluster(t, 3, 0)
	plain := c.Client(t)
	ctx := context.Background()
	ks := keys.Scheme{Prefix: redistest.Prefix(t)}
	st := ks.Stream("ord")
	slot := int(plain.ClusterKeySlot(ctx, st).Val())
	srcNode, err := plain.MasterForKey(ctx, st)
	if err != nil {
		t.Fatal(err)
	}
	src := srcNode.Options().Addr
	var dst string
	for _, a := range c.Addrs() {
		if a != src {
			dst = a // any other master (the cluster has no replicas)
		}
	}
	s := redis.NewClient(&redis.Options{Addr: src, DisableIdentity: true})
	defer s.Close()
	var move *redistest.SlotMove

	ap := func(i int, data string) Append {
		return Append{Stream: st, Notify: ks.Notify("ord"),
			Msg:    Message{Channel: "ord", TS: 1, Data: []byte(data)},
			Limits: Limits{MaxLen: 100, TTLMS: 60000}, Once: ks.Once(st, "digest", i), OnceTTLMS: 60000}
	}
	// The stream exists on its master before the batch.
	if _, err := NewStore(plain).Append(ctx, []Append{{Stream: st, Notify: ks.Notify("ord"),
		Msg: Message{Channel: "ord", TS: 1, Data: []byte(`"zero"`)}, Limits: Limits{MaxLen: 100, TTLMS: 60000}}}); err != nil {
		t.Fatal(err)
	}

	errorstat := func(rc *redis.Client, name string) bool {
		return strings.Contains(rc.Info(ctx, "errorstats").Val(), "errorstat_"+name+":")
	}
	mk := &marks{
		marks: [][]byte{[]byte(`"item-b"`), []byte(`"item-c"`)},
		hooks: []func(){
			func() { // a has run on src: the migration starts
				testkit.Eventually(t, 5*time.Second, func() error {
					if n := s.XLen(ctx, st).Val(); n != 2 {
						return fmt.Errorf("stream holds %d entries", n)
					}
					return nil
				})
				move = c.BeginSlotMove(t, slot, src, dst)
			},
			func() { // b was refused (ASK): the slot finishes moving
				testkit.Eventually(t, 5*time.Second, func() error {
					// Redis 7.0 answers TRYAGAIN on the source while some of
					// the script's keys are still there, ASK once none is.
					if !errorstat(s, "ASK") && !errorstat(s, "TRYAGAIN") {
						return fmt.Errorf("b has not been refused yet")
					}
					return nil
				})
				move.MigrateKeys(t)
				move.Finish(t)
			},
		},
	}
	rdb := redis.NewClusterClient(&redis.ClusterOptions{
		Addrs: c.Addrs(), DialTimeout: 500 * time.Millisecond, ReadTimeout: 10 * time.Second,
		WriteTimeout: 10 * time.Second, MaxRedirects: 8, DisableIdentity: true,
		Dialer: func(dctx context.Context, network, addr string) (net.Conn, error) {
			cn, err := (&net.Dialer{}).DialContext(dctx, network, addr)
			if err != nil {
				return nil, err
			}
			return &marksConn{Conn: cn, m: mk}, nil
		},
	})
	defer rdb.Close()
	store := NewStore(rdb)
	batch := []Append{ap(0, `"item-a"`), ap(1, `"item-b"`), ap(2, `"item-c"`)}

	ids1, errs1 := store.appendEach(ctx, batch)
	t.Logf("first attempt: ids %q, errs %v", ids1, errs1)
	if t.Failed() {
		t.FailNow()
	}
	// The publisher retries the batch with the same Idempotency-Key (the
	// same once-keys), until it is accepted.
	var ids []string
	testkit.Eventually(t, 10*time.Second, func() error {
		var err error
		ids, err = store.Append(ctx, batch)
		return err
	})
	msgs, err := move.Dst.XRange(ctx, st, "-", "+").Result()
	if err != nil {
		t.Fatal(err)
	}
	var order []string
	for _, e := range entriesOf(msgs) {
		dd, _ := e.Decode()
		order = append(order, string(dd.Data))
	}
	t.Logf("stream on the new master: %v; ids answered %v", order, ids)
	want := []string{`"zero"`, `"item-a"`, `"item-b"`, `"item-c"`}
	if strings.Join(order, " ") != strings.Join(want, " ") {
		t.Fatalf("the batch's messages to one channel were appended as %v, want %v (request order)", order, want)
	}
}
