package main

import (
	"net/url"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/protocol"
	"github.com/wsrelay/wsrelay/shared/redistest"
)

// TestTimersStartAtWelcome: a connection whose registration waits on
// Redis (a storm's shared pipelines, a slow Redis) gets its welcome, and
// its idle and silence timers start with it: IDLE_TIMEOUT counts from the
// welcome, its first data frame (docs/protocol.md, Timeouts), and the
// client is not dropped for missing a ping that waited behind the
// welcome. Counted from the upgrade, the registration's wait was idle
// time (closed 4000 that much less than IDLE_TIMEOUT after the welcome)
// and, past 2×PING_INTERVAL, silence: the socket was cut ("missed pong")
// before its welcome was sent.
func TestTimersStartAtWelcome(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name       string
		idle, ping time.Duration
		held       time.Duration // the registry write's wait
	}{
		{"registration shorter than IDLE_TIMEOUT", 2 * time.Second, 25 * time.Second, 1500 * time.Millisecond},
		{"registration longer than IDLE_TIMEOUT and 2×PING_INTERVAL", time.Second, 300 * time.Millisecond, 1500 * time.Millisecond},
		// The sweep every second (PING_INTERVAL's default): one ran in
		// the wait, which closed the socket 4000 before its welcome.
		{"registration longer than IDLE_TIMEOUT and a sweep", time.Second, 25 * time.Second, 2500 * time.Millisecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			rdb, prefix := redistest.Client(t)
			hold := redistest.NewHoldBefore(func(cmds []redis.Cmder) bool { return isRecordWrite(cmds, prefix) })
			t.Cleanup(hold.Release)
			rdb.AddHook(hold)
			e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true",
				"IDLE_TIMEOUT": tc.idle.String(), "PING_INTERVAL": tc.ping.String(), "REDIS_TIMEOUT": "5s"})
			<-e.s.hub.inbox.ready
			ws, _, err := e.dial(t, url.Values{}, nil)
			if err != nil {
				t.Fatal(err)
			}
			select {
			case <-hold.Hit():
			case <-time.After(5 * time.Second):
				t.Fatal("the connection's registry write was not seen")
			}
			time.Sleep(tc.held)
			hold.Release()
			next(t, ws, protocol.TypeWelcome)
			welcomed := time.Now()
			// Read on (gorilla answers the pings within the read), sending
			// nothing: idle from the welcome on.
			code := closeCode(t, ws, tc.idle+5*time.Second)
			if after := time.Since(welcomed); code != protocol.CloseIdleTimeout || after < tc.idle-100*time.Millisecond {
				t.Fatalf("closed %d %v after the welcome, want %d no sooner than IDLE_TIMEOUT %v", code, after.Round(time.Millisecond), protocol.CloseIdleTimeout, tc.idle)
			}
		})
	}
}
