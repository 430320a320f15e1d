package auth

import (
	"bytes"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/wsrelay/wsrelay/shared/channel"
	"github.com/wsrelay/wsrelay/shared/config"
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
	// readIss and readAud, set before the claims are decoded, say
	// whether iss and aud are read: only when JWT_ISSUER and
	// JWT_AUDIENCE are set (docs/security.md), so that a token is not
	// refused for the type of a claim nothing checks. jti is never read.
	readIss, readAud bool
	// decodeErr is the first claim UnmarshalJSON could not decode. It is
	// kept, not returned, because the parser decodes the claims before
	// it checks the signature: Verify tells it only to a signed token.
	decodeErr error
}

// claimError is a claim UnmarshalJSON refuses. The parser wraps it;
// Verify finds it with errors.As and names the claim.
type claimError struct{ claim, problem string }

func (e *claimError) Error() string { return e.claim + " " + e.problem }

// maxNumericDate is 9999-12-31T23:59:59Z in Unix seconds. A NumericDate
// further from 1970, either way, is refused: converting a float64 beyond
// the int64 range to an int64 gives a different value on each CPU
// architecture, and beyond ±9.2e18 the time.Time it makes wraps.
const maxNumericDate = 253402300799

// numericDate decodes raw, the value of claim exp, nbf or iat, into dst.
// It must be a JSON number (RFC 7519 §2): jwt.NumericDate decodes into a
// json.Number, which encoding/json also fills from a string holding a
// number, so that "exp":"1700000000" passed for a number. A fraction is
// allowed; jwt.NumericDate cuts it to the second.
func numericDate(claim string, raw json.RawMessage, dst **jwt.NumericDate) error {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || (raw[0] != '-' && (raw[0] < '0' || raw[0] > '9')) {
		return &claimError{claim, "must be a number (seconds since 1970)"}
	}
	// raw is a valid JSON number, which ParseFloat reads; past float64's
	// range it returns an error and ±Inf. The fraction is cut before the
	// bound is checked, as jwt.NumericDate cuts it: 253402300799.5 is
	// still in the year 9999.
	if f, err := strconv.ParseFloat(string(raw), 64); err != nil || math.Abs(math.Trunc(f)) > maxNumericDate {
		return &claimError{claim, "is out of range (beyond the year 9999)"}
	}
	return json.Unmarshal(raw, dst)
}

