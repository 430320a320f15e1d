package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// stallOn makes ch's stream unreadable (a key of the wrong type) and
// sends a notification on ch whose predecessor the hub has not delivered:
// the hub catches up from ch's stream, and that read fails.
func stallOn(t *testing.T, rdb redis.UniversalClient, ks keys.Scheme, ch string) {
	t.Helper()
	if err := rdb.Set(t.Context(), ks.Stream(ch), "not a stream", 0).Err(); err != nil {
		t.Fatal(err)
	}
	appendTo(t, rdb, ks, "other-"+ch, ks.Notify("other-"+ch), 1)
	appendTo(t, rdb, ks, "other-"+ch, ks.Notify(ch), 2)
}

// TestUnreadableStreamHoldsUpOnlyItsChannel: one channel's stream cannot
// be read (here a key of the wrong type; in a cluster, its master just
// died) while the hub must catch up on it. The read is retried, but the
// other channels go on being delivered meanwhile; once the stream can be
// read again, its channel gets what was published.
func TestUnreadableStreamHoldsUpOnlyItsChannel(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"})
	wsA, _ := subscribedTo(t, e, "a")
	wsB, _ := subscribedTo(t, e, "b")

	ctx := t.Context()
	stallOn(t, rdb, ks, "a")

	for i := range 3 {
		id := appendTo(t, rdb, ks, "b", ks.Notify("b"), 10+i)
		if got, code := readMessages(wsB, 5*time.Second, func(string) bool { return true }); len(got) != 1 || got[0] != id {
			t.Fatalf("b while a cannot be read: got %v (close %d), want %s", got, code, id)
		}
	}

	if err := rdb.Del(ctx, ks.Stream("a")).Err(); err != nil {
		t.Fatal(err)
	}
	id := appendTo(t, rdb, ks, "a", ks.Notify("a"), 20)
	if got, code := readMessages(wsA, 5*time.Second, func(string) bool { return true }); len(got) != 1 || got[0] != id {
		t.Fatalf("a once readable: got %v (close %d), want %s", got, code, id)
	}
}

// TestUnreadablePositionHoldsUpOnlyItsChannel: the first read of a new
// channel's position fails and keeps failing. The subscribe is answered
// "unavailable" as for any subscription that does not go live in time,
// the other channels go on being delivered meanwhile, and once the
// stream can be read the channel can be subscribed.
func TestUnreadablePositionHoldsUpOnlyItsChannel(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"})
	wsB, _ := subscribedTo(t, e, "b")
	ctx := t.Context()
	if err := rdb.Set(ctx, ks.Stream("c"), "not a stream", 0).Err(); err != nil {
		t.Fatal(err)
	}
	wsC, _, err := e.dial(t, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer wsC.Close()
	next(t, wsC, "welcome")
	send(t, wsC, map[string]any{"type": "subscribe", "channel": "c"})
	time.Sleep(300 * time.Millisecond) // c's subscription is confirmed, its position read fails

	id := appendTo(t, rdb, ks, "b", ks.Notify("b"), 1)
	if got, code := readMessages(wsB, 3*time.Second, func(string) bool { return true }); len(got) != 1 || got[0] != id {
		t.Fatalf("b while c's position cannot be read: got %v (close %d), want %s", got, code, id)
	}
	// The error comes acquire's 5 s after the server read the subscribe:
	// next's 5 s, counted from here, 300 ms after the send, were missed
	// by a server slow to read the frame or to write the error (a loaded
	// machine), and the test failed with a read timeout.
	if r := nextWithin(t, wsC, "error", 15*time.Second); r.Code != "unavailable" {
		t.Fatalf("subscribe to c: error %q, want unavailable", r.Code)
	}

	if err := rdb.Del(ctx, ks.Stream("c")).Err(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(1500 * time.Millisecond) // the next retry reads the position
	wsC2, r := subscribedTo(t, e, "c")
	if r.Position != "0-0" {
		t.Fatalf("c's position %s, want 0-0", r.Position)
	}
	id = appendTo(t, rdb, ks, "c", ks.Notify("c"), 2)
	if got, code := readMessages(wsC2, 5*time.Second, func(string) bool { return true }); len(got) != 1 || got[0] != id {
		t.Fatalf("c once readable: got %v (close %d), want %s", got, code, id)
	}
}

// slowReads is a hook whose XRANGE on key, while on is set, waits d
// (whatever its context says, as a read from a node that went silent
// does, unless honourCtx) and fails; entered receives once a read is
// waiting.
type slowReads struct {
	key       string
	d         time.Duration
	on        *atomic.Bool
	entered   chan struct{}
	honourCtx bool
}

func (s slowReads) DialHook(next redis.DialHook) redis.DialHook { return next }

func (s slowReads) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if a := cmd.Args(); s.on.Load() && strings.EqualFold(cmd.Name(), "xrange") && len(a) > 1 && a[1] == s.key {
			select {
			case s.entered <- struct{}{}:
			default:
			}
			if s.honourCtx {
				select {
				case <-time.After(s.d):
				case <-ctx.Done():
				}
			} else {
				time.Sleep(s.d)
			}
			cmd.SetErr(redistest.ErrFailed)
			return redistest.ErrFailed
		}
		return next(ctx, cmd)
	}
}

