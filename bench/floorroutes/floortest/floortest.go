// Package floortest checks a running floor's answers (floorroutes).
package floortest

import (
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/wsrelay/wsrelay/bench/floorroutes"
)

// Check: the floor at url answers /readyz, and a publish as the ingress
// does (202, a JSON reply with a Content-Length, which the bench's
// generator needs), after reading the whole body; nothing else.
func Check(t *testing.T, url string) {
	t.Helper()
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	for _, tc := range []struct {
		method, path, body string
		status             int
		reply              string
	}{
		{"GET", "/readyz", "", 200, ""},
		{"POST", "/v1/channels/in7/messages", `{"data":{"n":1}}`, 202, floorroutes.Reply},
		{"GET", "/v1/channels/in7/messages", "", 405, "Method Not Allowed\n"},
		{"POST", "/v1/messages", "{}", 404, "404 page not found\n"},
		{"POST", "/v1/channels/a/b/messages", "{}", 404, "404 page not found\n"},
	} {
		req, err := http.NewRequest(tc.method, url+tc.path, strings.NewReader(tc.body))
		if err != nil {
			t.Fatal(err)
		}
		resp, err := client.Do(req)
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
		if tc.status == 202 && (resp.ContentLength != int64(len(floorroutes.Reply)) || resp.Header.Get("Content-Type") != "application/json; charset=utf-8") {
			t.Errorf("publish answered with Content-Length %d, Content-Type %q", resp.ContentLength, resp.Header.Get("Content-Type"))
		}
	}
}
