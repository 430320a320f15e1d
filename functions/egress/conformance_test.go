package main

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/protocol"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/stream"
)

// rawWS is a client that speaks RFC 6455 frame by frame over its own TCP
// socket: it writes any bytes, broken frames included, and reads the
// server's frames as they are (a WebSocket library would answer pings and
// closes by itself, and refuse to send what these tests send).
type rawWS struct {
	t  *testing.T
	nc net.Conn
	br *bufio.Reader
}

// rawDial opens /ws on e with a hand-written handshake and reads the
// welcome.
func rawDial(t *testing.T, e *secEgress, d *net.Dialer) *rawWS {
	t.Helper()
	c := rawUpgrade(t, e, d, "/ws")
	if op, p := c.read(); op != opText || !bytes.Contains(p, []byte(`"welcome"`)) {
		t.Fatalf("first frame: op %d %q, want the welcome", op, p)
	}
	return c
}

// rawUpgrade opens path (/ws and its query) on e with a hand-written
// handshake, and reads nothing after the server's 101.
func rawUpgrade(t *testing.T, e *secEgress, d *net.Dialer, path string) *rawWS {
	t.Helper()
	if d == nil {
		d = &net.Dialer{}
	}
	nc, err := d.Dial("tcp", strings.TrimPrefix(e.srv.URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	_ = nc.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintf(nc, "GET %s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", path)
	br := bufio.NewReader(nc)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("handshake: %v %v", resp, err)
	}
	return &rawWS{t: t, nc: nc, br: br}
}

func (c *rawWS) send(frames ...[]byte) {
	c.t.Helper()
	_ = c.nc.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.nc.Write(bytes.Join(frames, nil)); err != nil {
		c.t.Fatal(err)
	}
}

// next reads the server's next frame (unmasked, final, short or 16-bit
// length: all the server writes in these tests).
func (c *rawWS) next() (op byte, payload []byte, err error) {
	_ = c.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	var h [4]byte
	if _, err := io.ReadFull(c.br, h[:2]); err != nil {
		return 0, nil, err
	}
	if h[0]&0xF0 != 0x80 || h[1]&0x80 != 0 {
		return 0, nil, fmt.Errorf("server frame header %x", h[:2])
	}
	n := int(h[1])
	if n == 126 {
		if _, err := io.ReadFull(c.br, h[2:4]); err != nil {
			return 0, nil, err
		}
		n = int(binary.BigEndian.Uint16(h[2:4]))
	}
	p := make([]byte, n)
	if _, err := io.ReadFull(c.br, p); err != nil {
		return 0, nil, err
	}
	return h[0] & 0x0F, p, nil
}

func (c *rawWS) read() (byte, []byte) {
	c.t.Helper()
	op, p, err := c.next()
	if err != nil {
		c.t.Fatal(err)
	}
	return op, p
}

// closed reads the server's close frame, skipping data frames, and
// returns its code (1005 for none), then checks that the server ends the
// TCP connection within end.
func (c *rawWS) closed(end time.Duration) int {
	c.t.Helper()
	for {
		op, p := c.read()
		if op != opClose {
			continue
		}
		code := 1005
		if len(p) >= 2 {
			code = int(binary.BigEndian.Uint16(p))
		}
		_ = c.nc.SetReadDeadline(time.Now().Add(end))
		if b, err := c.br.ReadByte(); err == nil {
			c.t.Fatalf("byte %x after the close frame", b)
		} else if ne := net.Error(nil); errors.As(err, &ne) && ne.Timeout() {
			c.t.Fatalf("the server did not end the connection within %v of its close frame", end)
		}
		return code
	}
}

func u16(code int) []byte { return binary.BigEndian.AppendUint16(nil, uint16(code)) }

// TestConformance checks the egress's server side against RFC 6455 over
// real sockets, in what the frame reader's own test (TestFrameReader)
// cannot see: what the server answers, and how it ends the connection.
func TestConformance(t *testing.T) {
	t.Parallel()
	e := startSecEgress(t, map[string]string{"ALLOW_ANONYMOUS": "true", "MAX_FRAME_BYTES": "256", "MAX_FRAMES_PER_SECOND": "0"})
	ping := func(ref string) []byte { return []byte(`{"type":"ping","ref":"` + ref + `"}`) }

	t.Run("pong echoes the ping", func(t *testing.T) {
		t.Parallel()
		c := rawDial(t, e, nil)
		all := make([]byte, 125)
		for i := range all {
			all[i] = byte(i * 2)
		}
		for _, p := range [][]byte{nil, {0}, all} {
			c.send(clientFrame(true, opPing, p))
			if op, got := c.read(); op != opPong || !bytes.Equal(got, p) {
				t.Fatalf("ping %x answered op %d %x", p, op, got)
			}
		}
	})
	t.Run("unsolicited pong ignored", func(t *testing.T) {
		t.Parallel()
		c := rawDial(t, e, nil)
		c.send(clientFrame(true, opPong, []byte("x")), clientFrame(true, opPong, nil), clientFrame(true, opText, ping("1")))
		if op, p := c.read(); op != opText || !bytes.Contains(p, []byte(`"ref":"1"`)) {
			t.Fatalf("op %d %s, want the pong reply", op, p)
		}
	})
	t.Run("code point across fragments", func(t *testing.T) {
		t.Parallel()
		c := rawDial(t, e, nil)
		p := ping("é€𝄞")
		i := bytes.Index(p, []byte("€")) + 1
		j := bytes.Index(p, []byte("𝄞")) + 2
		c.send(clientFrame(false, opText, p[:i]), clientFrame(true, opPing, []byte("between")),
			clientFrame(false, opContinuation, p[i:j]), clientFrame(true, opContinuation, p[j:]))
		if op, got := c.read(); op != opPong || string(got) != "between" {
			t.Fatalf("op %d %q, want the pong first", op, got)
		}
		if op, got := c.read(); op != opText || !bytes.Contains(got, []byte(`"ref":"é€𝄞"`)) {
			t.Fatalf("op %d %s, want the pong reply", op, got)
		}
	})
	t.Run("close codes", func(t *testing.T) {
		t.Parallel()
		for _, code := range []int{1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999} {
			c := rawDial(t, e, nil)
			c.send(clientFrame(true, opClose, append(u16(code), strings.Repeat("r", 123)...)))
			if got := c.closed(2 * time.Second); got != code {
				t.Errorf("close %d answered %d, want the echo", code, got)
			}
		}
		for _, code := range []int{0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535} {
			c := rawDial(t, e, nil)
			c.send(clientFrame(true, opClose, u16(code)))
			if got := c.closed(2 * time.Second); got != protocol.CloseProtocolError {
				t.Errorf("close %d answered %d, want 1002", code, got)
			}
		}
		c := rawDial(t, e, nil)
		c.send(clientFrame(true, opClose, nil))
		if got := c.closed(2 * time.Second); got != 1005 {
			t.Errorf("empty close answered %d, want an empty close", got)
		}
	})
	// Control frames are checked as such wherever they come, between a
	// message's fragments too (RFC 6455 §5.5): at most 125 bytes, never
	// fragmented, no reserved bits; each breach closes 1002 (docs/protocol.md).
	t.Run("bad control frames", func(t *testing.T) {
		t.Parallel()
		rsv := clientFrame(true, opPing, []byte("p"))
		rsv[0] |= 0x40
		cases := []struct {
			name   string
			frames [][]byte
		}{
			{"close of 126 bytes", [][]byte{clientFrame(true, opClose, append(u16(1000), strings.Repeat("r", 124)...))}},
			{"fragmented close", [][]byte{clientFrame(false, opClose, u16(1000))}},
			{"pong of 126 bytes", [][]byte{clientFrame(true, opPong, bytes.Repeat([]byte("p"), 126))}},
			{"reserved bit on a ping", [][]byte{rsv}},
			{"one-byte close between fragments", [][]byte{clientFrame(false, opText, ping("1")[:5]), clientFrame(true, opClose, []byte{3})}},
			{"fragmented ping between fragments", [][]byte{clientFrame(false, opText, ping("1")[:5]), clientFrame(false, opPing, nil)}},
		}
		for _, tc := range cases {
			c := rawDial(t, e, nil)
			c.send(tc.frames...)
			if got := c.closed(2 * time.Second); got != protocol.CloseProtocolError {
				t.Errorf("%s: close %d, want 1002", tc.name, got)
			}
		}
	})
	// A close between a message's fragments ends the connection: it is
	// echoed, and the unfinished message is not handled.
	t.Run("close between fragments", func(t *testing.T) {
		t.Parallel()
		c := rawDial(t, e, nil)
		p := ping("1")
		c.send(clientFrame(false, opText, p[:5]), clientFrame(true, opClose, u16(3000)), clientFrame(true, opContinuation, p[5:]))
		if op, got := c.read(); op != opClose || !bytes.Equal(got, u16(3000)) {
			t.Fatalf("op %d %q, want the echo of close 3000 and nothing before it", op, got)
		}
	})
	// UTF-8 is a text message's rule only (RFC 6455 §8.1): a binary one
	// is refused as a request (binary_frame), not closed 1007.
	t.Run("binary frame not UTF-8", func(t *testing.T) {
		t.Parallel()
		c := rawDial(t, e, nil)
		c.send(clientFrame(true, opBinary, []byte{0xFF, 0xFE}), clientFrame(true, opText, ping("2")))
		if op, got := c.read(); op != opText || !bytes.Contains(got, []byte(`"`+protocol.CodeBinaryFrame+`"`)) {
			t.Fatalf("op %d %s, want the binary_frame error", op, got)
		}
		if op, got := c.read(); op != opText || !bytes.Contains(got, []byte(`"ref":"2"`)) {
			t.Fatalf("op %d %s, want the pong reply", op, got)
		}
	})
	// Nothing the client sends after its close is answered.
	t.Run("after the close", func(t *testing.T) {
		t.Parallel()
		c := rawDial(t, e, nil)
		c.send(clientFrame(true, opClose, u16(1000)), clientFrame(true, opPing, []byte("p")), clientFrame(true, opText, ping("1")))
		if op, p := c.read(); op != opClose || !bytes.Equal(p, u16(1000)) {
			t.Fatalf("op %d %x, want the echo of the close", op, p)
		}
		_ = c.nc.SetReadDeadline(time.Now().Add(2 * time.Second))
		if b, err := io.ReadAll(c.br); len(b) > 0 {
			t.Fatalf("%q after the close (%v)", b, err)
		}
	})
	// After its own close (here IDLE_TIMEOUT's 4000) the server waits for
	// the client's, does not answer it, and then ends the connection at
	// once; without it, a second after its close frame.
	t.Run("server close", func(t *testing.T) {
		t.Parallel()
		e := startSecEgress(t, map[string]string{"ALLOW_ANONYMOUS": "true", "IDLE_TIMEOUT": "1s"})
		for _, answer := range []bool{true, false} {
			c := rawDial(t, e, nil)
			if op, p := c.read(); op != opClose || !bytes.Equal(p[:2], u16(protocol.CloseIdleTimeout)) {
				t.Fatalf("op %d %q, want close 4000", op, p)
			}
			_ = c.nc.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
			if b, err := c.br.ReadByte(); err == nil || !errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("%x, %v: the server did not wait for the client's close", b, err)
			}
			start := time.Now()
			want := 1500 * time.Millisecond
			if answer {
				c.send(clientFrame(true, opPing, nil), clientFrame(true, opClose, u16(1000)))
				want = 300 * time.Millisecond
			}
			_ = c.nc.SetReadDeadline(time.Now().Add(3 * time.Second))
			if b, err := io.ReadAll(c.br); len(b) > 0 || err != nil || time.Since(start) > want {
				t.Fatalf("answered %v: %q, %v after %v, want the end of the stream within %v", answer, b, err, time.Since(start), want)
			}
		}
	})
}

