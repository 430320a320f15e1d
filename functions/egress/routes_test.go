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
