package main

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/wsrelay/wsrelay/shared/protocol"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// serverFrame is one frame as a client parses it off the wire.
type serverFrame struct {
	op      byte
	payload []byte
}

// parseServerFrames reads whole server frames from r until it ends,
// failing on anything a server may not send: a masked frame, a fragment,
// RSV bits, a length not in its shortest form (RFC 6455 §5.2).
func parseServerFrames(r io.Reader) ([]serverFrame, error) {
	br := bufio.NewReaderSize(r, 64<<10)
	var out []serverFrame
	for {
		var h [2]byte
		if _, err := io.ReadFull(br, h[:]); err != nil {
			if err == io.EOF {
				return out, nil
			}
			return out, fmt.Errorf("header of frame %d: %w", len(out), err)
		}
		if h[0]&0x80 == 0 || h[0]&0x70 != 0 {
			return out, fmt.Errorf("frame %d: first byte %#x: not final, or RSV bits", len(out), h[0])
		}
		if h[1]&0x80 != 0 {
			return out, fmt.Errorf("frame %d: masked", len(out))
		}
		n := uint64(h[1] & 0x7f)
		switch n {
		case 126:
			var b [2]byte
			if _, err := io.ReadFull(br, b[:]); err != nil {
				return out, err
			}
			if n = uint64(binary.BigEndian.Uint16(b[:])); n < 126 {
				return out, fmt.Errorf("frame %d: 16-bit length %d", len(out), n)
			}
		case 127:
			var b [8]byte
			if _, err := io.ReadFull(br, b[:]); err != nil {
				return out, err
			}
			if n = binary.BigEndian.Uint64(b[:]); n <= 0xFFFF {
				return out, fmt.Errorf("frame %d: 64-bit length %d", len(out), n)
			}
		}
		p := make([]byte, n)
		if _, err := io.ReadFull(br, p); err != nil {
			return out, fmt.Errorf("payload of frame %d (%d bytes): %w", len(out), n, err)
		}
		out = append(out, serverFrame{h[0] & 0x0f, p})
	}
}

// slowReader reads at most chunk bytes per read, pausing between reads.
type slowReader struct {
	r     io.Reader
	chunk int
	pause time.Duration
}

func (s *slowReader) Read(p []byte) (int, error) {
	if len(p) > s.chunk {
		p = p[:s.chunk]
	}
	if s.pause > 0 {
		time.Sleep(s.pause)
	}
	return s.r.Read(p)
}

// stressPayload is the i-th payload: its size picked from the lengths at
// the edges of the three length encodings, the socket buffers' sizes and
// beyond, and its bytes saying which it is.
func stressPayload(i int, rng *rand.Rand) []byte {
	sizes := []int{0, 1, 125, 126, 127, 0xFFFF, 0x10000, 0x10001, 4 << 10, 200 << 10}
	n := rng.IntN(3000)
	if i%5 == 0 {
		n = sizes[i/5%len(sizes)]
	}
	p := make([]byte, n)
	for j := range p {
		p[j] = byte(i + j*31)
	}
	copy(p, fmt.Sprintf("%d:", i))
	return p
}

// writerPair is a conn on one end of a loopback TCP connection with small
// buffers (so that writes are cut mid-frame; 64 KiB, not less: with
// smaller ones loopback's 64 KiB segments leave the sender waiting for
// TCP's persist timer, not for the reader), and the client's end.
func writerPair(t *testing.T, timeout time.Duration) (*conn, net.Conn) {
	t.Helper()
	server, client := tcpPair(t)
	_ = server.(*net.TCPConn).SetWriteBuffer(64 << 10)
	_ = client.(*net.TCPConn).SetReadBuffer(64 << 10)
	c := &conn{s: &Server{cfg: Config{SendQueue: 1 << 20, WriteTimeout: timeout}}, nc: server, done: make(chan struct{})}
	c.fr.init(server, 1<<16)
	return c, client
}