// TestCloseAfterUnreadData: a close the client's frames caused (here
// 1009, a message over MAX_FRAME_BYTES whose rest the server never reads)
// reaches the client after the replies already due (docs/protocol.md),
// even when they are still on their way out when the server is done: the
// server's socket is not closed with the client's bytes unread, which
// makes the kernel reset the connection and throw away what was not sent
// yet, and the client would see a lost connection (and reconnect, to send
// the same message again) instead of 1009.
func TestCloseAfterUnreadData(t *testing.T) {
	t.Parallel()
	e := startSecEgress(t, map[string]string{"ALLOW_ANONYMOUS": "true", "MAX_FRAMES_PER_SECOND": "0", "SEND_QUEUE": "4096"})
	// A small receive buffer, so that the replies wait in the server's
	// socket until the client reads.
	c := rawDial(t, e, rcvBufDialer(4<<10))
	const n = 1500
	var reqs bytes.Buffer
	for i := range n {
		fmt.Fprintf(&reqs, `{"type":"ping","ref":%d}`+"\n", i)
	}
	big := clientFrame(true, opText, bytes.Repeat([]byte(" "), 1<<20))
	c.send(clientFrame(true, opText, reqs.Bytes()), big[:64<<10])
	time.Sleep(300 * time.Millisecond) // the server is done reading
	for i := range n {
		op, p, err := c.next()
		if err != nil {
			t.Fatalf("reply %d of %d: %v", i, n, err)
		}
		if op != opText || !bytes.Contains(p, []byte(`"pong"`)) {
			t.Fatalf("reply %d: op %d %s, want a pong", i, op, p)
		}
	}
	if code := c.closed(3 * time.Second); code != protocol.CloseTooBig {
		t.Fatalf("close %d, want 1009", code)
	}
}

