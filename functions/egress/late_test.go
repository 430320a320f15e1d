package main

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/protocol"
	"github.com/wsrelay/wsrelay/shared/redistest"
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
