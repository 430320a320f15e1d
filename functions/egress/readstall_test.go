package main

import (
	"context"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/redisconn"
	"github.com/wsrelay/wsrelay/shared/redistest"
)

// probeHook runs at, before its command, the first probe (SPUBLISH) the
// instance sends, and cancels the maintenance loop once Redis took it:
// the loop ends after that tick, its read-path check included.
type probeHook struct {
	once   sync.Once
	at     func()
	cancel context.CancelFunc
}

func (h *probeHook) DialHook(next redis.DialHook) redis.DialHook { return next }
func (h *probeHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}
func (h *probeHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if cmd.Name() != "spublish" {
			return next(ctx, cmd)
		}
		first := false
		h.once.Do(func() { first = true })
		if first {
			h.at()
		}
		err := next(ctx, cmd)
		if first {
			h.cancel()
		}
		return err
	}
}

// TestReadPathSilenceAfterStall: an instance that did not run (on SCF,
// frozen between invocations; SIGSTOP, a VM stall) got no probe back
// meanwhile because it sent none. The first check after it must not
// take that for a dead read path: no "redis read path silent" warning,
// no resubscribe of every channel, as for the pings (sweepConns). A
// silence of as long while the instance ran still is one.
func TestReadPathSilenceAfterStall(t *testing.T) {
	for _, tc := range []struct {
		name    string
		stalled bool
		want    int64 // resubscribes
	}{
		{"frozen", true, 0},
		{"running", false, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rdb, prefix := redistest.Client(t)
			log := slog.New(slog.NewTextHandler(io.Discard, nil))
			// Probes every 10 s: the read path is silent after 40 s.
			cfg := Config{RegistryTTL: time.Minute, SendQueue: 16, WriteTimeout: time.Second, PingInterval: 25 * time.Second,
				ProbeInterval: 10 * time.Second, ShutdownGrace: time.Second, Redis: redisconn.Config{KeyPrefix: prefix, Timeout: time.Second}}
			s := NewServer(cfg, log, rdb)
			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			rdb.AddHook(&probeHook{cancel: cancel, at: func() {
				// The last probe came back a minute ago; the sweep last
				// ran then too when the instance was frozen since.
				s.hub.lastRecv.Store(monoNow() - int64(61*time.Second))
				if tc.stalled {
					s.sweptAt.Store(s.clock() - int64(60*time.Second))
				} else {
					s.sweptAt.Store(s.clock())
				}
			}})
			s.maintain(ctx) // its first tick probes, then it ends
			if n := s.hub.reconnects.Load(); n != tc.want {
				t.Fatalf("%d resubscribes, want %d", n, tc.want)
			}
		})
	}
}
