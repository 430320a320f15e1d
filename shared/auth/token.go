package auth

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
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

// Verifier checks user tokens. A nil *Verifier refuses every token with
// ErrNoVerifier. It is safe for concurrent use.
type Verifier struct {
	secret  []byte
	pub     crypto.PublicKey
	methods []string
	now     func() time.Time
}

// NewVerifier accepts HS256 tokens signed with secret (when not empty) and
// RS256 or ES256 tokens signed by the key in publicKeyPEM (when not
// empty; PKIX "PUBLIC KEY" or "RSA PUBLIC KEY"; a literal \n in the text
// stands for a newline, so the PEM fits in one environment variable). It
// returns nil, nil when both are empty.
func NewVerifier(secret, publicKeyPEM string) (*Verifier, error) {
	if secret == "" && publicKeyPEM == "" {
		return nil, nil
	}
	v := &Verifier{now: time.Now}
	if secret != "" {
		v.secret = []byte(secret)
		v.methods = append(v.methods, "HS256")
	}
	if publicKeyPEM != "" {
		pemText := []byte(strings.ReplaceAll(publicKeyPEM, `\n`, "\n"))
		if k, err := jwt.ParseRSAPublicKeyFromPEM(pemText); err == nil {
			v.pub = k
			v.methods = append(v.methods, "RS256")
		} else if k, err := jwt.ParseECPublicKeyFromPEM(pemText); err == nil && k.Curve == elliptic.P256() {
			v.pub = k
			v.methods = append(v.methods, "ES256")
		} else {
			return nil, errors.New("JWT_PUBLIC_KEY: not a PEM RSA or P-256 ECDSA public key")
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
	switch t.Method.(type) {
	case *jwt.SigningMethodHMAC:
		if v.secret != nil {
			return v.secret, nil
		}
	case *jwt.SigningMethodRSA:
		if k, ok := v.pub.(*rsa.PublicKey); ok {
			return k, nil
		}
	case *jwt.SigningMethodECDSA:
		if k, ok := v.pub.(*ecdsa.PublicKey); ok {
			return k, nil
		}
	}
	return nil, errors.New("no key for this algorithm")
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