// UnmarshalJSON reads the claims by their exact names: claim names are
// case-sensitive (RFC 7519 §4), but encoding/json matches a field's name
// without case, so that "EXP" would pass for exp, or a "Channels" after
// "channels" replace it. exp, nbf and iat must be numbers (numericDate);
// iss and aud are read only when c.readIss and c.readAud say so. A claim
// that cannot be decoded is left unset and recorded in c.decodeErr, named
// (claimError); only a payload that is not a JSON object is an error here.
func (c *jwtClaims) UnmarshalJSON(b []byte) error {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(b, &m); err != nil {
		return err
	}
	for _, f := range []struct {
		name string
		dst  **jwt.NumericDate
	}{{"exp", &c.ExpiresAt}, {"nbf", &c.NotBefore}, {"iat", &c.IssuedAt}} {
		if raw, ok := m[f.name]; ok {
			if err := numericDate(f.name, raw, f.dst); err != nil && c.decodeErr == nil {
				c.decodeErr = err
			}
		}
	}
	for _, f := range []struct {
		name string
		dst  any
		read bool
		want string // what the claim must be, for the error
	}{
		{"iss", &c.Issuer, c.readIss, "a string"},
		{"sub", &c.Subject, true, "a string"},
		{"aud", &c.Audience, c.readAud, "a string or an array of strings"},
		{"channels", &c.Channels, true, "an array of strings (channel patterns)"},
		{"publish", &c.Publish, true, "an array of strings (channel patterns)"},
	} {
		if raw, ok := m[f.name]; ok && f.read {
			if err := json.Unmarshal(raw, f.dst); err != nil && c.decodeErr == nil {
				c.decodeErr = &claimError{f.name, "must be " + f.want}
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
	// keys (RSA of MinRSABits to MaxRSABits, or P-256 ECDSA), one after
	// the other; a token is
	// accepted if any of them verifies it, so that a new key can be
	// added before tokens are signed with it and the old one removed
	// after. A literal \n stands for a newline, so that the keys fit in
	// one environment variable. Empty: none.
	PublicKeys string `env:"JWT_PUBLIC_KEY"`
	// Issuer, when set, is the "iss" a token must carry, exactly.
	// Empty: iss is not checked.
	Issuer string `env:"JWT_ISSUER"`
	// Audience, when set, must be the token's "aud" or one of its
	// values (a string or an array of strings, RFC 7519 §4.1.3). Empty:
	// aud is not checked.
	Audience string `env:"JWT_AUDIENCE"`
}

// maxClaimValue bounds JWT_ISSUER and JWT_AUDIENCE, in bytes.
const maxClaimValue = 256

// checkClaimValues reports a JWT_ISSUER or JWT_AUDIENCE that is not
// 1–256 printable ASCII characters without a space at either end (a
// space pasted along would refuse every token, and look the same in a
// log line). The errors name the variable, never the value.
func (c TokenConfig) checkClaimValues() error {
	var bad []string
	for _, x := range []struct{ name, v string }{{"JWT_ISSUER", c.Issuer}, {"JWT_AUDIENCE", c.Audience}} {
		if x.v == "" {
			continue
		}
		ok := len(x.v) <= maxClaimValue && x.v[0] != ' ' && x.v[len(x.v)-1] != ' '
		for i := 0; ok && i < len(x.v); i++ {
			ok = x.v[i] >= 0x20 && x.v[i] <= 0x7e
		}
		if !ok {
			bad = append(bad, x.name)
		}
	}
	if bad == nil {
		return nil
	}
	// One line: SCF logs stderr line by line.
	return fmt.Errorf("%s must be 1–%d printable ASCII characters, without a space at either end", strings.Join(bad, " and "), maxClaimValue)
}

// Set reports whether a key is set (JWT_SECRET or JWT_PUBLIC_KEY):
// without one no token is accepted, whatever the other settings.
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
	// Whether iss and aud are checked, not what against: the values are
	// not secret, but a startup line need not carry them.
	if c.Issuer != "" {
		parts = append(parts, "iss checked")
	}
	if c.Audience != "" {
		parts = append(parts, "aud checked")
	}
	return strings.Join(parts, "+")
}

// ShortSecrets names the HS256 secrets Check accepts but an operator
// should hear of: JWT_SECRET or JWT_SECRET_PREVIOUS when shorter than 32
// bytes. The functions log one constant line for each, the name in an
// attribute, so that an alert can match the message.
func (c TokenConfig) ShortSecrets() []string {
	var names []string
	if c.Secret != "" && len(c.Secret) < 32 {
		names = append(names, "JWT_SECRET")
	}
	if c.PreviousSecret != "" && len(c.PreviousSecret) < 32 {
		names = append(names, "JWT_SECRET_PREVIOUS")
	}
	return names
}

// The sizes of an RSA key JWT_PUBLIC_KEY may hold, in bits. RFC 7518
// §3.3 requires 2048 or more for RS256: a 1024-bit key can be factored by
// a well-funded attacker, who could then sign any token. The maximum
// bounds what verifying each token costs, which grows with the square of
// the size; keys above it are not in use.
const (
	MinRSABits = 2048
	MaxRSABits = 8192
)

// Verifier checks user tokens. A nil *Verifier refuses every token with
// ErrNoVerifier. It is safe for concurrent use.
type Verifier struct {
	secrets  jwt.VerificationKeySet // HS256
	rsa      jwt.VerificationKeySet
	ecdsa    jwt.VerificationKeySet
	methods  []string
	issuer   string // JWT_ISSUER; empty: not checked
	audience string // JWT_AUDIENCE; empty: not checked
	now      func() time.Time
}

// NewVerifier accepts the tokens c allows: HS256 signed with its secret
// or previous secret, RS256 or ES256 signed by one of its public keys
// (PKIX "PUBLIC KEY" or "RSA PUBLIC KEY" blocks). It returns nil, nil
// when c sets no key, and an error naming the setting when one is
// unusable (never its value). Tokens must also carry c.Issuer and
// c.Audience, when set.
func NewVerifier(c TokenConfig) (*Verifier, error) {
	// Both reported at once, as every bad value at start.
	claimsErr := c.checkClaimValues()
	v, err := newVerifier(c)
	if err := config.Join(claimsErr, err); err != nil {
		return nil, err
	}
	return v, nil
}

// newVerifier is NewVerifier but for the check of c's claim values.
func newVerifier(c TokenConfig) (*Verifier, error) {
	if !c.Set() {
		if c.PreviousSecret != "" {
			return nil, errors.New("JWT_SECRET_PREVIOUS is set without JWT_SECRET: set JWT_SECRET to the current secret")
		}
		return nil, nil
	}
	v := &Verifier{issuer: c.Issuer, audience: c.Audience, now: time.Now}
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
				if bits := k.N.BitLen(); bits < MinRSABits || bits > MaxRSABits {
					return nil, fmt.Errorf("JWT_PUBLIC_KEY: key %d is a %d-bit RSA key: RS256 needs %d to %d bits (RFC 7518 §3.3 sets the minimum)", n, bits, MinRSABits, MaxRSABits)
				}
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
// leeway), "nbf" (when present), "iss" and "aud" (when JWT_ISSUER and
// JWT_AUDIENCE are set), that "exp", "nbf" and "iat" are numbers, "sub"
// (required, a valid user id) and the patterns of "channels" and
// "publish". The error is ErrTokenExpired (a token nothing but its
// expiry is wrong with), ErrNoVerifier or wraps ErrInvalidToken; it never
// holds the token.
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
	jc := jwtClaims{readIss: v.issuer != "", readAud: v.audience != ""}
	opts := []jwt.ParserOption{
		jwt.WithValidMethods(v.methods),
		jwt.WithExpirationRequired(),
		jwt.WithTimeFunc(v.now),
	}
	if v.issuer != "" {
		opts = append(opts, jwt.WithIssuer(v.issuer)) // exact; a missing iss fails
	}
	if v.audience != "" {
		opts = append(opts, jwt.WithAudience(v.audience)) // one of aud; a missing or empty aud fails
	}
	tok, err := jwt.NewParser(opts...).ParseWithClaims(token, &jc, v.key)
	// RFC 7515 §4.1.11: a JWS whose crit lists an extension the
	// recipient does not understand is invalid, and wsrelay understands
	// none. Told only once the signature has passed, as the claims are.
	if tok != nil && (err == nil || errors.Is(err, jwt.ErrTokenInvalidClaims)) {
		if _, crit := tok.Header["crit"]; crit {
			return nil, fmt.Errorf("%w: crit header: no JWS extension is supported", ErrInvalidToken)
		}
	}
	// The claims are decoded before the signature is checked; what was
	// wrong with them is told once the signature has passed (err is nil
	// or a claim check's), so that a forged token learns nothing of it.
	if jc.decodeErr != nil && (err == nil || errors.Is(err, jwt.ErrTokenInvalidClaims)) {
		if ce := (*claimError)(nil); errors.As(jc.decodeErr, &ce) {
			return nil, fmt.Errorf("%w: %v", ErrInvalidToken, ce)
		}
		return nil, fmt.Errorf("%w: malformed, or signed with an algorithm not accepted here", ErrInvalidToken)
	}
	expired := false
	if err != nil {
		// The validation errors come joined: iss and aud are looked at
		// before exp, so that a token of another issuer or audience is
		// invalid, never "expired" (a client would fetch a new one), and
		// so are sub and the patterns below.
		switch {
		// jwt reports an alg outside WithValidMethods as a bad
		// signature; said so, a backend signing with the right secret
		// and another algorithm (a library's default HS512) would look
		// for a wrong secret. The alg is one jwt knows (an unknown one
		// fails before, below), so the message holds nothing the
		// client chose freely.
		case tok != nil && tok.Method != nil && !slices.Contains(v.methods, tok.Method.Alg()):
			return nil, fmt.Errorf("%w: alg %s is not accepted here (accepted: %s)", ErrInvalidToken, tok.Method.Alg(), strings.Join(v.methods, ", "))
		case errors.Is(err, jwt.ErrTokenSignatureInvalid):
			return nil, fmt.Errorf("%w: bad signature", ErrInvalidToken)
		case errors.Is(err, jwt.ErrTokenInvalidIssuer):
			return nil, fmt.Errorf("%w: iss is not JWT_ISSUER", ErrInvalidToken)
		case errors.Is(err, jwt.ErrTokenInvalidAudience):
			return nil, fmt.Errorf("%w: aud does not hold JWT_AUDIENCE", ErrInvalidToken)
		// A missing iss or aud is ErrTokenRequiredClaimMissing, as a
		// missing exp is: the claims tell which.
		case v.issuer != "" && jc.Issuer == "" && errors.Is(err, jwt.ErrTokenRequiredClaimMissing):
			return nil, fmt.Errorf("%w: no iss claim, and JWT_ISSUER is set", ErrInvalidToken)
		case v.audience != "" && noAudience(jc.Audience) && errors.Is(err, jwt.ErrTokenRequiredClaimMissing):
			return nil, fmt.Errorf("%w: no aud claim, and JWT_AUDIENCE is set", ErrInvalidToken)
		case errors.Is(err, jwt.ErrTokenExpired):
			// A token whose nbf is after its exp was never valid, and
			// no waiting makes it so: invalid, not "expired", which
			// a client answers by fetching another of the same kind.
			if jc.NotBefore != nil && jc.NotBefore.After(jc.ExpiresAt.Time) {
				return nil, fmt.Errorf("%w: nbf is after exp, so it is never valid", ErrInvalidToken)
			}
			expired = true // once the rest has passed
		case errors.Is(err, jwt.ErrTokenRequiredClaimMissing):
			return nil, fmt.Errorf("%w: no exp claim", ErrInvalidToken)
		case errors.Is(err, jwt.ErrTokenNotValidYet):
			return nil, fmt.Errorf("%w: not valid yet", ErrInvalidToken)
		default:
			return nil, fmt.Errorf("%w: malformed, or signed with an algorithm not accepted here", ErrInvalidToken)
		}
	}
	if !channel.ValidUser(jc.Subject) {
		return nil, fmt.Errorf("%w: sub must be a user id of %s", ErrInvalidToken, channel.UserRule)
	}
	c := &Claims{Subject: jc.Subject, Expires: jc.ExpiresAt.Time}
	if c.Channels, err = patterns("channels", jc.Channels); err != nil {
		return nil, err
	}
	if c.Publish, err = patterns("publish", jc.Publish); err != nil {
		return nil, err
	}
	if expired {
		// Only time stands between this token and acceptance: a new one
		// from the same backend would do.
		return nil, ErrTokenExpired
	}
	return c, nil
}

// noAudience is how jwt's validator tells a missing aud: none, or one
// empty string.
func noAudience(aud jwt.ClaimStrings) bool {
	return len(aud) == 0 || len(aud) == 1 && aud[0] == ""
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

// SignPayloadHS256 signs payload, a claims JSON object written out as it
// is, with HS256: for tests of claims SignHS256 would not write (names in
// another case, a string exp, an iss or aud).
func SignPayloadHS256(secret, payload string) string {
	enc := base64.RawURLEncoding
	si := enc.EncodeToString([]byte(`{"alg":"HS256","typ":"JWT"}`)) + "." + enc.EncodeToString([]byte(payload))
	m := hmac.New(sha256.New, []byte(secret))
	m.Write([]byte(si))
	return si + "." + enc.EncodeToString(m.Sum(nil))
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
