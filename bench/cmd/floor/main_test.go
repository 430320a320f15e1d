package main

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// TestRoutes: the floor answers /readyz, and a publish as the ingress
// does (202, a JSON reply with a Content-Length, which the bench's
// generator needs), after reading the whole body; nothing else.
func TestRoutes(t *testing.T) {
	srv := httptest.NewServer(routes())
	defer srv.Close()
	for _, tc := range []struct {
		method, path, body string
		status             int
		reply              string
	}{
		{"GET", "/readyz", "", 200, ""},
		{"POST", "/v1/channels/in7/messages", `{"data":{"n":1}}`, 202, reply},
		{"GET", "/v1/channels/in7/messages", "", 405, "Method Not Allowed\n"},
		{"POST", "/v1/messages", "{}", 404, "404 page not found\n"},
	} {
		req, err := http.NewRequest(tc.method, srv.URL+tc.path, strings.NewReader(tc.body))
		if err != nil {
			t.Fatal(err)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != tc.status || string(b) != tc.reply {
			t.Errorf("%s %s: %d %q, want %d %q", tc.method, tc.path, resp.StatusCode, b, tc.status, tc.reply)
		}
		if tc.status == 202 && (resp.ContentLength != int64(len(reply)) || resp.Header.Get("Content-Type") != "application/json; charset=utf-8") {
			t.Errorf("publish answered with Content-Length %d, Content-Type %q", resp.ContentLength, resp.Header.Get("Content-Type"))
		}
	}
}
