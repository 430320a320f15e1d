package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/config"
	"github.com/wsrelay/wsrelay/shared/debugserver"
	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/logging"
	"github.com/wsrelay/wsrelay/shared/redisconn"
)

// run starts the ingress and serves until ctx is done. ready, when not
// nil, receives the listening address (tests start on port 0).
func run(ctx context.Context, args []string, getenv func(string) string, stdout, _ io.Writer) error {
	// -env: the deploy tests and docs take the variable names from here.
	if done, err := config.Args("ingress", args, &Config{}, stdout); done {
		return err
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
	// go-redis would print its own lines (failed dials) as plain text.
	redis.SetLogger(&logging.RedisLogger{Log: log})
	rdb, err := redisconn.New(cfg.Redis)
	if err != nil {
		return err
	}
	defer rdb.Close()

	_, stopDebug, err := debugserver.Start(ctx, cfg.DebugAddr, log)
	if err != nil {
		return fmt.Errorf("DEBUG_ADDR: %w", err)
	}
	defer stopDebug()

	srv := NewServer(cfg, log, rdb, keys.Scheme{Prefix: cfg.Redis.KeyPrefix})
	defer srv.Close() // before rdb.Close
	ln, err := net.Listen("tcp", ":"+strconv.Itoa(cfg.Port))
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	return serve(ctx, log, ln, srv, cfg.ShutdownGrace, cfg.Redis.Timeout, startAttrs(cfg)...)
}

// startAttrs is the configuration the startup line shows: what an operator
// checks first, and no credential.
func startAttrs(cfg Config) []any {
	apiKeys := 0
	for _, k := range strings.Split(cfg.APIKeys, ",") {
		if strings.TrimSpace(k) != "" {
			apiKeys++
		}
	}
	return append(cfg.Redis.LogAttrs(),
		"allow_anonymous", cfg.AllowAnonymous, "api_keys", apiKeys, "jwt", cfg.JWT.Describe(),
		"history_size", cfg.HistorySize, "history_ttl", cfg.HistoryTTL.String(),
		"publish_wait_replicas", cfg.PublishWaitReplicas, "registry_ttl", cfg.RegistryTTL.String(),
		"log_level", cfg.Log.Level)
}

// serve runs an HTTP server on ln until ctx is done, then shuts it down,
// letting requests in flight finish for up to grace. Connections still busy
// then are closed, and serve waits up to redisTimeout plus a second more
// for their handlers to end, so that none of them uses the Redis client
// after run has closed it. Running out of grace is logged, not an error:
// the process has stopped as asked. A listener that fails ends serving
// the same way, and its error is returned. start is added to the
// startup line.
func serve(ctx context.Context, log *slog.Logger, ln net.Listener, h http.Handler, grace, redisTimeout time.Duration, start ...any) error {
	var inflight sync.WaitGroup
	hs := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			inflight.Add(1)
			defer inflight.Done()
			h.ServeHTTP(w, r)
		}),
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       120 * time.Second,
		// net/http's own messages (accept errors such as running out of
		// file descriptors, panics) as records of the function's log, not
		// plain text lines on stderr, and with constant messages
		// (logging.ServerErrorLog) that an alert can name.
		ErrorLog: logging.ServerErrorLog(log),
	}
	log.Info("listening", append([]any{"addr", ln.Addr().String()}, start...)...)
	errc := make(chan error, 1)
	go func() { errc <- hs.Serve(ln) }()
	// failed is Serve's own error: its listener failed (Accept's error
	// was not temporary), and nothing more is accepted. The server then
	// stops as at ctx's end, the requests in flight given their grace and
	// the background logs ended, and says why in its last line.
	var failed error
	select {
	case failed = <-errc:
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	err := hs.Shutdown(sctx)
	if err != nil {
		log.Warn("shutdown grace period over: closing the connections of requests still running", "grace", grace.String())
		_ = hs.Close()
	}
	if failed == nil {
		if err := <-errc; !errors.Is(err, http.ErrServerClosed) {
			failed = err // the listener failed as ctx ended
		}
	}
	// No request starts once the server is closed, so the wait group
	// only counts down from here.
	ended := make(chan struct{})
	go func() { inflight.Wait(); close(ended) }()
	select {
	case <-ended:
	case <-time.After(redisTimeout + time.Second):
		log.Warn("requests still running after shutdown")
	}
	// What the handler logs in the background ends before the last line
	// (Server.quiesce).
	if q, ok := h.(interface{ quiesce() }); ok {
		q.quiesce()
	}
	if failed != nil {
		log.Error("serving failed", "err", failed.Error())
		return failed
	}
	log.Info("stopped")
	return nil
}
