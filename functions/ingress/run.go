package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"strconv"
	"time"

	"github.com/wsrelay/wsrelay/shared/config"
	"github.com/wsrelay/wsrelay/shared/debugserver"
	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/logging"
	"github.com/wsrelay/wsrelay/shared/redisconn"
)

// run starts the ingress and serves until ctx is done. ready, when not
// nil, receives the listening address (tests start on port 0).
func run(ctx context.Context, args []string, getenv func(string) string, stdout, _ io.Writer) error {
	if slices.Contains(args[min(1, len(args)):], "-env") {
		// The deploy tests and docs take the variable names from here.
		for _, name := range config.Names(&Config{}) {
			fmt.Fprintln(stdout, name)
		}
		return nil
	}
	cfg, err := loadConfig(getenv)
	if err != nil {
		return err
	}
	log, err := logging.New(cfg.Log, stdout, "ingress")
	if err != nil {
		return err
	}
	warnSecurity(log, cfg)
	rdb, err := redisconn.New(cfg.Redis)
	if err != nil {
		return err
	}
	defer rdb.Close()

	_, waitDebug, err := debugserver.Start(ctx, cfg.DebugAddr, log)
	if err != nil {
		return fmt.Errorf("DEBUG_ADDR: %w", err)
	}
	defer waitDebug()

	srv := NewServer(cfg, log, rdb, keys.Scheme{Prefix: cfg.Redis.KeyPrefix})
	ln, err := net.Listen("tcp", ":"+strconv.Itoa(cfg.Port))
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	return serve(ctx, log, ln, srv)
}

// serve runs an HTTP server on ln until ctx is done, then shuts it down,
// letting requests in flight finish for up to 10 s.
func serve(ctx context.Context, log *slog.Logger, ln net.Listener, h http.Handler) error {
	hs := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       120 * time.Second,
	}
	log.Info("listening", "addr", ln.Addr().String())
	errc := make(chan error, 1)
	go func() { errc <- hs.Serve(ln) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := hs.Shutdown(sctx)
	<-errc
	if err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	log.Info("stopped")
	return nil
}
