package auth

import (
	"bytes"
	"crypto/elliptic"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/wsrelay/wsrelay/shared/channel"
)

// MaxTokenBytes bounds a token; longer ones are refused before parsing.
const MaxTokenBytes = 8192

// Errors of Verify. Every other failure wraps ErrInvalidToken.
var (
	ErrInvalidToken = errors.New("invalid token")
	ErrTokenExpired = errors.New("token expired")
	ErrNoVerifier   = errors.New("tokens are not accepted: neither JWT_SECRET nor JWT_PUBLIC_KEY is set")
)

// Claims are what wsrelay reads from a user token.
type Claims struct {
	// Subject is the user id (the "sub" claim), required, a valid user id.
	Subject string
	// Channels ("channels") are the patterns the user may subscribe to
	// and read the history of. Nil means none.
	Channels channel.Patterns
	// Publish ("publish") are the patterns the user may publish to over
	// the ingress. Nil means none.
	Publish channel.Patterns
	// Expires is the "exp" claim, required.
	Expires time.Time
}

type jwtClaims struct {
	jwt.RegisteredClaims
	Channels []string `json:"channels,omitempty"`
	Publish  []string `json:"publish,omitempty"`
}

// UnmarshalJSON reads the claims by their exact names: claim names are
// case-sensitive (RFC 7519 §4), but encoding/json matches a field's name
// without case, so that "EXP" would pass for exp, or a "Channels" after
// "channels" replace it. Anything else is decoded as encoding/json does.
func (c *jwtClaims) UnmarshalJSON(b []byte) error {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(b, &m); err != nil {
		return err
	}
	for _, f := range []struct {
		name string
		dst  any
	}{
		{"iss", &c.Issuer}, {"sub", &c.Subject}, {"aud", &c.Audience},
		{"exp", &c.ExpiresAt}, {"nbf", &c.NotBefore}, {"iat", &c.IssuedAt}, {"jti", &c.ID},
		{"channels", &c.Channels}, {"publish", &c.Publish},
	} {
		if raw, ok := m[f.name]; ok {
			if err := json.Unmarshal(raw, f.dst); err != nil {
				return err
			}
		}
	}
	return nil
}

// IsToken tells a bearer credential that is a JWT from an API key without
// guessing: a JWT has exactly two dots, an API key none (ValidKey).
func IsToken(bearer string) bool { return strings.Count(bearer, ".") == 2 }

// BearerCredential returns the credential of an Authorization header
// value "Bearer <credential>" (scheme case-insensitive). ok is false when
// the header is set but not of that form.
func BearerCredential(header string) (cred string, ok bool) {
	scheme, rest, found := strings.Cut(header, " ")
	if !found || !strings.EqualFold(scheme, "Bearer") {
		return "", false
	}
	rest = strings.TrimSpace(rest)
	return rest, rest != ""
}

// TokenConfig is the user-token settings, the same in both functions
// (their Config embeds it).
type TokenConfig struct {
	// Secret verifies HS256 tokens. Empty: no HS256 tokens.
	Secret string `env:"JWT_SECRET"`
	// PreviousSecret also verifies HS256 tokens: the secret Secret
	// replaced, kept while tokens signed with it are still in use, so
	// that the secret can be rotated without refusing valid tokens.
	// Needs Secret.
	PreviousSecret string `env:"JWT_SECRET_PREVIOUS"`
	// PublicKeys verify RS256 and ES256 tokens: one or more PEM public
	// keys (RSA, or P-256 ECDSA), one after the other; a token is
	// accepted if any of them verifies it, so that a new key can be
	// added before tokens are signed with it and the old one removed
	// after. A literal \n stands for a newline, so that the keys fit in
	// one environment variable. Empty: none.
	PublicKeys string `env:"JWT_PUBLIC_KEY"`
}

// Set reports whether any token setting is set.
func (c TokenConfig) Set() bool { return c.Secret != "" || c.PublicKeys != "" }

