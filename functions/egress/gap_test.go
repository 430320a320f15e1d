package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/protocol"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/stream"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// Tests of what the egress does when the stream lost messages it had not
// delivered: trimmed or expired while its notifications were lost, or
// while a replay ran.

// appendTo appends one message to ch's stream, announcing it on notify
// (another shard channel than the channel's own loses the notification).
func appendTo(t *testing.T, rdb redis.UniversalClient, ks keys.Scheme, ch, notify string, n int) string {
	t.Helper()
	ids, err := stream.NewStore(rdb).Append(context.Background(), []stream.Append{{Stream: ks.Stream(ch), Notify: notify,
		Msg: stream.Message{Channel: ch, TS: time.Now().UnixMilli(), Data: []byte(strconv.Itoa(n))}}})
	if err != nil {
		t.Fatal(err)
	}
	return ids[0]
}

// appendData appends n messages holding data to ch's stream in one
// pipeline and returns their ids.
func appendData(t *testing.T, rdb redis.UniversalClient, ks keys.Scheme, ch string, data []byte, n int) []string {
	t.Helper()
	as := make([]stream.Append, n)
	for i := range as {
		as[i] = stream.Append{Stream: ks.Stream(ch), Notify: ks.Notify(ch),
			Msg: stream.Message{Channel: ch, TS: time.Now().UnixMilli(), Data: data}}
	}
	ids, err := stream.NewStore(rdb).Append(t.Context(), as)
	if err != nil {
		t.Fatal(err)
	}
	return ids
}

// readMessages reads message frames until the socket ends or stop
// returns true; it returns their ids and the close code (0 when the
// socket did not close, -1 when it ended without a close frame).
func readMessages(ws *websocket.Conn, within time.Duration, stop func(id string) bool) ([]string, int) {
	var ids []string
	_ = ws.SetReadDeadline(time.Now().Add(within))
	for {
		_, b, err := ws.ReadMessage()
		if err != nil {
			var ce *websocket.CloseError
			if errors.As(err, &ce) {
				return ids, ce.Code
			}
			return ids, -1
		}
		var f struct{ Type, ID string }
		if json.Unmarshal(b, &f) == nil && f.Type == "message" {
			ids = append(ids, f.ID)
			if stop != nil && stop(f.ID) {
				return ids, 0
			}
		}
	}
}

// subscribedTo dials e with ?channels=ch and reads up to the subscribed
// reply. The socket is closed when the test ends.
func subscribedTo(t *testing.T, e *secEgress, ch string) (*websocket.Conn, protocol.Reply) {
	t.Helper()
	ws, _, err := e.dial(t, url.Values{"channels": {ch}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ws.Close() })
	return ws, next(t, ws, "subscribed")
}

// resumeOn dials e and, once welcomed, subscribes to ch after `after`; it
// reads nothing more. The socket is closed when the test ends.
func resumeOn(t *testing.T, e *secEgress, ch, after string) *websocket.Conn {
	t.Helper()
	ws, _, err := e.dial(t, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ws.Close() })
	next(t, ws, "welcome")
	send(t, ws, map[string]any{"type": "subscribe", "channel": ch, "after": after})
	return ws
}

// TestGapPastTrim: notifications are lost while the stream is trimmed past
// the last message the hub delivered. Delivering from the oldest entry
// left would skip the trimmed ones for every subscriber here with nothing
// to tell them: the subscriber is closed with 1011 instead, and its
// resume says recovered:false.
func TestGapPastTrim(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"})
	ws, _ := subscribedTo(t, e, "room")

	ids := []string{appendTo(t, rdb, ks, "room", ks.Notify("room"), 1)}
	if got := nextData(t, ws); got != "1" {
		t.Fatalf("first message %s", got)
	}
	for i := 2; i <= 6; i++ { // their notifications are lost
		ids = append(ids, appendTo(t, rdb, ks, "room", ks.Notify("room")+"-lost", i))
	}
	if err := rdb.XTrimMaxLen(t.Context(), ks.Stream("room"), 1).Err(); err != nil {
		t.Fatal(err)
	}
	ids = append(ids, appendTo(t, rdb, ks, "room", ks.Notify("room"), 7)) // shows the gap
	got, code := readMessages(ws, 5*time.Second, nil)
	if code != protocol.CloseInternal || len(got) != 0 {
		t.Fatalf("after the gap: messages %v, close %d; want none and %d", got, code, protocol.CloseInternal)
	}
	if n := e.s.hub.gaps.Load(); n != 1 {
		t.Errorf("gaps counted: %d, want 1", n)
	}

	// The resume tells the client, and goes on from the entries left.
	ws2 := resumeOn(t, e, "room", ids[0])
	r := next(t, ws2, "subscribed")
	if r.Recovered == nil || *r.Recovered || r.Position != ids[4] {
		t.Fatalf("resume: recovered %v, position %s; want false, %s", r.Recovered, r.Position, ids[4])
	}
	got, _ = readMessages(ws2, 5*time.Second, func(id string) bool { return id == ids[6] })
	if fmt.Sprint(got) != fmt.Sprint(ids[5:]) {
		t.Fatalf("replayed %v, want %v", got, ids[5:])
	}

	// A subscriber joining now is given the position the stream goes on
	// from, and a resume from it is whole.
	if _, r := subscribedTo(t, e, "room"); r.Position != ids[6] {
		t.Fatalf("position after the gap %s, want %s", r.Position, ids[6])
	}
}

