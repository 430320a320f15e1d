package main

import (
	"errors"
	"fmt"
	"log/slog"

	"github.com/gin-gonic/gin"

	"github.com/wsrelay/wsrelay/shared/auth"
)

// security is what the ingress checks credentials and limits with, built
// once from Config.
type security struct {
	keys     auth.Keys
	verifier *auth.Verifier
	anon     bool
	metrics  auth.MetricsToken // METRICS_TOKEN
	limits   publishLimits
}

// maxRate bounds the PUBLISH_RATE_PER_* settings: a burst of twice it must
// be an int, and no one ingress takes more.
const maxRate = 1_000_000

// maxBurst bounds the PUBLISH_BURST_PER_* settings: twice maxRate, the
// largest burst a 0 (twice the rate) gives.
const maxBurst = 2 * maxRate

// maxGlobalRefill bounds, with PUBLISH_RATE_SCOPE=global, the seconds a
// bucket takes to refill (burst/rate), about 3 years: redis_rate's script
// keeps a bucket's time as a double of seconds since 2017, and a time
// that far ahead no longer adds and subtracts exactly (a fresh bucket
// refused a batch of its whole burst).
const maxGlobalRefill = 100_000_000

// checkSecurity reports what is wrong with the credential settings,
// including the rule that a non-anonymous ingress needs some credential.
func (c *Config) checkSecurity() []error {
	var errs []error
	keys, keysErr := auth.ParseKeys(c.APIKeys)
	if keysErr != nil {
		errs = append(errs, keysErr)
	}
	if _, err := auth.NewVerifier(c.JWT); err != nil {
		errs = append(errs, err)
	}
	if _, err := auth.NewMetricsToken(c.MetricsToken); err != nil {
		errs = append(errs, err)
	}
	// API_KEYS set but refused has its own error above, not this one.
	if !c.AllowAnonymous && keysErr == nil && keys.Len() == 0 && !c.JWT.Set() {
		errs = append(errs, errors.New("no credentials configured: set API_KEYS (backend keys) and/or JWT_SECRET or JWT_PUBLIC_KEY (user tokens), or ALLOW_ANONYMOUS=true for local development only"))
	}
	for _, x := range []struct {
		name string
		v    float64
	}{{"PUBLISH_RATE_PER_KEY", c.PublishRatePerKey}, {"PUBLISH_RATE_PER_IP", c.PublishRatePerIP}, {"PUBLISH_RATE_PER_USER", c.PublishRatePerUser}} {
		if !(x.v >= 0 && x.v <= maxRate) { // NaN fails both
			errs = append(errs, fmt.Errorf("%s must be 0 (off) to %d", x.name, maxRate))
		}
	}
	for _, x := range []struct {
		name string
		v    int
	}{{"PUBLISH_BURST_PER_KEY", c.PublishBurstPerKey}, {"PUBLISH_BURST_PER_IP", c.PublishBurstPerIP}, {"PUBLISH_BURST_PER_USER", c.PublishBurstPerUser}} {
		if x.v < 0 {
			errs = append(errs, fmt.Errorf("%s must not be negative (0: twice the rate)", x.name))
		} else if x.v > maxBurst {
			errs = append(errs, fmt.Errorf("%s must be at most %d", x.name, maxBurst))
		}
	}
	if c.PublishRateScope == scopeGlobal {
		for _, x := range []struct {
			name  string
			rate  float64
			burst int
		}{{"KEY", c.PublishRatePerKey, c.PublishBurstPerKey}, {"IP", c.PublishRatePerIP, c.PublishBurstPerIP}, {"USER", c.PublishRatePerUser, c.PublishBurstPerUser}} {
			if ls := newLimiterSet(x.rate, x.burst); ls != nil && float64(ls.burst)/x.rate > maxGlobalRefill {
				errs = append(errs, fmt.Errorf("PUBLISH_BURST_PER_%s / PUBLISH_RATE_PER_%s (the seconds a bucket takes to refill) must be at most %d with PUBLISH_RATE_SCOPE=global", x.name, x.name, maxGlobalRefill))
			}
		}
	}
	if c.PublishRateScope != scopeInstance && c.PublishRateScope != scopeGlobal {
		errs = append(errs, fmt.Errorf("PUBLISH_RATE_SCOPE: %q is not %s or %s", c.PublishRateScope, scopeInstance, scopeGlobal))
	}
	return errs
}

// newSecurity builds the checks from cfg. Settings that loadConfig would
// refuse fail closed here: no key, no token is accepted.
func newSecurity(cfg Config, log *slog.Logger) *security {
	sec := &security{anon: cfg.AllowAnonymous, limits: newPublishLimits(cfg)}
	var err error
	if sec.keys, err = auth.ParseKeys(cfg.APIKeys); err != nil {
		log.Error("API_KEYS unusable: no API key is accepted", "err", err.Error())
	}
	if sec.metrics, err = auth.NewMetricsToken(cfg.MetricsToken); err != nil {
		log.Error("METRICS_TOKEN unusable: every scrape of /metrics is refused", "err", err.Error())
	}
	if sec.verifier, err = auth.NewVerifier(cfg.JWT); err != nil {
		log.Error("JWT settings unusable: no user token is accepted", "err", err.Error())
	}
	return sec
}

// principal is who made a request: an API key, a user token, or nobody
// (anonymous mode). Its methods answer nil or the apiError to return.
type principal struct {
	// id identifies the credential for idempotency keys and rate limits;
	// never the secret itself.
	id   string
	user string // user token's sub; empty otherwise

	key    *auth.Key    // API key, or nil
	claims *auth.Claims // user token, or nil
}

