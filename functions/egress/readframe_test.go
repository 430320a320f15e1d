package main

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"runtime"
	"strings"
	"testing"
	"time"
)

// clientFrame is a masked client frame (RFC 6455 §5.2).
func clientFrame(fin bool, op byte, payload []byte) []byte {
	b0 := op
	if fin {
		b0 |= 0x80
	}
	var b []byte
	switch n := len(payload); {
	case n < 126:
		b = []byte{b0, 0x80 | byte(n)}
	case n <= 0xFFFF:
		b = []byte{b0, 0x80 | 126, 0, 0}
		binary.BigEndian.PutUint16(b[2:], uint16(n))
	default:
		b = []byte{b0, 0x80 | 127, 0, 0, 0, 0, 0, 0, 0, 0}
		binary.BigEndian.PutUint64(b[2:], uint64(n))
	}
	key := [4]byte{0x12, 0x34, 0x56, 0x78}
	b = append(b, key[:]...)
	for i, c := range payload {
		b = append(b, c^key[i%4])
	}
	return b
}

// readerConn is a net.Conn whose reads come from r (the frameReader only
// reads). Not a syscall.Conn, so the reader takes its net.Conn path.
type readerConn struct {
	net.Conn
	r io.Reader
}

func (c readerConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// tcpPair returns both ends of a loopback TCP connection: the server end
// is a real socket, so the reader takes its raw read(2) path on Linux.
func tcpPair(t *testing.T) (server, client net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server = <-accepted
	if server == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { server.Close(); client.Close() })
	return server, client
}

type readResult struct {
	op      byte
	payload string
}

// readAll reads what next returns until the stream ends or fails.
func readAll(r *frameReader) ([]readResult, error) {
	var out []readResult
	for {
		op, p, err := r.next()
		if err != nil {
			return out, err
		}
		out = append(out, readResult{op, string(p)})
	}
}

