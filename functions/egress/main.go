// Command egress is the WebSocket function: it reads the Redis streams its
// sockets need and delivers each message to the subscribed sockets
// (docs/protocol.md).
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/wsrelay/wsrelay/shared/config"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args, os.Getenv, os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "egress:", err)
		if _, ok := errors.AsType[*config.UsageError](err); ok {
			os.Exit(2)
		}
		os.Exit(1)
	}
}
