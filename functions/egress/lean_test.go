//go:build wsrelay_lean

package main

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/wsrelay/wsrelay/shared/debugserver"
	"github.com/wsrelay/wsrelay/shared/logging"
	"github.com/wsrelay/wsrelay/shared/redistest"
)

// A lean build answers /metrics with 404 not_built, refuses DEBUG_ADDR at
// start, and otherwise serves as a default build does (the rest of the
// suite runs with the tag too: make test).
func TestLeanBuild(t *testing.T) {
	e := startSecEgress(t, map[string]string{"ALLOW_ANONYMOUS": "true"})
	resp, err := http.Get(e.srv.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var body struct {
		Error struct{ Code string } `json:"error"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil || resp.StatusCode != 404 || body.Error.Code != "not_built" {
		t.Fatalf("GET /metrics: %d %+v %v, want 404 not_built", resp.StatusCode, body, err)
	}

	env := map[string]string{"ALLOW_ANONYMOUS": "true", "REDIS_URL": redistest.URL(t), "DEBUG_ADDR": "127.0.0.1:0"}
	// Bounded: a build that accepted DEBUG_ADDR would serve until ctx ends.
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	err = run(ctx, nil, func(k string) string { return env[k] }, io.Discard, io.Discard)
	if !errors.Is(err, debugserver.ErrNotBuilt) || !strings.Contains(err.Error(), "DEBUG_ADDR") {
		t.Fatalf("run with DEBUG_ADDR in a lean build: %v", err)
	}
}

// metricsStatus is what /metrics answers a scrape with the right
// token: a lean build has no metrics (404 not_built).
const metricsStatus = 404

// checkEndMetrics: a lean build keeps no metrics.
func checkEndMetrics(*testing.T, *secEgress, string, int) {}

// TestLeanLogsNameNoMetrics: a lean build's log lines name no metric (it
// keeps none); they told operators to watch counters /metrics does not
// serve.
func TestLeanLogsNameNoMetrics(t *testing.T) {
	e := startSecEgress(t, map[string]string{"ALLOW_ANONYMOUS": "true"})
	h := e.s.hub
	for _, ep := range []*logging.Episode{h.readFail, h.loginRefused, h.badNotify, h.badRoute, h.undecodable, h.pacing.spent} {
		if strings.Contains(ep.Then, "wsrelay_") {
			t.Errorf("%q names a metric: %s", ep.Msg, ep.Then)
		}
	}
}
