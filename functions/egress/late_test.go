package main

import (
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/protocol"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// TestResumeNotificationsLate: a client got message 1 from another
// egress and resumes from it on this one, whose notifications of 1, 2 and
// 3 are late, while the stream has been trimmed past 2 (the stream alone
// cannot prove the client missed nothing). When the notifications were
// only late, this egress delivers 1, 2 and 3 live moments later: the
// resume waits for its hub to deliver 1 and is recovered, with 2 and 3
// from the live buffer. When they were lost (the next one shows the gap,
// or none comes within lateNotice), it is not recovered, and goes on from
// where the stream does. The egress waits the default lateNotice
// (TestResumeRandomized shortens it), the whole of it when nothing
// follows.
func TestResumeNotificationsLate(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		keep int64 // stream entries left by the trim: 3 only, or none
		// arrive: which late notifications (by message number) reach
		// the egress after the resume read the stream.
		arrive []int
		rec    bool
	}{
		{"late", 1, []int{1, 2, 3}, true},
		{"late, stream emptied", 0, []int{1, 2, 3}, true},
		{"lost, the next shows the gap", 1, []int{3}, false},
		{"lost, nothing follows", 1, nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			rdb, prefix := redistest.Client(t)
			ks := keys.Scheme{Prefix: prefix}
			// Signals the resume's first stream read, done: its answer
			// comes from what the stream held then.
			read := make(chan struct{})
			var once sync.Once
			var after string
			var afterMu sync.Mutex
			rdb.AddHook(aroundCmd{after: func(cmd redis.Cmder) {
				afterMu.Lock()
				defer afterMu.Unlock()
				if a := cmd.Args(); cmd.Name() == "xrange" && len(a) > 2 && after != "" && a[1] == ks.Stream("room") && a[2] == after {
					once.Do(func() { close(read) })
				}
			}})
			e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"})
			if e.s.hub.lateWait != lateNotice {
				t.Fatalf("the egress waits %v for late notifications, want the default %v", e.s.hub.lateWait, lateNotice)
			}
			live, _ := subscribedTo(t, e, "room")

			// Appended with their notifications set aside: this
			// egress's are late.
			ps := rdb.SSubscribe(t.Context(), ks.Notify("room")+"-late")
			defer ps.Close()
			if _, err := ps.Receive(t.Context()); err != nil {
				t.Fatal(err)
			}
			var ids, late []string
			for i := 1; i <= 3; i++ {
				ids = append(ids, appendTo(t, rdb, ks, "room", ks.Notify("room")+"-late", i))
				m, err := ps.ReceiveMessage(t.Context())
				if err != nil {
					t.Fatal(err)
				}
				late = append(late, m.Payload)
			}
			if err := rdb.XTrimMaxLen(t.Context(), ks.Stream("room"), tc.keep).Err(); err != nil {
				t.Fatal(err)
			}

			afterMu.Lock()
			after = ids[0]
			afterMu.Unlock()
			ws := resumeOn(t, e, "room", ids[0])
			select {
			case <-read:
			case <-time.After(5 * time.Second):
				t.Fatal("the resume never read the stream")
			}
			for _, n := range tc.arrive {
				if err := rdb.SPublish(t.Context(), ks.Notify("room"), late[n-1]).Err(); err != nil {
					t.Fatal(err)
				}
			}

			r := next(t, ws, "subscribed")
			wantPos, want := ids[0], ids[1:]
			if !tc.rec {
				// From where the stream goes on: the last one trimmed.
				wantPos, want = ids[1], ids[2:]
			}
			if r.Recovered == nil || *r.Recovered != tc.rec || r.Position != wantPos {
				t.Fatalf("resume after %s: recovered %v, position %s; want %v, %s", ids[0], deref(r.Recovered), r.Position, tc.rec, wantPos)
			}
			if got, code := readMessages(ws, 5*time.Second, func(id string) bool { return id == ids[2] }); fmt.Sprint(got) != fmt.Sprint(want) || code != 0 {
				t.Fatalf("resumed client got %v (close %d), want %v", got, code, want)
			}
			switch len(tc.arrive) {
			case 3: // delivered live here, to the subscriber that was live
				if got, _ := readMessages(live, 5*time.Second, func(id string) bool { return id == ids[2] }); fmt.Sprint(got) != fmt.Sprint(ids) {
					t.Fatalf("live subscriber got %v, want %v", got, ids)
				}
			case 1: // the hub found the gap: its subscriber lacks 1 and 2
				if got, code := readMessages(live, 5*time.Second, nil); len(got) != 0 || code != protocol.CloseInternal {
					t.Fatalf("live subscriber across the gap: got %v, close %d; want none, %d", got, code, protocol.CloseInternal)
				}
			}
		})
	}
}

