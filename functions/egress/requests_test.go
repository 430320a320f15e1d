package main

import (
	"context"
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/wsrelay/wsrelay/shared/auth"
	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/protocol"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/stream"
)

// sendRaw writes one text frame as given.
func sendRaw(t *testing.T, ws *websocket.Conn, frame string) {
	t.Helper()
	if err := ws.WriteMessage(websocket.TextMessage, []byte(frame)); err != nil {
		t.Fatal(err)
	}
}

// nextReply reads the next frame that is not a message.
func nextReply(t *testing.T, ws *websocket.Conn) protocol.Reply {
	t.Helper()
	_ = ws.SetReadDeadline(time.Now().Add(5 * time.Second))
	for {
		var r protocol.Reply
		if err := ws.ReadJSON(&r); err != nil {
			t.Fatalf("waiting for a reply: %v", err)
		}
		if r.Type != protocol.TypeMessage {
			return r
		}
	}
}

// wantReplies reads the next replies and checks them against want, each
// "type ref" or "error code ref".
func wantReplies(t *testing.T, ws *websocket.Conn, want ...string) {
	t.Helper()
	for i, w := range want {
		r := nextReply(t, ws)
		got := r.Type + " " + string(r.Ref)
		if r.Type == protocol.TypeError {
			got = "error " + r.Code + " " + string(r.Ref)
		}
		if strings.TrimSpace(got) != w {
			t.Fatalf("reply %d: %s (%+v), want %s", i, got, r, w)
		}
	}
}