// TestGapPastClear: notifications are lost while the channel's history is
// removed (Store.Clear, DELETE /v1/channels/{channel}/messages) after
// messages this egress had not delivered: its subscriber is closed with
// 1011 and its resume says recovered:false, as for a trim; a subscriber
// of a channel whose notifications all arrived gets what follows the
// removal as usual. The same when the last-id key was missing at the
// removal (evicted): the next message chained from 0-0, which the egress
// took for a stream that expired and started again, and it delivered
// past the lost messages.
func TestGapPastClear(t *testing.T) {
	t.Parallel()
	for _, dropKey := range []bool{false, true} {
		t.Run(fmt.Sprint("dropKey=", dropKey), func(t *testing.T) {
			t.Parallel()
			rdb, prefix := redistest.Client(t)
			ks := keys.Scheme{Prefix: prefix}
			store := stream.NewStore(rdb)
			e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"})
			clear := func(ch string) {
				t.Helper()
				if dropKey {
					if err := rdb.Del(t.Context(), keys.Last(ks.Stream(ch))).Err(); err != nil {
						t.Fatal(err)
					}
				}
				if _, err := store.Clear(t.Context(), ks.Stream(ch)); err != nil {
					t.Fatal(err)
				}
			}

			live, _ := subscribedTo(t, e, "calm")
			calm := []string{appendTo(t, rdb, ks, "calm", ks.Notify("calm"), 1), appendTo(t, rdb, ks, "calm", ks.Notify("calm"), 2)}
			clear("calm")
			calm = append(calm, appendTo(t, rdb, ks, "calm", ks.Notify("calm"), 3))
			if got, code := readMessages(live, 5*time.Second, func(id string) bool { return id == calm[2] }); fmt.Sprint(got) != fmt.Sprint(calm) {
				t.Fatalf("subscriber live across the removal: %v (close %d), want %v", got, code, calm)
			}

			ws, _ := subscribedTo(t, e, "room")
			ids := []string{appendTo(t, rdb, ks, "room", ks.Notify("room"), 1)}
			if got := nextData(t, ws); got != "1" {
				t.Fatalf("first message %s", got)
			}
			for i := 2; i <= 3; i++ { // their notifications are lost
				ids = append(ids, appendTo(t, rdb, ks, "room", ks.Notify("room")+"-lost", i))
			}
			clear("room")
			ids = append(ids, appendTo(t, rdb, ks, "room", ks.Notify("room"), 4)) // shows the gap
			got, code := readMessages(ws, 5*time.Second, nil)
			if code != protocol.CloseInternal || len(got) != 0 {
				t.Fatalf("after the gap: messages %v, close %d; want none and %d", got, code, protocol.CloseInternal)
			}
			r := next(t, resumeOn(t, e, "room", ids[0]), "subscribed")
			if r.Recovered == nil || *r.Recovered || r.Position != ids[2] {
				t.Fatalf("resume: recovered %v, position %s; want false, %s", r.Recovered, r.Position, ids[2])
			}
		})
	}
}