// Describe says, for a startup line, how tokens are verified, without any
// key: "off", "secret", "secret+previous secret", "1 public key",
// "secret+2 public keys" and so on.
func (c TokenConfig) Describe() string {
	var parts []string
	if c.Secret != "" {
		parts = append(parts, "secret")
	}
	if c.PreviousSecret != "" {
		parts = append(parts, "previous secret")
	}
	if c.PublicKeys != "" {
		n := strings.Count(strings.ReplaceAll(c.PublicKeys, `\n`, "\n"), "-----BEGIN ")
		parts = append(parts, fmt.Sprintf("%d public key", n)+map[bool]string{true: "s"}[n != 1])
	}
	if len(parts) == 0 {
		return "off"
	}
	return strings.Join(parts, "+")
}

// Warnings are what Check accepts but an operator should hear of.
func (c TokenConfig) Warnings() []string {
	var w []string
	if c.Secret != "" && len(c.Secret) < 32 {
		w = append(w, "JWT_SECRET is shorter than 32 bytes: use a long random secret")
	}
	if c.PreviousSecret != "" && len(c.PreviousSecret) < 32 {
		w = append(w, "JWT_SECRET_PREVIOUS is shorter than 32 bytes: use a long random secret")
	}
	return w
}

// Verifier checks user tokens. A nil *Verifier refuses every token with
// ErrNoVerifier. It is safe for concurrent use.
type Verifier struct {
	secrets jwt.VerificationKeySet // HS256
	rsa     jwt.VerificationKeySet
	ecdsa   jwt.VerificationKeySet
	methods []string
	now     func() time.Time
}

// NewVerifier accepts the tokens c allows: HS256 signed with its secret
// or previous secret, RS256 or ES256 signed by one of its public keys
// (PKIX "PUBLIC KEY" or "RSA PUBLIC KEY" blocks). It returns nil, nil
// when c sets nothing, and an error naming the setting when one is
// unusable (never its value).
func NewVerifier(c TokenConfig) (*Verifier, error) {
	if !c.Set() {
		if c.PreviousSecret != "" {
			return nil, errors.New("JWT_SECRET_PREVIOUS is set without JWT_SECRET: set JWT_SECRET to the current secret")
		}
		return nil, nil
	}
	v := &Verifier{now: time.Now}
	if c.Secret != "" {
		v.secrets.Keys = append(v.secrets.Keys, []byte(c.Secret))
		if c.PreviousSecret != "" {
			v.secrets.Keys = append(v.secrets.Keys, []byte(c.PreviousSecret))
		}
		v.methods = append(v.methods, "HS256")
	} else if c.PreviousSecret != "" {
		return nil, errors.New("JWT_SECRET_PREVIOUS is set without JWT_SECRET: set JWT_SECRET to the current secret")
	}
	if c.PublicKeys != "" {
		rest := []byte(strings.ReplaceAll(c.PublicKeys, `\n`, "\n"))
		for n := 1; ; n++ {
			// pem.Decode skips text before a block; it would hide a key
			// pasted without its BEGIN line.
			if i := bytes.Index(rest, []byte("-----BEGIN ")); i >= 0 && len(bytes.TrimSpace(rest[:i])) > 0 {
				return nil, fmt.Errorf("JWT_PUBLIC_KEY: text before key %d's BEGIN line", n)
			}
			b, after := pem.Decode(rest)
			if b == nil {
				if len(bytes.TrimSpace(rest)) > 0 || n == 1 {
					return nil, fmt.Errorf("JWT_PUBLIC_KEY: key %d is not a PEM block", n)
				}
				break
			}
			// pem.Decode skips a block it cannot read (bad base64, no END
			// line) and returns the next one: that block is key n, and
			// unusable, not a key to leave out.
			if bytes.Count(rest[:len(rest)-len(after)], []byte("-----BEGIN ")) > 1 {
				return nil, fmt.Errorf("JWT_PUBLIC_KEY: key %d is not a PEM block", n)
			}
			rest = after
			one := pem.EncodeToMemory(b)
			if k, err := jwt.ParseRSAPublicKeyFromPEM(one); err == nil {
				v.rsa.Keys = append(v.rsa.Keys, k)
			} else if k, err := jwt.ParseECPublicKeyFromPEM(one); err == nil && k.Curve == elliptic.P256() {
				v.ecdsa.Keys = append(v.ecdsa.Keys, k)
			} else {
				return nil, fmt.Errorf("JWT_PUBLIC_KEY: key %d is not an RSA or P-256 ECDSA public key", n)
			}
		}
		if len(v.rsa.Keys) > 0 {
			v.methods = append(v.methods, "RS256")
		}
		if len(v.ecdsa.Keys) > 0 {
			v.methods = append(v.methods, "ES256")
		}
	}
	return v, nil
}