func (s slowReads) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

// TestStalledReadEndsWithRun: a shutdown that comes while a stalled
// channel's read is retried waits for that read: once Run has returned,
// nothing of the hub reads Redis any more (run then closes the client)
// or logs. Not parallel: it looks at every goroutine.
func TestStalledReadEndsWithRun(t *testing.T) {
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	var slow atomic.Bool
	entered := make(chan struct{}, 1)
	rdb.AddHook(slowReads{key: ks.Stream("a"), d: 2 * time.Second, on: &slow, entered: entered})
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true", "SHUTDOWN_GRACE": "0s"})
	wsA, _ := subscribedTo(t, e, "a")

	// a's catch-up fails at once (a key of the wrong type), then its
	// retries wait for a silent node.
	stallOn(t, rdb, ks, "a")
	testkit.Eventually(t, 5*time.Second, func() error {
		if e.s.hub.redisErrors.Load() == 0 {
			return errors.New("a's catch-up has not failed yet")
		}
		return nil
	})
	slow.Store(true)
	select {
	case <-entered:
	case <-time.After(5 * time.Second):
		t.Fatal("a's stream was never read")
	}
	wsA.Close()
	e.stop()
	var stacks []byte
	for n := 1 << 16; ; n *= 2 {
		stacks = make([]byte, n)
		if m := runtime.Stack(stacks, true); m < n {
			stacks = stacks[:m]
			break
		}
	}
	if i := bytes.Index(stacks, []byte("(*hub).stall")); i >= 0 {
		t.Fatalf("a stalled channel's retries outlive Run:\n%s", stacks[max(0, i-1500):min(len(stacks), i+500)])
	}
}

// TestStalledChannelCountsItsReconnect: Redis confirming the subscription
// of a stalled channel again (its Pub/Sub connection came back) is a
// reconnect like any other: counted (wsrelay_egress_redis_resubscribes_total)
// and, as for the others, a registry refresh is asked for; only its read
// waits for the stall to end.
func TestStalledChannelCountsItsReconnect(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"})
	subscribedTo(t, e, "a")
	subscribedTo(t, e, "b")
	stallOn(t, rdb, ks, "a")
	testkit.Eventually(t, 5*time.Second, func() error {
		if e.s.hub.redisErrors.Load() == 0 {
			return errors.New("a's catch-up has not failed yet")
		}
		return nil
	})

	// One reconnect of the Pub/Sub connection (counted once by
	// resubscribe), then one confirmation again each for the inbox, a
	// and b.
	before := e.s.hub.reconnects.Load()
	e.s.hub.resubscribe(t.Context())
	want := before + 4
	deadline := time.Now().Add(5 * time.Second)
	for e.s.hub.reconnects.Load() < want && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond)
	if got := e.s.hub.reconnects.Load(); got != want {
		t.Fatalf("reconnects counted: %d, want %d (the resubscribe, the inbox, a and b)", got-before, want-before)
	}
}

