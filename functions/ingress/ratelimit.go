package main

import (
	"cmp"
	"math"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/gin-gonic/gin"
	"golang.org/x/time/rate"
)

// maxLimiters bounds each limiter set; beyond it, idle limiters are
// evicted first, then the fullest (which gives them back at most the
// little they had spent; an emptied one, a rate-limited client's, is
// the last to go).
const maxLimiters = 10000

// limiterSet holds one token bucket per key (API key, IP, user).
type limiterSet struct {
	rate  rate.Limit
	burst int
	// idle is how long an unused bucket takes to refill: after that it
	// equals a fresh one, so dropping it changes nothing.
	idle time.Duration

	mu        sync.Mutex
	m         map[string]*limiterEntry
	lastSweep time.Time
}

type limiterEntry struct {
	lim *rate.Limiter
	// seen is the latest time the bucket was read at, never moved back.
	seen time.Time
}

// newLimiterSet returns nil (no limit) when perSecond is zero. A zero
// burst means twice the rate, at least 1.
func newLimiterSet(perSecond float64, burst int) *limiterSet {
	if perSecond <= 0 {
		return nil
	}
	if burst <= 0 {
		burst = max(1, int(math.Ceil(2*perSecond)))
	}
	idle := seconds(float64(burst) / perSecond)
	return &limiterSet{rate: rate.Limit(perSecond), burst: burst, idle: max(idle, time.Second), m: map[string]*limiterEntry{}}
}

// seconds is s seconds as a Duration, at most a century: a low rate
// (PUBLISH_RATE_* 0.0001 with a burst of 2,000,000) makes a refill time
// past Duration's range, which converted as it is wraps round to the
// minimum (a bucket then dropped, so refilled, after a second idle).
func seconds(s float64) time.Duration {
	const most = 100 * 365 * 24 * time.Hour
	if s >= most.Seconds() {
		return most
	}
	return time.Duration(s * float64(time.Second))
}

// reserve takes n tokens from key's bucket, or none: it returns how long
// to wait before the n would be available (zero when taken, with what
// gives them back if the publish is refused after all; otherwise its r is
// nil), and -1 when n exceeds the burst and can never be taken at once.
//
// now is read before the lock is taken, so concurrent requests come with
// their times out of order: a time behind the bucket's last is read as
// its last. rate would otherwise wind the bucket's clock back to it, and
// count the refill since again at the next request (requests alternating
// so passed at up to twice the rate).
func (ls *limiterSet) reserve(key string, n int, now time.Time) (time.Duration, reservation) {
	if ls == nil {
		return 0, reservation{}
	}
	if n > ls.burst {
		return -1, reservation{}
	}
	ls.mu.Lock()
	defer ls.mu.Unlock()
	e := ls.m[key]
	if e == nil {
		if len(ls.m) >= maxLimiters || now.Sub(ls.lastSweep) > time.Minute {
			ls.sweep(now)
		}
		e = &limiterEntry{lim: rate.NewLimiter(ls.rate, ls.burst)}
		ls.m[key] = e
	}
	if now.After(e.seen) {
		e.seen = now
	}
	now = e.seen
	// A refusal reserves nothing: a reservation cancelled at once would
	// leave the bucket's last event in the future, and rate would then
	// count the refund of a reservation taken earlier as already spent.
	if t := e.lim.TokensAt(now); t < float64(n) {
		d := seconds((float64(n) - t) / float64(ls.rate))
		return max(d, 1), reservation{}
	}
	return 0, reservation{e.lim.ReserveN(now, n), now}
}

// reservation is tokens reserve took, and the time it took them at. A
// value, not a pointer: no allocation more per publish.
type reservation struct {
	r  *rate.Reservation
	at time.Time
}

// cancel gives the tokens back. At the time they were taken: rate gives
// nothing back for a reservation it takes as already acted on, and an
// earlier time (the request's, which reserve may have moved on) would
// wind the bucket's clock back.
func (r reservation) cancel() { r.r.CancelAt(r.at) }

