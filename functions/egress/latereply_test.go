package main

import (
	"context"
	"fmt"
	"maps"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/wsrelay/wsrelay/shared/client"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/stream"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// Tests of ONE Redis reply that comes later than REDIS_TIMEOUT (Redis ran
// the command; its reply is too late for the client) on each of the
// egress's Redis paths. go-redis sends no command again after a late
// reply (redisconn.New), so each path's own schedule must make up for
// it: the hub's stalled reads retried with backoff, the registry
// refresh every REGISTRY_TTL / 3, the probe every PROBE_INTERVAL, the
// subscriber's SSUBSCRIBE sent again after confirmWait (and the Pub/Sub
// connection replaced after 4 × PROBE_INTERVAL of silence), the
// readiness check's PING made again after 500 ms, and the client
// resuming after an unavailable error or a close.

// lateHold is how much later than it came the held reply reaches the
// egress: past its 300 ms REDIS_TIMEOUT.
const lateHold = time.Second

// startLateEnv is startLossEnv (more settings on top) with the egress's
// Redis client behind a ReplyDropper and a 300 ms REDIS_TIMEOUT; the
// test's own client (le.pub) bypasses the relay. arm, when not nil,
// arms the relay before the egress starts.
func startLateEnv(t *testing.T, more map[string]string, arm func(*testkit.ReplyDropper)) (*lossEnv, *testkit.ReplyDropper) {
	t.Helper()
	srv := redistest.Start(t)
	relay := testkit.NewReplyDropper(t, srv.Addr())
	if arm != nil {
		arm(relay)
	}
	env := map[string]string{"REDIS_URL": "redis://" + relay.Addr, "REDIS_TIMEOUT": "300ms"}
	maps.Copy(env, more)
	return startLossEnv(t, srv, env), relay
}

// respArgs is args as a command's RESP bulk strings, in a row: a marker
// that only the chunk of a command with these arguments holds.
func respArgs(args ...string) string {
	var b strings.Builder
	for _, a := range args {
		fmt.Fprintf(&b, "$%d\r\n%s\r\n", len(a), a)
	}
	return b.String()
}

// held waits until the relay has held n replies in all.
func held(t *testing.T, relay *testkit.ReplyDropper, n int) {
	t.Helper()
	testkit.Eventually(t, 5*time.Second, func() error {
		if d := relay.Dropped(); d != n {
			return fmt.Errorf("%d replies held, want %d", d, n)
		}
		return nil
	})
}

// welcomed waits until g's socket has been welcomed: its connection is
// registered, and messages to its user reach it.
func welcomed(t *testing.T, g *goClient) {
	t.Helper()
	testkit.Eventually(t, 5*time.Second, func() error {
		if g.c.State() != client.StateConnected {
			return fmt.Errorf("client %v", g.c.State())
		}
		return nil
	})
}

// loggedOp fails t unless the egress logged msg for op (its "op"
// attribute): the path the late reply was on failed, as meant.
func loggedOp(t *testing.T, le *lossEnv, msg, op string) {
	t.Helper()
	for _, l := range le.log.Lines(t, msg) {
		if l["op"] == op {
			return
		}
	}
	t.Errorf("no %q line for op %q: the late reply was not on that path; log:\n%s", msg, op, le.log.String())
}

// TestLateReplyCatchUp: the hub's read of a channel's stream, catching
// up on what its notifications did not bring, gets its reply late: after
// a lost notification (the next one names a predecessor the hub has not
// delivered), and after its Pub/Sub connection came back (Redis confirms
// the subscription again). The read stalls and is retried: the messages
// it was to read arrive with nothing published after them (round 1),
// and a message published while the reply is held arrives too (round
// 2). The client gets every message once and in order, on the socket
// it had.
func TestLateReplyCatchUp(t *testing.T) {
	t.Parallel()
	for _, tc := range []string{"notification lost", "pubsub reconnected"} {
		t.Run(tc, func(t *testing.T) {
			t.Parallel()
			le, relay := startLateEnv(t, map[string]string{}, nil)
			g := newGoClient(t, le.wsURL(), "", "room", "")
			last := le.publish("room", 1)
			want := strs(1)
			g.waitData(5*time.Second, want...)
			// add appends the next message, its notification lost when
			// lost; it returns its id.
			add := func(lost bool) string {
				want = append(want, strconv.Itoa(len(want)+1))
				if lost {
					return appendTo(t, le.pub, le.ks, "room", le.ks.Notify("room")+"-lost", len(want))
				}
				return le.publish("room", len(want))
			}
			for round := 1; round <= 2; round++ {
				relay.ArmHold(respArgs("xrange", le.ks.Stream("room"), last), lateHold)
				last = add(true)
				switch tc {
				case "notification lost":
					last = add(false) // names the one lost
				case "pubsub reconnected":
					if err := le.pub.Do(t.Context(), "CLIENT", "KILL", "TYPE", "pubsub").Err(); err != nil {
						t.Fatal(err)
					}
				}
				held(t, relay, round)
				if round == 2 {
					last = add(false) // while the reply is held
				}
				g.waitData(5*time.Second, want...)
			}
			add(false)
			g.waitData(5*time.Second, want...)
			g.neverCut()
			loggedOp(t, le, "redis read path failing", "catch up from stream")
			if got := g.subscribed(); fmt.Sprint(got) != "[true]" {
				t.Errorf("subscribed %v, want once, [true]", got)
			}
		})
	}
}

// TestLateReplyInboxCatchUp: the hub's read of its inbox's stream,
// catching up after a lost notification, gets its reply late. The read
// stalls and is retried: the messages to the user it was to read reach
// its connection with nothing sent after them (round 1), and so does a
// message sent while the reply is held (round 2); each once, in order.
func TestLateReplyInboxCatchUp(t *testing.T) {
	t.Parallel()
	le, relay := startLateEnv(t, map[string]string{"INSTANCE_ID": "late3"}, nil)
	g := newGoClient(t, le.wsURL(), "alice", "", "")
	welcomed(t, g)
	to := stream.ToUser("alice")
	last := appendInbox(t, le.pub, le.ks, "late3", to, 1)
	want := strs(1)
	g.waitTargeted(5*time.Second, want...)
	add := func(lost bool) string {
		want = append(want, strconv.Itoa(len(want)+1))
		if lost {
			return appendLost(t, le.pub, le.ks, "late3", "", to, []byte(want[len(want)-1]), 1)[0]
		}
		return appendInbox(t, le.pub, le.ks, "late3", to, len(want))
	}
	for round := 1; round <= 2; round++ {
		relay.ArmHold(respArgs("xrange", le.ks.Inbox("late3"), last), lateHold)
		add(true)
		last = add(false) // names the one lost
		held(t, relay, round)
		if round == 2 {
			last = add(false) // while the reply is held
		}
		g.waitTargeted(5*time.Second, want...)
	}
	add(false)
	g.waitTargeted(5*time.Second, want...)
	time.Sleep(200 * time.Millisecond) // a duplicate would arrive now
	if got := g.targetedData(); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("targeted %v, want %v once", got, want)
	}
	g.neverCut()
	loggedOp(t, le, "redis read path failing", "catch up from stream")
}

