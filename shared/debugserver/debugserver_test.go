//go:build !wsrelay_lean

package debugserver

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"testing"
	"time"
)

func TestStartServesProfilesUntilCancelled(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	addr, stop, err := Start(ctx, "127.0.0.1:0", log)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.Get("http://" + addr + "/debug/pprof/goroutine?debug=1")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || len(body) == 0 {
		t.Fatalf("GET goroutine profile: %d, %d bytes", resp.StatusCode, len(body))
	}
	cancel()
	stop()
	if _, err := http.Get("http://" + addr + "/debug/pprof/"); err == nil {
		t.Fatal("still serving after cancel")
	}
}

func TestOffByDefault(t *testing.T) {
	addr, stop, err := Start(context.Background(), "", slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil || addr != "" {
		t.Fatalf("empty DEBUG_ADDR: %q, %v", addr, err)
	}
	stop()
}

// The returned function stops the server even while ctx runs on: a
// function whose start fails after Start (its port taken) returns, and
// waiting for a ctx that only a signal ends would keep the process
// running with nothing but its profiling port open.
func TestStopBeforeCancel(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	addr, stop, err := Start(context.Background(), "127.0.0.1:0", log)
	if err != nil {
		t.Fatal(err)
	}
	stopped := make(chan struct{})
	go func() { stop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(10 * time.Second):
		t.Fatal("stop has not returned after 10s: it waits for ctx")
	}
	if _, err := http.Get("http://" + addr + "/debug/pprof/"); err == nil {
		t.Fatal("still serving after stop")
	}
	stop() // a second call returns too
}