// TestRequestsPerFrame: a text frame holds one or more requests, each
// handled in order as if it had come alone (docs/protocol.md).
func TestRequestsPerFrame(t *testing.T) {
	t.Parallel()
	dial := func(t *testing.T, env map[string]string) (*secEgress, *websocket.Conn, protocol.Reply) {
		t.Helper()
		env["ALLOW_ANONYMOUS"] = "true"
		e := startSecEgress(t, env)
		ws, _, err := e.dial(t, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		return e, ws, next(t, ws, protocol.TypeWelcome)
	}
	t.Run("welcome carries max_frame_bytes", func(t *testing.T) {
		t.Parallel()
		_, _, w := dial(t, map[string]string{"MAX_FRAME_BYTES": "4096"})
		if w.MaxFrameBytes != 4096 {
			t.Fatalf("welcome %+v, want max_frame_bytes 4096", w)
		}
	})
	// The idle timeout is announced only when set, so that a client that
	// probes a silent connection waits past it instead of keeping an idle
	// connection open with its pings (docs/protocol.md). A part of a ms
	// rounds up: a client waiting past a value rounded down could ping
	// before the server's own timeout.
	t.Run("welcome carries idle_timeout_ms when IDLE_TIMEOUT is set", func(t *testing.T) {
		t.Parallel()
		for _, tc := range []struct {
			idle string
			want int64
		}{{"2500ms", 2500}, {"1500100us", 1501}, {"0s", 0}} {
			_, ws, w := dial(t, map[string]string{"IDLE_TIMEOUT": tc.idle})
			if w.IdleTimeoutMs != tc.want {
				t.Fatalf("IDLE_TIMEOUT %s: welcome %+v, want idle_timeout_ms %d", tc.idle, w, tc.want)
			}
			ws.Close()
		}
	})
	t.Run("subscribes", func(t *testing.T) {
		t.Parallel()
		rdb, prefix := redistest.Client(t)
		e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"})
		ws, _, err := e.dial(t, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		next(t, ws, protocol.TypeWelcome)
		const n = 8
		var frame []string
		var want []string
		for i := range n {
			frame = append(frame, fmt.Sprintf(`{"type":"subscribe","channel":"batch-%d","ref":%d}`, i, i))
			want = append(want, fmt.Sprintf("subscribed %d", i))
		}
		sendRaw(t, ws, strings.Join(frame, "\n"))
		wantReplies(t, ws, want...)
		// Every subscription is live.
		ks := keys.Scheme{Prefix: prefix}
		var as []stream.Append
		for i := range n {
			ch := fmt.Sprintf("batch-%d", i)
			as = append(as, stream.Append{Stream: ks.Stream(ch), Notify: ks.Notify(ch),
				Msg: stream.Message{Channel: ch, TS: time.Now().UnixMilli(), Data: []byte(strconv.Itoa(i))}})
		}
		if _, err := stream.NewStore(rdb).Append(context.Background(), as); err != nil {
			t.Fatal(err)
		}
		got := map[string]bool{}
		for range n {
			got[nextData(t, ws)] = true
		}
		if len(got) != n {
			t.Fatalf("messages %v, want one on each of %d channels", got, n)
		}
	})
	t.Run("an invalid request between valid ones", func(t *testing.T) {
		t.Parallel()
		_, ws, _ := dial(t, map[string]string{})
		sendRaw(t, ws, `{"type":"ping","ref":1} {"type":"dance","ref":2} {"type":"subscribe","channel":"bad name","ref":3}`+"\n"+`{"type":"ping","ref":4}`)
		wantReplies(t, ws, "pong 1", "error unknown_type 2", "error invalid_channel 3", "pong 4")
	})
	t.Run("broken JSON drops the rest of the frame", func(t *testing.T) {
		t.Parallel()
		_, ws, _ := dial(t, map[string]string{})
		sendRaw(t, ws, `{"type":"ping","ref":1} {"type":"ping","ref":2,,} {"type":"ping","ref":3}`)
		wantReplies(t, ws, "pong 1")
		r := nextReply(t, ws)
		if r.Type != protocol.TypeError || r.Code != protocol.CodeInvalidJSON || !strings.Contains(r.Message, "rest of the frame") {
			t.Fatalf("%+v, want invalid_json saying the rest was dropped", r)
		}
		sendRaw(t, ws, `{"type":"ping","ref":5}`)
		wantReplies(t, ws, "pong 5") // not the pong to 3
	})
	t.Run("pretty-printed single object", func(t *testing.T) {
		t.Parallel()
		_, ws, _ := dial(t, map[string]string{})
		sendRaw(t, ws, "\n{\n  \"type\": \"ping\",\n  \"ref\": 1\n}\n")
		wantReplies(t, ws, "pong 1")
	})
	t.Run("ten bad requests close 1008", func(t *testing.T) {
		t.Parallel()
		_, ws, _ := dial(t, map[string]string{})
		sendRaw(t, ws, strings.Repeat(`{"type":"dance"}`+"\n", 10)+`{"type":"ping"}`)
		if code := closeCode(t, ws, 5*time.Second); code != protocol.ClosePolicy {
			t.Fatalf("close %d, want 1008", code)
		}
	})
	// Each of the ten gets its error, the tenth included, ahead of the
	// close, in one frame as in ten: the client learns what was wrong.
	// Before, the close dropped the errors still queued: none of them
	// came when the ten were in one frame.
	t.Run("the errors of the ten bad requests come before the close", func(t *testing.T) {
		t.Parallel()
		for _, frames := range []int{1, 10} {
			_, ws, _ := dial(t, map[string]string{})
			var reqs, want []string
			for i := range 10 {
				reqs = append(reqs, fmt.Sprintf(`{"type":"dance","ref":%d}`, i))
				want = append(want, fmt.Sprintf("error unknown_type %d", i))
			}
			if frames == 1 {
				sendRaw(t, ws, strings.Join(reqs, "\n"))
			} else {
				for _, r := range reqs {
					sendRaw(t, ws, r)
				}
			}
			wantReplies(t, ws, want...)
			if code := closeCode(t, ws, 5*time.Second); code != protocol.ClosePolicy {
				t.Fatalf("in %d frames: close %d, want 1008", frames, code)
			}
		}
	})
	t.Run("a valid request resets the count", func(t *testing.T) {
		t.Parallel()
		_, ws, _ := dial(t, map[string]string{})
		bad := strings.Repeat(`{"type":"dance"}`, 9)
		sendRaw(t, ws, bad+`{"type":"ping","ref":1}`+bad)
		sendRaw(t, ws, `{"type":"ping","ref":2}`)
		for range 9 {
			next(t, ws, protocol.TypeError)
		}
		wantReplies(t, ws, "pong 1")
		for range 9 {
			next(t, ws, protocol.TypeError)
		}
		wantReplies(t, ws, "pong 2")
	})
	t.Run("each request counts against MAX_FRAMES_PER_SECOND", func(t *testing.T) {
		t.Parallel()
		_, ws, _ := dial(t, map[string]string{"MAX_FRAMES_PER_SECOND": "5"})
		// 15 requests at 5 per second, a burst of 5: the ten over it are
		// held two seconds at least, and every one is answered, in order.
		var frame, want []string
		for i := range 15 {
			frame = append(frame, fmt.Sprintf(`{"type":"ping","ref":%d}`, i))
			want = append(want, fmt.Sprintf("pong %d", i))
		}
		start := time.Now()
		sendRaw(t, ws, strings.Join(frame, "\n"))
		wantReplies(t, ws, want...)
		if d := time.Since(start); d < 2*time.Second {
			t.Fatalf("15 requests at 5 per second answered in %v: not held", d)
		}
	})
	t.Run("a client held by the limit is not silent", func(t *testing.T) {
		t.Parallel()
		// The server reads nothing while it holds a frame's requests, the
		// client's pongs included: the client must not be dropped for
		// them (2×PING_INTERVAL is 400 ms here, the frame takes 2 s).
		_, ws, _ := dial(t, map[string]string{"MAX_FRAMES_PER_SECOND": "5", "PING_INTERVAL": "200ms"})
		var frame, want []string
		for i := range 15 {
			frame = append(frame, fmt.Sprintf(`{"type":"ping","ref":%d}`, i))
			want = append(want, fmt.Sprintf("pong %d", i))
		}
		sendRaw(t, ws, strings.Join(frame, "\n"))
		wantReplies(t, ws, want...)
	})
}

// TestEveryReplyEchoesRef: the reply to each request with a valid ref
// (a string or a number) echoes it, whatever the reply is, in a frame of
// its own or among others; among them the not_subscribed answering an
// unsubscribe from a channel whose subscribe was refused, and the errors
// of a request refused for a field of the wrong type or an unknown type.
func TestEveryReplyEchoesRef(t *testing.T) {
	t.Parallel()
	e := startSecEgress(t, map[string]string{"JWT_SECRET": testSecret, "MAX_SUBSCRIPTIONS": "2"})
	var reqs, want []string
	for i, tc := range []struct {
		req  string // without its ref: `,"ref":…}` is appended
		want string // "type" or "error code"
	}{
		{`{"type":"subscribe","channel":"b"`, "error forbidden"},
		{`{"type":"unsubscribe","channel":"b"`, "error not_subscribed"},
		{`{"type":"subscribe","channel":"bad name"`, "error invalid_channel"},
		{`{"type":"unsubscribe","channel":"bad name"`, "error invalid_channel"},
		{`{"type":"subscribe","channel":"a1","after":"x"`, "error invalid_after"},
		{`{"type":"unsubscribe","channel":"a1"`, "error not_subscribed"},
		{`{"type":"subscribe","channel":"a1"`, "subscribed"},
		{`{"type":"subscribe","channel":"a1"`, "error already_subscribed"},
		{`{"type":"subscribe","channel":"a2","after":"0-0"`, "subscribed"},
		{`{"type":"subscribe","channel":"a3"`, "error too_many_subscriptions"},
		{`{"type":"unsubscribe","channel":"a3"`, "error not_subscribed"},
		{`{"type":"unsubscribe","channel":"a1"`, "unsubscribed"},
		{`{"type":"unsubscribe","channel":"a1"`, "error not_subscribed"},
		{`{"type":"subscribe","channel":7`, "error invalid_frame"},
		{`{"channel":"a1"`, "error invalid_frame"},
		{`{"type":"dance"`, "error unknown_type"},
		{`{"type":"ping"`, "pong"},
		{`{"type":"refresh","token":"a.b.c"`, "error invalid_token"},
		{`{"type":"refresh","token":"` + token(t, auth.Claims{Subject: "bob"}) + `"`, "error forbidden"},
		{`{"type":"refresh","token":"` + token(t, auth.Claims{Subject: "alice", Channels: []string{"a*"}}) + `"`, "refreshed"},
	} {
		ref := strconv.Itoa(100 + i) // numbers and strings in turn
		if i%2 == 1 {
			ref = `"r-` + ref + `"`
		}
		reqs = append(reqs, tc.req+`,"ref":`+ref+`}`)
		want = append(want, tc.want+" "+ref)
	}
	dial := func(t *testing.T) *websocket.Conn {
		ws, _, err := e.dial(t, url.Values{"token": {token(t, auth.Claims{Subject: "alice", Channels: []string{"a*"}})}}, nil)
		if err != nil {
			t.Fatal(err)
		}
		next(t, ws, protocol.TypeWelcome)
		return ws
	}
	t.Run("a frame each", func(t *testing.T) {
		ws := dial(t)
		for i := range reqs {
			sendRaw(t, ws, reqs[i])
			wantReplies(t, ws, want[i])
		}
	})
	t.Run("one frame", func(t *testing.T) {
		ws := dial(t)
		sendRaw(t, ws, strings.Join(reqs, "\n"))
		wantReplies(t, ws, want...)
	})
}

// TestFrameRepliesToReadingClient: a frame holding more requests than
// SEND_QUEUE has room for replies to, sent by a client that reads the
// replies as fast as they come, gets every reply. They were queued all at
// once (the rate limit's burst, a second's worth, lets them through
// together, and MAX_FRAMES_PER_SECOND=0 lets every one through), faster
// than the writer sends them, and the client was closed 4002 as a slow
// consumer, however fast it read, as a long ?channels list was
// (TestChannelsLongList): the reference clients pack their resubscribes
// into one frame. A client that does not read is still dropped, by
// WRITE_TIMEOUT once the socket takes no more.
func TestFrameRepliesToReadingClient(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		env   map[string]string
		n     int
		pings bool // pings only
	}{
		{"small queue", map[string]string{"SEND_QUEUE": "16", "MAX_SUBSCRIPTIONS": "2"}, 50, false},
		{"no rate limit", map[string]string{"MAX_FRAMES_PER_SECOND": "0"}, 1500, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			tc.env["ALLOW_ANONYMOUS"] = "true"
			e := startSecEgress(t, tc.env)
			ws, _, err := e.dial(t, nil, nil)
			if err != nil {
				t.Fatal(err)
			}
			next(t, ws, protocol.TypeWelcome)
			// Subscribes refused (too many) and pings: replies that need no
			// round trip to Redis, queued as fast as the reader decodes.
			var b strings.Builder
			var want []string
			for i := range tc.n {
				if i%2 == 0 || tc.pings {
					fmt.Fprintf(&b, `{"type":"ping","ref":%d}`+"\n", i)
					want = append(want, "pong "+strconv.Itoa(i))
					continue
				}
				fmt.Fprintf(&b, `{"type":"subscribe","channel":"c%d","ref":%d}`+"\n", i, i)
				if i < 4 { // MAX_SUBSCRIPTIONS

					want = append(want, "subscribed "+strconv.Itoa(i))
				} else {
					want = append(want, "error "+protocol.CodeTooManySubs+" "+strconv.Itoa(i))
				}
			}
			sendRaw(t, ws, b.String())
			wantReplies(t, ws, want...)
			send(t, ws, map[string]any{"type": "ping", "ref": "after"})
			wantReplies(t, ws, `pong "after"`)
		})
	}
}
