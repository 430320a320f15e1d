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
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/config"
	"github.com/wsrelay/wsrelay/shared/debugserver"
	"github.com/wsrelay/wsrelay/shared/logging"
	"github.com/wsrelay/wsrelay/shared/redisconn"
)

// run starts the egress and serves until ctx is done, then drains.
func run(ctx context.Context, args []string, getenv func(string) string, stdout, _ io.Writer) error {
	// -env: the deploy tests and docs take the variable names from here.
	if done, err := config.Args("egress", args, &Config{}, stdout); done {
		return err
	}
	cfg, err := loadConfig(getenv)
	if err != nil {
		return err
	}
	log, err := logging.New(cfg.Log, stdout, "egress")
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
	ln, err := net.Listen("tcp", ":"+strconv.Itoa(cfg.Port))
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	return serve(ctx, log, ln, NewServer(cfg, log, rdb))
}

// readTimeout bounds the reading of a whole HTTP request, body included.
// The egress's requests have no body, but a client may declare one: without
// a bound, net/http waits for it (to discard it) for as long as the client
// keeps the connection open, before it even sends the response, so anyone,
// without a credential, could hold a goroutine and a file descriptor per
// connection forever. gorilla/websocket clears the deadline when it takes
// the connection over, so upgraded sockets are not affected.
const readTimeout = 30 * time.Second

// writeTimeout bounds the writing of a response (from the request's
// headers on): a client that pipelines requests for the demo page or
// client.js and never reads the answers would otherwise hold a
// goroutine, a file descriptor and its socket's send buffer for as long
// as it likes. gorilla/websocket clears it too as it takes a socket over.
const writeTimeout = 30 * time.Second

// httpServer is the net/http server of s.
func httpServer(s *Server, log *slog.Logger) *http.Server {
	return &http.Server{
		Handler: s, ReadHeaderTimeout: 10 * time.Second, ReadTimeout: readTimeout, WriteTimeout: writeTimeout, IdleTimeout: 120 * time.Second,
		// net/http's own messages (accept errors such as running out of
		// file descriptors, panics) as records of the function's log, not
		// plain text lines on stderr, and with constant messages
		// (logging.ServerErrorLog) that an alert can name.
		ErrorLog: logging.ServerErrorLog(log),
	}
}

// serve runs s on ln until ctx is done: it stops accepting, drains the
// sockets (close 1001, registry records removed) and returns. Requests
// that are not sockets and still run SHUTDOWN_GRACE plus a second after
// ctx's end have their connections closed: logged, not an error (the
// process has stopped as asked). A listener that fails ends serving the
// same way, and its error is returned.
func serve(ctx context.Context, log *slog.Logger, ln net.Listener, s *Server) error {
	return serveWith(ctx, log, ln, s, httpServer(s, log))
}

// serveWith is serve with the HTTP server hs (tests shorten its timeouts).
func serveWith(ctx context.Context, log *slog.Logger, ln net.Listener, s *Server, hs *http.Server) error {
	log.Info("listening", append([]any{"addr", ln.Addr().String(), "instance", s.instance}, startAttrs(s.cfg)...)...)
	runCtx, stopRun := context.WithCancel(ctx)
	defer stopRun()
	ran := make(chan struct{})
	go func() { s.Run(runCtx); close(ran) }()
	errc := make(chan error, 1)
	go func() { errc <- hs.Serve(ln) }()
	// failed is Serve's own error: its listener failed (Accept's error
	// was not temporary), and nothing more is accepted. The server then
	// stops as at ctx's end, its sockets drained and the outage logs
	// ended, and says why in its last line.
	var failed error
	select {
	case failed = <-errc:
	case <-ctx.Done():
	}
	// Stop accepting first, then drain the hijacked sockets. Serve has
	// returned (and let go of ln) before Shutdown, which would otherwise
	// close ln a second time and report that as its error.
	grace := s.cfg.ShutdownGrace + time.Second
	sctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	if failed == nil {
		_ = ln.Close()
		<-errc // the accept error of the closed listener
	}
	stopRun() // after a failure, the drain starts here; ctx's end has started it otherwise
	<-ran
	// Requests that are not sockets (a client still sending a body it
	// declared, which net/http waits for until readTimeout) are cut once
	// the time is over, as the ingress cuts its own: logged, not an
	// error, so that the last line still says how the process stopped.
	if err := hs.Shutdown(sctx); err != nil && !errors.Is(err, http.ErrServerClosed) {
		log.Warn("shutdown grace period over: closing the connections of requests still running", "grace", grace.String())
		_ = hs.Close()
	}
	s.stopEpisodes()
	if failed != nil {
		log.Error("serving failed", "err", failed.Error())
		return failed
	}
	log.Info("stopped")
	return nil
}

// startAttrs is the configuration the startup line shows: what an operator
// checks first, and no credential.
func startAttrs(cfg Config) []any {
	return append(cfg.Redis.LogAttrs(),
		"allow_anonymous", cfg.AllowAnonymous, "jwt", cfg.JWT.Describe(),
		"max_connections", cfg.MaxConnections, "idle_timeout", cfg.IdleTimeout.String(), "max_lifetime", cfg.MaxLifetime.String(),
		"ping_interval", cfg.PingInterval.String(), "probe_interval", cfg.ProbeInterval.String(), "registry_ttl", cfg.RegistryTTL.String(),
		"log_level", cfg.Log.Level)
}