// TestLateReplyClientResume: a client resuming a channel has one of its
// replay's stream reads answered late: the first (the subscribe is
// answered unavailable) or a later batch (the socket is closed 1011).
// The client resumes again from the last message it got, and gets every
// message, those published while the reply was held included, once and
// in order, each resume recovered.
func TestLateReplyClientResume(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		batch int // the replay's read (0: the first) whose reply is late
	}{{"first read", 0}, {"second batch", 1}} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			le, relay := startLateEnv(t, map[string]string{}, nil)
			after := le.publish("room", 0)
			n := replayBatch + replayBatch/2
			var ids []string
			var want []string
			for i := 1; i <= n; i++ {
				ids = append(ids, le.publish("room", i))
				want = append(want, strconv.Itoa(i))
			}
			from := after
			if tc.batch > 0 {
				from = ids[tc.batch*replayBatch-1]
			}
			relay.ArmHold(respArgs("xrange", le.ks.Stream("room"), from), lateHold)
			g := newGoClient(t, le.wsURL(), "", "room", after)
			held(t, relay, 1)
			le.publish("room", n+1)
			want = append(want, strconv.Itoa(n+1))
			g.waitData(10*time.Second, want...)
			g.mu.Lock()
			states := fmt.Sprint(g.states)
			g.mu.Unlock()
			if states == "[connecting connected]" {
				t.Errorf("client states %s: the late read did not make it resume again", states)
			}
			for _, rec := range g.subscribed() {
				if !rec {
					t.Errorf("subscribed %v, want each recovered", g.subscribed())
					break
				}
			}
		})
	}
}

