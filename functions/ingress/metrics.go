package main

import (
	"context"
	"errors"
	"strconv"
	"time"

	"github.com/gin-gonic/gin"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/stream"
)

// metrics are the ingress's Prometheus metrics (docs/metrics.md), on a
// registry of their own. Labels take values from small fixed sets only:
// route templates, status classes and error codes, never a channel name,
// user or connection id.
type metrics struct {
	reg           *prometheus.Registry
	publishes     *prometheus.CounterVec
	messages      prometheus.Counter
	appendLatency prometheus.Histogram
	requests      *prometheus.CounterVec
	redisErrors   prometheus.Counter
}

func newMetrics() *metrics {
	m := &metrics{reg: prometheus.NewRegistry()}
	m.publishes = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "wsrelay_ingress_publishes_total",
		Help: `Publish requests (channel, batch, connection, user), by result: "accepted" or the error code returned.`,
	}, []string{"result"})
	m.messages = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "wsrelay_ingress_messages_appended_total",
		Help: "Stream entries appended (a batch counts each message; a user send each instance).",
	})
	m.appendLatency = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "wsrelay_ingress_append_latency_seconds",
		Help:    "Time of one stream append round trip to Redis (one pipeline per request).",
		Buckets: []float64{.0002, .0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2},
	})
	m.requests = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "wsrelay_ingress_http_requests_total",
		Help: `HTTP requests, by method, route template ("unmatched" for none) and status class (2xx, 4xx, 5xx).`,
	}, []string{"method", "route", "status"})
	m.redisErrors = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "wsrelay_ingress_redis_errors_total",
		Help: "Redis commands or pipelines that failed (timeouts, refused connections, server errors).",
	})
	m.reg.MustRegister(m.publishes, m.messages, m.appendLatency, m.requests, m.redisErrors,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// handler serves the registry in the Prometheus text format.
func (m *metrics) handler() gin.HandlerFunc {
	return gin.WrapH(promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{}))
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
	m.requests.WithLabelValues(c.Request.Method, route, strconv.Itoa(status/100)+"xx").Inc()
	if c.Request.Method == "POST" && publishRoutes[route] {
		result := "accepted"
		switch {
		case codeStr != "":
			result = codeStr
		case status >= 300:
			result = "error"
		}
		m.publishes.WithLabelValues(result).Inc()
	}
}

// appendStreams appends through the batcher (concurrent publishes share
// Redis pipelines), timed and counted.
func (s *Server) appendStreams(ctx context.Context, as []stream.Append) ([]string, error) {
	start := time.Now()
	ids, err := s.batcher.Append(ctx, as)
	s.metrics.appendLatency.Observe(time.Since(start).Seconds())
	if err == nil {
		s.metrics.messages.Add(float64(len(ids)))
	}
	return ids, err
}

// redisHook counts failed Redis commands and pipelines (one per pipeline).
// A missing key (redis.Nil), a script not yet cached (NOSCRIPT, retried at
// once), a request the client abandoned and the connection handshake's
// optional commands (CLIENT SETINFO, which older servers refuse) are not
// failures.
type redisHook struct{ m *metrics }

func (h redisHook) DialHook(next redis.DialHook) redis.DialHook {
	return next // a failed dial fails the command, counted there
}

func (h redisHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		err := next(ctx, cmd)
		if failed(cmd, err) {
			h.m.redisErrors.Inc()
		}
		return err
	}
}

func (h redisHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		err := next(ctx, cmds)
		if err != nil {
			for _, c := range cmds {
				if failed(c, c.Err()) {
					h.m.redisErrors.Inc()
					break
				}
			}
		}
		return err
	}
}

func failed(cmd redis.Cmder, err error) bool {
	if err == nil || errors.Is(err, redis.Nil) || errors.Is(err, context.Canceled) || redis.HasErrorPrefix(err, "NOSCRIPT") {
		return false
	}
	switch cmd.Name() {
	case "client", "hello":
		return false
	}
	return true
}