// TestResumeBehindCatchUpDroppedAtAfter: a client got message M (after
// SEND_QUEUE others) from another egress and resumes from it on this
// one, whose notifications of them were lost; the resume's first stream
// read is held while the hub, told of the next message, catches them up
// from the stream into the replay's buffer of live messages, which M
// finds full: the catch-up empties it there (resumer.dropped is M), and
// the buffer then holds every message after M the hub delivers. The
// stream is trimmed past M before the read runs, so the stream alone
// cannot prove the client missed nothing, but the hub delivered M, and
// what follows it is in the buffer: the resume is recovered at M, as it
// is when M lands in the buffer rather than in a drop, and the client
// gets every message after M. Before, it was told recovered:false and
// got only what the stream still held.
func TestResumeBehindCatchUpDroppedAtAfter(t *testing.T) {
	t.Parallel()
	e, rdb, ks, pause := pausedEgress(t, nil)
	key := ks.Stream("room")
	// The hub reads the channel, at its first message, before the lost
	// ones; the subscriber that made it do so leaves (the channel
	// lingers).
	cs := lingering(t, e, rdb, ks, "room")
	// SEND_QUEUE messages fill the buffer; M, the next, finds it full.
	lost := appendLost(t, rdb, ks, e.s.hub.instance, "room", "", []byte(`"x"`), e.s.cfg.SendQueue+1)
	after := lost[len(lost)-1]
	p := &pausePoint{key: key, start: after, reached: make(chan struct{}), released: make(chan struct{})}
	pause.arm(p)
	defer p.release()
	ws := resumeOn(t, e, "room", after)
	p.await(t, "the resume never read the stream")
	// The hub is told of two more: it catches up to the first, and
	// delivers the second live.
	more := []string{appendTo(t, rdb, ks, "room", ks.Notify("room"), 1), appendTo(t, rdb, ks, "room", ks.Notify("room"), 2)}
	testkit.Eventually(t, 5*time.Second, func() error {
		cs.mu.Lock()
		defer cs.mu.Unlock()
		if cs.last.String() != more[1] {
			return fmt.Errorf("the hub is at %s, not yet at %s", cs.last, more[1])
		}
		for _, r := range cs.resuming {
			if r.dropped.String() != after {
				return fmt.Errorf("the replay's buffer was emptied at %s, want at %s", r.dropped, after)
			}
		}
		return nil
	})
	// Trimmed past M and the message after it: the oldest entry left
	// names the one before it, not M.
	if err := rdb.XTrimMinID(t.Context(), key, more[1]).Err(); err != nil {
		t.Fatal(err)
	}
	p.release()
	if r := next(t, ws, "subscribed"); r.Recovered == nil || !*r.Recovered || r.Position != after {
		t.Fatalf("resume after %s: recovered %v, position %s; want true, %s", after, deref(r.Recovered), r.Position, after)
	}
	got, code := readThrough(ws, 5*time.Second, more[1])
	if code != 0 || !slices.Equal(got, more) {
		t.Fatalf("got %v (close %d), want %v once each and no close", got, code, more)
	}
}

