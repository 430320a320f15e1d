package main

import (
	"context"
	"io"
	"log/slog"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/redisconn"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/registry"
)

// freezeHook emulates a process that stops right after Redis took its
// first pipeline: the clock jumps by d, all of it a stall, and the
// records expire meanwhile.
type freezeHook struct {
	done   atomic.Bool
	freeze func(cmds []redis.Cmder)
}

func (h *freezeHook) DialHook(next redis.DialHook) redis.DialHook { return next }
func (h *freezeHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return next
}
func (h *freezeHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		err := next(ctx, cmds)
		if h.done.CompareAndSwap(false, true) {
			h.freeze(cmds)
		}
		return err
	}
}

// TestFreezeDuringRefresh: a stall that begins while a refresh is under
// way (after its closeLapsed, during or between its batches) lets the
// records expire all the same. The batches written after it must not
// write expired records back, and a batch Redis took before it must not
// count from its reply, read after the stall.
func TestFreezeDuringRefresh(t *testing.T) {
	rdb, prefix := redistest.Client(t)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	cfg := Config{RegistryTTL: 60 * time.Second, SendQueue: 16, WriteTimeout: time.Second, PingInterval: time.Hour,
		ShutdownGrace: time.Second, Redis: redisconn.Config{KeyPrefix: prefix, Timeout: time.Second}}
	s := NewServer(cfg, log, rdb)
	s.refreshBatch = 1
	var cs []*conn
	for _, id := range []string{"a", "b"} {
		server, client := tcpPair(t)
		c := &conn{s: s, nc: server, id: id, done: make(chan struct{}), openedAt: time.Now()}
		c.fr.init(server, 1<<16)
		c.rec = registry.Record{ID: id, Instance: s.instance}
		if err := s.reg.Put(t.Context(), c.recordCopy()); err != nil {
			t.Fatal(err)
		}
		c.regTry.Store(s.clock())
		c.listed.Store(true)
		s.hub.addConn(c)
		cs = append(cs, c)
		t.Cleanup(func() {
			_ = client.Close()
			_ = server.Close()
			c.unlisting.Wait()
			c.writers.Wait()
		})
	}
	// The refresh takes the connections in no set order: a is the one
	// whose batch Redis took before the stall, b the other.
	var a, b *conn
	rdb.AddHook(&freezeHook{freeze: func(cmds []redis.Cmder) {
		a, b = cs[0], cs[1]
		// The batch's first command writes its record (SET key …).
		if args := cmds[0].Args(); len(args) > 1 && args[1] == s.hub.keys.Conn(b.id) {
			a, b = b, a
		}
		s.epoch = s.epoch.Add(-70 * time.Second) // same goroutine: no Run here
		s.stalled.Add(int64(69 * time.Second))
		for _, c := range cs {
			rdb.Del(context.Background(), s.hub.keys.Conn(c.id))
		}
	}})
	if err := s.refreshRegistry(t.Context()); err != nil {
		t.Fatal(err)
	}
	if a == nil {
		t.Fatal("the refresh wrote nothing")
	}
	if !b.closeStarted.Load() {
		n, _ := rdb.Exists(t.Context(), s.hub.keys.Conn(b.id)).Result()
		t.Errorf("b, whose record expired during the stall before its batch, was not closed (record written back: %v)", n == 1)
	}
	if !s.lapsed(a, s.clock()) {
		t.Errorf("a, whose batch Redis took before the stall, is not lapsed: its try counts from the reply after the stall")
	}
}