func TestFrameReader(t *testing.T) {
	big := strings.Repeat("b", 70000)
	mid := strings.Repeat("m", 300)
	cat := func(frames ...[]byte) []byte { return bytes.Join(frames, nil) }
	cases := []struct {
		name    string
		in      []byte
		want    []readResult
		wantErr error // nil: the stream just ends (io.EOF)
	}{
		{"text", clientFrame(true, opText, []byte(`{"type":"ping"}`)), []readResult{{opText, `{"type":"ping"}`}}, nil},
		{"16-bit length", clientFrame(true, opBinary, []byte(mid)), []readResult{{opBinary, mid}}, nil},
		{"64-bit length", clientFrame(true, opText, []byte(big)), []readResult{{opText, big}}, nil},
		{"empty text", clientFrame(true, opText, nil), []readResult{{opText, ""}}, nil},
		{"fragments with a ping between", cat(
			clientFrame(false, opText, []byte("hel")),
			clientFrame(true, opPing, []byte("p")),
			clientFrame(false, opContinuation, []byte("lo ")),
			clientFrame(true, opContinuation, []byte("world")),
			clientFrame(true, opText, []byte("next")),
		), []readResult{{opPing, "p"}, {opText, "hello world"}, {opText, "next"}}, nil},
		{"close and pong", cat(clientFrame(true, opPong, nil), clientFrame(true, opClose, []byte{0x03, 0xE8})),
			[]readResult{{opPong, ""}, {opClose, "\x03\xe8"}}, nil},
		{"unmasked", []byte{0x81, 0x01, 'x'}, nil, protocolError("")},
		{"reserved bit", append([]byte{0xC1}, clientFrame(true, opText, []byte("x"))[1:]...), nil, protocolError("")},
		{"unknown data opcode", clientFrame(true, 0x3, []byte("x")), nil, protocolError("")},
		{"unknown control opcode", clientFrame(true, 0xB, nil), nil, protocolError("")},
		{"fragmented ping", clientFrame(false, opPing, nil), nil, protocolError("")},
		{"long ping", clientFrame(true, opPing, []byte(mid)), nil, protocolError("")},
		{"stray continuation", clientFrame(true, opContinuation, []byte("x")), nil, protocolError("")},
		{"message inside a message", cat(clientFrame(false, opText, []byte("a")), clientFrame(true, opText, []byte("b"))), nil, protocolError("")},
		// RFC 6455 §5.4: a message's fragments are not interleaved with
		// another message's, of either data opcode.
		{"binary message inside a text message", cat(clientFrame(false, opText, []byte("a")), clientFrame(true, opBinary, []byte("b"))), nil, protocolError("")},
		{"text message inside a binary message", cat(clientFrame(false, opBinary, []byte("a")), clientFrame(true, opText, []byte("b"))), nil, protocolError("")},
		{"top bit of a 64-bit length", []byte{0x81, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0}, nil, protocolError("")},
		{"over the limit", clientFrame(true, opText, []byte(strings.Repeat("x", 1025))), nil, errTooBig},
		{"at the limit in fragments", cat(clientFrame(false, opText, []byte(strings.Repeat("x", 600))), clientFrame(true, opContinuation, []byte(strings.Repeat("x", 424)))),
			[]readResult{{opText, strings.Repeat("x", 1024)}}, nil},
		{"one byte over the limit in fragments", cat(clientFrame(false, opText, []byte(strings.Repeat("x", 600))), clientFrame(true, opContinuation, []byte(strings.Repeat("x", 425)))), nil, errTooBig},
		{"over the limit in fragments", cat(clientFrame(false, opText, []byte(strings.Repeat("x", 600))), clientFrame(true, opContinuation, []byte(strings.Repeat("x", 600)))), nil, errTooBig},
		{"cut inside the payload", clientFrame(true, opText, []byte("hello"))[:8], nil, io.EOF},
	}
	for _, tc := range cases {
		limit := int64(1024)
		if tc.name == "64-bit length" {
			limit = 1 << 20
		}
		check := func(t *testing.T, got []readResult, err error) {
			t.Helper()
			switch {
			case tc.wantErr == nil && !errors.Is(err, io.EOF):
				t.Fatalf("error %v, want the stream to end (EOF)", err)
			case tc.wantErr == errTooBig && !errors.Is(err, errTooBig):
				t.Fatalf("error %v, want errTooBig", err)
			case tc.wantErr == io.EOF && !errors.Is(err, io.EOF):
				t.Fatalf("error %v, want EOF", err)
			}
			if _, want := tc.wantErr.(protocolError); want {
				var pe protocolError
				if !errors.As(err, &pe) {
					t.Fatalf("error %v, want a protocol error", err)
				}
			}
			if len(got) != len(tc.want) {
				t.Fatalf("got %d results, want %d", len(got), len(tc.want))
			}
			for i := range got {
				if got[i] != tc.want[i] {
					t.Fatalf("result %d: op %d %.40q, want op %d %.40q", i, got[i].op, got[i].payload, tc.want[i].op, tc.want[i].payload)
				}
			}
		}
		t.Run(tc.name+"/net.Conn", func(t *testing.T) {
			var r frameReader
			// One byte per read: every header and payload boundary is split.
			r.init(readerConn{r: iotestOneByte(bytes.NewReader(tc.in))}, limit)
			got, err := readAll(&r)
			check(t, got, err)
		})
		t.Run(tc.name+"/socket", func(t *testing.T) {
			server, client := tcpPair(t)
			var r frameReader
			r.init(server, limit)
			go func() {
				for i := 0; i < len(tc.in); i += 7 { // in pieces, so reads wait for more
					_, _ = client.Write(tc.in[i:min(i+7, len(tc.in))])
					time.Sleep(time.Microsecond)
				}
				client.(*net.TCPConn).CloseWrite()
			}()
			got, err := readAll(&r)
			check(t, got, err)
		})
	}
}

// iotestOneByte returns a reader that reads one byte at a time.
func iotestOneByte(r io.Reader) io.Reader { return oneByte{r} }

type oneByte struct{ r io.Reader }

func (o oneByte) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	return o.r.Read(p[:1])
}

// TestFrameReaderDeadline: a read deadline ends the wait with a timeout,
// which is how a server close's drain ends for a silent client.
func TestFrameReaderDeadline(t *testing.T) {
	server, _ := tcpPair(t)
	var r frameReader
	r.init(server, 1024)
	_ = server.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	_, _, err := r.next()
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("error %v, want a timeout", err)
	}
}

