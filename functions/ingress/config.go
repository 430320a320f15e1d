package main

import (
	"errors"
	"fmt"
	"time"

	"golang.org/x/net/http/httpguts"

	"github.com/wsrelay/wsrelay/shared/auth"
	"github.com/wsrelay/wsrelay/shared/config"
	"github.com/wsrelay/wsrelay/shared/logging"
	"github.com/wsrelay/wsrelay/shared/origin"
	"github.com/wsrelay/wsrelay/shared/redisconn"
)

// Config is the ingress configuration, read once at start from the
// environment. The README's configuration table lists every variable.
type Config struct {
	// Port to listen on, on all interfaces. SCF requires 9000.
	Port int `env:"PORT" envDefault:"9000"`

	Redis redisconn.Config
	Log   logging.Config

	// DebugAddr, when set (e.g. 127.0.0.1:6060), serves Go's profiling
	// endpoints (/debug/pprof/) there. Empty means off. Never expose it.
	DebugAddr string `env:"DEBUG_ADDR"`

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

	// PublishWaitReplicas, when positive, answers 202 only once that many
	// Redis replicas have the message (Redis WAIT), so a failover cannot
	// lose an acknowledged publish; otherwise 503 (it may have been
	// written: retry with the same Idempotency-Key). Zero: off.
	PublishWaitReplicas int `env:"PUBLISH_WAIT_REPLICAS" envDefault:"0"`
	// PublishWaitTimeout bounds that wait; it must be below REDIS_TIMEOUT.
	PublishWaitTimeout time.Duration `env:"PUBLISH_WAIT_TIMEOUT" envDefault:"500ms"`

	// ShutdownGrace is how long the requests in flight at SIGTERM get to
	// finish before their connections are closed.
	ShutdownGrace time.Duration `env:"SHUTDOWN_GRACE" envDefault:"10s"`

	// RegistryTTL must equal the egress's: targeted messages to an instance
	// are kept this long (twice) for it to catch up after a Redis blip.
	RegistryTTL time.Duration `env:"REGISTRY_TTL" envDefault:"30s"`

	// AllowAnonymous serves requests without a credential with full access
	// (local development only); a credential that is sent is still checked.
	AllowAnonymous bool `env:"ALLOW_ANONYMOUS" envDefault:"false"`
	// APIKeys are the backends' keys, comma-separated, each optionally
	// scoped: key=chat:*|news.*|+admin (docs/security.md). Empty: none.
	APIKeys string `env:"API_KEYS"`
	// JWT verifies user tokens: JWT_SECRET, JWT_SECRET_PREVIOUS,
	// JWT_PUBLIC_KEY, JWT_ISSUER and JWT_AUDIENCE (auth.TokenConfig).
	JWT auth.TokenConfig
	// MetricsToken, when set, is the bearer token a scrape of /metrics
	// must carry (401 without it). Empty: /metrics is open.
	MetricsToken string `env:"METRICS_TOKEN"`
	// AllowedOrigins are the browser origins allowed by CORS (comma-
	// separated scheme://host[:port]; "*" any). Empty: same host only.
	AllowedOrigins string `env:"ALLOWED_ORIGINS"`

	// PublishRatePerKey limits messages per second per API key; zero: off.
	PublishRatePerKey float64 `env:"PUBLISH_RATE_PER_KEY" envDefault:"0"`
	// PublishBurstPerKey is that limit's burst; zero: twice the rate, rounded up (at least 1).
	PublishBurstPerKey int `env:"PUBLISH_BURST_PER_KEY" envDefault:"0"`
	// PublishRatePerIP limits messages per second per client IP; zero: off.
	PublishRatePerIP float64 `env:"PUBLISH_RATE_PER_IP" envDefault:"0"`
	// PublishBurstPerIP is that limit's burst; zero: twice the rate, rounded up (at least 1).
	PublishBurstPerIP int `env:"PUBLISH_BURST_PER_IP" envDefault:"0"`
	// PublishRatePerUser limits messages per second per user token
	// subject; zero: off. The default is SCF's per-connection figure.
	PublishRatePerUser float64 `env:"PUBLISH_RATE_PER_USER" envDefault:"10"`
	// PublishBurstPerUser is that limit's burst; zero: twice the rate, rounded up (at least 1).
	PublishBurstPerUser int `env:"PUBLISH_BURST_PER_USER" envDefault:"20"`
	// PublishRateScope is where the publish rate limits' buckets live:
	// "instance" (in each ingress process: a client spread over n
	// instances gets n times the rates) or "global" (in Redis, shared by
	// every instance: one more Redis call per limit that applies).
	PublishRateScope string `env:"PUBLISH_RATE_SCOPE" envDefault:"instance"`
	// ClientIPHeader names the header the API gateway puts the client's
	// address in (its last entry is used, e.g. X-Forwarded-For). Empty:
	// the TCP peer address. Only set it behind a gateway that sets it.
	ClientIPHeader string `env:"CLIENT_IP_HEADER"`
}

// The upper bounds of the settings (docs: the README's table).
const (
	maxDuration     = 24 * time.Hour       // SHUTDOWN_GRACE, REGISTRY_TTL
	maxRetention    = 365 * 24 * time.Hour // HISTORY_TTL, IDEMPOTENCY_WINDOW
	maxHistorySize  = 1_000_000_000
	maxMessageBytes = 64 << 20
	maxBatchBytes   = 256 << 20
	maxWaitReplicas = 100
)

