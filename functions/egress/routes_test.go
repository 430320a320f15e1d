package main

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"
)

// TestRoutesMethodsAndNotFound: every egress endpoint is GET (and HEAD);
// another method on one of them is 405 with Allow, as on the ingress, and
// a path that is none of them is 404. Both carry the JSON error body.
func TestRoutesMethodsAndNotFound(t *testing.T) {
	t.Parallel()
	e := startSecEgress(t, map[string]string{"ALLOW_ANONYMOUS": "true"})
	for _, tc := range []struct {
		method, path string
		status       int
		code         string
	}{
		{"POST", "/healthz", 405, "method_not_allowed"},
		{"DELETE", "/readyz", 405, "method_not_allowed"},
		{"POST", "/ws", 405, "method_not_allowed"},
		{"PUT", "/metrics", 405, "method_not_allowed"},
		{"POST", "/", 405, "method_not_allowed"},
		{"GET", "/nope", 404, "not_found"},
		{"POST", "/nope", 404, "not_found"},
		// Not in clean form: 404, never ServeMux's 307 to the cleaned
		// path (which http.DefaultClient would follow to a 200 or 400).
		{"GET", "//ws", 404, "not_found"},
		{"POST", "//ws", 404, "not_found"},
		{"GET", "/./ws", 404, "not_found"},
		{"GET", "/x/../healthz", 404, "not_found"},
		{"GET", "/healthz/.", 404, "not_found"},
		{"GET", "/healthz/", 404, "not_found"},
		{"GET", "//", 404, "not_found"},
		{"GET", "//client.js", 404, "not_found"},
		{"HEAD", "/healthz", 200, ""},
	} {
		req, _ := http.NewRequest(tc.method, e.srv.URL+tc.path, strings.NewReader(""))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		var body struct{ Error struct{ Code string } }
		_ = json.NewDecoder(resp.Body).Decode(&body)
		resp.Body.Close()
		if resp.StatusCode != tc.status || body.Error.Code != tc.code {
			t.Errorf("%s %s: %d %q, want %d %q", tc.method, tc.path, resp.StatusCode, body.Error.Code, tc.status, tc.code)
		}
		if tc.status == 405 && resp.Header.Get("Allow") != "GET, HEAD" {
			t.Errorf("%s %s: Allow %q", tc.method, tc.path, resp.Header.Get("Allow"))
		}
	}
}

// TestLiveAnswersNotStored: what the egress answers besides /client.js
// and the demo page is live (health, readiness, metrics, and errors such
// as a refused upgrade), so it carries Cache-Control: no-store, as every
// ingress answer does: a browser, CDN or proxy that stored a /readyz 200
// or a /metrics page would serve it stale. /client.js and / keep their
// own caching (max-age and no-cache, revalidated by ETag).
func TestLiveAnswersNotStored(t *testing.T) {
	t.Parallel()
	e := startSecEgress(t, map[string]string{"ALLOW_ANONYMOUS": "true", "METRICS_TOKEN": "scrape-secret-0123456789"})
	for _, tc := range []struct {
		method, path, token string
		status              int
		cache               string
	}{
		{"GET", "/healthz", "", 200, "no-store"},
		{"HEAD", "/healthz", "", 200, "no-store"},
		{"GET", "/readyz", "", 0, "no-store"},                                      // 200 or 503, as Redis answers: both live
		{"GET", "/metrics", "scrape-secret-0123456789", metricsStatus, "no-store"}, // 404 in a lean build: still no-store
		{"GET", "/metrics", "", 401, "no-store"},
		{"GET", "/ws", "", 400, "no-store"}, // not an upgrade
		{"POST", "/readyz", "", 405, "no-store"},
		{"GET", "/nope", "", 404, "no-store"},
		{"GET", "/client.js", "", 200, "public, max-age=300"},
		{"GET", "/", "", 200, "no-cache"},
	} {
		req, _ := http.NewRequest(tc.method, e.srv.URL+tc.path, nil)
		if tc.token != "" {
			req.Header.Set("Authorization", "Bearer "+tc.token)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if got := resp.Header.Values("Cache-Control"); (tc.status != 0 && resp.StatusCode != tc.status) || len(got) != 1 || got[0] != tc.cache {
			t.Errorf("%s %s: %d, Cache-Control %q; want %d, %q", tc.method, tc.path, resp.StatusCode, got, tc.status, tc.cache)
		}
	}
}
