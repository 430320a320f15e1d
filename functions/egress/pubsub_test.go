package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// silentProxy forwards TCP to target until silence: then it drops the
// connections it carries and accepts new ones without ever answering, as
// a node behind a network partition does (no refusal, no reply).
type silentProxy struct {
	ln     net.Listener
	silent atomic.Bool
	mu     sync.Mutex
	conns  []net.Conn
}

func newSilentProxy(t *testing.T, target string) *silentProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &silentProxy{ln: ln}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); p.drop(); wg.Wait() })
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			p.keep(c)
			if p.silent.Load() {
				continue // never read, never answer
			}
			u, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			p.keep(u)
			wg.Go(func() { _, _ = io.Copy(u, c); u.Close() })
			wg.Go(func() { _, _ = io.Copy(c, u); c.Close() })
		}
	})
	return p
}

func (p *silentProxy) keep(c net.Conn) {
	p.mu.Lock()
	p.conns = append(p.conns, c)
	p.mu.Unlock()
}

func (p *silentProxy) drop() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
}

// TestMoveOffSilentNode: when the node holding the subscriptions stops
// answering and its slots move, the channels are subscribed on the new
// owner, and a new Subscribe goes through, without waiting on the silent
// node (go-redis holds its connection's lock through each reconnect
// attempt: an unsubscribe from it made while placing stalled every
// placement for seconds per channel moved).
func TestMoveOffSilentNode(t *testing.T) {
	t.Parallel()
	o, err := redis.ParseURL(redistest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	p := newSilentProxy(t, o.Addr)
	var moved atomic.Bool
	cc := redis.NewClusterClient(&redis.ClusterOptions{
		// One "cluster" whose only master is reached through the proxy,
		// then, once moved, directly.
		ClusterSlots: func(context.Context) ([]redis.ClusterSlot, error) {
			addr := p.ln.Addr().String()
			if moved.Load() {
				addr = o.Addr
			}
			return []redis.ClusterSlot{{Start: 0, End: 16383, Nodes: []redis.ClusterNode{{Addr: addr}}}}, nil
		},
		DialTimeout: 2 * time.Second,
		ReadTimeout: 2 * time.Second,
	})
	defer cc.Close()
	s := newSubscriber(slog.New(slog.NewTextHandler(io.Discard, nil)), cc, nil)
	defer s.Close()

	var mu sync.Mutex
	confirms := map[string]int{}
	// The subscriber never closes its events: this reader ends with the
	// test.
	done := make(chan struct{})
	defer close(done)
	go func() {
		for {
			select {
			case ev := <-s.Events():
				if ev.confirmed {
					mu.Lock()
					confirms[ev.channel]++
					mu.Unlock()
				}
			case <-done:
				return
			}
		}
	}()
	waitConfirmed := func(chans []string, times int) {
		t.Helper()
		testkit.Eventually(t, 15*time.Second, func() error {
			mu.Lock()
			defer mu.Unlock()
			for _, ch := range chans {
				if confirms[ch] < times {
					return fmt.Errorf("%s confirmed %d times, want %d", ch, confirms[ch], times)
				}
			}
			return nil
		})
	}
	prefix := redistest.Prefix(t)
	var chans []string
	for i := range 10 {
		ch := fmt.Sprintf("%s{c:m%d}:n", prefix, i)
		chans = append(chans, ch)
		if err := s.Subscribe(t.Context(), ch); err != nil {
			t.Fatal(err)
		}
	}
	waitConfirmed(chans, 1)

	moved.Store(true)
	p.silent.Store(true)
	p.drop()
	// Each moved channel is confirmed again on the new owner, and a
	// channel subscribed meanwhile is confirmed there too.
	fresh := prefix + "{c:fresh}:n"
	if err := s.Subscribe(t.Context(), fresh); err != nil {
		t.Logf("subscribe %s: %v (the repair loop places it)", fresh, err)
	}
	waitConfirmed(chans, 2)
	waitConfirmed([]string{fresh}, 1)
}

// TestSilentNodeLogNamesIt: "redis subscription silent, reconnecting"
// names the node (docs/metrics.md, node) on a single Redis too, as the
// subscription's error and back lines do: there the node's key in the
// subscriber is "", and the line said "node":"".
func TestSilentNodeLogNamesIt(t *testing.T) {
	t.Parallel()
	s, rdb, logs := confirmedSubscriber(t, "silent")
	s.mu.Lock()
	for _, n := range s.nodes {
		n.lastRead.Store(mono(time.Now().Add(-2 * deadAfter)))
	}
	s.mu.Unlock()
	s.regroup(time.Now())
	var silent []map[string]any
	for _, r := range logs.JSONLines(t) {
		if r["msg"] == "redis subscription silent, reconnecting" {
			silent = append(silent, r)
		}
	}
	want := rdb.(*redis.Client).Options().Addr
	if len(silent) != 1 || silent[0]["node"] != want {
		t.Fatalf("silent lines %v, want one with node %q", silent, want)
	}
}

// TestMessageSlowToArrive: a message whose bytes come in two parts far
// apart (a large one, or one Redis was descheduled while writing) is
// read whole, once, on the same connection. Reads had a 1 s deadline,
// and go-redis cannot take up a reply where a read that timed out left
// it: the next read failed to parse the rest ("can't parse"), the
// connection was dropped and every channel on it subscribed again and
// caught up from its stream, the message itself lost to Pub/Sub.
func TestMessageSlowToArrive(t *testing.T) {
	t.Parallel()
	o, err := redis.ParseURL(redistest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	var split atomic.Bool // the first large read from Redis only
	o.Addr = testkit.Relay(t, o.Addr, func() (up, down testkit.Filter) {
		return nil, func(b []byte, to io.Writer) bool {
			if len(b) > 1000 && split.CompareAndSwap(false, true) {
				if _, err := to.Write(b[:500]); err != nil {
					return false
				}
				time.Sleep(1500 * time.Millisecond)
				b = b[500:]
			}
			_, err := to.Write(b)
			return err == nil
		}
	})
	rdb := redis.NewClient(o)
	defer rdb.Close()
	s := newSubscriber(slog.New(slog.NewTextHandler(io.Discard, nil)), rdb, nil)
	defer s.Close()
	ch := redistest.Prefix(t) + ":slow"
	if err := s.Subscribe(t.Context(), ch); err != nil {
		t.Fatal(err)
	}
	next := func(within time.Duration) (psEvent, bool) {
		select {
		case ev := <-s.Events():
			return ev, true
		case <-time.After(within):
			return psEvent{}, false
		}
	}
	if ev, ok := next(5 * time.Second); !ok || !ev.confirmed {
		t.Fatalf("no confirmation: %+v", ev)
	}
	direct, err := redis.ParseURL(redistest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	pub := redis.NewClient(direct)
	defer pub.Close()
	big := strings.Repeat("x", 64<<10)
	if err := pub.SPublish(t.Context(), ch, big).Err(); err != nil {
		t.Fatal(err)
	}
	ev, ok := next(10 * time.Second)
	if !ok || ev.confirmed || ev.payload != big {
		t.Fatalf("after a message slow to arrive: %v, confirmed %v, payload of %d bytes; want the message, whole", ok, ev.confirmed, len(ev.payload))
	}
	if ev, ok := next(2 * time.Second); ok {
		t.Fatalf("then %+v (a confirmation: the connection was replaced), want nothing", ev.confirmed)
	}
}

// confirmedSubscriber is a subscriber on the test's Redis, logging JSON
// to logs, with one channel ({c:name}, under the test's prefix)
// subscribed and confirmed; it is closed when the test ends.
func confirmedSubscriber(t *testing.T, name string) (s *subscriber, rdb redis.UniversalClient, logs *testkit.SyncBuffer) {
	t.Helper()
	rdb, prefix := redistest.Client(t)
	logs = &testkit.SyncBuffer{}
	s = newSubscriber(slog.New(slog.NewJSONHandler(logs, nil)), rdb, nil)
	t.Cleanup(func() { s.Close() })
	if err := s.Subscribe(t.Context(), prefix+"{c:"+name+"}:n"); err != nil {
		t.Fatal(err)
	}
	select {
	case ev := <-s.Events():
		if !ev.confirmed {
			t.Fatalf("first event %+v, want the confirmation", ev)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("subscription not confirmed")
	}
	return s, rdb, logs
}
