package main

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/protocol"

	"github.com/wsrelay/wsrelay/shared/redistest"
)

// TestRedisBlackholeKeepsSockets: Redis becomes unreachable without a
// refusal (a network partition: dials time out, open connections go
// silent) for a few seconds, with a client on a dozen channels that
// answers every ping. The egress keeps pinging it and keeps it, as it
// does when Redis refuses connections: re-subscribing its channels
// (a dial timeout each) held up the loop that pings, and the client,
// never pinged, was dropped for a missed pong as soon as Redis was back.
func TestRedisBlackholeKeepsSockets(t *testing.T) {
	ws, partition, _ := blackholeEgress(t)
	var pings atomic.Int64
	ws.SetPingHandler(func(data string) error {
		pings.Add(1)
		return ws.WriteControl(websocket.PongMessage, []byte(data), time.Now().Add(time.Second))
	})
	closed := make(chan error, 1)
	go func() {
		for {
			_ = ws.SetReadDeadline(time.Now().Add(time.Minute))
			if _, _, err := ws.ReadMessage(); err != nil {
				closed <- err
				return
			}
		}
	}()
	partition(true)
	time.Sleep(6 * time.Second)
	during := pings.Load()
	partition(false)
	// The first sweep after the partition must not drop it.
	select {
	case err := <-closed:
		t.Fatalf("the socket was closed (%v) after a 6s partition; %d pings during it", err, during)
	case <-time.After(3 * time.Second):
	}
	if during == 0 {
		t.Fatal("no ping during the partition")
	}
	t.Logf("%d pings during the partition", during)
}

// blackholeEgress starts an egress whose Redis can be made unreachable
// without a refusal (a network partition: dials time out, open
// connections go silent), and a client subscribed to a dozen channels.
func blackholeEgress(t *testing.T, vars ...string) (ws *websocket.Conn, partition func(on bool), stop func()) {
	t.Helper()
	o, err := redis.ParseURL(redistest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	p := newSilentProxy(t, o.Addr)
	var blackhole atomic.Bool
	rdb := redis.NewClient(&redis.Options{
		Addr: p.ln.Addr().String(),
		Dialer: func(ctx context.Context, network, addr string) (net.Conn, error) {
			if blackhole.Load() {
				// SYNs dropped: the dial times out (DialTimeout, as
				// go-redis's own dialer, net.Dialer{Timeout}, does).
				select {
				case <-ctx.Done():
					return nil, ctx.Err()
				case <-time.After(time.Second):
					return nil, &net.OpError{Op: "dial", Net: network, Err: os.ErrDeadlineExceeded}
				}
			}
			var d net.Dialer
			return d.DialContext(ctx, network, addr)
		},
		DialTimeout: time.Second, ReadTimeout: time.Second, WriteTimeout: time.Second,
		ContextTimeoutEnabled: true, DisableIdentity: true, MaxRetries: 1, DialerRetries: 1,
	})
	t.Cleanup(func() { rdb.Close() })
	prefix := redistest.Prefix(t)
	env := map[string]string{"ALLOW_ANONYMOUS": "true", "PING_INTERVAL": "1s", "PROBE_INTERVAL": "200ms", "REDIS_TIMEOUT": "1s", "SHUTDOWN_GRACE": "1s"}
	for i := 0; i+1 < len(vars); i += 2 {
		env[vars[i]] = vars[i+1]
	}
	e := startEgressOn(t, rdb, prefix, env)
	srv, stop := e.srv, e.stop
	var chans []string
	for i := range 12 {
		chans = append(chans, fmt.Sprintf("bh-%d", i))
	}
	ws, _, err = websocket.DefaultDialer.Dial("ws"+strings.TrimPrefix(srv.URL, "http")+"/ws?"+url.Values{"channels": {strings.Join(chans, ",")}}.Encode(), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ws.Close() })
	for range chans {
		next(t, ws, "subscribed")
	}
	partition = func(on bool) {
		blackhole.Store(on)
		p.silent.Store(on)
		if on {
			p.drop()
		}
	}
	return ws, partition, stop
}

// TestShutdownDuringBlackhole: SIGTERM while Redis is unreachable without
// a refusal ends within SHUTDOWN_GRACE + REDIS_TIMEOUT + 1s (and a
// little): the platform waits only so long before it kills the process.
func TestShutdownDuringBlackhole(t *testing.T) {
	_, partition, stop := blackholeEgress(t)
	partition(true)
	defer partition(false)
	time.Sleep(3 * time.Second) // the read path is found silent, re-subscribing begins
	start := time.Now()
	stop()
	if d := time.Since(start); d > 4*time.Second {
		t.Fatalf("shutdown took %s with SHUTDOWN_GRACE=1s and REDIS_TIMEOUT=1s", d.Round(time.Millisecond))
	}
}

// TestSubscribeDuringBlackhole: a subscribe to a new channel while Redis
// is unreachable without a refusal is answered "unavailable" within the
// 5 s the egress gives a subscription to go live, and the socket stays.
func TestSubscribeDuringBlackhole(t *testing.T) {
	ws, partition, _ := blackholeEgress(t, "PING_INTERVAL", "10s")
	partition(true)
	defer partition(false)
	time.Sleep(2 * time.Second) // the read path is found silent, re-subscribing begins
	start := time.Now()
	send(t, ws, map[string]any{"type": "subscribe", "channel": "bh-new"})
	_ = ws.SetReadDeadline(time.Now().Add(30 * time.Second))
	for {
		var r struct{ Type, Code string }
		if err := ws.ReadJSON(&r); err != nil {
			t.Fatalf("after %s: %v", time.Since(start).Round(time.Millisecond), err)
		}
		if r.Type == "error" || r.Type == "subscribed" {
			if d := time.Since(start); d > 7*time.Second {
				t.Fatalf("%s %s after %s, want it within ~5s", r.Type, r.Code, d.Round(time.Millisecond))
			}
			return
		}
	}
}

// TestBatchDuringBlackholeKeepsSocket: a frame of subscribes to new
// channels while Redis is unreachable without a refusal takes ~5 s per
// request (each "unavailable"), longer in all than 2×PING_INTERVAL. Sent
// one per frame, each read would show the client alive; sent in one
// frame, the requests must count the same, and the client (which
// answers every ping) is kept, not dropped for a missed pong.
func TestBatchDuringBlackholeKeepsSocket(t *testing.T) {
	ws, partition, _ := blackholeEgress(t, "PING_INTERVAL", "4s")
	partition(true)
	defer partition(false)
	time.Sleep(2 * time.Second) // the read path is found silent, re-subscribing begins
	sendRaw(t, ws, `{"type":"subscribe","channel":"bh-new-1","ref":1}`+"\n"+`{"type":"subscribe","channel":"bh-new-2","ref":2}`+"\n"+`{"type":"subscribe","channel":"bh-new-3","ref":3}`)
	start := time.Now()
	for want := 1; want <= 3; {
		_ = ws.SetReadDeadline(time.Now().Add(30 * time.Second))
		var r protocol.Reply
		if err := ws.ReadJSON(&r); err != nil {
			t.Fatalf("after %s, waiting for the answer to request %d of 3: %v", time.Since(start).Round(time.Millisecond), want, err)
		}
		if r.Type == protocol.TypeError || r.Type == protocol.TypeSubscribed {
			if string(r.Ref) != strconv.Itoa(want) {
				t.Fatalf("%+v, want the answer to request %d", r, want)
			}
			want++
		}
	}
}