// TestReplayTrimmedMidway: the stream is trimmed past a replay's position
// between two of its batches (a slow reader on a busy channel). The
// client was told recovered:true; skipping to the oldest entry left would
// lose the entries between without a word. It is closed with 1011
// instead, and resumes from what it got.
func TestReplayTrimmedMidway(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	key := ks.Stream("busy")
	var ids []string
	for i := range 2*replayBatch + 50 {
		ids = append(ids, appendTo(t, rdb, ks, "busy", ks.Notify("busy")+"-x", i))
	}
	// Before the replay's second read, the stream is trimmed to its
	// newest 20 entries.
	var reads atomic.Int64
	rdb.AddHook(redistest.Fail{Cmd: func(cmd redis.Cmder) bool {
		if a := cmd.Args(); strings.EqualFold(cmd.Name(), "xrange") && len(a) > 1 && a[1] == key && reads.Add(1) == 2 {
			_ = rdb.XTrimMaxLen(context.Background(), key, 20).Err()
		}
		return false
	}})
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"})
	ws := resumeOn(t, e, "busy", ids[0])
	// The subscribed reply (recovered: true, before the trim) and part of
	// the first batch may be dropped with the queue when the connection
	// closes; what arrives has no gap.
	got, code := readMessages(ws, 5*time.Second, nil)
	if code != protocol.CloseInternal || len(got) > replayBatch || fmt.Sprint(got) != fmt.Sprint(ids[1:1+len(got)]) {
		t.Fatalf("got %d messages (%v…), close %d; want at most the first batch, in order, then close %d",
			len(got), got[:min(len(got), 3)], code, protocol.CloseInternal)
	}
	// Resuming from what it got tells it.
	last := ids[len(got)]
	if r := next(t, resumeOn(t, e, "busy", last), "subscribed"); r.Recovered == nil || *r.Recovered {
		t.Fatalf("resume after %s, trimmed past it: recovered %v", last, r.Recovered)
	}
}

// TestReplayTrimmedAtBatchEnd: a replay's first batch is exactly
// replayBatch entries, so it reads again from the last of them, and
// before that read what follows is published and the stream trimmed
// past it (as the ingress trims: MAXLEN ~ on each append). Everything
// after that entry was published after the replay began, so the hub
// delivers it into the replay's live buffer: the client lost nothing
// and stays open, whether the oldest entry left still names the last
// one replayed (the chain is whole) or not (a burst trimmed the entries
// between, which stream.Resume reports as a break). Before, the second
// case closed it with 1011 and its resume said recovered:false.
func TestReplayTrimmedAtBatchEnd(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		burst  int   // messages published before the second read
		maxLen int64 // the trim each of them makes (MAXLEN ~); 0: one exact trim to the burst
		whole  bool  // whether the chain from the batch's end survives
	}{
		{"to the entry after the batch", 1, 0, true},
		{"past the batch by a burst", 250, 20, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			rdb, prefix := redistest.Client(t)
			ks := keys.Scheme{Prefix: prefix}
			key := ks.Stream("busy")
			var ids []string
			for i := range replayBatch + 1 { // the resume point and one batch after it
				ids = append(ids, appendTo(t, rdb, ks, "busy", ks.Notify("busy")+"-x", i))
			}
			store := stream.NewStore(rdb)
			burst := make(chan []string, 1)
			var reads atomic.Int64
			rdb.AddHook(aroundCmd{before: func(cmd redis.Cmder) {
				if a := cmd.Args(); !strings.EqualFold(cmd.Name(), "xrange") || len(a) < 2 || a[1] != key || reads.Add(1) != 2 {
					return
				}
				as := make([]stream.Append, tc.burst)
				for i := range as {
					as[i] = stream.Append{Stream: key, Notify: ks.Notify("busy"), Limits: stream.Limits{MaxLen: tc.maxLen},
						Msg: stream.Message{Channel: "busy", TS: time.Now().UnixMilli(), Data: []byte("0")}}
				}
				got, err := store.Append(context.Background(), as)
				if err != nil {
					t.Error(err)
				}
				if tc.maxLen == 0 {
					err = rdb.XTrimMaxLen(context.Background(), key, int64(tc.burst)).Err()
				}
				// The premise: the read from the batch's end finds the
				// entries after it gone, or not.
				b, rerr := store.Resume(context.Background(), key, stream.MustParseID(ids[replayBatch]), replayBatch)
				if err != nil || rerr != nil || b.Continuous != tc.whole {
					t.Errorf("after the trim: continuous %v, want %v (%v, %v)", b.Continuous, tc.whole, err, rerr)
				}
				burst <- got
			}})
			e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"})
			ws := resumeOn(t, e, "busy", ids[0])
			if r := next(t, ws, "subscribed"); r.Recovered == nil || !*r.Recovered {
				t.Fatalf("recovered %v, want true", r.Recovered)
			}
			var more []string
			select {
			case more = <-burst:
			case <-time.After(5 * time.Second):
				t.Fatal("the replay made no second read")
			}
			want := append(slices.Clone(ids[1:]), more...)
			last := want[len(want)-1]
			got, code := readMessages(ws, 5*time.Second, func(id string) bool { return id == last })
			if extra, c := readMessages(ws, 200*time.Millisecond, nil); len(extra) > 0 || c > 0 {
				got, code = append(got, extra...), c // a duplicate, or the close, would come now
			}
			if code != 0 || !slices.Equal(got, want) {
				t.Fatalf("got %d messages (…%v), close %d; want %d (…%v) once each in order and open",
					len(got), got[max(0, len(got)-3):], code, len(want), want[len(want)-3:])
			}
		})
	}
}