func (p *principal) anonymous() bool { return p.key == nil && p.claims == nil }

func unauthorized(code, msg string) *apiError { return errf(401, code, msg) }

func forbidden(msg string) *apiError { return errf(403, "forbidden", msg) }

// authenticate identifies the caller from "Authorization: Bearer <x>",
// where x is an API key or a user token (a JWT: exactly two dots; API keys
// have none). No credential is 401 unless anonymous mode is on; a bad
// credential is always 401, and so are two Authorization headers, even
// alike: which of them a client or a proxy between meant is not guessed.
func (s *Server) authenticate(c *gin.Context) (*principal, error) {
	h := c.GetHeader("Authorization")
	if len(c.Request.Header.Values("Authorization")) > 1 {
		c.Header("WWW-Authenticate", `Bearer realm="wsrelay"`)
		return nil, unauthorized("unauthorized", "send one Authorization header, not several")
	}
	if h == "" {
		if s.sec.anon {
			return &principal{id: "anonymous"}, nil
		}
		c.Header("WWW-Authenticate", `Bearer realm="wsrelay"`)
		return nil, unauthorized("unauthorized", "missing credential: send Authorization: Bearer <API key or user token>")
	}
	cred, ok := auth.BearerCredential(h)
	if !ok {
		c.Header("WWW-Authenticate", `Bearer realm="wsrelay"`)
		return nil, unauthorized("unauthorized", "the Authorization header must be: Bearer <API key or user token>")
	}
	if auth.IsToken(cred) {
		claims, err := s.sec.verifier.Verify(cred)
		if err != nil {
			c.Header("WWW-Authenticate", `Bearer realm="wsrelay", error="invalid_token"`)
			switch {
			case errors.Is(err, auth.ErrTokenExpired):
				return nil, unauthorized("token_expired", "the user token has expired; get a fresh one")
			default:
				return nil, unauthorized("invalid_token", err.Error())
			}
		}
		return &principal{id: "user:" + claims.Subject, user: claims.Subject, claims: claims}, nil
	}
	k, ok := s.sec.keys.Lookup(cred)
	if !ok {
		c.Header("WWW-Authenticate", `Bearer realm="wsrelay"`)
		return nil, unauthorized("unauthorized", "unknown API key")
	}
	return &principal{id: k.ID, key: k}, nil
}

const userAdminMsg = "user tokens cannot send to connections or users, read the registry, disconnect or remove history: these need an API key with the admin scope"

func (p *principal) mayPublish(ch string) error {
	switch {
	case p.anonymous():
		return nil
	case p.claims != nil:
		if p.claims.Publish.Allows(ch) {
			return nil
		}
		return forbidden("this user token may not publish to " + ch + " (see its publish claim)")
	case p.key.MayUseChannel(ch):
		return nil
	}
	return forbidden("this API key may not publish to " + ch)
}

func (p *principal) mayAdmin() error {
	switch {
	case p.anonymous():
		return nil
	case p.claims != nil:
		return forbidden(userAdminMsg)
	case p.key.Admin:
		return nil
	}
	return forbidden("this API key lacks the " + auth.AdminScope + " scope")
}

// mayClearHistory: removing a channel's history takes the admin scope
// and the channel: an API key without scopes, or one with +admin and a
// pattern matching the channel (anonymous mode allows everything). User
// tokens never may.
func (p *principal) mayClearHistory(ch string) error {
	if err := p.mayAdmin(); err != nil {
		return err
	}
	if p.anonymous() || p.key.MayUseChannel(ch) {
		return nil
	}
	return forbidden("this API key may not use " + ch + ": removing its history takes the " + auth.AdminScope + " scope and the channel")
}

// mayReadPresence: the registry is admin-only.
func (p *principal) mayReadPresence(string) error { return p.mayAdmin() }

// mayReadHistory: an API key on its channels, or a user token whose
// channels claim covers the channel.
func (p *principal) mayReadHistory(ch string) error {
	switch {
	case p.anonymous():
		return nil
	case p.claims != nil:
		if p.claims.Channels.Allows(ch) {
			return nil
		}
		return forbidden("this user token may not read " + ch + " (see its channels claim)")
	case p.key.MayUseChannel(ch):
		return nil
	}
	return forbidden("this API key may not read " + ch)
}

// from is the sender stamped on a message: a user token's sub always (a
// "from" in the body is ignored, so it cannot be forged); a backend's own
// "from" otherwise.
func (p *principal) from(bodyFrom string) (string, error) {
	if p.user != "" {
		return p.user, nil
	}
	return bodyFrom, nil
}

// warnSecurity logs, at start, settings that leave the ingress open.
func warnSecurity(log *slog.Logger, cfg Config) {
	if cfg.AllowAnonymous {
		log.Warn("ALLOW_ANONYMOUS=true: ANYONE CAN PUBLISH, SEND AND READ WITHOUT A CREDENTIAL. For local development only; never deploy this.")
	}
	for _, name := range cfg.JWT.ShortSecrets() {
		log.Warn("JWT secret shorter than 32 bytes: use a long random secret", "setting", name)
	}
	if keys, err := auth.ParseKeys(cfg.APIKeys); err == nil {
		for _, pos := range keys.ShortKeys() {
			// Its ID in logs and Redis key names is an unsalted SHA-256
			// prefix: a short key can be recovered from it offline.
			log.Warn("API key shorter than 32 characters: use a long random key (openssl rand -hex 32)", "api_keys_item", pos)
		}
	}
}
