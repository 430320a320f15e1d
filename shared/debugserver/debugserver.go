//go:build !wsrelay_lean

package debugserver

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"sync"
	"time"

	"github.com/wsrelay/wsrelay/shared/logging"
)

// Start serves /debug/pprof/ on addr (e.g. 127.0.0.1:6060) until ctx is
// done or stop is called, and returns the address it listens on. An empty
// addr starts nothing. stop stops the server, if ctx has not, and waits
// for it: a caller whose start fails after Start returns before any
// signal ends ctx, and waiting for ctx alone would keep the process
// running, its profiling port open and its own never served. Calling stop
// more than once is safe.
func Start(ctx context.Context, addr string, log *slog.Logger) (bound string, stop func(), err error) {
	if addr == "" {
		return "", func() {}, nil
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return "", nil, err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	hs := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second, ErrorLog: logging.ServerErrorLog(log)}
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() {
		if err := hs.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Warn("debug server stopped", "err", err.Error())
		}
	})
	wg.Go(func() {
		<-ctx.Done()
		sctx, cancelShutdown := context.WithTimeout(context.Background(), time.Second)
		defer cancelShutdown()
		_ = hs.Shutdown(sctx)
	})
	log.Warn("profiling endpoints enabled: keep DEBUG_ADDR private", "addr", ln.Addr().String())
	return ln.Addr().String(), func() { cancel(); wg.Wait() }, nil
}
