// Package testkit holds the small helpers the modules' tests share:
// polling until a condition holds, a buffer that a process's concurrent
// writers and a test's reads can share (and that decodes JSON log
// lines), a listener that fails an Accept, and a TCP relay whose
// directions a test can filter (Relay). Only tests import it.
// Its subpackage delivery, the check of the delivery contract end to
// end, serves the soak (bench/cmd/soak) too.
package testkit

import (
	"bytes"
	"encoding/json"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"
)

// Eventually calls f every 20 ms until it returns nil, and fails t with
// f's last error once within has passed.
func Eventually(t testing.TB, within time.Duration, f func() error) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		err := f()
		if err == nil {
			return
		}
		if !time.Now().Before(deadline) {
			t.Fatalf("after %v: %v", within, err)
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// SyncBuffer is a bytes.Buffer that concurrent writers (log handlers, a
// child process's output) and a test's reads may use at once.
type SyncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *SyncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

// JSONLines decodes what was written so far as JSON log lines (slog's
// JSON handler), failing t on a line that is not a JSON object.
func (s *SyncBuffer) JSONLines(t testing.TB) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, l := range strings.Split(strings.TrimSpace(s.String()), "\n") {
		if l == "" {
			continue
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("not a JSON log line: %q", l)
		}
		out = append(out, m)
	}
	return out
}

// Lines is JSONLines less the lines whose message is not msg.
func (s *SyncBuffer) Lines(t testing.TB, msg string) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, l := range s.JSONLines(t) {
		if l["msg"] == msg {
			out = append(out, l)
		}
	}
	return out
}

