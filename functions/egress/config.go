package main

import (
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/wsrelay/wsrelay/shared/auth"
	"github.com/wsrelay/wsrelay/shared/channel"
	"github.com/wsrelay/wsrelay/shared/config"
	"github.com/wsrelay/wsrelay/shared/logging"
	"github.com/wsrelay/wsrelay/shared/origin"
	"github.com/wsrelay/wsrelay/shared/redisconn"
)

// Config is the egress configuration, read once at start from the
// environment. The README's configuration table lists every variable.
type Config struct {
	// Port to listen on, on all interfaces. SCF requires 9000.
	Port int `env:"PORT" envDefault:"9000"`

	Redis redisconn.Config
	Log   logging.Config

	// DebugAddr, when set (e.g. 127.0.0.1:6060), serves Go's profiling
	// endpoints (/debug/pprof/) there. Empty means off. Never expose it.
	DebugAddr string `env:"DEBUG_ADDR"`

	// InstanceID names this instance in the registry, its inbox's keys
	// and its log lines: 1–128 characters [A-Za-z0-9_.:@-], as a user
	// id, so that it can go into a key. Empty means a random id chosen at
	// start (the usual choice).
	InstanceID string `env:"INSTANCE_ID"`

	// IdleTimeout closes a connection (code 4000) after this long without
	// a data frame either way. Zero disables it. Set it a little below the
	// platform's idle timeout so the close is the server's, with a code.
	IdleTimeout time.Duration `env:"IDLE_TIMEOUT" envDefault:"0s"`
	// MaxLifetime closes a connection (code 4001) at most this long after
	// it opened, and no sooner than nine tenths of it (a lifetime drawn per
	// connection, so that sockets opened together are not cut together).
	// Zero disables it. Set it a little below SCF's execution timeout.
	MaxLifetime time.Duration `env:"MAX_LIFETIME" envDefault:"0s"`

	// PingInterval is how often the server pings each socket; a peer that
	// has not answered within 2×PingInterval is dropped.
	PingInterval time.Duration `env:"PING_INTERVAL" envDefault:"25s"`
	// WriteTimeout: a socket that takes no data for this long (at least
	// half of it) is dropped.
	WriteTimeout time.Duration `env:"WRITE_TIMEOUT" envDefault:"10s"`
	// MaxFrameBytes is the read limit per client message, all its
	// fragments together (close 1009 above).
	MaxFrameBytes int64 `env:"MAX_FRAME_BYTES" envDefault:"65536"`
	// SendQueue is each connection's outgoing queue, in frames; a client
	// that falls this far behind is closed with 4002 and resumes.
	SendQueue int `env:"SEND_QUEUE" envDefault:"1024"`
	// MaxSubscriptions per connection.
	MaxSubscriptions int `env:"MAX_SUBSCRIPTIONS" envDefault:"100"`
	// MaxFramesPerSecond a client may send (a token bucket with a second's
	// burst); above it the client's frames are read more slowly, none is
	// refused. Zero means no limit.
	MaxFramesPerSecond int `env:"MAX_FRAMES_PER_SECOND" envDefault:"50"`
	// MaxConnections per instance; above it upgrades get 503. Zero means
	// no limit.
	MaxConnections int `env:"MAX_CONNECTIONS" envDefault:"0"`

	// AllowedOrigins lists the browser origins (scheme://host[:port],
	// comma-separated) that may open sockets; "*" allows any. Empty means
	// only the egress's own origin. Clients without Origin are allowed.
	AllowedOrigins string `env:"ALLOWED_ORIGINS"`

	// AllowAnonymous accepts sockets without a token (the user then comes
	// from the "user" query parameter) for local development; a token
	// that is sent is still checked.
	AllowAnonymous bool `env:"ALLOW_ANONYMOUS" envDefault:"false"`
	// JWT verifies user tokens: JWT_SECRET, JWT_SECRET_PREVIOUS,
	// JWT_PUBLIC_KEY, JWT_ISSUER and JWT_AUDIENCE (auth.TokenConfig).
	JWT auth.TokenConfig
	// MetricsToken, when set, is the bearer token a scrape of /metrics
	// must carry (401 without it). Empty: /metrics is open.
	MetricsToken string `env:"METRICS_TOKEN"`
	// PublicChannels are channel patterns (comma-separated) any holder of
	// a valid token may subscribe to, besides its channels claim. Empty:
	// none.
	PublicChannels string `env:"PUBLIC_CHANNELS"`

	// IngressURL is the public URL of the ingress (e.g.
	// https://api.example.com), used by the demo page at / to publish and
	// read presence. Empty means the page's own origin (both functions
	// behind one reverse proxy).
	IngressURL string `env:"INGRESS_URL"`

	// RegistryTTL is how long a connection's registry record outlives its
	// instance: records are refreshed every RegistryTTL/3, so a crashed
	// instance's records vanish within RegistryTTL.
	RegistryTTL time.Duration `env:"REGISTRY_TTL" envDefault:"30s"`
	// ProbeInterval is how often the instance checks its Redis read path
	// end to end (/readyz turns 503 after 3 missed probes).
	ProbeInterval time.Duration `env:"PROBE_INTERVAL" envDefault:"5s"`
	// ShutdownGrace bounds the drain on SIGTERM.
	ShutdownGrace time.Duration `env:"SHUTDOWN_GRACE" envDefault:"10s"`
	// DrainRate is how many sockets a second the drain closes: their
	// clients reconnect spread out, not all at once (Server.drain). 0:
	// all at once.
	DrainRate int `env:"DRAIN_RATE" envDefault:"1000"`
}