// subscribeHeld connects to le subscribed to "room" with the relay
// armed on a command of that subscription, waits for the held reply,
// and publishes a message meanwhile: the socket is told the position of
// that message (the last one before `after`, what the held reply waited
// for), then gets each message published after it once, in order, on
// the same socket.
func subscribeHeld(t *testing.T, le *lossEnv, relay *testkit.ReplyDropper, after string) {
	t.Helper()
	ws, _, err := le.e.dial(t, url.Values{"channels": {"room"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	held(t, relay, 1)
	mid := le.publish("room", 1)
	if sub := nextWithin(t, ws, "subscribed", 5*time.Second); sub.Position != mid {
		t.Fatalf("subscribed at %s, want %s (the last message before %s)", sub.Position, mid, after)
	}
	var want []string
	for i := 2; i <= 4; i++ {
		want = append(want, le.publish("room", i))
	}
	if got, code := readThrough(ws, 5*time.Second, want[len(want)-1]); fmt.Sprint(got) != fmt.Sprint(want) || code != 0 {
		t.Fatalf("got %v (close %d), want %v", got, code, want)
	}
}

// TestLateReplyPositionRead: the read of a channel's position, when
// Redis first confirms its subscription, gets its reply late. The
// channel still goes live: the read is retried, the subscriber is told
// the position it read, which the message published while the reply
// was held is at, and gets each message after it once.
func TestLateReplyPositionRead(t *testing.T) {
	t.Parallel()
	le, relay := startLateEnv(t, map[string]string{}, nil)
	relay.ArmHold(respArgs("xrevrange", le.ks.Stream("room")), lateHold)
	subscribeHeld(t, le, relay, "the position was read again")
	loggedOp(t, le, "redis read path failing", "read stream position")
}

// TestLateReplyRegistryRefresh: a registry refresh gets its reply late
// (Redis wrote the records). The next refresh, REGISTRY_TTL / 3 later,
// rewrites them before they expire: the record, watched from the
// connection's registration on, never goes missing (nor has the probe
// to find it gone and have it written again), and messages to the
// connection's user, sent while the reply is held and after, reach it.
func TestLateReplyRegistryRefresh(t *testing.T) {
	t.Parallel()
	le, relay := startLateEnv(t, map[string]string{"REGISTRY_TTL": "3s"}, nil)
	g := newGoClient(t, le.wsURL(), "alice", "room", "")
	conns := le.e.s.hub.snapshotConns()
	if len(conns) != 1 {
		t.Fatalf("%d connections, want 1", len(conns))
	}
	key := le.ks.Conn(conns[0].id)
	relay.ArmHold(respArgs("set", key), lateHold)
	// The record's TTL runs down until a refresh raises it. Raised twice
	// once the late one is held (which may have raised it before): by a
	// refresh after the late one at least.
	prev, raised, sent := time.Duration(-1), 0, false
	testkit.Eventually(t, 10*time.Second, func() error {
		ttl, err := le.pub.PTTL(context.Background(), key).Result()
		if err != nil {
			t.Fatal(err)
		}
		if ttl < 0 {
			t.Fatalf("the record of the connection is gone (PTTL %v); %d refreshes seen, the late one held: %v", ttl, raised, relay.Dropped() == 1)
		}
		if prev >= 0 && ttl > prev && relay.Dropped() == 1 {
			raised++
		}
		prev = ttl
		if relay.Dropped() == 1 && !sent {
			sent = true
			if n, err := le.sendToUser("alice", 1); err != nil || n != 1 {
				t.Fatalf("send to alice while the refresh's reply is held: %d connections listed, %v", n, err)
			}
		}
		if raised < 2 {
			return fmt.Errorf("%d refreshes seen since the late one was held", raised)
		}
		return nil
	})
	if n, err := le.sendToUser("alice", 2); err != nil || n != 1 {
		t.Fatalf("send to alice after the next refresh: %d connections listed, %v", n, err)
	}
	g.waitTargeted(5*time.Second, "1", "2")
	g.neverCut()
	loggedOp(t, le, "registry write failed", "refresh")
	if l := le.log.Lines(t, "registry records missing in redis, rewriting them"); len(l) != 0 {
		t.Errorf("the probe found the record gone: %v", l)
	}
}

// TestLateReplyProbe: the probe's publish, or the readiness check's
// PING, gets its reply late. /readyz answers 200 again (the probe ran
// in Redis and came back on the Pub/Sub connection; the next check pings
// again) and the read path is not taken for silent.
func TestLateReplyProbe(t *testing.T) {
	t.Parallel()
	for _, tc := range []string{"probe", "readiness ping"} {
		t.Run(tc, func(t *testing.T) {
			t.Parallel()
			le, relay := startLateEnv(t, map[string]string{"INSTANCE_ID": "late1"}, nil)
			le.waitReadyz(5*time.Second, 200)
			switch tc {
			case "probe":
				relay.ArmHold(respArgs("spublish", le.ks.InboxNotify("late1")), lateHold)
				held(t, relay, 1)
				testkit.Eventually(t, 5*time.Second, func() error {
					if len(le.log.Lines(t, "probe failed")) == 0 {
						return fmt.Errorf("the late probe has not failed yet")
					}
					return nil
				})
			case "readiness ping":
				// The check pings at most every 500 ms: the first one
				// after the arming is late.
				relay.ArmHold("*1\r\n"+respArgs("ping"), lateHold)
				testkit.Eventually(t, 5*time.Second, func() error {
					st := readyz(le)
					if relay.Dropped() == 0 {
						return fmt.Errorf("no PING held yet")
					}
					if st != 503 {
						t.Fatalf("/readyz %d as its PING's reply was late, want 503", st)
					}
					return nil
				})
			}
			le.waitReadyz(5*time.Second, 200)
			if n := le.e.s.hub.reconnects.Load(); n != 0 || len(le.log.Lines(t, "redis read path silent, resubscribing")) != 0 {
				t.Errorf("the read path was resubscribed (%d) after one late reply", n)
			}
			g := newGoClient(t, le.wsURL(), "", "room", "")
			le.publish("room", 1)
			g.waitData(5*time.Second, "1")
		})
	}
}

// TestLateReplySubscribe: Redis's confirmation of a SSUBSCRIBE comes
// late: of a channel, by more than confirmWait (the subscriber sends it
// again, and Redis confirms it twice) and less than the 4 ×
// PROBE_INTERVAL of silence that has the Pub/Sub connection replaced,
// or by more than that too (the connection, whose probes are held
// behind the confirmation, is replaced, and the channel subscribed on
// the new one); or of the instance's inbox as the egress starts. The
// channel ends live: the subscriber is told the position read once a
// confirmation came, which the message published meanwhile is at, and
// gets each message after it once; the inbox ends live too (/readyz
// 200, a message to the user arrives).
func TestLateReplySubscribe(t *testing.T) {
	t.Parallel()
	env := func(more ...string) map[string]string {
		m := map[string]string{"PROBE_INTERVAL": "1s"}
		for i := 0; i < len(more); i += 2 {
			m[more[i]] = more[i+1]
		}
		return m
	}
	forced := func(t *testing.T, le *lossEnv, want bool) {
		t.Helper()
		if l := le.log.Lines(t, "redis read path silent, resubscribing"); (len(l) != 0) != want {
			t.Errorf("the Pub/Sub connection replaced for its silence: %v, want %v", len(l) != 0, want)
		}
	}
	for _, tc := range []struct {
		name   string
		probe  string        // PROBE_INTERVAL
		hold   time.Duration // how late the confirmation is
		forced bool          // the Pub/Sub connection is replaced for its silence meanwhile
	}{
		{"channel", "1s", confirmWait + confirmWait/2, false},
		{"channel, past the read path's silence", "200ms", 2 * time.Second, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			le, relay := startLateEnv(t, env("PROBE_INTERVAL", tc.probe), nil)
			le.waitReadyz(5*time.Second, 200)
			relay.ArmHold(respArgs("ssubscribe", le.ks.Notify("room")), tc.hold)
			subscribeHeld(t, le, relay, "the confirmation came")
			forced(t, le, tc.forced)
		})
	}
	t.Run("inbox", func(t *testing.T) {
		t.Parallel()
		le, relay := startLateEnv(t, env("INSTANCE_ID", "late2"), func(r *testkit.ReplyDropper) {
			r.ArmHold(respArgs("ssubscribe", "wsr:{i:late2}:n"), confirmWait+confirmWait/2)
		})
		if got := le.ks.InboxNotify("late2"); got != "wsr:{i:late2}:n" {
			t.Fatalf("the inbox's shard channel is %s", got)
		}
		held(t, relay, 1)
		le.waitReadyz(5*time.Second, 200)
		g := newGoClient(t, le.wsURL(), "alice", "", "")
		welcomed(t, g)
		if n, err := le.sendToUser("alice", 1); err != nil || n != 1 {
			t.Fatalf("send to alice: %d connections listed, %v", n, err)
		}
		g.waitTargeted(5*time.Second, "1")
		g.neverCut()
		forced(t, le, false)
	})
}
