package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// TestServeLogsHTTPErrors: net/http's own messages (here an accept error,
// as when the instance is out of file descriptors, one per socket) are
// records of the function's structured log, not plain text on stderr.
func TestServeLogsHTTPErrors(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	env := map[string]string{"REDIS_URL": redistest.URL(t), "REDIS_KEY_PREFIX": prefix, "ALLOW_ANONYMOUS": "true"}
	cfg, err := loadConfig(func(k string) string { return env[k] })
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var logs testkit.SyncBuffer
	log := slog.New(slog.NewJSONHandler(&logs, nil))
	ctx, cancel := context.WithCancel(t.Context())
	served := make(chan error, 1)
	go func() { served <- serve(ctx, log, &failingListener{Listener: ln}, NewServer(cfg, log, rdb)) }()
	testkit.Eventually(t, 5*time.Second, func() error {
		if !strings.Contains(logs.String(), `"msg":"http: Accept error: accept4: too many open files`) {
			return fmt.Errorf("no accept error in the log: %s", logs.String())
		}
		return nil
	})
	cancel()
	if err := <-served; err != nil {
		t.Fatalf("serve: %v", err)
	}
}

// failingListener fails its first Accept as accept(2) does when the
// process is out of file descriptors: a temporary error, which net/http
// logs and retries.
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