// TestWriterFrameSequence: whatever the writer's batches (more frames
// than IOV_MAX, more bytes than the socket buffers, writes cut mid-frame
// and resumed) and whatever control frames come between them (pongs, the
// sweep's pings), a client that parses every frame reads each data frame
// once, whole, in the order queued, and the close frame last, after all
// of them (a 1008's queue goes out ahead of its close). Frames are
// shared and never changed: the same bytes queued on two connections
// are sent the same to both.
func TestWriterFrameSequence(t *testing.T) {
	t.Parallel()
	const n = 2500
	rng := rand.New(rand.NewPCG(1, 2))
	payloads := make([][]byte, n)
	frames := make([][]byte, n)
	for i := range payloads {
		payloads[i] = stressPayload(i, rng)
		frames[i] = wsFrame(opText, payloads[i])
	}
	pristine := make([][]byte, n)
	for i := range frames {
		pristine[i] = slices.Clone(frames[i])
	}
	const conns = 2
	var wg sync.WaitGroup
	for k := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// A WRITE_TIMEOUT far longer than the test: the close comes with
			// megabytes still to go, and a server close cuts what has not
			// gone within WRITE_TIMEOUT (writeAll).
			c, client := writerPair(t, time.Minute)
			got := make(chan []serverFrame, 1)
			errc := make(chan error, 1)
			go func() {
				fs, err := parseServerFrames(&slowReader{r: client, chunk: 3000 + 1000*k, pause: 50 * time.Microsecond})
				got <- fs
				errc <- err
			}()
			// The first 1500 frames in one batch (more than IOV_MAX),
			// the rest a few at a time, with pongs and pings between.
			c.mu.Lock()
			for i := range 1500 {
				c.queue = append(c.queue, &queued{frame: frames[i]})
			}
			c.startWriterLocked()
			c.mu.Unlock()
			for i := 1500; i < n; i++ {
				c.enqueue(&queued{frame: frames[i]})
				switch i % 97 {
				case 0:
					c.pong([]byte(fmt.Sprint(i)))
				case 50:
					c.ping()
				}
				if i%200 == 0 {
					time.Sleep(time.Millisecond)
				}
			}
			c.closeWith(protocol.ClosePolicy, "too many invalid frames", true)
			c.writers.Wait()
			c.finishWrites()
			_ = c.nc.(*net.TCPConn).CloseWrite()
			fs := <-got
			if err := <-errc; err != nil {
				t.Errorf("conn %d: %v", k, err)
			}
			var data [][]byte
			for j, f := range fs {
				switch f.op {
				case opText:
					data = append(data, f.payload)
				case opPing, opPong:
				case opClose:
					if j != len(fs)-1 {
						t.Errorf("conn %d: close frame %d of %d", k, j, len(fs))
					}
					if code, _, err := parseClose(f.payload); err != nil || code != protocol.ClosePolicy {
						t.Errorf("conn %d: close %d %v", k, code, err)
					}
				default:
					t.Errorf("conn %d: frame %d opcode %#x", k, j, f.op)
				}
			}
			if len(fs) == 0 || fs[len(fs)-1].op != opClose {
				t.Errorf("conn %d: no close frame last", k)
			}
			if len(data) != n {
				t.Errorf("conn %d: %d data frames, want %d", k, len(data), n)
			}
			for i := range min(len(data), n) {
				if !bytes.Equal(data[i], payloads[i]) {
					t.Errorf("conn %d: data frame %d: %d bytes %.12q, want %d bytes %.12q", k, i, len(data[i]), data[i], len(payloads[i]), payloads[i])
					break
				}
			}
		}()
	}
	wg.Wait()
	for i := range frames {
		if !bytes.Equal(frames[i], pristine[i]) {
			t.Fatalf("frame %d changed by the writers", i)
		}
	}
}

