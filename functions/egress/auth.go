package main

import (
	"errors"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/wsrelay/wsrelay/shared/auth"
	"github.com/wsrelay/wsrelay/shared/channel"
	"github.com/wsrelay/wsrelay/shared/query"
)

// Subprotocol is the WebSocket subprotocol a client offers alongside its
// token: new WebSocket(url, ["wsrelay", "token." + jwt]). The server
// echoes "wsrelay", never the token.
const (
	Subprotocol   = "wsrelay"
	tokenProtocol = "token."
)

// identity is who opened a connection.
type identity struct {
	user  string
	allow func(channel string) bool // nil: any channel
	exp   time.Time                 // zero: never expires
	proto string                    // subprotocol to echo, if any
}

type authError struct {
	status    int
	code, msg string
}

func (id *identity) responseHeader() http.Header {
	if id.proto == "" {
		return nil
	}
	return http.Header{"Sec-WebSocket-Protocol": {id.proto}}
}

// security is what the egress checks tokens with, built once from Config.
type security struct {
	verifier *auth.Verifier
	public   channel.Patterns
	anon     bool
	metrics  auth.MetricsToken // METRICS_TOKEN
}

// checkSecurity reports what is wrong with the token settings, including
// the rule that a non-anonymous egress needs a way to verify tokens.
func (c *Config) checkSecurity() []error {
	var errs []error
	if _, err := auth.NewVerifier(c.JWT); err != nil {
		errs = append(errs, err)
	}
	if _, err := auth.NewMetricsToken(c.MetricsToken); err != nil {
		errs = append(errs, err)
	}
	if _, bad := channel.ParsePatterns(c.PublicChannels); bad != "" {
		errs = append(errs, errors.New("PUBLIC_CHANNELS: "+bad+" is not a channel pattern"))
	}
	if !c.AllowAnonymous && !c.JWT.Set() {
		errs = append(errs, errors.New("no way to verify connection tokens: set JWT_SECRET (HS256) or JWT_PUBLIC_KEY (RS256/ES256 PEM), or ALLOW_ANONYMOUS=true for local development only"))
	}
	return errs
}

// newSecurity builds the checks from cfg; settings loadConfig would refuse
// fail closed (no token accepted, no public channel).
func newSecurity(cfg Config, log *slog.Logger) *security {
	sec := &security{anon: cfg.AllowAnonymous}
	var err error
	if sec.metrics, err = auth.NewMetricsToken(cfg.MetricsToken); err != nil {
		log.Error("METRICS_TOKEN unusable: every scrape of /metrics is refused", "err", err.Error())
	}
	if sec.verifier, err = auth.NewVerifier(cfg.JWT); err != nil {
		log.Error("JWT settings unusable: no token is accepted", "err", err.Error())
	}
	if ps, bad := channel.ParsePatterns(cfg.PublicChannels); bad == "" {
		sec.public = ps
	} else {
		log.Error("PUBLIC_CHANNELS unusable: no public channel", "pattern", bad)
	}
	return sec
}

// warnSecurity logs, at start, settings that leave the egress open.
func warnSecurity(log *slog.Logger, cfg Config) {
	if cfg.AllowAnonymous {
		log.Warn("ALLOW_ANONYMOUS=true: ANYONE CAN CONNECT AND SUBSCRIBE TO ANY CHANNEL WITHOUT A TOKEN. For local development only; never deploy this.")
	}
	for _, name := range cfg.JWT.ShortSecrets() {
		log.Warn("JWT secret shorter than 32 bytes: use a long random secret", "setting", name)
	}
}

// allowFor is the subscribe check of a token: its channels claim or a
// public channel.
func (sec *security) allowFor(c *auth.Claims) func(string) bool {
	own, public := c.Channels, sec.public
	return func(ch string) bool { return own.Allows(ch) || public.Allows(ch) }
}

// queryOnce reads a query parameter that takes one value ("" when
// absent). A repeated one (?token=a&token=b) is a 400 with code, the
// parameter's code for a bad value: which value was meant cannot be told.
func queryOnce(r *http.Request, name, code string) (string, *authError) {
	if query.Malformed(r.URL.RawQuery, name) {
		return "", &authError{http.StatusBadRequest, code, name + " is malformed (a ';', a bad %-escape, or one of more than 10000 parameters)"}
	}
	q := r.URL.Query()
	if vs := q[name]; len(vs) > 1 {
		return "", &authError{http.StatusBadRequest, code, name + " must be given once, not " + strconv.Itoa(len(vs)) + " times"}
	}
	return q.Get(name), nil
}

// tokenFrom finds the token of an upgrade request: the "token" query
// parameter, else a "token.<jwt>" subprotocol. proto is the subprotocol
// to echo ("wsrelay" when offered).
func tokenFrom(r *http.Request) (token, proto string, aerr *authError) {
	if token, aerr = queryOnce(r, "token", "invalid_token"); aerr != nil {
		return "", "", aerr
	}
	for _, h := range r.Header.Values("Sec-WebSocket-Protocol") {
		for _, p := range strings.Split(h, ",") {
			p = strings.TrimSpace(p)
			switch {
			case p == Subprotocol:
				proto = Subprotocol
			case strings.HasPrefix(p, tokenProtocol) && token == "":
				token = p[len(tokenProtocol):]
			}
		}
	}
	return token, proto, nil
}

// authenticate identifies the client of an upgrade request from its token
// (401 when missing, invalid or expired). In anonymous mode a request
// without a token is let in, its user named by the optional `user` query
// parameter.
func (s *Server) authenticate(r *http.Request) (*identity, *authError) {
	token, proto, aerr := tokenFrom(r)
	if aerr != nil {
		return nil, aerr
	}
	if token == "" {
		if !s.sec.anon {
			return nil, &authError{http.StatusUnauthorized, "unauthorized", "missing token: pass it as the token query parameter or the token.<jwt> subprotocol"}
		}
		user, aerr := queryOnce(r, "user", "invalid_user")
		if aerr != nil {
			return nil, aerr
		}
		if user != "" && !channel.ValidUser(user) {
			return nil, &authError{http.StatusBadRequest, "invalid_user", "user must be " + channel.UserRule}
		}
		return &identity{user: user, proto: proto}, nil
	}
	claims, err := s.sec.verifier.Verify(token)
	if err != nil {
		if errors.Is(err, auth.ErrTokenExpired) {
			return nil, &authError{http.StatusUnauthorized, "token_expired", "the token has expired; connect with a fresh one"}
		}
		return nil, &authError{http.StatusUnauthorized, "invalid_token", err.Error()}
	}
	return &identity{user: claims.Subject, allow: s.sec.allowFor(claims), exp: claims.Expires, proto: proto}, nil
}