// TestSilentReadHoldsUpLoopBriefly: a channel's catch-up reads from a node
// that stopped answering (go-redis waits up to the context's deadline, and
// in a cluster retries a timed-out read several times). The receive loop
// gives that first read a bound of its own, then leaves the channel to its
// retries and goes on with the other channels.
func TestSilentReadHoldsUpLoopBriefly(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	var slow atomic.Bool
	entered := make(chan struct{}, 1)
	rdb.AddHook(slowReads{key: ks.Stream("a"), d: time.Minute, on: &slow, entered: entered, honourCtx: true})
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true", "REDIS_TIMEOUT": "200ms"})
	wsA, _ := subscribedTo(t, e, "a")
	wsB, _ := subscribedTo(t, e, "b")

	slow.Store(true)
	appendTo(t, rdb, ks, "a", ks.Notify("a")+"-lost", 1) // its notification is lost
	appendTo(t, rdb, ks, "a", ks.Notify("a"), 2)         // so this one makes the hub catch up
	select {
	case <-entered:
	case <-time.After(5 * time.Second):
		t.Fatal("a's stream was never read")
	}
	id := appendTo(t, rdb, ks, "b", ks.Notify("b"), 3)
	if got, code := readMessages(wsB, 3*time.Second, func(string) bool { return true }); len(got) != 1 || got[0] != id {
		t.Fatalf("b while a's node is silent: got %v (close %d), want %s", got, code, id)
	}
	slow.Store(false)
	n := 0
	if got, code := readMessages(wsA, 5*time.Second, func(string) bool { n++; return n == 2 }); len(got) != 2 {
		t.Fatalf("a once its node answers: got %v (close %d), want its two messages", got, code)
	}
}

// stallAndLeave makes ch's read fail and keep failing, as how says: for
// "position", the first read of a new channel's position; for "catch-up",
// a catch-up of a channel already live. It returns once the hub retries
// that read beside its loop (two failed reads) and ch's last local
// subscriber has left.
func stallAndLeave(t *testing.T, e *secEgress, rdb redis.UniversalClient, ks keys.Scheme, ch, how string) {
	t.Helper()
	h := e.s.hub
	before := h.redisErrors.Load()
	retried := func() error {
		if h.redisErrors.Load() < before+2 {
			return errors.New(ch + "'s read has not been retried yet")
		}
		return nil
	}
	switch how {
	case "position":
		if err := rdb.Set(t.Context(), ks.Stream(ch), "not a stream", 0).Err(); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(t.Context())
		acquired := make(chan error, 1)
		go func() { _, err := h.acquire(ctx, ch); acquired <- err }()
		testkit.Eventually(t, 5*time.Second, retried)
		cancel() // the subscriber gives up and leaves
		if err := <-acquired; !errors.Is(err, errUnavailable) {
			t.Fatalf("acquire %s: %v, want errUnavailable", ch, err)
		}
	case "catch-up":
		ws, _ := subscribedTo(t, e, ch)
		stallOn(t, rdb, ks, ch)
		testkit.Eventually(t, 5*time.Second, retried)
		ws.Close()
	default:
		t.Fatalf("stallAndLeave: %q", how)
	}
}

// dropStalled sweeps the hub as if the linger had passed, until ch's
// state is gone and no read is retried any more (h.stalls).
func dropStalled(t *testing.T, h *hub, ks keys.Scheme, ch string) {
	t.Helper()
	ended := make(chan struct{})
	go func() { h.stalls.Wait(); close(ended) }()
	testkit.Eventually(t, 5*time.Second, func() error {
		h.sweepIdle(t.Context(), time.Now().Add(2*linger))
		select {
		case <-ended:
		default:
			return errors.New("the retries of " + ch + "'s read go on after its last local subscriber left")
		}
		if h.state(ks.Notify(ch)) != nil {
			return errors.New(ch + " is still subscribed")
		}
		return nil
	})
}

// TestStalledReadEndsWithItsChannel: a channel whose stream can never be
// read (a key overwritten with another type) has its read retried beside
// the receive loop; once its last local subscriber has left and the
// channel is dropped (after the linger), the retries end too, instead of
// reading Redis every second for the rest of the instance's life.
func TestStalledReadEndsWithItsChannel(t *testing.T) {
	t.Parallel()
	for _, how := range []string{"position", "catch-up"} {
		t.Run(how, func(t *testing.T) {
			t.Parallel()
			rdb, prefix := redistest.Client(t)
			ks := keys.Scheme{Prefix: prefix}
			e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"})
			h := e.s.hub
			stallAndLeave(t, e, rdb, ks, "a", how)
			dropStalled(t, h, ks, "a")
			n := h.redisErrors.Load()
			time.Sleep(1500 * time.Millisecond) // longer than the longest wait between retries
			if m := h.redisErrors.Load(); m != n {
				t.Fatalf("%d failed reads after a was dropped", m-n)
			}
		})
	}
}

