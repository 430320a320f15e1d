// Package testkit holds the small helpers the modules' tests share:
// polling until a condition holds, a buffer that a process's concurrent
// writers and a test's reads can share (and that decodes JSON log
// lines), and a listener that fails an Accept. Only tests import it.
// Its subpackage delivery, the check of the delivery contract end to
// end, serves the soak (bench/cmd/soak) too.
package testkit

import (
	"bytes"
	"encoding/json"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
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