// WithClock returns a copy of v that reads the time from now (tests).
func (v *Verifier) WithClock(now func() time.Time) *Verifier {
	c := *v
	c.now = now
	return &c
}

func (v *Verifier) key(t *jwt.Token) (any, error) {
	var set jwt.VerificationKeySet
	switch t.Method.(type) {
	case *jwt.SigningMethodHMAC:
		set = v.secrets
	case *jwt.SigningMethodRSA:
		set = v.rsa
	case *jwt.SigningMethodECDSA:
		set = v.ecdsa
	}
	if len(set.Keys) == 0 {
		return nil, errors.New("no key for this algorithm")
	}
	return set, nil
}

// Verify checks token's signature, algorithm, "exp" (required, no
// leeway), "nbf" (when present), "sub" (required, a valid user id) and the patterns
// of "channels" and "publish". The error is ErrTokenExpired, ErrNoVerifier
// or wraps ErrInvalidToken; it never holds the token.
func (v *Verifier) Verify(token string) (*Claims, error) {
	if v == nil {
		return nil, ErrNoVerifier
	}
	if len(token) > MaxTokenBytes {
		return nil, fmt.Errorf("%w: longer than %d bytes", ErrInvalidToken, MaxTokenBytes)
	}
	if !IsToken(token) {
		return nil, fmt.Errorf("%w: not a JWT", ErrInvalidToken)
	}
	var jc jwtClaims
	p := jwt.NewParser(
		jwt.WithValidMethods(v.methods),
		jwt.WithExpirationRequired(),
		jwt.WithTimeFunc(v.now),
	)
	if _, err := p.ParseWithClaims(token, &jc, v.key); err != nil {
		switch {
		case errors.Is(err, jwt.ErrTokenExpired):
			return nil, ErrTokenExpired
		case errors.Is(err, jwt.ErrTokenRequiredClaimMissing):
			return nil, fmt.Errorf("%w: no exp claim", ErrInvalidToken)
		case errors.Is(err, jwt.ErrTokenSignatureInvalid):
			return nil, fmt.Errorf("%w: bad signature", ErrInvalidToken)
		case errors.Is(err, jwt.ErrTokenNotValidYet):
			return nil, fmt.Errorf("%w: not valid yet", ErrInvalidToken)
		default:
			return nil, fmt.Errorf("%w: malformed, or signed with an algorithm not accepted here", ErrInvalidToken)
		}
	}
	if !channel.ValidUser(jc.Subject) {
		return nil, fmt.Errorf("%w: sub must be a user id of 1–128 characters [A-Za-z0-9_.:@-]", ErrInvalidToken)
	}
	c := &Claims{Subject: jc.Subject, Expires: jc.ExpiresAt.Time}
	var err error
	if c.Channels, err = patterns("channels", jc.Channels); err != nil {
		return nil, err
	}
	if c.Publish, err = patterns("publish", jc.Publish); err != nil {
		return nil, err
	}
	return c, nil
}

func patterns(claim string, ps []string) (channel.Patterns, error) {
	if len(ps) > 256 {
		return nil, fmt.Errorf("%w: %s holds more than 256 patterns", ErrInvalidToken, claim)
	}
	for _, p := range ps {
		if !channel.ValidPattern(p) {
			return nil, fmt.Errorf("%w: %s holds %q, which is not a channel pattern", ErrInvalidToken, claim, p)
		}
	}
	return channel.Patterns(ps), nil
}

// SignHS256 mints a user token: what an application's backend does (see
// docs/security.md), here for tests and tools. A zero Expires is refused.
func SignHS256(secret string, c Claims) (string, error) {
	if c.Expires.IsZero() {
		return "", errors.New("SignHS256: Expires is required")
	}
	jc := jwtClaims{
		RegisteredClaims: jwt.RegisteredClaims{Subject: c.Subject, ExpiresAt: jwt.NewNumericDate(c.Expires)},
		Channels:         c.Channels,
		Publish:          c.Publish,
	}
	return jwt.NewWithClaims(jwt.SigningMethodHS256, jc).SignedString([]byte(secret))
}
