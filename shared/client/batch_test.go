package client

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/wsrelay/wsrelay/shared/protocol"
)

// arrival is a frame the scripted server read, and when.
type arrival struct {
	at    time.Time
	frame []byte
}

// readAll reads the client's frames into a channel until the socket ends.
func readAll(ws *websocket.Conn) <-chan arrival {
	ch := make(chan arrival, 100)
	go func() {
		defer close(ch)
		for {
			_, b, err := ws.ReadMessage()
			if err != nil {
				return
			}
			ch <- arrival{time.Now(), b}
		}
	}()
	return ch
}

// TestSubscribesAfterWelcome: on each connection the client sends its
// subscribes once it has read the welcome, not before. A welcome with
// max_frame_bytes gets them packed into as few frames as fit (each within
// the limit, in subscription order); one without (an older server) gets
// one frame each, and so does one whose max_frame_bytes is not a
// positive integer: the value is ignored as if absent, not the welcome. A
// Subscribe made while connected is one frame.
func TestSubscribesAfterWelcome(t *testing.T) {
	t.Parallel()
	long := strings.Repeat("x", 40) // a subscribe of ~90 bytes
	welcome := func(maxFrame string) string {
		if maxFrame == "" {
			return `{"type":"welcome","connection_id":"c1","instance":"i"}`
		}
		return `{"type":"welcome","connection_id":"c1","instance":"i","max_frame_bytes":` + maxFrame + `}`
	}
	for _, tc := range []struct {
		name     string
		maxFrame string // the welcome's max_frame_bytes, as JSON; "": none
		limit    int    // what the client should take it for
		frames   int    // frames for the 5 subscribes
	}{
		{"older server", "", 0, 5},
		{"batching server", "65536", 65536, 1},
		{"small frames", "256", 256, 2},
		{"string", `"65536"`, 0, 5},
		{"fraction", "65536.5", 0, 5},
		{"exponent", "1e5", 0, 5},
		{"negative", "-1", 0, 5},
		{"zero", "0", 0, 5},
		{"null", "null", 0, 5},
		{"object", `{"bytes":65536}`, 0, 5},
		{"too large", "99999999999999999999", 0, 5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			limit := tc.limit
			result := make(chan error, 1)
			subscribed := make(chan struct{}) // closed once the five Subscribes are made
			url, _ := scripted(t, func(t *testing.T, ws *websocket.Conn) {
				in := readAll(ws)
				// Welcomed once the client has the five: a fixed 300 ms
				// here was no bound on a loaded machine, where the test
				// goroutine could still be between two Subscribes, and
				// the last ones went one frame each after the welcome.
				select {
				case <-subscribed:
				case <-time.After(5 * time.Second):
				}
				welcomed := time.Now()
				write(t, ws, welcome(tc.maxFrame))
				result <- func() error {
					var refs []string
					for frames := 0; len(refs) < 6; frames++ {
						var a arrival
						select {
						case a = <-in:
						case <-time.After(5 * time.Second):
							return fmt.Errorf("%d subscribes in %d frames, then nothing", len(refs), frames)
						}
						if a.at.Before(welcomed) {
							return fmt.Errorf("frame %s read before the welcome was sent", a.frame)
						}
						if limit > 0 && len(a.frame) > limit {
							return fmt.Errorf("frame of %d bytes over max_frame_bytes %d", len(a.frame), limit)
						}
						lines := bytes.Split(a.frame, []byte("\n"))
						if limit == 0 && len(lines) > 1 {
							return fmt.Errorf("several requests in a frame to an older server: %s", a.frame)
						}
						for _, l := range lines {
							var r protocol.Request
							if err := json.Unmarshal(l, &r); err != nil || r.Type != protocol.TypeSubscribe {
								return fmt.Errorf("request %s: %v", l, err)
							}
							refs = append(refs, string(r.Ref))
						}
						if len(refs) == 5 && frames+1 != tc.frames {
							return fmt.Errorf("5 subscribes in %d frames, want %d", frames+1, tc.frames)
						}
						if len(refs) == 6 && len(lines) != 1 {
							return fmt.Errorf("the Subscribe made while connected came in a frame of %d", len(lines))
						}
						if len(refs) == 5 {
							write(t, ws, `{"type":"pong"}`) // the client subscribes once more
						}
					}
					if got := strings.Join(refs, " "); got != "1 2 3 4 5 6" {
						return fmt.Errorf("refs %s, want 1 2 3 4 5 6", got)
					}
					return nil
				}()
				for range in { // until the client goes
				}
			})
			welcomes := make(chan Welcome, 1)
			c := dialed(t, Options{URL: url, OnWelcome: func(w Welcome) { welcomes <- w }})
			for i := range 5 {
				if _, err := c.Subscribe(fmt.Sprintf("%s-%d", long, i), Handler{}); err != nil {
					t.Fatal(err)
				}
			}
			close(subscribed)
			// Once connected and the five sent, one more.
			deadline := time.Now().Add(5 * time.Second)
			for c.State() != StateConnected && time.Now().Before(deadline) {
				time.Sleep(10 * time.Millisecond)
			}
			time.Sleep(100 * time.Millisecond)
			if _, err := c.Subscribe("late", Handler{}); err != nil {
				t.Fatal(err)
			}
			select {
			case err := <-result:
				if err != nil {
					t.Fatal(err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("the server script did not finish")
			}
			if w := <-welcomes; w.MaxFrameBytes != int64(limit) || w.ConnectionID != "c1" {
				t.Fatalf("OnWelcome got %+v, want connection c1 and MaxFrameBytes %d", w, limit)
			}
		})
	}
}

// TestCloseBeforeWelcome: Close while the client waits for a welcome that
// does not come returns at once, having sent no request.
func TestCloseBeforeWelcome(t *testing.T) {
	t.Parallel()
	got := make(chan []byte, 10)
	url, upgrades := scripted(t, func(t *testing.T, ws *websocket.Conn) {
		for a := range readAll(ws) {
			got <- a.frame
		}
	})
	c, err := Dial(Options{URL: url})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Subscribe("a", Handler{}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for upgrades.Load() == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond)
	start := time.Now()
	_ = c.Close()
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("Close took %v", d)
	}
	select {
	case f := <-got:
		t.Fatalf("the client sent %s before any welcome", f)
	default:
	}
}