// TestRefusedAfterClientFrames: a socket refused right after the upgrade
// (here 1013, its registry write failing; a drain's 1001 takes the same
// path) whose client has already sent frames ends as every other does:
// the close frame, then the end of the stream. Closing the socket with
// the client's bytes unread makes the kernel reset the connection,
// throwing away what it has not sent yet (the close frame, when the
// client's window is full or a segment is lost) and, on some clients'
// systems, what the client has received but not read: the client sees a
// lost connection (1006) instead of 1013 and its backoff. Over loopback
// on Linux the close frame is sent before the reset and survives it, so
// the test looks for the reset itself.
func TestRefusedAfterClientFrames(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	// Carol's registry write fails once her frames have reached the
	// server.
	sent := make(chan struct{})
	var once sync.Once
	release := func() { once.Do(func() { close(sent) }) }
	rdb.AddHook(redistest.Fail{Pipeline: func(cmds []redis.Cmder) bool {
		for _, c := range cmds {
			if a := c.Args(); len(a) > 1 && a[1] == ks.UserConns("carol") {
				<-sent
				return true
			}
		}
		return false
	}})
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"})
	t.Cleanup(release)
	c := rawUpgrade(t, e, nil, "/ws?user=carol")
	for _, ch := range []string{"a", "b", "c"} {
		c.send(clientFrame(true, opText, []byte(`{"type":"subscribe","channel":"`+ch+`"}`)))
	}
	time.Sleep(100 * time.Millisecond) // the frames are in the server's socket
	release()
	op, p, err := c.next()
	if err != nil || op != opClose || len(p) < 2 || binary.BigEndian.Uint16(p) != protocol.CloseTryAgainLater {
		t.Fatalf("first frame: op %d %q, %v; want close 1013", op, p, err)
	}
	_ = c.nc.SetReadDeadline(time.Now().Add(3 * time.Second))
	if b, err := io.ReadAll(c.br); len(b) > 0 || err != nil {
		t.Fatalf("after the close frame: %q, %v; want the end of the stream", b, err)
	}
}

