//go:build wsrelay_lean

package debugserver

import (
	"context"
	"log/slog"
)

// Start starts nothing: a lean build has no profiling. An address is an
// error (ErrNotBuilt), so that a configuration asking for profiles fails
// at start instead of going without them unnoticed.
func Start(_ context.Context, addr string, _ *slog.Logger) (bound string, stop func(), err error) {
	if addr == "" {
		return "", func() {}, nil
	}
	return "", nil, ErrNotBuilt
}