// TestResumeAheadOfStream: a subscribe whose `after` is ahead of the
// stream (a position from another channel, or from a master that failed
// over) is not recovered, and goes on from the stream's own position:
// the messages published next are delivered, not skipped until the
// clock reaches `after`.
func TestResumeAheadOfStream(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"})
	last := appendTo(t, rdb, ks, "f", ks.Notify("f"), 0)
	for _, after := range []string{"99999999999999-0", stream.Max.String()} {
		ws := resumeOn(t, e, "f", after)
		r := next(t, ws, "subscribed")
		if r.Recovered == nil || *r.Recovered || r.Position != last {
			t.Fatalf("after %s: recovered %v, position %s; want false, %s", after, r.Recovered, r.Position, last)
		}
		last = appendTo(t, rdb, ks, "f", ks.Notify("f"), 1)
		if got, code := readMessages(ws, 5*time.Second, func(string) bool { return true }); len(got) != 1 || got[0] != last {
			t.Fatalf("after %s: got %v (close %d), want %s", after, got, code, last)
		}
	}
}

// TestResumeQuiet: a client subscribed to a channel nothing was published
// on is cut and resumes from the position it was given, 0-0, with the
// channel still quiet: it missed nothing. Likewise after the channel's
// stream expired, whose last id outlives it.
func TestResumeQuiet(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"})
	resume := func(ch, want string) {
		t.Helper()
		ws, r := subscribedTo(t, e, ch)
		ws.Close() // cut
		pos := r.Position
		if pos != want {
			t.Fatalf("%s: position %s, want %s", ch, pos, want)
		}
		if r := next(t, resumeOn(t, e, ch, pos), "subscribed"); r.Recovered == nil || !*r.Recovered {
			t.Fatalf("%s: resume from %s with nothing published says recovered %v", ch, pos, r.Recovered)
		}
	}
	resume("quiet", "0-0")

	last := appendTo(t, rdb, ks, "expired", ks.Notify("expired"), 1)
	if err := rdb.Del(t.Context(), ks.Stream("expired")).Err(); err != nil { // as its TTL would
		t.Fatal(err)
	}
	resume("expired", last)
}