// sweep drops idle buckets and, if still full, the fullest down to nine
// tenths of the bound: dropping a bucket refills it, so the ones that
// lose least are those with most tokens left, and a client that emptied
// its bucket keeps its limit however many others come and go (to reset
// it, they would all have to be emptier). A sweep walks every bucket, so
// a set full of active keys (many clients at once) sweeps once per
// thousand new keys, not once per new key. Called with ls.mu held.
func (ls *limiterSet) sweep(now time.Time) {
	ls.lastSweep = now
	for k, e := range ls.m {
		if now.Sub(e.seen) > ls.idle {
			delete(ls.m, k)
		}
	}
	if len(ls.m) < maxLimiters {
		return
	}
	type bucket struct {
		key    string
		tokens float64
	}
	all := make([]bucket, 0, len(ls.m))
	for k, e := range ls.m {
		all = append(all, bucket{k, e.lim.TokensAt(now)})
	}
	slices.SortFunc(all, func(a, b bucket) int { return cmp.Compare(b.tokens, a.tokens) })
	for _, b := range all[:len(all)-maxLimiters*9/10] {
		delete(ls.m, b.key)
	}
}

func (ls *limiterSet) len() int {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	return len(ls.m)
}

// publishLimits are the ingress's publish rate limits. Each is nil when
// off.
type publishLimits struct {
	perKey, perIP, perUser *limiterSet
	ipHeader               string
	// global, when set (PUBLISH_RATE_SCOPE=global), keeps the buckets in
	// Redis; the limiterSets then only give their rates and bursts.
	global *redisLimits
	// now is the in-process buckets' clock: time.Now when nil (a test
	// stops it to check a burst "at once" however slow the machine).
	now func() time.Time
}

func newPublishLimits(cfg Config) publishLimits {
	return publishLimits{
		perKey:   newLimiterSet(cfg.PublishRatePerKey, cfg.PublishBurstPerKey),
		perIP:    newLimiterSet(cfg.PublishRatePerIP, cfg.PublishBurstPerIP),
		perUser:  newLimiterSet(cfg.PublishRatePerUser, cfg.PublishBurstPerUser),
		ipHeader: cfg.ClientIPHeader,
	}
}

// clientIP is the key of the per-IP limit: the TCP peer, or the last
// entry of the configured gateway header (the one the gateway itself
// added; earlier ones are the client's to forge).
func (pl *publishLimits) clientIP(c *gin.Context) string {
	if pl.ipHeader != "" {
		if v := c.Request.Header.Values(pl.ipHeader); len(v) > 0 {
			last := v[len(v)-1]
			if i := strings.LastIndexByte(last, ','); i >= 0 {
				last = last[i+1:]
			}
			if ip := strings.TrimSpace(last); ip != "" {
				return ipKey(ip)
			}
		}
	}
	host, _, err := net.SplitHostPort(c.Request.RemoteAddr)
	if err != nil {
		return ipKey(c.Request.RemoteAddr)
	}
	return ipKey(host)
}

// ipKey is an IPv4 address, or an IPv6 address's /64: one subscriber
// line is given a whole /64 and can send from any of its addresses, so
// keying the full address would let one client have a bucket per request.
// An address with a port (some gateways write "ip:port" or "[ip]:port"
// in X-Forwarded-For) is keyed by its address: the port changes with each
// connection. Anything that does not parse is its own key.
func ipKey(s string) string {
	a, ok := clientAddr(s)
	if !ok {
		return s
	}
	a = a.Unmap()
	if a.Is4() {
		return a.String()
	}
	p, _ := a.WithZone("").Prefix(64)
	return p.String()
}

