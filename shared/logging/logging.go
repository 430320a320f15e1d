// Package logging builds the functions' structured logger.
package logging

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"strings"
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
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(c.Level)); err != nil {
		return nil, fmt.Errorf("LOG_LEVEL: %q is not debug, info, warn or error", c.Level)
	}
	opts := &slog.HandlerOptions{Level: lvl}
	var h slog.Handler
	switch strings.ToLower(c.Format) {
	case "json", "":
		h = slog.NewJSONHandler(w, opts)
	case "text":
		h = slog.NewTextHandler(w, opts)
	default:
		return nil, fmt.Errorf("LOG_FORMAT: %q is not json or text", c.Format)
	}
	return slog.New(h).With("function", function), nil
}

// RedisLogger sends go-redis's own log lines (a pool's failed dials and
// the like), which it otherwise prints to stderr as plain text, through
// Log at warn level, one line each. Install it with redis.SetLogger; the
// method set is go-redis's logging interface, so this package does not
// import go-redis.
type RedisLogger struct{ Log *slog.Logger }

// Printf logs one go-redis message.
func (l RedisLogger) Printf(ctx context.Context, format string, v ...any) {
	l.Log.WarnContext(ctx, "redis client", "detail", strings.TrimSpace(fmt.Sprintf(format, v...)))
}
