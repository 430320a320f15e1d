// Command ingress is the HTTP function: it validates published messages
// and appends them to Redis streams (docs/api.md).
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"

	"github.com/wsrelay/wsrelay/shared/config"
)

func main() {
	defaultGC(os.Getenv)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args, os.Getenv, os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "ingress:", err)
		if _, ok := errors.AsType[*config.UsageError](err); ok {
			os.Exit(2)
		}
		os.Exit(1)
	}
}

// gcPercent is the ingress's GOGC when the environment sets none. Its
// live heap is 2–3 MB, so at Go's default of 100 it collected every 2–3 MB
// of request garbage, 25 times a second under load: 8 % of its CPU per
// publish (docs/benchmarks.md). At 400 its heap peaks near 12 MB.
const gcPercent = 400

// defaultGC sets gcPercent unless GOGC is set, which the runtime has
// already applied and which stays the operator's to choose.
func defaultGC(getenv func(string) string) {
	if getenv("GOGC") == "" {
		debug.SetGCPercent(gcPercent)
	}
}
