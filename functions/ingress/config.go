package main

import (
	"errors"
	"fmt"
	"time"

	"github.com/wsrelay/wsrelay/shared/config"
	"github.com/wsrelay/wsrelay/shared/logging"
	"github.com/wsrelay/wsrelay/shared/redisconn"
)

// Config is the ingress configuration, read once at start from the
// environment. The README's configuration table lists every variable.
type Config struct {
	// Port to listen on, on all interfaces. SCF requires 9000.
	Port int `env:"PORT" envDefault:"9000"`

	Redis redisconn.Config
	Log   logging.Config

	// HistorySize is how many messages each channel's stream keeps
	// (approximately); zero keeps all, bounded only by HistoryTTL.
	HistorySize int64 `env:"HISTORY_SIZE" envDefault:"1000"`
	// HistoryTTL is how long a message is kept; a channel with no publish
	// for this long disappears whole. Zero keeps messages forever.
	HistoryTTL time.Duration `env:"HISTORY_TTL" envDefault:"24h"`

	// MaxMessageBytes bounds a single publish's body and each batch item.
	MaxMessageBytes int64 `env:"MAX_MESSAGE_BYTES" envDefault:"65536"`
	// MaxBatchBytes bounds a batch publish's whole body.
	MaxBatchBytes int64 `env:"MAX_BATCH_BYTES" envDefault:"4194304"`
	// MaxBatchItems bounds the messages of one batch (1–1000).
	MaxBatchItems int `env:"MAX_BATCH_ITEMS" envDefault:"1000"`

	// IdempotencyWindow is how long an Idempotency-Key is remembered.
	IdempotencyWindow time.Duration `env:"IDEMPOTENCY_WINDOW" envDefault:"24h"`

	// RegistryTTL must equal the egress's: targeted messages to an instance
	// are kept this long (twice) for it to catch up after a Redis blip.
	RegistryTTL time.Duration `env:"REGISTRY_TTL" envDefault:"30s"`
}

func loadConfig(getenv func(string) string) (Config, error) {
	var c Config
	if err := config.Load(getenv, &c); err != nil {
		return c, err
	}
	var errs []error
	if c.Port < 1 || c.Port > 65535 {
		errs = append(errs, fmt.Errorf("PORT: %d is not a TCP port", c.Port))
	}
	if err := c.Redis.Validate(); err != nil {
		errs = append(errs, err)
	}
	if c.HistorySize < 0 {
		errs = append(errs, errors.New("HISTORY_SIZE must not be negative"))
	}
	if c.HistoryTTL < 0 {
		errs = append(errs, errors.New("HISTORY_TTL must not be negative"))
	}
	if c.MaxMessageBytes < 64 {
		errs = append(errs, errors.New("MAX_MESSAGE_BYTES must be at least 64"))
	}
	if c.MaxBatchBytes < c.MaxMessageBytes {
		errs = append(errs, errors.New("MAX_BATCH_BYTES must be at least MAX_MESSAGE_BYTES"))
	}
	if c.MaxBatchItems < 1 || c.MaxBatchItems > 1000 {
		errs = append(errs, errors.New("MAX_BATCH_ITEMS must be 1–1000"))
	}
	if c.IdempotencyWindow < time.Second {
		errs = append(errs, errors.New("IDEMPOTENCY_WINDOW must be at least 1s"))
	}
	if c.RegistryTTL < time.Second {
		errs = append(errs, errors.New("REGISTRY_TTL must be at least 1s"))
	}
	if len(errs) > 0 {
		return c, fmt.Errorf("configuration: %w", errors.Join(errs...))
	}
	return c, nil
}
