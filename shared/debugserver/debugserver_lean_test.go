//go:build wsrelay_lean

package debugserver

import (
	"errors"
	"io"
	"log/slog"
	"testing"
)

func TestLeanBuildRefusesAnAddress(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if _, _, err := Start(t.Context(), "127.0.0.1:0", log); !errors.Is(err, ErrNotBuilt) {
		t.Fatalf("Start with an address in a lean build: %v, want ErrNotBuilt", err)
	}
	addr, stop, err := Start(t.Context(), "", log)
	if err != nil || addr != "" {
		t.Fatalf("Start without an address: %q, %v", addr, err)
	}
	stop()
}