// TestUnreadableNotification: a notification this egress cannot parse
// (another release's format during a rolling upgrade, or anything else
// published on the channel) still says that the channel's stream grew.
// The egress reads the stream at once, instead of leaving the message
// there until the next one shows the gap, and logs the episode once, not
// once per notification.
func TestUnreadableNotification(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	logs := &testkit.SyncBuffer{}
	e := startEgressLogging(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"}, logs)
	ws, _ := subscribedTo(t, e, "a")
	id := appendTo(t, rdb, ks, "a", ks.Notify("a"), 0)
	if got, code := readMessages(ws, 5*time.Second, func(string) bool { return true }); len(got) != 1 || got[0] != id {
		t.Fatalf("first message: got %v (close %d), want %s", got, code, id)
	}
	for i, payload := range []string{"v2|something else", "", "1-0\n2-0\nx"} {
		// In the stream, announced where nobody listens; then something
		// unreadable on a's own notification channel.
		id := appendTo(t, rdb, ks, "a", ks.Notify("nobody"), 1+i)
		if err := rdb.SPublish(t.Context(), ks.Notify("a"), payload).Err(); err != nil {
			t.Fatal(err)
		}
		if got, code := readMessages(ws, 3*time.Second, func(string) bool { return true }); len(got) != 1 || got[0] != id {
			t.Fatalf("after unreadable notification %q: got %v (close %d), want %s", payload, got, code, id)
		}
	}
	id = appendTo(t, rdb, ks, "a", ks.Notify("a"), 9)
	if got, code := readMessages(ws, 3*time.Second, func(string) bool { return true }); len(got) != 1 || got[0] != id {
		t.Fatalf("next readable notification: got %v (close %d), want %s", got, code, id)
	}
	if n := strings.Count(logs.String(), `"msg":"unreadable notifications"`); n != 1 {
		t.Errorf("%d log lines for three unreadable notifications, want 1:\n%s", n, logs.String())
	}
}

// TestGapSparesSubscribersAhead: the hub finds a gap in a channel's chain
// (notifications lost while the stream was trimmed), but two subscribers
// here had resumed meanwhile and read the missing messages from the
// stream themselves, one up to the last of them, the other past it: they
// lost nothing, stay open, and get what follows once each, in order.
// Those that did miss messages (a live subscriber, and one that resumed
// before they were published) are closed with 1011 as before, and told
// recovered:false on resume.
func TestGapSparesSubscribersAhead(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	logs := &testkit.SyncBuffer{}
	e := startEgressLogging(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"}, logs)
	lost := ks.Notify("room") + "-lost"
	// resumed resumes after `after`, reads its replay up to want's last
	// id, and waits for the answer to a ping, which the connection sends
	// once the subscribe is done (it is live).
	resumed := func(after string, want []string) *websocket.Conn {
		t.Helper()
		ws := resumeOn(t, e, "room", after)
		if r := next(t, ws, "subscribed"); r.Recovered == nil || !*r.Recovered {
			t.Fatalf("resume after %s: recovered %v, want true", after, r.Recovered)
		}
		if len(want) > 0 {
			got, code := readMessages(ws, 5*time.Second, func(id string) bool { return id == want[len(want)-1] })
			if fmt.Sprint(got) != fmt.Sprint(want) {
				t.Fatalf("replay after %s: %v (close %d), want %v", after, got, code, want)
			}
		}
		send(t, ws, map[string]any{"type": "ping", "ref": 1})
		next(t, ws, "pong")
		return ws
	}

	live, _ := subscribedTo(t, e, "room")
	ids := []string{appendTo(t, rdb, ks, "room", ks.Notify("room"), 1)}
	if got := nextData(t, live); got != "1" {
		t.Fatalf("first message %s", got)
	}
	behind := resumed(ids[0], nil) // at ids[0], like live
	for i := 2; i <= 5; i++ {      // their notifications are lost
		ids = append(ids, appendTo(t, rdb, ks, "room", lost, i))
	}
	atEnd := resumed(ids[0], ids[1:5]) // at ids[4], the last message trimmed
	ids = append(ids, appendTo(t, rdb, ks, "room", lost, 6))
	ahead := resumed(ids[0], ids[1:6]) // at ids[5], past it
	if err := rdb.XTrimMaxLen(t.Context(), ks.Stream("room"), 1).Err(); err != nil {
		t.Fatal(err)
	}
	ids = append(ids, appendTo(t, rdb, ks, "room", ks.Notify("room"), 7)) // shows the gap
	ids = append(ids, appendTo(t, rdb, ks, "room", ks.Notify("room"), 8))

	for name, ws := range map[string]*websocket.Conn{"live": live, "behind": behind} {
		if got, code := readMessages(ws, 5*time.Second, nil); code != protocol.CloseInternal || len(got) != 0 {
			t.Errorf("%s subscriber after the gap: messages %v, close %d; want none and %d", name, got, code, protocol.CloseInternal)
		}
	}
	for _, c := range []struct {
		name string
		ws   *websocket.Conn
		want []string
	}{
		{"atEnd", atEnd, ids[5:]},
		{"ahead", ahead, ids[6:]},
	} {
		got, code := readMessages(c.ws, 5*time.Second, func(id string) bool { return id == ids[len(ids)-1] })
		if code != 0 || fmt.Sprint(got) != fmt.Sprint(c.want) {
			t.Errorf("%s subscriber after the gap: messages %v, close %d; want %v and open", c.name, got, code, c.want)
		}
	}
	if n := e.s.hub.gaps.Load(); n != 1 {
		t.Errorf("gaps counted: %d, want 1", n)
	}
	if !strings.Contains(logs.String(), `"msg":"stream gap"`) || !strings.Contains(logs.String(), `"closed":2,"kept":2}`) {
		t.Errorf("no stream gap log line with closed 2, kept 2:\n%s", logs.String())
	}

	// A subscriber that was closed is told on resume.
	r := next(t, resumeOn(t, e, "room", ids[0]), "subscribed")
	if r.Recovered == nil || *r.Recovered || r.Position != ids[4] {
		t.Fatalf("resume: recovered %v, position %s; want false, %s", r.Recovered, r.Position, ids[4])
	}
}

// TestGapDuringReplay: the hub finds a gap (notifications lost while the
// stream was trimmed past what it delivered) while a connection is
// between its replay's first read and the end of its replay. Its fate is
// decided when the replay ends: a replay that had read the missing
// messages from the stream before the trim lacks nothing and stays open;
// one that had not (a replay of two batches, the gap past its first) is
// closed with 1011, as a subscriber lacking them is, and its messages
// before the close have no gap. Before, both were closed.
func TestGapDuringReplay(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		lost int  // messages after the resume point whose notifications are lost
		kept bool // whether the replay read them all before the trim
	}{
		{"replay read past the missing messages", 4, true},
		{"replay short of the missing messages", replayBatch + 50, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			rdb, prefix := redistest.Client(t)
			ks := keys.Scheme{Prefix: prefix}
			key := ks.Stream("room")
			logs := &testkit.SyncBuffer{}
			e := startEgressLogging(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"}, logs)
			live, _ := subscribedTo(t, e, "room")
			ids := []string{appendTo(t, rdb, ks, "room", ks.Notify("room"), 0)}
			if got := nextData(t, live); got != "0" {
				t.Fatalf("first message %s", got)
			}
			for i := 1; i <= tc.lost; i++ {
				ids = append(ids, appendTo(t, rdb, ks, "room", ks.Notify("room")+"-lost", i))
			}
			// The replay's first read returns, then waits while the gap
			// is made and found.
			reached, release := make(chan struct{}), make(chan struct{})
			var reads atomic.Int64
			rdb.AddHook(aroundCmd{after: func(cmd redis.Cmder) {
				if a := cmd.Args(); strings.EqualFold(cmd.Name(), "xrange") && len(a) > 1 && a[1] == key && reads.Add(1) == 1 {
					close(reached)
					<-release
				}
			}})
			ws := resumeOn(t, e, "room", ids[0])
			select {
			case <-reached:
			case <-time.After(5 * time.Second):
				close(release)
				t.Fatal("the replay made no read")
			}
			if err := rdb.XTrimMaxLen(t.Context(), key, 1).Err(); err != nil {
				close(release)
				t.Fatal(err)
			}
			ids = append(ids, appendTo(t, rdb, ks, "room", ks.Notify("room"), -1)) // shows the gap
			testkit.Eventually(t, 5*time.Second, func() error {
				if n := e.s.hub.gaps.Load(); n != 1 {
					return fmt.Errorf("gaps counted: %d, want 1", n)
				}
				return nil
			})
			close(release)
			ids = append(ids, appendTo(t, rdb, ks, "room", ks.Notify("room"), -2))

			if got, code := readMessages(live, 5*time.Second, nil); code != protocol.CloseInternal || len(got) != 0 {
				t.Errorf("live subscriber after the gap: messages %v, close %d; want none and %d", got, code, protocol.CloseInternal)
			}
			last := ids[len(ids)-1]
			if tc.kept {
				if r := next(t, ws, "subscribed"); r.Recovered == nil || !*r.Recovered {
					t.Fatalf("recovered %v, want true", r.Recovered)
				}
				got, code := readMessages(ws, 5*time.Second, func(id string) bool { return id == last })
				if extra, c := readMessages(ws, 200*time.Millisecond, nil); len(extra) > 0 || c > 0 {
					got, code = append(got, extra...), c
				}
				if code != 0 || !slices.Equal(got, ids[1:]) {
					t.Fatalf("resumed connection: %d messages (…%v), close %d; want %d (…%v) and open",
						len(got), got[max(0, len(got)-3):], code, len(ids)-1, ids[len(ids)-3:])
				}
				if !strings.Contains(logs.String(), `"replaying":1,"closed":1,"kept":0}`) {
					t.Errorf("no stream gap log line with replaying 1, closed 1, kept 0:\n%s", logs.String())
				}
				return
			}
			// The subscribed reply (recovered: true) and part of the
			// first batch may be dropped with the queue at the close.
			got, code := readMessages(ws, 5*time.Second, func(id string) bool { return id == last })
			if code != protocol.CloseInternal || len(got) > replayBatch || !slices.Equal(got, ids[1:1+len(got)]) {
				t.Fatalf("resumed connection: %d messages (…%v), close %d; want at most its first batch, in order, then close %d",
					len(got), got[max(0, len(got)-3):], code, protocol.CloseInternal)
			}
		})
	}
}

// TestUndecodableEntrySkipped: a stream entry whose frame no client could
// read (written by a release that names a field differently: make
// upgrade-check) is skipped both where the egress reads streams, a
// resume's replay and a catch-up after a lost notification, and logged
// once; the messages around it arrive, once each, in order. Before, the
// egress sent the broken frame.
func TestUndecodableEntrySkipped(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	logs := &testkit.SyncBuffer{}
	e := startEgressLogging(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"}, logs)
	live, _ := subscribedTo(t, e, "room")

	first := appendTo(t, rdb, ks, "room", ks.Notify("room"), 1)
	// The broken entry, in the chain but without its tail, announced
	// where nobody listens: the live subscriber's egress reads it when the
	// next notification names it as its predecessor.
	key := ks.Stream("room")
	head, _ := (&stream.Message{Channel: "room"}).Frame()
	broken, err := rdb.XAdd(t.Context(), &redis.XAddArgs{Stream: key, Values: []any{"h", head, "T", `","ts":1,"data":2}`, "g", "", "s", "1", "p", first}}).Result()
	if err != nil {
		t.Fatal(err)
	}
	if err := rdb.Set(t.Context(), keys.Last(key), broken, 0).Err(); err != nil {
		t.Fatal(err)
	}
	last := appendTo(t, rdb, ks, "room", ks.Notify("room"), 3)

	// Every frame, not only the messages readMessages can parse: a frame
	// that is not JSON is one too many.
	frames := func(ws *websocket.Conn) []string {
		var out []string
		for {
			_ = ws.SetReadDeadline(time.Now().Add(5 * time.Second))
			_, b, err := ws.ReadMessage()
			if err != nil {
				return append(out, "error: "+err.Error())
			}
			var f struct{ Type, ID string }
			if json.Unmarshal(b, &f) != nil {
				out = append(out, "not JSON: "+string(b))
				continue
			}
			if f.Type == "message" {
				out = append(out, f.ID)
				if f.ID == last {
					return out
				}
			}
		}
	}
	if got := frames(live); !slices.Equal(got, []string{first, last}) {
		t.Errorf("live subscriber (catch-up): got %q, want [%s %s]", got, first, last)
	}
	resumed := resumeOn(t, e, "room", "0-0")
	if got := frames(resumed); !slices.Equal(got, []string{first, last}) {
		t.Errorf("resume: got %q, want [%s %s]", got, first, last)
	}
	lines := logs.Lines(t, "undecodable stream entries")
	if len(lines) != 1 || lines[0]["level"] != "WARN" || lines[0]["id"] != broken {
		t.Errorf("the skipped entry logged %d warnings, want one naming %s:\n%s", len(lines), broken, logs.String())
	}
}

// readThrough reads ws's messages until last (readMessages), then those
// that come within 200 ms more: a duplicate of one already read would
// come then.
func readThrough(ws *websocket.Conn, within time.Duration, last string) ([]string, int) {
	got, code := readMessages(ws, within, func(id string) bool { return id == last })
	if more, _ := readMessages(ws, 200*time.Millisecond, nil); len(more) > 0 {
		got = append(got, more...)
	}
	return got, code
}

// TestUndecodableNotificationSkipped: a notification whose frame no
// client could read is not sent on the live path, as a catch-up reading
// its entry would not send it (TestUndecodableEntrySkipped). One whose
// entry is in the stream, next in the chain (another release's frame
// format), is passed without a read: the next notification names it and
// is delivered at once. Ones published by hand (their ids in no stream,
// their predecessor 0-0) move the channel's position nowhere: the
// messages after them arrive, in order, with no gap and no close. Before,
// each such frame went out raw to every subscriber (the Go and the
// JavaScript clients drop a frame that is not JSON, a plain WebSocket
// gets it), and one with an id ahead of the stream's hid every message up
// to that id.
func TestUndecodableNotificationSkipped(t *testing.T) {
	t.Parallel()
	srv := redistest.Start(t) // its own: its command counts are this test's
	rdb := redis.NewClient(srv.Options())
	defer rdb.Close()
	prefix := redistest.Prefix(t)
	ks := keys.Scheme{Prefix: prefix}
	logs := &testkit.SyncBuffer{}
	e := startEgressLogging(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"}, logs)
	live, _ := subscribedTo(t, e, "room")
	notify := ks.Notify("room")

	// Every frame up to last, not only the messages readMessages can
	// parse: a frame that is not a message is one too many.
	frames := func(last string) []string {
		var out []string
		for {
			_ = live.SetReadDeadline(time.Now().Add(5 * time.Second))
			_, b, err := live.ReadMessage()
			if err != nil {
				return append(out, "error: "+err.Error())
			}
			var f struct{ Type, ID string }
			if json.Unmarshal(b, &f) != nil || f.Type != "message" {
				out = append(out, "not a message: "+string(b))
				continue
			}
			if out = append(out, f.ID); f.ID == last {
				return out
			}
		}
	}
	first := appendTo(t, rdb, ks, "room", notify, 1)
	if got := frames(first); !slices.Equal(got, []string{first}) {
		t.Fatalf("got %q, want [%s]", got, first)
	}
	reads := commandCalls(t, rdb)["xrange"]

	// An entry in another release's frame format, appended after first
	// and announced as the append script does.
	key := ks.Stream("room")
	head, tail := "message\troom\t", "\t1"
	broken, err := rdb.XAdd(t.Context(), &redis.XAddArgs{Stream: key, Values: []any{"h", head, "t", tail, "g", "", "s", "1", "p", first}}).Result()
	if err != nil {
		t.Fatal(err)
	}
	if err := rdb.Set(t.Context(), keys.Last(key), broken, 0).Err(); err != nil {
		t.Fatal(err)
	}
	if err := rdb.SPublish(t.Context(), notify, first+"\n"+broken+"\n1\n\n"+head+broken+tail).Err(); err != nil {
		t.Fatal(err)
	}
	second := appendTo(t, rdb, ks, "room", notify, 2)
	if got := frames(second); !slices.Equal(got, []string{second}) {
		t.Errorf("after an entry of another format: got %q, want [%s]", got, second)
	}
	if n := commandCalls(t, rdb)["xrange"] - reads; n != 0 {
		t.Errorf("%d stream reads for a notification of another format that follows the position, want none", n)
	}

	// By hand, as redis-cli SPUBLISH would: ids just past the stream's
	// last and far ahead of it, frames that are no JSON object.
	sid := stream.MustParseID(second)
	for _, id := range []stream.ID{{MS: sid.MS, Seq: sid.Seq + 1}, {MS: uint64(time.Now().Add(time.Hour).UnixMilli())}} {
		for _, frame := range []string{"hello", `["message"]`} {
			if err := rdb.SPublish(t.Context(), notify, "0-0\n"+id.String()+"\n1\n\n"+frame).Err(); err != nil {
				t.Fatal(err)
			}
		}
	}
	var want []string
	for i := range 3 {
		want = append(want, appendTo(t, rdb, ks, "room", notify, 3+i))
	}
	if got := frames(want[len(want)-1]); !slices.Equal(got, want) {
		t.Errorf("after notifications published by hand: got %q, want %q", got, want)
	}
	if n := e.s.hub.gaps.Load(); n != 0 {
		t.Errorf("%d gaps, want none", n)
	}
	if strings.Contains(logs.String(), `"stream gap"`) {
		t.Errorf("a stream gap logged:\n%s", logs.String())
	}
	lines := logs.Lines(t, "undecodable stream entries")
	if len(lines) != 1 || lines[0]["level"] != "WARN" || lines[0]["id"] != broken {
		t.Errorf("the skipped frames logged %d warnings, want one naming %s:\n%s", len(lines), broken, logs.String())
	}
}
