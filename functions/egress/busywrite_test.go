package main

import (
	"bytes"
	"context"
	"net"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/stream"
)

// TestBusyWriteIsNotSilence: a client reading a long burst of live
// messages steadily, a little slower than they come, is neither closed as
// idle (4000: "no data frame either way for IDLE_TIMEOUT") nor dropped
// for a missed pong (1006), however long the writer's one write of the
// burst takes: frames go out all along, and the server's ping waits
// behind them, so that the client cannot answer it (docs/protocol.md,
// Timeouts: a client that keeps reading is not dropped).
func TestBusyWriteIsNotSilence(t *testing.T) {
	for _, tc := range []struct {
		name string
		env  map[string]string
	}{
		{"idle", map[string]string{"IDLE_TIMEOUT": "1s"}},
		// 2×PING_INTERVAL (1 s) is half the 2 s of slow reading, during
		// which the write is under way.
		{"pong", map[string]string{"PING_INTERVAL": "500ms"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rdb, prefix := redistest.Client(t)
			tc.env["ALLOW_ANONYMOUS"] = "true"
			tc.env["SEND_QUEUE"] = "4096"
			e := startEgressOn(t, rdb, prefix, tc.env)
			<-e.s.hub.inbox.ready
			// A small receive buffer, so that the writer waits for the
			// reader.
			d := websocket.Dialer{NetDialContext: rcvBufDialer(32 << 10).DialContext}
			ws, _, err := d.Dial(e.url(url.Values{"channels": {"busy"}}), nil)
			if err != nil {
				t.Fatal(err)
			}
			defer ws.Close()
			readUntil(t, ws, `"subscribed"`)
			// A small send buffer too: once the write ends, what the
			// client still has to read before the ping behind it is a
			// few frames, not the megabytes an autotuned buffer holds,
			// which a loaded machine's client took longer than
			// 2×PING_INTERVAL to read.
			cs := e.s.hub.snapshotConns()
			if len(cs) != 1 {
				t.Fatalf("%d connections, want 1", len(cs))
			}
			_ = cs[0].nc.(*net.TCPConn).SetWriteBuffer(64 << 10)
			const n = 600
			// Published while the client reads, as a client does: it
			// answers the server's pings until the burst comes, so that
			// its silence before the write does not eat into the time it
			// has to answer the ping after it.
			published := make(chan error, 1)
			go func() {
				as := make([]stream.Append, n)
				for i := range as {
					as[i] = stream.Append{Stream: keys.Scheme{Prefix: prefix}.Stream("busy"), Notify: keys.Scheme{Prefix: prefix}.Notify("busy"),
						Msg: stream.Message{Channel: "busy", TS: time.Now().UnixMilli(), Data: []byte(`"` + strings.Repeat("x", 16<<10) + `"`)}}
				}
				_, err := stream.NewStore(rdb).Append(context.Background(), as)
				published <- err
			}()
			// The client reads the first 4 MB at about 2 MB/s, with no
			// pause longer than 10 ms, for 2 s in which the writer is in
			// the middle of writing the burst. Then it reads as fast as
			// it can: the rest, in the server's socket buffer once the
			// writer is done, would otherwise take it longer than
			// IDLE_TIMEOUT, and the server's first ping after the burst
			// would wait behind it for longer than 2×PING_INTERVAL.
			start := time.Now()
			for got := 0; got < n; {
				_ = ws.SetReadDeadline(time.Now().Add(5 * time.Second))
				_, b, err := ws.ReadMessage()
				if err != nil {
					t.Fatalf("after %d of %d messages, read steadily for %v: %v", got, n, time.Since(start), err)
				}
				if bytes.Contains(b, []byte(`"message"`)) {
					if got++; got < 250 {
						time.Sleep(8 * time.Millisecond)
					}
				}
			}
			if err := <-published; err != nil {
				t.Fatal(err)
			}
			// Still open: the last message was read just now.
			send(t, ws, map[string]any{"type": "ping"})
			_ = ws.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, b, err := ws.ReadMessage(); err != nil || !bytes.Contains(b, []byte(`"pong"`)) {
				t.Fatalf("read %d messages steadily for %v, then %q, %v; want a pong", n, time.Since(start), b, err)
			}
		})
	}
}
