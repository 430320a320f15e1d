package main

import (
	"io"
	"net/http"
	"slices"
	"strings"
	"testing"
)

// TestHeadLikeGet: every GET route also answers HEAD (RFC 9110 §9.3.2),
// with GET's status and headers, its refusals included (401, 400, 404,
// 503's Retry-After), and no body. Other methods on those paths are 405
// with an Allow header that lists HEAD beside GET.
func TestHeadLikeGet(t *testing.T) {
	t.Parallel()
	const tok = "metrics-token-0123"
	e, _ := newSecEnv(t, map[string]string{"API_KEYS": testKeys, "METRICS_TOKEN": tok})
	e.register("c1", "bob", "inst-a", "room")
	if w := e.do("POST", "/v1/channels/room/messages", `{"data":{"text":"hi"}}`, bearer(fullKey)...); w.Code != 202 {
		t.Fatalf("publish: %d %s", w.Code, w.Body)
	}
	base := "http://" + serveEnv(t, e)
	send := func(method, path, auth string) (*http.Response, []byte) {
		t.Helper()
		req, _ := http.NewRequest(method, base+path, nil)
		if auth != "" {
			req.Header.Set("Authorization", "Bearer "+auth)
		}
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", method, path, err)
		}
		defer res.Body.Close()
		b, _ := io.ReadAll(res.Body)
		return res, b
	}
	for _, tc := range []struct {
		path, auth string
		status     int
	}{
		{"/v1/channels/room/messages", fullKey, 200},
		{"/v1/channels/room/messages?after=0&limit=1", fullKey, 200},
		{"/v1/channels/room/messages?limit=0", fullKey, 400},
		{"/v1/channels/room/messages", "", 401},
		{"/v1/channels/room/messages", chatKey, 403},
		{"/v1/channels/room/connections", adminKey, 200},
		{"/v1/connections/c1", adminKey, 200},
		{"/v1/connections/nobody", adminKey, 404},
		{"/v1/users/bob/connections", adminKey, 200},
		{"/v1/users/a%20b/connections", adminKey, 400},
		{"/metrics", tok, 200},
		{"/metrics", "", 401},
		{"/healthz", "", 200},
		{"/readyz", "", 200},
	} {
		get, gb := send("GET", tc.path, tc.auth)
		head, hb := send("HEAD", tc.path, tc.auth)
		what := "HEAD " + tc.path
		if get.StatusCode != tc.status || head.StatusCode != tc.status {
			t.Errorf("%s: GET %d, HEAD %d, want %d both (GET's body %s)", what, get.StatusCode, head.StatusCode, tc.status, gb)
			continue
		}
		if len(hb) != 0 {
			t.Errorf("%s: a body of %d bytes", what, len(hb))
		}
		for _, h := range []string{"Content-Type", "WWW-Authenticate", "Retry-After"} {
			if g, hd := get.Header.Get(h), head.Header.Get(h); g != hd {
				t.Errorf("%s: %s %q, GET's %q", what, h, hd, g)
			}
		}
		// net/http gives a Content-Length to a body written whole before
		// the handler returns, HEAD's too (the body it discards).
		if cl := get.Header.Get("Content-Length"); cl != "" && head.Header.Get("Content-Length") != cl {
			t.Errorf("%s: Content-Length %q, GET's %q", what, head.Header.Get("Content-Length"), cl)
		}
	}
	// Methods a path does not take are 405, with the ones it does.
	for path, want := range map[string][]string{
		"/v1/channels/room/messages":    {"DELETE", "GET", "HEAD", "POST"},
		"/v1/channels/room/connections": {"GET", "HEAD"},
		"/v1/connections/c1":            {"DELETE", "GET", "HEAD"},
		"/v1/users/bob/connections":     {"DELETE", "GET", "HEAD"},
		"/metrics":                      {"GET", "HEAD"},
		"/healthz":                      {"GET", "HEAD"},
	} {
		res, b := send("PUT", path, adminKey)
		allow := strings.Split(res.Header.Get("Allow"), ", ")
		slices.Sort(allow)
		if res.StatusCode != 405 || !strings.Contains(string(b), `"method_not_allowed"`) || !slices.Equal(allow, want) {
			t.Errorf("PUT %s: %d %s, Allow %q, want 405 method_not_allowed and Allow %v", path, res.StatusCode, b, res.Header.Get("Allow"), want)
		}
	}
}
