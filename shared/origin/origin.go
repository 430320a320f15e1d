// Package origin decides which browser origins may use the functions:
// the egress's WebSocket origin check and the ingress's CORS share it, so
// ALLOWED_ORIGINS means the same thing in both (docs/security.md).
package origin

import "strings"

// Allowed reports whether a request with the Origin header origin, sent to
// host (the request's Host), is allowed by the ALLOWED_ORIGINS value
// allowed: an origin listed there ("*" allows any), or, when allowed is
// empty, an origin whose host is the request's own host. Requests without
// an Origin header (not from a browser) are the caller's to let through.
func Allowed(allowed, origin, host string) bool {
	if allowed != "" {
		for _, a := range strings.Split(allowed, ",") {
			a = strings.TrimSpace(a)
			if a == "*" || strings.EqualFold(a, origin) {
				return true
			}
		}
		return false
	}
	_, after, ok := strings.Cut(origin, "://")
	return ok && strings.EqualFold(after, host)
}

// AllowsAny reports whether allowed lists "*".
func AllowsAny(allowed string) bool {
	for _, a := range strings.Split(allowed, ",") {
		if strings.TrimSpace(a) == "*" {
			return true
		}
	}
	return false
}
