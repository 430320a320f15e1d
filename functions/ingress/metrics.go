package main

import (
	"context"
	"crypto/sha1"
	"encoding/hex"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	vm "github.com/VictoriaMetrics/metrics"
	"github.com/gin-gonic/gin"
	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/redisconn"
	"github.com/wsrelay/wsrelay/shared/stream"
)

// metrics are the ingress's Prometheus metrics (docs/metrics.md), in a set
// of their own so that servers sharing a process (tests) do not share
// counters. Labels take values from small fixed sets only: methods, route
// templates, status classes and error codes, never a channel name, user or
// connection id.
type metrics struct {
	set           *vm.Set
	publishes     counterVec[string]
	messages      *vm.Counter
	appendLatency *vm.PrometheusHistogram
	requests      counterVec[requestKey]
	redisErrors   *vm.Counter
}

// requestKey labels wsrelay_ingress_http_requests_total.
type requestKey struct {
	method, route string
	class         byte // '1'…'5': the status class
}

func newMetrics() *metrics {
	vm.ExposeMetadata(true) // # HELP / # TYPE lines, as scrapers expect
	set := vm.NewSet()
	m := &metrics{
		set:      set,
		messages: set.NewCounter("wsrelay_ingress_messages_appended_total"),
		appendLatency: set.NewPrometheusHistogramExt("wsrelay_ingress_append_latency_seconds",
			[]float64{.0002, .0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2}),
		redisErrors: set.NewCounter("wsrelay_ingress_redis_errors_total"),
	}
	m.publishes = counterVec[string]{set: set, series: func(result string) string {
		return `wsrelay_ingress_publishes_total{result="` + result + `"}`
	}}
	m.requests = counterVec[requestKey]{set: set, series: func(k requestKey) string {
		return `wsrelay_ingress_http_requests_total{method="` + k.method + `",route="` + k.route + `",status="` + string(k.class) + `xx"}`
	}}
	return m
}

// handler serves the set, then the Go runtime and process metrics, in the
// Prometheus text format.
func (m *metrics) handler() gin.HandlerFunc {
	return func(c *gin.Context) {
		c.Header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		c.Status(200)
		m.set.WritePrometheus(c.Writer)
		vm.WriteProcessMetrics(c.Writer)
		vm.WriteFDMetrics(c.Writer)
	}
}

// counterVec is a family of labelled counters, each created in the set at
// its first use and then found by key without allocating.
type counterVec[K comparable] struct {
	set    *vm.Set
	series func(K) string // the series name, labels included
	mu     sync.RWMutex
	m      map[K]*vm.Counter
}

