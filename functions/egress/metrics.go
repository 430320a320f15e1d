package main

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// metrics are the egress's Prometheus metrics (docs/metrics.md). Labels
// never carry a channel name, user or connection id.
type metrics struct {
	reg             *prometheus.Registry
	connections     prometheus.Gauge
	subscriptions   prometheus.Gauge
	deliveries      prometheus.Counter
	deliveryLatency prometheus.Histogram
	slowConsumers   prometheus.Counter
	closes          *prometheus.CounterVec
	redisReconnects prometheus.CounterFunc
}

func newMetrics(h *hub) *metrics {
	m := &metrics{reg: prometheus.NewRegistry()}
	m.connections = prometheus.NewGauge(prometheus.GaugeOpts{Name: "wsrelay_egress_connections", Help: "WebSocket connections open."})
	m.subscriptions = prometheus.NewGauge(prometheus.GaugeOpts{Name: "wsrelay_egress_subscriptions", Help: "Channel subscriptions held by open connections."})
	m.deliveries = prometheus.NewCounter(prometheus.CounterOpts{Name: "wsrelay_egress_deliveries_total", Help: "Messages written to sockets."})
	m.deliveryLatency = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name: "wsrelay_egress_delivery_latency_seconds", Help: "Publish timestamp to socket write.",
		Buckets: []float64{.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5},
	})
	m.slowConsumers = prometheus.NewCounter(prometheus.CounterOpts{Name: "wsrelay_egress_slow_consumer_closes_total", Help: "Connections closed because their outgoing queue overflowed."})
	m.closes = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "wsrelay_egress_closes_total", Help: "Connections ended, by SCF-style status (200, 433, 439, 455, 456)."}, []string{"status"})
	m.redisReconnects = prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "wsrelay_egress_redis_resubscribes_total", Help: "Redis Pub/Sub reconnects followed by a stream catch-up."}, func() float64 { return float64(h.reconnects.Load()) })
	channels := prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "wsrelay_egress_channels", Help: "Channels this instance reads because a local socket is subscribed."}, func() float64 { return float64(h.channelCount()) })
	readLag := prometheus.NewHistogram(prometheus.HistogramOpts{
		Name: "wsrelay_egress_stream_read_lag_seconds", Help: "Publish timestamp to receipt of the message's notification by this instance (how far the read path runs behind).",
		Buckets: []float64{.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5},
	})
	h.readLag = readLag.Observe
	redisErrors := prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "wsrelay_egress_redis_errors_total", Help: "Failed Redis stream reads and subscribes."}, func() float64 { return float64(h.redisErrors.Load()) })
	m.reg.MustRegister(readLag, redisErrors, channels, m.connections, m.subscriptions, m.deliveries, m.deliveryLatency, m.slowConsumers, m.closes, m.redisReconnects,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

func (m *metrics) observeDelivery(now time.Time, tsMS int64) {
	m.deliveries.Inc()
	if d := now.UnixMilli() - tsMS; d >= 0 {
		m.deliveryLatency.Observe(float64(d) / 1000)
	}
}