// TestStalledChannelComesBack: a channel dropped while its read was
// stalled is subscribed again, its stream readable before that or only
// once the new subscription's own read has stalled. The new subscription
// starts afresh (its position read again, nothing kept from before) and
// gets each message published after it exactly once; nothing goes on
// retrying afterwards.
func TestStalledChannelComesBack(t *testing.T) {
	t.Parallel()
	for _, how := range []string{"position", "catch-up"} {
		for _, fixed := range []string{"before", "while stalled"} {
			t.Run(how+"/fixed "+fixed, func(t *testing.T) {
				t.Parallel()
				rdb, prefix := redistest.Client(t)
				ks := keys.Scheme{Prefix: prefix}
				e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"})
				h := e.s.hub
				ctx := t.Context()
				stallAndLeave(t, e, rdb, ks, "a", how)
				dropStalled(t, h, ks, "a")

				fix := func() {
					if err := rdb.Del(ctx, ks.Stream("a")).Err(); err != nil {
						t.Fatal(err)
					}
				}
				if fixed == "before" {
					fix()
				}
				ws, _, err := e.dial(t, nil, nil)
				if err != nil {
					t.Fatal(err)
				}
				next(t, ws, "welcome")
				before := h.redisErrors.Load()
				send(t, ws, map[string]any{"type": "subscribe", "channel": "a"})
				if fixed != "before" {
					testkit.Eventually(t, 3*time.Second, func() error {
						if h.redisErrors.Load() < before+2 {
							return errors.New("the new subscription's position read has not been retried")
						}
						return nil
					})
					fix()
				}
				if r := next(t, ws, "subscribed"); r.Position != "0-0" {
					t.Fatalf("a's position %s, want 0-0", r.Position)
				}
				var want []string
				for i := range 3 {
					want = append(want, appendTo(t, rdb, ks, "a", ks.Notify("a"), i))
				}
				got, code := readMessages(ws, time.Second, nil)
				if code != -1 || strings.Join(got, " ") != strings.Join(want, " ") {
					t.Fatalf("a once back: got %v (close %d), want %v once each", got, code, want)
				}
				ended := make(chan struct{})
				go func() { h.stalls.Wait(); close(ended) }()
				select {
				case <-ended:
				case <-time.After(time.Second):
					t.Fatal("a read is still retried after a came back")
				}
			})
		}
	}
}

// TestAbandonedStallEndsItsEpisode: the failing reads of a channel whose
// last local subscriber left are logged as an episode (redis read path
// failing). When the channel is dropped and its retries given up, the
// episode ends at once with a line saying so (not "redis reads back":
// they never came back), and the next failure of the read path, of
// another channel, is logged as a new episode, not counted silently in
// the old one.
func TestAbandonedStallEndsItsEpisode(t *testing.T) {
	t.Parallel()
	for _, how := range []string{"position", "catch-up"} {
		t.Run(how, func(t *testing.T) {
			t.Parallel()
			rdb, prefix := redistest.Client(t)
			ks := keys.Scheme{Prefix: prefix}
			logs := &testkit.SyncBuffer{}
			e := startEgressLogging(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"}, logs)
			h := e.s.hub
			episode := func() []string {
				var lines []string
				for _, r := range logs.JSONLines(t) {
					switch r["msg"] {
					case "redis read path failing", "redis reads back", "redis reads abandoned":
						line := fmt.Sprint(r["msg"])
						if r["msg"] == "redis read path failing" && r["failures"] != nil {
							line += " (reminder)"
						}
						lines = append(lines, line)
					}
				}
				return lines
			}
			wantLines := func(want ...string) {
				t.Helper()
				testkit.Eventually(t, 3*time.Second, func() error {
					if got := episode(); strings.Join(got, "|") != strings.Join(want, "|") {
						return fmt.Errorf("read path log lines %q, want %q", got, want)
					}
					return nil
				})
			}
			stallAndLeave(t, e, rdb, ks, "a", how)
			wantLines("redis read path failing")
			dropStalled(t, h, ks, "a")
			wantLines("redis read path failing", "redis reads abandoned")

			// Another channel's read fails: a new episode.
			subscribedTo(t, e, "b")
			stallOn(t, rdb, ks, "b")
			wantLines("redis read path failing", "redis reads abandoned", "redis read path failing")
		})
	}
}