// waitMargin is how far below REDIS_TIMEOUT PUBLISH_WAIT_TIMEOUT must stay
// with the replica wait on: Redis's timer tick (100 ms at hz 10), then
// the reply's way back.
const waitMargin = 200 * time.Millisecond

func loadConfig(getenv func(string) string) (Config, error) {
	var c Config
	// The variables that do not parse are at their defaults: the others'
	// ranges are checked too, and all of them reported at once.
	errs, err := config.LoadAll(getenv, &c)
	if err != nil {
		return c, err
	}
	if c.Port < 1 || c.Port > 65535 {
		errs = append(errs, fmt.Errorf("PORT: %d is not a TCP port", c.Port))
	}
	if err := c.Redis.Validate(); err != nil {
		errs = append(errs, err)
	}
	if c.HistorySize < 0 {
		errs = append(errs, errors.New("HISTORY_SIZE must not be negative"))
	}
	if c.HistoryTTL < 0 || (c.HistoryTTL > 0 && c.HistoryTTL < time.Second) {
		// Age trimming and the TTL refresh run once per second of a
		// stream's traffic, and a value below 1ms would read as 0 (keep
		// forever).
		errs = append(errs, errors.New("HISTORY_TTL must be 0 (keep until HISTORY_SIZE) or at least 1s"))
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
	if c.PublishWaitReplicas < 0 {
		errs = append(errs, errors.New("PUBLISH_WAIT_REPLICAS must not be negative"))
	}
	if c.PublishWaitReplicas > 0 && (c.PublishWaitTimeout < time.Millisecond || c.PublishWaitTimeout > c.Redis.Timeout-waitMargin) {
		// WAIT takes whole milliseconds, and WAIT n 0 waits forever. Its
		// reply must come within REDIS_TIMEOUT (the read deadline of its
		// pipeline), and Redis answers a WAIT that ran out on its next
		// timer tick, up to 100 ms late (hz 10).
		errs = append(errs, fmt.Errorf("PUBLISH_WAIT_TIMEOUT must be at least 1ms and at most REDIS_TIMEOUT less %s (Redis answers a WAIT that ran out up to 100 ms late, and the answer must come within REDIS_TIMEOUT)", waitMargin))
	} else if c.PublishWaitTimeout < 0 {
		// Even with the wait off it is part of an Idempotency-Key claim's
		// expiry (pendingTTL), which a negative value can make invalid.
		errs = append(errs, errors.New("PUBLISH_WAIT_TIMEOUT must not be negative"))
	}
	if c.ShutdownGrace < 0 {
		errs = append(errs, errors.New("SHUTDOWN_GRACE must not be negative"))
	}
	if c.RegistryTTL < 3*time.Second {
		// Records are refreshed every REGISTRY_TTL/3 by a sweep that runs
		// once a second: below 3s a live connection's record can expire.
		errs = append(errs, errors.New("REGISTRY_TTL must be at least 3s"))
	}
	// Upper bounds no deployment comes near, checked so that nothing
	// derived from a value overflows: targeted messages are kept
	// 2×REGISTRY_TTL, an Idempotency-Key claim lasts 10×REDIS_TIMEOUT +
	// PUBLISH_WAIT_TIMEOUT + 5s, the grace is followed by REDIS_TIMEOUT
	// and a second.
	errs = append(errs,
		config.AtMost("HISTORY_SIZE", c.HistorySize, maxHistorySize),
		config.AtMost("HISTORY_TTL", c.HistoryTTL, maxRetention),
		config.AtMost("MAX_MESSAGE_BYTES", c.MaxMessageBytes, maxMessageBytes),
		config.AtMost("MAX_BATCH_BYTES", c.MaxBatchBytes, maxBatchBytes),
		config.AtMost("IDEMPOTENCY_WINDOW", c.IdempotencyWindow, maxRetention),
		config.AtMost("PUBLISH_WAIT_REPLICAS", c.PublishWaitReplicas, maxWaitReplicas),
		// Even with the wait off: what the wait may be when on.
		config.AtMost("PUBLISH_WAIT_TIMEOUT", c.PublishWaitTimeout, redisconn.MaxTimeout),
		config.AtMost("SHUTDOWN_GRACE", c.ShutdownGrace, maxDuration),
		config.AtMost("REGISTRY_TTL", c.RegistryTTL, maxDuration))
	if c.ClientIPHeader != "" && !httpguts.ValidHeaderFieldName(c.ClientIPHeader) {
		// It would never match, and every request would fall back to
		// the TCP peer: the gateway's address, one bucket for everyone.
		errs = append(errs, errors.New("CLIENT_IP_HEADER must be a header name (e.g. X-Forwarded-For)"))
	}
	if err := origin.Validate(c.AllowedOrigins); err != nil {
		errs = append(errs, err)
	}
	errs = append(errs, c.checkSecurity()...)
	if err := config.Join(errs...); err != nil { // nil errors skipped
		return c, fmt.Errorf("configuration: %w", err)
	}
	return c, nil
}
