//go:build wsrelay_lean

package main

import (
	"net/http"
	"time"
)

// A lean build (-tags wsrelay_lean, `make package LEAN=1`) keeps no
// metrics: it is meant for one-connection-per-instance deployments, where
// an instance lives for one socket and nothing scrapes it, and leaving the
// metrics library out keeps such an instance's memory down
// (docs/deployment.md). /metrics answers 404 not_built.
type metrics struct {
	connections, subscriptions, slowConsumers noCount
}

type noCount struct{}

func (noCount) Inc() {}
func (noCount) Dec() {}

func newMetrics(*hub) *metrics { return &metrics{} }

// counted is what a log line says of a metric that counts its event:
// nothing, in a build that keeps none.
func counted(string) string { return "" }

func (m *metrics) handler() http.HandlerFunc {
	return func(w http.ResponseWriter, _ *http.Request) {
		writeHTTPError(w, http.StatusNotFound, "not_built", "this egress is a lean build (-tags wsrelay_lean): it keeps no metrics")
	}
}

func (m *metrics) observeDelivery(time.Time, int64) {}

func (m *metrics) closed(int, string) {}

func (m *metrics) refused(string) {}

func (m *metrics) resumed(bool) {}