// TestResumeLateDroppedAtAfter is TestResumeBehindCatchUpDroppedAtAfter
// with M's notification late rather than lost: the resume, its stream
// read trimmed past M, waits for the hub to deliver M (awaitLive), whose
// buffer a catch-up filled with the SEND_QUEUE messages before it; M,
// delivered live, finds it full of the catch-up's messages and empties
// it (resumer.dropped is M). The hub delivered M, and the buffer holds
// what follows: recovered at M, with every message after it.
func TestResumeLateDroppedAtAfter(t *testing.T) {
	t.Parallel()
	e, rdb, ks, pause := pausedEgress(t, nil)
	key, notify := ks.Stream("room"), ks.Notify("room")
	cs := lingering(t, e, rdb, ks, "room")
	// SEND_QUEUE-1 messages lost, then one late (its notification makes
	// the hub catch up all SEND_QUEUE), then M and two more, late.
	lost := appendLost(t, rdb, ks, e.s.hub.instance, "room", "", []byte(`"x"`), e.s.cfg.SendQueue-1)
	ps := rdb.SSubscribe(t.Context(), notify+"-late")
	defer ps.Close()
	if _, err := ps.Receive(t.Context()); err != nil {
		t.Fatal(err)
	}
	var ids, late []string
	for i := range 4 {
		ids = append(ids, appendTo(t, rdb, ks, "room", notify+"-late", i))
		m, err := ps.ReceiveMessage(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		late = append(late, m.Payload)
	}
	caught, after, more := append(lost, ids[0]), ids[1], ids[2:]
	p := &pausePoint{key: key, start: after, reached: make(chan struct{}), released: make(chan struct{})}
	pause.arm(p)
	defer p.release()
	ws := resumeOn(t, e, "room", after)
	p.await(t, "the resume never read the stream")
	// The catch-up fills the buffer, short of M.
	if err := rdb.SPublish(t.Context(), notify, late[0]).Err(); err != nil {
		t.Fatal(err)
	}
	hubReaches(t, cs, caught[len(caught)-1])
	// Trimmed past M and the message after it.
	if err := rdb.XTrimMinID(t.Context(), key, more[1]).Err(); err != nil {
		t.Fatal(err)
	}
	p.release()
	// The resume waits for M.
	testkit.Eventually(t, 5*time.Second, func() error {
		cs.mu.Lock()
		defer cs.mu.Unlock()
		for _, r := range cs.resuming {
			if r.arrived != nil && len(r.buf) == len(caught) {
				return nil
			}
			return fmt.Errorf("the resume is not waiting for %s with its buffer full (%d)", after, len(r.buf))
		}
		return errors.New("the resume has ended")
	})
	for _, l := range late[1:] {
		if err := rdb.SPublish(t.Context(), notify, l).Err(); err != nil {
			t.Fatal(err)
		}
	}
	if r := next(t, ws, "subscribed"); r.Recovered == nil || !*r.Recovered || r.Position != after {
		t.Fatalf("resume after %s: recovered %v, position %s; want true, %s", after, deref(r.Recovered), r.Position, after)
	}
	got, code := readThrough(ws, 5*time.Second, more[1])
	if code != 0 || !slices.Equal(got, more) {
		t.Fatalf("got %v (close %d), want %v once each and no close", got, code, more)
	}
}

// lingering makes e's hub read ch, at a first message appended to it,
// with no subscriber left: the channel lingers, and the hub is at that
// message.
func lingering(t *testing.T, e *secEgress, rdb redis.UniversalClient, ks keys.Scheme, ch string) *chanState {
	t.Helper()
	first := appendTo(t, rdb, ks, ch, ks.Notify(ch), 0)
	sub, _ := subscribedTo(t, e, ch)
	sub.Close()
	cs := e.s.hub.state(ks.Notify(ch))
	testkit.Eventually(t, 5*time.Second, func() error {
		cs.mu.Lock()
		defer cs.mu.Unlock()
		if len(cs.subs) != 0 || cs.last.String() != first {
			return fmt.Errorf("%d subscribers, the hub at %s; want none, at %s", len(cs.subs), cs.last, first)
		}
		return nil
	})
	return cs
}

// TestLateFirstNotificationAfterTrim: the notification of a stream's
// first entry (predecessor 0-0) arrives late, after a catch-up delivered
// that entry and the next, and after the stream was trimmed to nothing
// while the hub was still behind its end (the notification of its last
// entry on its way too). It is no chain that started again below the ids
// delivered (the stream's position is past them): the hub reads nothing,
// finds no gap, and delivers the last entry from its notification; the
// subscriber gets all three, and is not closed.
func TestLateFirstNotificationAfterTrim(t *testing.T) {
	t.Parallel()
	e, rdb, ks, _ := pausedEgress(t, nil)
	key, notify := ks.Stream("room"), ks.Notify("room")
	ws, _ := subscribedTo(t, e, "room")
	cs := e.s.hub.state(notify)
	ps := rdb.SSubscribe(t.Context(), notify+"-late")
	defer ps.Close()
	if _, err := ps.Receive(t.Context()); err != nil {
		t.Fatal(err)
	}
	var ids, late []string
	for i := range 3 {
		ids = append(ids, appendTo(t, rdb, ks, "room", notify+"-late", i))
		m, err := ps.ReceiveMessage(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		late = append(late, m.Payload)
	}
	// The second's notification: the hub catches up on the first two.
	if err := rdb.SPublish(t.Context(), notify, late[1]).Err(); err != nil {
		t.Fatal(err)
	}
	hubReaches(t, cs, ids[1])
	if err := rdb.XTrimMaxLen(t.Context(), key, 0).Err(); err != nil {
		t.Fatal(err)
	}
	for _, l := range []string{late[0], late[2]} {
		if err := rdb.SPublish(t.Context(), notify, l).Err(); err != nil {
			t.Fatal(err)
		}
	}
	got, code := readThrough(ws, 5*time.Second, ids[2])
	if code != 0 || !slices.Equal(got, ids) {
		t.Fatalf("got %v (close %d), want %v once each and no close", got, code, ids)
	}
	if n := e.s.hub.gaps.Load(); n != 0 {
		t.Fatalf("the hub found %d gaps, want none", n)
	}
}