func (v *counterVec[K]) get(k K) *vm.Counter {
	v.mu.RLock()
	c := v.m[k]
	v.mu.RUnlock()
	if c != nil {
		return c
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if c = v.m[k]; c == nil {
		if v.m == nil {
			v.m = map[K]*vm.Counter{}
		}
		c = v.set.NewCounter(v.series(k))
		v.m[k] = c
	}
	return c
}

// errorCodeKey is the gin context key under which writeError leaves the
// error code of the response, for the metrics middleware.
const errorCodeKey = "wsrelay.error_code"

// publishRoutes are the route templates counted as publishes.
var publishRoutes = map[string]bool{
	"/v1/channels/:channel/messages": true,
	"/v1/messages":                   true,
	"/v1/connections/:id/messages":   true,
	"/v1/users/:user/messages":       true,
}

// methodLabel keeps the method label to a fixed set: any other method a
// client sends is counted as "other".
func methodLabel(m string) string {
	switch m {
	case "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS":
		return m
	}
	return "other"
}

// middleware counts every request by route template and status class, and
// every publish request by result.
func (m *metrics) middleware(c *gin.Context) {
	c.Next()
	route := c.FullPath()
	if route == "" {
		route = "unmatched"
	}
	status := c.Writer.Status()
	code, _ := c.Get(errorCodeKey)
	codeStr, _ := code.(string)
	if codeStr == "canceled" {
		status = 499 // the client went away; nothing was written
	}
	class := byte('0' + status/100%10)
	m.requests.get(requestKey{methodLabel(c.Request.Method), route, class}).Inc()
	if c.Request.Method == "POST" && publishRoutes[route] {
		result := "accepted"
		switch {
		case codeStr != "":
			result = codeStr
		case status >= 300:
			result = "error"
		}
		m.publishes.get(result).Inc()
	}
}

// appendStreams appends through the batcher (concurrent publishes share
// Redis pipelines), timed and counted. The entries counted are those
// Redis wrote, whether or not the others failed: not an append of a
// retry with the same Idempotency-Key that found its once-key set (an
// earlier attempt wrote it, and counted it if its reply came back).
func (s *Server) appendStreams(ctx context.Context, as []stream.Append) ([]string, error) {
	start := time.Now()
	ids, appended, err := s.batcher.AppendCount(ctx, as)
	s.metrics.messages.Add(appended)
	// A request withdrawn before any pipeline took it (its client went
	// away: the batcher returns the request's context error, and its
	// pipelines never do) made no round trip to Redis.
	if !errors.Is(err, context.Canceled) {
		s.metrics.appendLatency.UpdateDuration(start)
	}
	if err == nil {
		// The appends of a cluster waiting for replicas run outside the
		// client's hooks (redisHook), which see the other successes.
		s.redisUp()
		s.redisOOM.OK() // only a write shows that Redis takes writes again
		s.slotMoving.OK()
		s.unreplicated.OK()
	}
	return ids, err
}

// redisUp records a command Redis carried out: it ends an outage, and a
// run of refused commands once none has come for a while and each that
// Redis refused has been carried out since (refusals): not another
// command, which says nothing of the refused one. Not a refused login:
// the command may have gone through a connection logged in before
// (redisconn.LoggedIn); a login Redis accepts ends that (NewServer).
func (s *Server) redisUp() {
	s.redisDown.OK()
	if s.refusals.none() {
		s.redisRefused.OK()
	}
}

// refusals are what Redis refused to the functions' ACL user and has not
// carried out since (refusalKind): "redis refused a command" ends only
// once none is left, so that "redis accepts the commands again" is true
// of the commands it refused. Safe for concurrent use.
type refusals struct {
	n     atomic.Int64 // len(kinds): a success costs an atomic load while nothing is refused
	mu    sync.Mutex
	kinds map[string]struct{}
}

// note records cmd's outcome, err.
func (r *refusals) note(cmd redis.Cmder, err error) {
	switch {
	case err == nil || errors.Is(err, redis.Nil):
		if r.n.Load() == 0 {
			return
		}
		r.mu.Lock()
		delete(r.kinds, refusalKind(cmd))
		r.n.Store(int64(len(r.kinds)))
		r.mu.Unlock()
	case redisconn.Refused(err) && redisconn.Failed(context.Background(), cmd, err):
		r.mu.Lock()
		if r.kinds == nil {
			r.kinds = make(map[string]struct{})
		}
		r.kinds[refusalKind(cmd)] = struct{}{}
		r.n.Store(int64(len(r.kinds)))
		r.mu.Unlock()
	}
}

// none reports whether each command Redis refused has been carried out
// since.
func (r *refusals) none() bool { return r.n.Load() == 0 }

// refusalKind is what Redis refuses or carries out in cmd, as one: the
// command, or for a script the script itself, by its hash, whether sent
// by hash (EVALSHA) or with its source (EVAL, after NOSCRIPT): a refusal
// inside one (a command it calls) is not ended by another script run.
func refusalKind(cmd redis.Cmder) string {
	name := cmd.Name()
	a := cmd.Args()
	if len(a) < 2 {
		return name
	}
	arg, _ := a[1].(string)
	switch name {
	case "evalsha", "evalsha_ro":
		return "script " + strings.ToLower(arg)
	case "eval", "eval_ro":
		h := sha1.Sum([]byte(arg))
		return "script " + hex.EncodeToString(h[:])
	}
	return name
}

// redisHook counts failed Redis commands and pipelines (one per pipeline).
// A missing key (redis.Nil), a script not yet cached (NOSCRIPT, retried at
// once), a request the client abandoned and the connection handshake's
// optional commands (CLIENT SETINFO, which older servers refuse) are not
// failures. It calls up after each command or pipeline that succeeded.
//
// On a cluster it is also added to each master's client (node), where it
// sees only the pipelines the stream store runs there itself
// (stream.OnNode) and the readiness pings, which go to every master on
// its own client (redisconn.MasterPing): the others it sees already on
// the cluster client.
type redisHook struct {
	m        *metrics
	up       func()
	refusals *refusals // told each command's outcome, before up
	node     bool
}

func (h redisHook) DialHook(next redis.DialHook) redis.DialHook {
	return next // a failed dial fails the command, counted there
}

func (h redisHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if h.node && !redisconn.MasterPing(ctx) {
			return next(ctx, cmd) // routed by the cluster client, which saw it
		}
		err := next(ctx, cmd)
		h.refusals.note(cmd, err)
		if redisconn.Failed(ctx, cmd, err) {
			h.m.redisErrors.Inc()
		} else if err == nil || errors.Is(err, redis.Nil) {
			h.up()
		}
		return err
	}
}

func (h redisHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		if h.node && !stream.OnNode(ctx) {
			return next(ctx, cmds)
		}
		err := next(ctx, cmds)
		for _, c := range cmds {
			h.refusals.note(c, c.Err())
		}
		if err == nil {
			h.up()
			return nil
		}
		if redisconn.PipelineFailed(ctx, cmds) {
			h.m.redisErrors.Inc()
		}
		return err
	}
}