// The upper bounds of the settings (docs: the README's table).
const (
	maxDuration        = 24 * time.Hour // every duration
	maxFrameBytes      = 64 << 20
	maxSendQueue       = 1_000_000
	maxSubscriptions   = 100_000
	maxFramesPerSecond = 1_000_000
	maxConnections     = 10_000_000
)

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
	if c.InstanceID != "" && !channel.ValidUser(c.InstanceID) {
		errs = append(errs, errors.New("INSTANCE_ID must be "+channel.UserRule+" (empty: a random id)"))
	}
	if c.IdleTimeout != 0 && c.IdleTimeout < time.Second {
		errs = append(errs, errors.New("IDLE_TIMEOUT must be 0 (off) or at least 1s"))
	}
	if c.MaxLifetime != 0 && c.MaxLifetime < time.Second {
		errs = append(errs, errors.New("MAX_LIFETIME must be 0 (off) or at least 1s"))
	}
	if c.PingInterval < 100*time.Millisecond {
		errs = append(errs, errors.New("PING_INTERVAL must be at least 100ms"))
	}
	if c.WriteTimeout < 100*time.Millisecond {
		errs = append(errs, errors.New("WRITE_TIMEOUT must be at least 100ms"))
	}
	if c.MaxFrameBytes < 256 {
		errs = append(errs, errors.New("MAX_FRAME_BYTES must be at least 256"))
	}
	if c.SendQueue < 16 {
		errs = append(errs, errors.New("SEND_QUEUE must be at least 16"))
	}
	if c.MaxSubscriptions < 1 {
		errs = append(errs, errors.New("MAX_SUBSCRIPTIONS must be at least 1"))
	}
	if c.MaxConnections < 0 {
		errs = append(errs, errors.New("MAX_CONNECTIONS must not be negative"))
	}
	if c.MaxFramesPerSecond < 0 {
		errs = append(errs, errors.New("MAX_FRAMES_PER_SECOND must not be negative (0: no limit)"))
	}
	if c.RegistryTTL < 3*time.Second {
		// Records are refreshed every REGISTRY_TTL/3 by a sweep that runs
		// once a second: below 3s a live connection's record can expire.
		errs = append(errs, errors.New("REGISTRY_TTL must be at least 3s"))
	}
	if c.ProbeInterval < 100*time.Millisecond {
		errs = append(errs, errors.New("PROBE_INTERVAL must be at least 100ms"))
	}
	if c.ShutdownGrace < 0 {
		errs = append(errs, errors.New("SHUTDOWN_GRACE must not be negative"))
	}
	if c.DrainRate < 0 {
		errs = append(errs, errors.New("DRAIN_RATE must not be negative (0: all at once)"))
	}
	// Upper bounds no deployment comes near, checked so that nothing
	// derived from a value overflows: 2×PING_INTERVAL and 4×PROBE_INTERVAL
	// wrapped negative above about a million hours (every socket dropped,
	// /readyz stuck at 503), and a grace adds REDIS_TIMEOUT and a second.
	for _, x := range []struct {
		name string
		v    time.Duration
	}{
		{"IDLE_TIMEOUT", c.IdleTimeout}, {"MAX_LIFETIME", c.MaxLifetime}, {"PING_INTERVAL", c.PingInterval},
		{"WRITE_TIMEOUT", c.WriteTimeout}, {"REGISTRY_TTL", c.RegistryTTL}, {"PROBE_INTERVAL", c.ProbeInterval},
		{"SHUTDOWN_GRACE", c.ShutdownGrace},
	} {
		errs = append(errs, config.AtMost(x.name, x.v, maxDuration))
	}
	errs = append(errs,
		config.AtMost("MAX_FRAME_BYTES", c.MaxFrameBytes, maxFrameBytes),
		config.AtMost("SEND_QUEUE", c.SendQueue, maxSendQueue),
		config.AtMost("MAX_SUBSCRIPTIONS", c.MaxSubscriptions, maxSubscriptions),
		config.AtMost("MAX_FRAMES_PER_SECOND", c.MaxFramesPerSecond, maxFramesPerSecond),
		config.AtMost("MAX_CONNECTIONS", c.MaxConnections, maxConnections),
		config.AtMost("DRAIN_RATE", c.DrainRate, maxConnections))
	if c.IngressURL != "" && !validIngressURL(c.IngressURL) {
		// Not quoted: a URL with user information holds a password.
		errs = append(errs, errors.New("INGRESS_URL must be an http:// or https:// URL with a host (a port, if any, 1 to 65535) and no user name, password, query or fragment (e.g. https://api.example.com; empty: the demo page's own origin)"))
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

// validIngressURL reports whether s can prefix the demo page's requests
// (s + "/v1/…"): an absolute http(s) URL with a host and at most a path.
// Without a scheme the page's requests would go to a path of the egress;
// user information would be shown to every visitor of the page. A port
// without a host ("https://:443"), or one past 65535, passes url.Parse,
// but browsers refuse the URL, and every request of the page failed.
func validIngressURL(s string) bool {
	u, err := url.Parse(s)
	if err != nil || u.Hostname() == "" {
		return false
	}
	if p := u.Port(); p != "" {
		if n, err := strconv.Atoi(p); err != nil || n < 1 || n > 65535 {
			return false
		}
	}
	// A "#" with nothing after it leaves no Fragment, but still cuts
	// the page's requests short (s + "/v1/…").
	return (u.Scheme == "http" || u.Scheme == "https") &&
		u.User == nil && u.RawQuery == "" && !u.ForceQuery && !strings.Contains(s, "#") && u.Opaque == ""
}