// String returns everything written so far.
func (s *SyncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// FailFirstAccept wraps ln so that its first Accept fails as accept(2)
// does when the process is out of file descriptors: a temporary error,
// which net/http logs (through its ErrorLog) and retries.
func FailFirstAccept(ln net.Listener) net.Listener { return &failingListener{Listener: ln} }

type failingListener struct {
	net.Listener
	failed atomic.Bool
}

func (l *failingListener) Accept() (net.Conn, error) {
	if l.failed.CompareAndSwap(false, true) {
		return nil, errTooManyFiles{}
	}
	return l.Listener.Accept()
}

type errTooManyFiles struct{}

func (errTooManyFiles) Error() string   { return "accept4: too many open files" }
func (errTooManyFiles) Timeout() bool   { return false }
func (errTooManyFiles) Temporary() bool { return true }

// CheckLast fails t unless the last line written has the message last
// and exactly one line has one of the messages finals (a server's
// closing lines: nothing logged after it, and it said once).
func (s *SyncBuffer) CheckLast(t testing.TB, last string, finals ...string) {
	t.Helper()
	recs := s.JSONLines(t)
	if len(recs) == 0 || recs[len(recs)-1]["msg"] != last {
		t.Errorf("last line is not %q; log:\n%s", last, s.String())
	}
	n := 0
	for _, f := range finals {
		n += len(s.Lines(t, f))
	}
	if n != 1 {
		t.Errorf("%d lines of %q, want 1; log:\n%s", n, finals, s.String())
	}
}

// JSONDepth is how deeply valid JSON b nests arrays and objects, as
// encoding/json reads it: the reference that depth limits are checked
// against.
func JSONDepth(b []byte) int {
	dec := json.NewDecoder(bytes.NewReader(b))
	depth, deepest := 0, 0
	for {
		tok, err := dec.Token()
		if err != nil {
			return deepest
		}
		switch tok {
		case json.Delim('['), json.Delim('{'):
			depth++
			deepest = max(deepest, depth)
		case json.Delim(']'), json.Delim('}'):
			depth--
		}
	}
}

// Filter is one direction of a Relay connection: it gets each chunk read
// from one side and writes to the other (to) what it forwards, and
// returns false to cut the connection.
type Filter func(chunk []byte, to io.Writer) bool

// ReplyDropper is a Relay to a Redis that loses one command's reply on
// command: once armed, the connection whose next chunk sent holds the
// marker has that chunk's fate decided by how it was armed (Arm: it
// runs and its reply is dropped; ArmHold: it runs and its reply comes
// late; ArmCut: it never reaches Redis).
type ReplyDropper struct {
	Addr    string // the relay's host:port
	marker  atomic.Pointer[armed]
	dropped atomic.Int32
}

type armed struct {
	marker []byte
	hold   time.Duration // ArmHold's
	cut    bool          // ArmCut's
	first  bool          // ArmFirstReply's
}

// NewReplyDropper starts a ReplyDropper to target for the test's length.
func NewReplyDropper(t testing.TB, target string) *ReplyDropper {
	t.Helper()
	d := &ReplyDropper{}
	d.Addr = Relay(t, target, func() (up, down Filter) {
		var hit atomic.Pointer[armed]
		up = func(b []byte, to io.Writer) bool {
			if a := d.marker.Load(); a != nil && bytes.Contains(b, a.marker) && d.marker.CompareAndSwap(a, nil) {
				hit.Store(a)
				if a.cut {
					d.dropped.Add(1)
					return false // the command never reaches Redis
				}
			}
			_, err := to.Write(b)
			return err == nil
		}
		down = func(b []byte, to io.Writer) bool {
			if a := hit.Load(); a != nil {
				if a.first {
					d.dropped.Add(1) // Redis ran the commands: the first reply passes
					n := respEnd(b)
					if n > 0 {
						_, _ = to.Write(b[:n])
					}
					if a.hold == 0 {
						return false
					}
					hit.Store(nil)
					time.Sleep(a.hold) // the others come late
					_, err := to.Write(b[n:])
					return err == nil
				}
				if a.hold == 0 {
					d.dropped.Add(1) // Redis ran the command: its reply is lost
					return false
				}
				hit.Store(nil)
				d.dropped.Add(1)
				time.Sleep(a.hold) // Redis ran it: its reply comes late
			}
			_, err := to.Write(b)
			return err == nil
		}
		return up, down
	})
	return d
}

// Arm makes the next chunk sent that holds marker run in Redis, and its
// reply be dropped with the connection: a reply lost.
func (d *ReplyDropper) Arm(marker string) { d.marker.Store(&armed{marker: []byte(marker)}) }

// ArmHold makes the next chunk sent that holds marker run in Redis, and
// its reply reach the client hold later: past a client's timeout, a
// reply that came too late.
func (d *ReplyDropper) ArmHold(marker string, hold time.Duration) {
	d.marker.Store(&armed{marker: []byte(marker), hold: hold})
}

// ArmCut makes the next chunk sent that holds marker never reach Redis:
// its connection is cut instead, as one Redis had closed.
func (d *ReplyDropper) ArmCut(marker string) {
	d.marker.Store(&armed{marker: []byte(marker), cut: true})
}

// ArmFirstReply makes the next chunk sent that holds marker (a pipeline)
// run in Redis, and only the first of its replies reach the client
// before the connection is cut: a pipeline partly answered.
func (d *ReplyDropper) ArmFirstReply(marker string) {
	d.marker.Store(&armed{marker: []byte(marker), first: true})
}

// ArmFirstReplyHold makes the next chunk sent that holds marker (a
// pipeline) run in Redis, its first reply reach the client at once and
// the others hold later: a pipeline partly answered in time.
func (d *ReplyDropper) ArmFirstReplyHold(marker string, hold time.Duration) {
	d.marker.Store(&armed{marker: []byte(marker), first: true, hold: hold})
}

// respEnd is the length of the first whole RESP reply in b, or 0.
func respEnd(b []byte) int {
	line := bytes.Index(b, []byte("\r\n"))
	if line < 1 {
		return 0
	}
	end := line + 2
	switch b[0] {
	case '$', '=', '!':
		n, err := strconv.Atoi(string(b[1:line]))
		if err != nil || n < 0 {
			return end
		}
		if end+n+2 > len(b) {
			return 0
		}
		return end + n + 2
	case '*', '%', '~', '>':
		n, err := strconv.Atoi(string(b[1:line]))
		if err != nil || n < 0 {
			return end
		}
		if b[0] == '%' {
			n *= 2
		}
		for range n {
			k := respEnd(b[end:])
			if k == 0 {
				return 0
			}
			end += k
		}
		return end
	}
	return end
}

// Dropped is how many chunks it acted on.
func (d *ReplyDropper) Dropped() int { return int(d.dropped.Load()) }

// Relay starts a TCP proxy to target, for the test's length, and returns
// its address. For each connection it accepts, conn (when not nil) gives
// the filters of its two directions: up, from the client to target, and
// down, back; a nil filter forwards as it is.
func Relay(t testing.TB, target string, conn func() (up, down Filter)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			u, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			mu.Lock()
			conns = append(conns, c, u)
			mu.Unlock()
			var up, down Filter
			if conn != nil {
				up, down = conn()
			}
			wg.Go(func() { pipe(c, u, up) })
			wg.Go(func() { pipe(u, c, down) })
		}
	})
	return ln.Addr().String()
}

// pipe copies from to to through f until either side fails or f cuts
// the connection; it closes to as it ends.
func pipe(from, to net.Conn, f Filter) {
	defer to.Close()
	buf := make([]byte, 1<<20)
	for {
		n, err := from.Read(buf)
		if n > 0 {
			if f != nil {
				if !f(buf[:n], to) {
					return
				}
			} else if _, err := to.Write(buf[:n]); err != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// WallStep returns t as time.Now reads it once the system clock has been
// stepped by d (NTP, an operator, a VM's clock set on resume): its wall
// clock moved by d, its monotonic reading (what Time.Sub between two
// readings, and the runtime's timers, go by) not. The time package makes
// no such value, so it is built on time.Time's layout (wall: a flag for
// the monotonic reading, 33 bits of seconds since 1885 and 30 of
// nanoseconds; ext: the monotonic reading), which TestWallStep checks.
// d is whole seconds.
func WallStep(t time.Time, d time.Duration) time.Time {
	const hasMonotonic, nsecShift = 1 << 63, 30
	p := (*struct {
		wall uint64
		ext  int64
		loc  *time.Location
	})(unsafe.Pointer(&t))
	if p.wall&hasMonotonic == 0 || d%time.Second != 0 {
		panic("testkit.WallStep: a time.Now reading and whole seconds only")
	}
	sec := int64(p.wall<<1>>(nsecShift+1)) + int64(d/time.Second)
	p.wall = hasMonotonic | uint64(sec)<<nsecShift | p.wall&(1<<nsecShift-1)
	return t
}
