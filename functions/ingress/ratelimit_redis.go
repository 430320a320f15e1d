package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"math"
	"net/netip"
	"strings"
	"time"

	"github.com/go-redis/redis_rate/v10"
	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redisconn"
)

// The values of PUBLISH_RATE_SCOPE.
const (
	scopeInstance = "instance"
	scopeGlobal   = "global"
)

// redisLimits keeps the publish rate limits' buckets in Redis
// (PUBLISH_RATE_SCOPE=global), shared by every ingress instance: one
// call of redis_rate's GCRA script, which keeps one key per bucket, for
// each limit that applies to a publish. It is safe for concurrent use.
type redisLimits struct {
	lim  *redis_rate.Limiter
	keys keys.Scheme
}

// A charge whose reply came late is not sent again (NoResend: a cluster
// client's loop did, and the publish was charged twice); the publish is
// answered 503.
func newRedisLimits(rdb redis.UniversalClient, ks keys.Scheme) *redisLimits {
	return &redisLimits{lim: redis_rate.NewLimiter(ownKeys{redisconn.NoResend(rdb)}), keys: ks}
}

// reserve is limiterSet.reserve with ls's bucket named bucket kept in
// Redis: it takes n tokens or none, and returns how long to wait before
// the n would be available (zero when taken), or -1 when n exceeds the
// burst (without asking Redis). A Redis error is returned as it is, so
// that the publish is answered 503 and not let through unchecked.
func (rl *redisLimits) reserve(ctx context.Context, ls *limiterSet, bucket string, n int) (time.Duration, error) {
	if n > ls.burst {
		return -1, nil
	}
	res, err := rl.lim.AllowN(ctx, rl.keys.PublishRate(bucket), gcraLimit(float64(ls.rate), ls.burst), n)
	if err != nil {
		return 0, fmt.Errorf("publish rate limit: %w", err)
	}
	if res.Allowed > 0 {
		return 0, nil
	}
	// At least a nanosecond: a refusal must not read as a pass.
	return max(res.RetryAfter, time.Nanosecond), nil
}

// gcraLimit is a limit of perSecond messages per second (a float) as
// redis_rate takes it: its script spaces messages Period/Rate apart, with
// an integer Rate. Over a million seconds a rate is exact to six decimal
// places; one below a message per two million seconds is spaced 1/perSecond
// apart, to the nanosecond.
func gcraLimit(perSecond float64, burst int) redis_rate.Limit {
	const scale = 1_000_000 // seconds
	if r := math.Round(perSecond * scale); r >= 1 {
		return redis_rate.Limit{Rate: int(r), Burst: burst, Period: scale * time.Second}
	}
	return redis_rate.Limit{Rate: 1, Burst: burst, Period: time.Duration(min(float64(time.Second)/perSecond, 1<<62))}
}

// ipBucket names a client IP's bucket. The per-IP limiter's key (ipKey)
// is an address or an IPv6 /64 in their canonical forms, except for a
// gateway's entry that is not an address, which may hold anything: that
// one is named by a hash, so that no key holds a client's braces.
func ipBucket(ip string) string {
	if a, err := netip.ParseAddr(ip); err == nil && a.String() == ip {
		return "ip:" + ip
	}
	if p, err := netip.ParsePrefix(ip); err == nil && p.String() == ip {
		return "ip:" + ip
	}
	sum := sha256.Sum256([]byte(ip))
	return "ip:#" + hex.EncodeToString(sum[:16])
}

// ownKeys hands rdb to redis_rate, which puts "rate:" before every key
// it is given: ownKeys takes it off again, so that the buckets' keys are
// the ones keys.Scheme makes, under REDIS_KEY_PREFIX like every other key
// (which a Redis ACL or a test's cleanup may rely on).
type ownKeys struct{ redis.UniversalClient }

const rateKeyPrefix = "rate:" // redis_rate's

func trimRate(keys []string) []string {
	out := make([]string, len(keys))
	for i, k := range keys {
		out[i] = strings.TrimPrefix(k, rateKeyPrefix)
	}
	return out
}

func (o ownKeys) Eval(ctx context.Context, script string, keys []string, args ...any) *redis.Cmd {
	return o.UniversalClient.Eval(ctx, script, trimRate(keys), args...)
}

func (o ownKeys) EvalSha(ctx context.Context, sha1 string, keys []string, args ...any) *redis.Cmd {
	return o.UniversalClient.EvalSha(ctx, sha1, trimRate(keys), args...)
}

func (o ownKeys) EvalRO(ctx context.Context, script string, keys []string, args ...any) *redis.Cmd {
	return o.UniversalClient.EvalRO(ctx, script, trimRate(keys), args...)
}

func (o ownKeys) EvalShaRO(ctx context.Context, sha1 string, keys []string, args ...any) *redis.Cmd {
	return o.UniversalClient.EvalShaRO(ctx, sha1, trimRate(keys), args...)
}

func (o ownKeys) Del(ctx context.Context, keys ...string) *redis.IntCmd {
	return o.UniversalClient.Del(ctx, trimRate(keys)...)
}