// clientAddr parses a client address as gateways write it: "ip",
// "ip:port", "[ip]:port", "[ip]" (RFC 7239 style), or an IPv6 address
// followed by ":port" without brackets when that is the only reading (the
// whole is not an address itself).
func clientAddr(s string) (netip.Addr, bool) {
	if a, err := netip.ParseAddr(s); err == nil {
		return a, true
	}
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return ap.Addr(), true
	}
	if len(s) > 2 && s[0] == '[' && s[len(s)-1] == ']' {
		if a, err := netip.ParseAddr(s[1 : len(s)-1]); err == nil && a.Is6() {
			return a, true
		}
	}
	if i := strings.LastIndexByte(s, ':'); i > 0 {
		if _, err := strconv.ParseUint(s[i+1:], 10, 16); err == nil {
			if a, err := netip.ParseAddr(s[:i]); err == nil && a.Is6() {
				return a, true
			}
		}
	}
	return netip.Addr{}, false
}

// allowPublishes applies the publish rate limits for n messages: per
// client IP, then per API key or per user token. Over a limit: 429
// rate_limited with Retry-After (none for a batch larger than a burst,
// which can never pass). A refused publish takes nothing from any bucket:
// a batch larger than a burst is refused before any is taken from, and a
// bucket that refuses gives back what the buckets before it took. (With
// the buckets in Redis, PUBLISH_RATE_SCOPE=global, that last part is not
// done: redis_rate's script has no refund, so the buckets passed before a
// rate refusal keep the share.) With the buckets in Redis, a Redis error
// is returned as it is (503), unless the request's Idempotency-Key is
// bad (400), which the order of errors puts first.
func (s *Server) allowPublishes(c *gin.Context, p *principal, n int) error {
	pl := &s.sec.limits
	now := time.Now()
	if pl.now != nil {
		now = pl.now()
	}
	type check struct {
		set  *limiterSet
		key  string
		what string
	}
	checks := []check{{pl.perIP, "", "client IP"}}
	if pl.perIP != nil {
		checks[0].key = pl.clientIP(c)
	}
	switch {
	case p.claims != nil:
		checks = append(checks, check{pl.perUser, p.id, "user"})
	case p.key != nil:
		checks = append(checks, check{pl.perKey, p.id, "API key"})
	}
	// First what can never pass, so that the per-IP bucket is not spent
	// on a batch the per-key or per-user burst refuses: other clients
	// behind the same address publish from it.
	for _, ch := range checks {
		if ch.set != nil && n > ch.set.burst {
			// No Retry-After: the same batch can never pass.
			return &apiError{Status: 429, Code: "rate_limited",
				Message: "batch of " + strconv.Itoa(n) + " messages exceeds the per-" + ch.what + " burst of " + strconv.Itoa(ch.set.burst) + "; send smaller batches"}
		}
	}
	var held [2]reservation // per IP, per key or user
	taken := held[:0]
	for _, ch := range checks {
		if ch.set == nil {
			continue
		}
		var d time.Duration
		if pl.global != nil {
			// User and key ids already say what they are ("user:…",
			// "key:…"); an IP does not.
			bucket := ch.key
			if ch.set == pl.perIP {
				bucket = ipBucket(bucket)
			}
			var err error
			if d, err = pl.global.reserve(c.Request.Context(), ch.set, bucket, n); err != nil {
				// A bad Idempotency-Key comes before what Redis answers
				// (docs/api.md, Errors): a 503 would ask for a retry
				// with a key that can never be taken.
				if ae := badIdempotencyKey(c); ae != nil {
					return ae
				}
				return err
			}
		} else {
			var r reservation
			if d, r = ch.set.reserve(ch.key, n, now); r.r != nil {
				taken = append(taken, r)
			}
		}
		if d != 0 { // -1 (over the burst) was refused above
			for _, r := range taken {
				r.cancel()
			}
			return &apiError{Status: 429, Code: "rate_limited", RetryAfter: int(math.Ceil(max(d, 0).Seconds())),
				Message: "publish rate limit per " + ch.what + " exceeded; retry after the Retry-After seconds"}
		}
	}
	return nil
}
