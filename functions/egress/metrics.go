//go:build !wsrelay_lean

package main

import (
	"io"
	"net/http"
	"strconv"
	"time"

	vm "github.com/VictoriaMetrics/metrics"
)

// metrics are the egress's Prometheus metrics (docs/metrics.md), in a set
// of their own so that servers sharing a process (tests) do not share
// counters. Labels never carry a channel name, user or connection id.
type metrics struct {
	set             *vm.Set
	connections     *vm.Gauge
	subscriptions   *vm.Gauge
	deliveries      *vm.Counter
	deliveryLatency *vm.PrometheusHistogram
	slowConsumers   *vm.Counter
}

// latencyBuckets are the upper bounds (seconds) of both latency histograms.
var latencyBuckets = []float64{.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5}

func newMetrics(h *hub) *metrics {
	vm.ExposeMetadata(true) // # HELP / # TYPE lines, as scrapers expect
	set := vm.NewSet()
	m := &metrics{
		set:             set,
		connections:     set.NewGauge("wsrelay_egress_connections", nil),
		subscriptions:   set.NewGauge("wsrelay_egress_subscriptions", nil),
		deliveries:      set.NewCounter("wsrelay_egress_deliveries_total"),
		deliveryLatency: set.NewPrometheusHistogramExt("wsrelay_egress_delivery_latency_seconds", latencyBuckets),
		slowConsumers:   set.NewCounter("wsrelay_egress_slow_consumer_closes_total"),
	}
	set.NewGauge("wsrelay_egress_channels", func() float64 { return float64(h.channelCount()) })
	h.readLag = set.NewPrometheusHistogramExt("wsrelay_egress_stream_read_lag_seconds", latencyBuckets).Update
	// The hub keeps these counts itself; they are written at scrape
	// time, typed counter (a callback Gauge would be typed gauge).
	set.RegisterMetricsWriter(func(w io.Writer) {
		vm.WriteCounterUint64(w, "wsrelay_egress_redis_errors_total", uint64(h.redisErrors.Load()))
		vm.WriteCounterUint64(w, "wsrelay_egress_redis_resubscribes_total", uint64(h.reconnects.Load()))
		vm.WriteCounterUint64(w, "wsrelay_egress_stream_gaps_total", uint64(h.gaps.Load()))
		vm.WriteCounterUint64(w, "wsrelay_egress_targeted_undelivered_total", uint64(h.undelivered.Load()))
		vm.WriteCounterUint64(w, "wsrelay_egress_catchup_waits_over_budget_total", uint64(h.pacing.overBudget.Load()))
		vm.WriteCounterUint64(w, "wsrelay_egress_catchup_given_up_total", uint64(h.pacing.gaveUp.Load()))
	})
	return m
}

// counted is what a log line says of a metric that counts its event
// (s, from the metric's name on); a lean build's says nothing.
func counted(s string) string { return s }

// handler serves the set, then the Go runtime and process metrics, in the
// Prometheus text format.
func (m *metrics) handler() http.HandlerFunc {
	return func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		m.set.WritePrometheus(w)
		vm.WriteProcessMetrics(w)
		vm.WriteFDMetrics(w)
	}
}

// observeDelivery counts one message written to a socket; tsMS, its
// publish time, is zero for a replayed one, which the latency histogram
// leaves out (it measures live delivery).
func (m *metrics) observeDelivery(now time.Time, tsMS int64) {
	m.deliveries.Inc()
	if d := now.UnixMilli() - tsMS; tsMS > 0 && d >= 0 {
		m.deliveryLatency.Update(float64(d) / 1000)
	}
}

// closed counts one ended connection by its SCF-style status (scfStatus's
// fixed set, so the series stay few), and the egress's own timeout closes
// by kind (timeoutClose; "" for any other close).
func (m *metrics) closed(status int, timeout string) {
	m.set.GetOrCreateCounter(`wsrelay_egress_closes_total{status="` + strconv.Itoa(status) + `"}`).Inc()
	if timeout != "" {
		m.set.GetOrCreateCounter(`wsrelay_egress_timeout_closes_total{reason="` + timeout + `"}`).Inc()
	}
}

// resumed counts one resume answered (a subscribe with "after"), by the
// recovered flag it was told.
func (m *metrics) resumed(recovered bool) {
	m.set.GetOrCreateCounter(`wsrelay_egress_resumes_total{recovered="` + strconv.FormatBool(recovered) + `"}`).Inc()
}

// refused counts one upgrade refused with an HTTP error, by its error
// code (the egress's own fixed set: the series stay few).
func (m *metrics) refused(code string) {
	m.set.GetOrCreateCounter(`wsrelay_egress_upgrades_refused_total{code="` + code + `"}`).Inc()
}

// channelCount is the number of channels with local subscribers (the
// wsrelay_egress_channels gauge).
func (h *hub) channelCount() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, cs := range h.chans {
		if cs != h.inbox && cs.refs > 0 {
			n++
		}
	}
	return n
}