// TestHalfPingThenQueueThenClose: the sweep's ping got one byte into the
// socket; meanwhile data frames were queued and a 1008 close (which
// keeps the queue) begun. The client reads the whole ping, every data
// frame in order, then the close.
func TestHalfPingThenQueueThenClose(t *testing.T) {
	t.Parallel()
	c, client := writerPair(t, 10*time.Second)
	c.mu.Lock()
	c.writing = true
	c.writers.Add(1)
	c.mu.Unlock()
	if _, err := c.nc.Write(pingFrame[:1]); err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(3, 4))
	var payloads [][]byte
	for i := range 300 {
		p := stressPayload(i, rng)
		payloads = append(payloads, p)
		c.enqueue(&queued{frame: wsFrame(opText, p)})
	}
	c.closeWith(protocol.ClosePolicy, "too many invalid frames", true)
	got := make(chan []serverFrame, 1)
	errc := make(chan error, 1)
	go func() {
		fs, err := parseServerFrames(&slowReader{r: client, chunk: 4096})
		got <- fs
		errc <- err
	}()
	c.pingWritten(1)
	c.writers.Wait()
	c.finishWrites()
	_ = c.nc.(*net.TCPConn).CloseWrite()
	fs := <-got
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if len(fs) != len(payloads)+2 {
		t.Fatalf("%d frames, want %d", len(fs), len(payloads)+2)
	}
	if fs[0].op != opPing || len(fs[0].payload) != 0 {
		t.Fatalf("first frame %#x %q, want the ping", fs[0].op, fs[0].payload)
	}
	for i, p := range payloads {
		if f := fs[i+1]; f.op != opText || !bytes.Equal(f.payload, p) {
			t.Fatalf("frame %d: %#x, %d bytes; want text, %d bytes", i+1, f.op, len(f.payload), len(p))
		}
	}
	if f := fs[len(fs)-1]; f.op != opClose {
		t.Fatalf("last frame %#x, want close", f.op)
	}
}

// TestFrameLengthEncodings: each payload length at the edge of an
// encoding is written in the shortest form, unmasked, final.
func TestFrameLengthEncodings(t *testing.T) {
	t.Parallel()
	for _, n := range []int{0, 125, 126, 0xFFFF, 0x10000} {
		p := bytes.Repeat([]byte{'a'}, n)
		for _, f := range [][]byte{wsFrame(opText, p), textFrame(string(p))} {
			fs, err := parseServerFrames(bytes.NewReader(f))
			if err != nil || len(fs) != 1 || fs[0].op != opText || len(fs[0].payload) != n {
				t.Fatalf("%d bytes: %v, %d frames", n, err, len(fs))
			}
			if cap(f) != len(f) {
				t.Fatalf("%d bytes: frame has spare capacity %d: an append to it could share its array", n, cap(f)-len(f))
			}
		}
	}
}

// TestWriteDeadlineWallStep: a write deadline armed at a time read from a
// wall clock stepped back (or forward) holds by the time the process
// runs: a steady reader is not dropped, a stalled one is within
// 2×WRITE_TIMEOUT.
func TestWriteDeadlineWallStep(t *testing.T) {
	t.Parallel()
	const timeout = 300 * time.Millisecond
	for _, step := range []time.Duration{-time.Hour, time.Hour} {
		t.Run(step.String(), func(t *testing.T) {
			t.Parallel()
			c, client := writerPair(t, timeout)
			c.armWriteDeadline(testkit.WallStep(time.Now(), step))
			// The deadline armed holds WRITE_TIMEOUT from now: the write
			// of a frame larger than the buffers to a reader that takes
			// nothing times out, neither at once nor an hour later.
			start := time.Now()
			_, err := c.nc.Write(make([]byte, 1<<20))
			d := time.Since(start)
			if ne, ok := err.(net.Error); !ok || !ne.Timeout() {
				t.Fatalf("write: %v", err)
			}
			if d < timeout/2 || d > 3*timeout {
				t.Fatalf("write timed out after %v, want about %v", d, timeout)
			}
			_ = client
		})
	}
}
