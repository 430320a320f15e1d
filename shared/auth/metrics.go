package auth

import (
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"net/http"
)

// MetricsToken guards /metrics: when set (METRICS_TOKEN), a scrape must
// carry it as "Authorization: Bearer <token>", which Prometheus sends with
// its `authorization` setting; the zero value lets every request through.
type MetricsToken struct {
	set bool
	sum [sha256.Size]byte // all zero (no credential's digest) when unusable
}

// NewMetricsToken checks token (empty: /metrics stays open): 1–256
// printable ASCII bytes without spaces, which fit in a header as they
// are. With an error (which never holds the token) it returns a guard
// that refuses every scrape, so that a caller going on fails closed.
func NewMetricsToken(token string) (MetricsToken, error) {
	if token == "" {
		return MetricsToken{}, nil
	}
	if len(token) > 256 {
		return MetricsToken{set: true}, errors.New("METRICS_TOKEN: longer than 256 bytes")
	}
	for i := 0; i < len(token); i++ {
		if c := token[i]; c <= 0x20 || c > 0x7e {
			return MetricsToken{set: true}, errors.New("METRICS_TOKEN: only printable ASCII characters, no spaces")
		}
	}
	return MetricsToken{set: true, sum: sha256.Sum256([]byte(token))}, nil
}

// Allows reports whether r may read /metrics. The comparison takes the
// same time whatever the credential.
func (m MetricsToken) Allows(r *http.Request) bool {
	if !m.set {
		return true
	}
	// One Authorization header, as for the API: of two, which one a
	// client or a proxy between meant is not guessed.
	h := r.Header.Values("Authorization")
	if len(h) != 1 {
		return false
	}
	cred, ok := BearerCredential(h[0])
	if !ok {
		return false
	}
	sum := sha256.Sum256([]byte(cred))
	return subtle.ConstantTimeCompare(sum[:], m.sum[:]) == 1
}
