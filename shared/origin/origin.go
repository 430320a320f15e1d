// Package origin decides which browser origins may use the functions:
// the egress's WebSocket origin check and the ingress's CORS share it, so
// ALLOWED_ORIGINS means the same thing in both (docs/security.md).
package origin

import (
	"fmt"
	"net/url"
	"strconv"
	"strings"
)

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

// Validate checks an ALLOWED_ORIGINS value: each entry is "*" or an origin
// as browsers send it, scheme://host[:port] and nothing more. An entry with
// a path (even a trailing "/"), or without a scheme, would silently match
// nothing.
func Validate(allowed string) error {
	if allowed == "" {
		return nil
	}
	for _, a := range strings.Split(allowed, ",") {
		a = strings.TrimSpace(a)
		if a == "*" {
			continue
		}
		u, err := url.Parse(a)
		// url.Parse lowers the scheme; Allowed compares without case.
		if err != nil || u.Scheme == "" || u.Host == "" || u.User != nil || !strings.EqualFold(u.Scheme+"://"+u.Host, a) {
			return fmt.Errorf("ALLOWED_ORIGINS: %q is not an origin (scheme://host[:port], no path) or *", a)
		}
		// Entries a browser's Origin can never equal: they would refuse
		// every browser while looking right.
		if strings.Contains(u.Host, "*") {
			return fmt.Errorf("ALLOWED_ORIGINS: %q: patterns are not supported; list each origin, or *", a)
		}
		if strings.HasSuffix(u.Host, ":") {
			return fmt.Errorf("ALLOWED_ORIGINS: %q: empty port; write %s://%s", a, u.Scheme, strings.TrimSuffix(u.Host, ":"))
		}
		for _, r := range u.Host {
			if r >= 0x80 {
				return fmt.Errorf("ALLOWED_ORIGINS: %q: browsers send an internationalized host name in its ASCII form (xn--…); write that", a)
			}
		}
		if p := u.Port(); p != "" {
			// Browsers send a port as its number, 1–65535, no leading zero.
			if n, err := strconv.Atoi(p); err != nil || n < 1 || n > 65535 || strconv.Itoa(n) != p {
				return fmt.Errorf("ALLOWED_ORIGINS: %q: the port must be a number from 1 to 65535 without leading zeros, as browsers send it", a)
			}
		}
		if p := u.Port(); (p == "443" && u.Scheme == "https") || (p == "80" && u.Scheme == "http") {
			// TrimSuffix, not Hostname: an IPv6 literal keeps its brackets.
			return fmt.Errorf("ALLOWED_ORIGINS: %q: browsers send the scheme's default port %s as no port; write %s://%s", a, p, u.Scheme, strings.TrimSuffix(u.Host, ":"+p))
		}
	}
	return nil
}
