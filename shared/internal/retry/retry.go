// Package retry holds what the Go clients (package client, which
// subscribes, and package publisher, which calls the ingress) share about
// waiting before another attempt: full-jitter backoff, and a response's
// Retry-After.
package retry

import (
	"errors"
	"math"
	"math/rand/v2"
	"net/http"
	"strconv"
	"time"
)

// Backoff is the full-jitter wait before attempt n (0-based): a random
// time in [0, min(maxWait, minWait·2ⁿ)].
func Backoff(minWait, maxWait time.Duration, n int) time.Duration {
	shift := min(n, 20)
	ceil := maxWait
	// Compared before the shift, which would wrap for a minWait of hours.
	if minWait > 0 && minWait <= maxWait>>shift {
		ceil = minWait << shift
	}
	if ceil <= 0 {
		return 0
	}
	// ceil+1 would overflow at the top of the range.
	return rand.N(min(ceil, math.MaxInt64-1) + 1)
}

// After reads a Retry-After header (RFC 9110 §10.2.3: delay-seconds or
// an HTTP date), at most limit. ok is false when h has none that parses.
func After(h http.Header, limit time.Duration) (d time.Duration, ok bool) {
	v := h.Get("Retry-After")
	if v == "" {
		return 0, false
	}
	// ParseUint gives its maximum for too many digits: capped below.
	if n, err := strconv.ParseUint(v, 10, 64); err == nil || errors.Is(err, strconv.ErrRange) {
		return time.Duration(min(n, uint64(limit/time.Second))) * time.Second, true
	}
	if t, err := http.ParseTime(v); err == nil {
		return min(max(time.Until(t), 0), limit), true
	}
	return 0, false
}
