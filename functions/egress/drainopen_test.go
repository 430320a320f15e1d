package main

import (
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/protocol"
	"github.com/wsrelay/wsrelay/shared/redistest"
)

// TestDrainDuringOpenSkipsSubscriptions: a socket whose setup was under
// way when the drain began is closed with 1001 like the others, and its
// ?channels= are not subscribed: each would cost Redis round trips (and,
// with Redis down, up to 5 s) for a socket already going.
func TestDrainDuringOpenSkipsSubscriptions(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	var armed atomic.Bool
	var joins atomic.Int32
	// The connect's registry write waits until the drain has begun.
	hold := redistest.NewHoldBefore(func(cmds []redis.Cmder) bool {
		if !armed.Load() {
			return false
		}
		for _, c := range cmds {
			if a := c.Args(); strings.EqualFold(c.Name(), "zadd") && len(a) > 1 && a[1] == ks.ChannelConns("a") {
				joins.Add(1)
			}
		}
		return isRecordWrite(cmds, prefix)
	})
	t.Cleanup(hold.Release)
	rdb.AddHook(hold)
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"})
	armed.Store(true)
	ws, _, err := e.dial(t, url.Values{"channels": {"a"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	select {
	case <-hold.Hit():
	case <-time.After(5 * time.Second):
		t.Fatal("the connect's registry write was not seen")
	}
	e.s.draining.Store(true) // as drain does first, after this socket's check
	hold.Release()
	_ = ws.SetReadDeadline(time.Now().Add(5 * time.Second))
	for {
		var r protocol.Reply
		err := ws.ReadJSON(&r)
		if ce, ok := err.(*websocket.CloseError); ok {
			if ce.Code != protocol.CloseGoingAway {
				t.Fatalf("closed with %d, want %d", ce.Code, protocol.CloseGoingAway)
			}
			break
		}
		if err != nil {
			t.Fatalf("waiting for the 1001: %v", err)
		}
		if r.Type == protocol.TypeSubscribed {
			t.Fatalf("channel %s subscribed on a socket closed by the drain", r.Channel)
		}
	}
	// Once the socket has ended on the server, anything it did is done.
	for deadline := time.Now().Add(5 * time.Second); len(e.s.hub.snapshotConns()) > 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the socket closed by the drain has not ended")
		}
	}
	if n := joins.Load(); n != 0 {
		t.Fatalf("%d registry joins of channel a for a socket closed by the drain", n)
	}
}