func TestParseClose(t *testing.T) {
	cases := []struct {
		in   []byte
		code int
		ok   bool
	}{
		{nil, 1005, true},
		{[]byte{0x03, 0xE8}, 1000, true},
		{append([]byte{0x0F, 0xA0}, "bye"...), 4000, true},
		{[]byte{0x0B, 0xB8}, 3000, true},
		{[]byte{0x03}, 0, false},
		{[]byte{0x03, 0xED}, 0, false},             // 1005 may not be sent
		{[]byte{0x03, 0xEE}, 0, false},             // nor 1006
		{[]byte{0x03, 0xE7}, 0, false},             // 999
		{[]byte{0x13, 0x88}, 0, false},             // 5000
		{[]byte{0x03, 0xE8, 0xFF, 0xFE}, 0, false}, // reason not UTF-8
	}
	for _, tc := range cases {
		code, _, err := parseClose(tc.in)
		if (err == nil) != tc.ok || (tc.ok && code != tc.code) {
			t.Errorf("parseClose(%x) = %d, %v; want %d, ok %v", tc.in, code, err, tc.code, tc.ok)
		}
	}
}

// TestClosePayloadLongReason: a reason cut to fit the 125-byte control
// frame is cut at a character boundary, so that the close stays valid
// UTF-8 (RFC 6455 §5.5.1: a client fails the connection otherwise).
func TestClosePayloadLongReason(t *testing.T) {
	for _, reason := range []string{strings.Repeat("x", 200), "xx" + strings.Repeat("é", 100), "x" + strings.Repeat("✓", 60)} {
		p := closePayload(4000, reason)
		if len(p) > 125 {
			t.Errorf("%q: payload of %d bytes, over 125", reason[:10], len(p))
		}
		code, got, err := parseClose(p)
		if err != nil || code != 4000 || !strings.HasPrefix(reason, got) || len(got) < 121 {
			t.Errorf("%q: parseClose = %d, %q, %v; want 4000, a valid prefix of 121–123 bytes", reason[:10], code, got, err)
		}
	}
}

// BenchmarkFrameReader reads client frames: a 100-byte text message and a
// pong, as an idle-but-alive subscriber sends them, from memory.
func BenchmarkFrameReader(b *testing.B) {
	msg := clientFrame(true, opText, []byte(`{"type":"subscribe","channel":"room-1","after":"1700000000000-0"}`+strings.Repeat(" ", 35)))
	pong := clientFrame(true, opPong, nil)
	stream := bytes.Repeat(append(append([]byte{}, msg...), pong...), 1024)
	src := bytes.NewReader(stream)
	var r frameReader
	r.init(readerConn{r: src}, 1<<20)
	b.ReportAllocs()
	b.SetBytes(int64(len(msg) + len(pong)))
	for b.Loop() {
		for range 2 {
			if _, _, err := r.next(); err != nil {
				src.Reset(stream)
				r.r, r.w = 0, 0
				if _, _, err := r.next(); err != nil {
					b.Fatal(err)
				}
			}
		}
	}
}

// TestFrameReaderAllocatesWhatArrives: a frame header announcing a large
// payload (14 bytes) does not make the reader allocate that payload before
// it arrives. A client that sends only such headers, on as many sockets as
// it may open, would otherwise pin MAX_FRAME_BYTES per socket (64 KiB by
// default, eight times an idle socket's whole cost) until the missed-pong
// sweep drops it. Not parallel: it reads the process's allocation count.
func TestFrameReaderAllocatesWhatArrives(t *testing.T) {
	const limit = 1 << 20
	for _, fin := range []bool{true, false} {
		// The header of a 1 MiB frame and 100 bytes of its payload, then
		// the stream ends: what arrived is 114 bytes.
		in := clientFrame(fin, opText, make([]byte, limit))[:14+100]
		var before, after runtime.MemStats
		const runs = 20
		runtime.ReadMemStats(&before)
		for range runs {
			var r frameReader
			r.init(readerConn{r: bytes.NewReader(in)}, limit)
			if _, _, err := r.next(); !errors.Is(err, io.EOF) {
				t.Fatalf("fin %v: %v, want EOF", fin, err)
			}
		}
		runtime.ReadMemStats(&after)
		if per := (after.TotalAlloc - before.TotalAlloc) / runs; per > 16<<10 {
			t.Errorf("fin %v: %d bytes allocated for a frame cut after 114 bytes", fin, per)
		}
	}
}