// TestServerFrameLengths: every frame the server writes gives its payload
// length in the encoding RFC 6455 §5.2 prescribes: 7 bits up to 125, 126
// and 16 bits up to 65535, 127 and 64 bits above, which a client's
// WebSocket library holds it to. Messages whose frames run across both
// boundaries must each read back, over a real socket, as published. A
// payload of exactly 126 bytes written with the 7-bit length 126 is read
// by the client as a 16-bit length taken from the payload's first bytes:
// the connection's frames are garbage from there on. No other test sends
// a frame of that length but by chance.
func TestServerFrameLengths(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true", "SEND_QUEUE": "4096"})
	ws, _ := e.dialConn(t, url.Values{"channels": {"len"}})
	next(t, ws, protocol.TypeSubscribed)
	// Data of every length over a range wider than a message frame's
	// envelope (its id, channel and publish time), below each boundary.
	var as []stream.Append
	var want [][]byte
	for _, span := range [][2]int{{0, 200}, {0xFFFF - 200, 0xFFFF}} {
		for n := span[0]; n <= span[1]; n++ {
			data := []byte(strconv.Quote(strings.Repeat("d", n)))
			want = append(want, data)
			as = append(as, stream.Append{Stream: ks.Stream("len"), Notify: ks.Notify("len"),
				Msg: stream.Message{Channel: "len", TS: time.Now().UnixMilli(), Data: data}})
		}
	}
	if _, err := stream.NewStore(rdb).Append(t.Context(), as); err != nil {
		t.Fatal(err)
	}
	// read reads the next message, which must carry data, and notes its
	// frame's length; what says which message it is.
	lengths := map[int]bool{}
	read := func(data []byte, what string) int {
		t.Helper()
		_ = ws.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, b, err := ws.ReadMessage()
		if err != nil {
			t.Fatalf("%s (data of %d bytes): %v", what, len(data), err)
		}
		var r struct {
			Type string
			Data json.RawMessage
		}
		if err := json.Unmarshal(b, &r); err != nil || r.Type != "message" || !bytes.Equal(r.Data, data) {
			t.Fatalf("%s: a frame of %d bytes, %.80q (%v); want the message with data of %d bytes", what, len(b), b, err, len(data))
		}
		lengths[len(b)] = true
		return len(b)
	}
	for i, data := range want {
		read(data, fmt.Sprintf("message %d of %d", i+1, len(want)))
	}
	// A frame's envelope grows by a byte where its id's sequence number
	// gains a digit, which can skip a boundary length: a length not met
	// is aimed at once more with the envelope of the last frame read, a
	// few times (ids change digits only now and then).
	envelope := 0
	for _, n := range []int{125, 126, 127, 0xFFFF, 0x10000} {
		for try := 0; !lengths[n] && try < 10; try++ {
			data := []byte(strconv.Quote(strings.Repeat("d", max(0, n-envelope-2))))
			if envelope == 0 {
				data = want[0]
			}
			if _, err := stream.NewStore(rdb).Append(t.Context(), []stream.Append{{Stream: ks.Stream("len"), Notify: ks.Notify("len"),
				Msg: stream.Message{Channel: "len", TS: time.Now().UnixMilli(), Data: data}}}); err != nil {
				t.Fatal(err)
			}
			envelope = read(data, fmt.Sprintf("aiming at a frame of %d bytes", n)) - len(data)
		}
		if !lengths[n] {
			t.Errorf("no frame of %d bytes: the test does not reach the boundary", n)
		}
	}
}

