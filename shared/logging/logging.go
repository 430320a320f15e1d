// Package logging builds the functions' structured logger.
package logging

import (
	"context"
	"fmt"
	"io"
	"log"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/wsrelay/wsrelay/shared/config"
)

// Config selects the log format and level.
type Config struct {
	// Format is "json" (default, for production) or "text".
	Format string `env:"LOG_FORMAT" envDefault:"json"`
	// Level is debug, info (default), warn or error.
	Level string `env:"LOG_LEVEL" envDefault:"info"`
}

// New returns a logger writing to w, tagged with the function's name.
func New(c Config, w io.Writer, function string) (*slog.Logger, error) {
	// The four names only: slog's own parser also takes offsets
	// ("info+4", which is warn) that the startup line would then report
	// as given.
	var lvl slog.Level
	var errs []error
	switch strings.ToLower(c.Level) {
	case "debug":
		lvl = slog.LevelDebug
	case "info":
		lvl = slog.LevelInfo
	case "warn":
		lvl = slog.LevelWarn
	case "error":
		lvl = slog.LevelError
	default:
		errs = append(errs, fmt.Errorf("LOG_LEVEL: %q is not debug, info, warn or error", c.Level))
	}
	opts := &slog.HandlerOptions{Level: lvl}
	var h slog.Handler
	switch strings.ToLower(c.Format) {
	case "json", "":
		h = slog.NewJSONHandler(w, opts)
	case "text":
		h = slog.NewTextHandler(w, opts)
	default:
		errs = append(errs, fmt.Errorf("LOG_FORMAT: %q is not json or text", c.Format))
	}
	// Both reported at once, as the README says of every bad value.
	if len(errs) > 0 {
		return nil, config.Join(errs...)
	}
	return slog.New(h).With("function", function), nil
}

// RedisLogger sends go-redis's own log lines (a pool's failed dials and
// the like), which it otherwise prints to stderr as plain text, through
// Log at warn level, one line each, except that a message of the same
// form as one written less than RedisRepeat ago is counted, not written:
// during a Redis outage each pool logs a failed dial per connection it
// tries (up to its size, 10 per CPU, and again whenever a dial gets
// through), and the next line of that form says how many it stood for
// ("repeated"). Install it with redis.SetLogger; the method set is
// go-redis's logging interface, so this package does not import go-redis.
// Safe for concurrent use.
type RedisLogger struct {
	Log *slog.Logger

	mu   sync.Mutex
	seen map[string]*repeat // by format: go-redis's are constants, a few dozen
}

// RedisRepeat is how long a go-redis message's form stays quiet after a
// line of it was written.
const RedisRepeat = 30 * time.Second

type repeat struct {
	at time.Time // of the line written
	n  int       // messages counted, not written, since
}

// Printf logs one go-redis message.
func (l *RedisLogger) Printf(ctx context.Context, format string, v ...any) {
	now := time.Now()
	l.mu.Lock()
	r := l.seen[format]
	if r != nil && now.Sub(r.at) < RedisRepeat {
		r.n++
		l.mu.Unlock()
		return
	}
	if l.seen == nil {
		l.seen = make(map[string]*repeat)
	}
	n := 0
	if r != nil {
		n = r.n
	}
	l.seen[format] = &repeat{at: now}
	l.mu.Unlock()
	attrs := []any{"detail", strings.TrimSpace(fmt.Sprintf(format, v...))}
	if n > 0 {
		attrs = append(attrs, "repeated", n)
	}
	l.Log.WarnContext(ctx, "redis client", attrs...)
}

// ServerErrorLog is an http.Server's ErrorLog that writes net/http's own
// lines (accept errors such as running out of file descriptors, a
// handler's panic, a handler's misuse of its ResponseWriter) as records
// of l with a constant message and net/http's text in "detail", so that
// an alert can name them: a handler's panic is "panic" at error level, as
// the ingress's recovery logs one; anything else is "http server" at
// warn. slog.NewLogLogger would make each line's text its message, which
// differs from line to line.
func ServerErrorLog(l *slog.Logger) *log.Logger {
	return log.New(serverErrorWriter{l}, "", 0)
}

type serverErrorWriter struct{ log *slog.Logger }

func (w serverErrorWriter) Write(p []byte) (int, error) {
	detail := strings.TrimSpace(string(p))
	if strings.HasPrefix(detail, "http: panic serving") {
		w.log.Error("panic", "detail", detail)
	} else {
		w.log.Warn("http server", "detail", detail)
	}
	return len(p), nil
}
