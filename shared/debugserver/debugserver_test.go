//go:build !wsrelay_lean

package debugserver

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"testing"
)

func TestStartServesProfilesUntilCancelled(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	addr, wait, err := Start(ctx, "127.0.0.1:0", log)
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
	wait()
	if _, err := http.Get("http://" + addr + "/debug/pprof/"); err == nil {
		t.Fatal("still serving after cancel")
	}
}

func TestOffByDefault(t *testing.T) {
	addr, wait, err := Start(context.Background(), "", slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil || addr != "" {
		t.Fatalf("empty DEBUG_ADDR: %q, %v", addr, err)
	}
	wait()
}