// TestFrameBuilders: the two builders that spare a copy, textFrame (a
// live notification's payload) and entryFrame (a stream entry's head, id
// and tail), write what wsFrame writes, whose lengths
// TestServerFrameLengths checks over a socket, at each boundary of the
// length's encoding.
func TestFrameBuilders(t *testing.T) {
	t.Parallel()
	for _, n := range []int{0, 1, 125, 126, 127, 0xFFFF, 0x10000, 0x10001} {
		payload := strings.Repeat("p", n)
		want := wsFrame(opText, []byte(payload))
		if got := textFrame(payload); !bytes.Equal(got, want) {
			t.Errorf("textFrame of %d bytes: header %x, want %x", n, got[:min(len(got), 10)], want[:min(len(want), 10)])
		}
		// The id and tail split the payload anywhere, empty parts included.
		for _, cut := range [][2]int{{0, 0}, {0, n}, {n / 3, 2 * n / 3}, {n, n}} {
			e := stream.Entry{Head: payload[:cut[0]], ID: payload[cut[0]:cut[1]], Tail: payload[cut[1]:]}
			if got := entryFrame(&e); !bytes.Equal(got, want) {
				t.Errorf("entryFrame of %d bytes cut at %v: header %x, want %x", n, cut, got[:min(len(got), 10)], want[:min(len(want), 10)])
			}
			if got := wsFrame(opText, e.Frame()); !bytes.Equal(got, want) {
				t.Fatalf("Entry.Frame of %d bytes cut at %v is not its head, id and tail", n, cut)
			}
		}
	}
}
