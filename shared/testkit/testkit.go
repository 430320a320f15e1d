// Package testkit holds the small helpers the modules' tests share:
// polling until a condition holds, and a buffer that a process's
// concurrent writers and a test's reads can share. Only tests import it.
package testkit

import (
	"bytes"
	"sync"
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

// String returns everything written so far.
func (s *SyncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