// TestSubscribeFramesBounded: the packed subscribes of a reconnect fill
// each frame up to min(max_frame_bytes, 64 KiB) and never past it, the
// newline between two requests counted: two subscribes whose bytes alone
// fit exactly, but not with their newline, go in two frames; and a
// server that allows more than 64 KiB still gets frames of 64 KiB at
// most.
func TestSubscribeFramesBounded(t *testing.T) {
	subscribed := func(t *testing.T, n int, name func(int) string) *Client {
		t.Helper()
		c, err := newClient(Options{URL: "ws://egress.test/ws"}) // not run: it sends nothing
		if err != nil {
			t.Fatal(err)
		}
		for i := range n {
			if _, err := c.Subscribe(name(i), Handler{}); err != nil {
				t.Fatal(err)
			}
		}
		return c
	}
	frames := func(c *Client, maxFrame int64) [][]byte {
		c.writing.Lock()
		defer c.writing.Unlock()
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.subscribeFramesLocked(maxFrame)
	}

	c := subscribed(t, 2, func(i int) string { return fmt.Sprintf("a-%d", i) })
	var both int64
	for _, f := range frames(c, 0) { // one a frame: their sizes
		both += int64(len(f))
	}
	for _, tc := range []struct {
		maxFrame int64
		want     int
	}{{both, 2}, {both + 1, 1}} {
		got := frames(c, tc.maxFrame)
		if len(got) != tc.want {
			t.Errorf("max_frame_bytes %d: %d frames, want %d", tc.maxFrame, len(got), tc.want)
		}
		for _, f := range got {
			if int64(len(f)) > tc.maxFrame {
				t.Errorf("max_frame_bytes %d: a frame of %d bytes", tc.maxFrame, len(f))
			}
		}
	}

	long := strings.Repeat("x", 120)
	c = subscribed(t, 1000, func(i int) string { return fmt.Sprintf("%s-%d", long, i) })
	got := frames(c, 10<<20)
	var reqs int
	for _, f := range got {
		if len(f) > 64<<10 {
			t.Errorf("max_frame_bytes 10 MiB: a frame of %d bytes, over 64 KiB", len(f))
		}
		reqs += len(bytes.Split(f, []byte("\n")))
	}
	if reqs != 1000 || len(got) < 2 {
		t.Errorf("%d subscribes in %d frames, want 1000 in several", reqs, len(got))
	}
}
