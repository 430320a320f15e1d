package main

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

func TestWebAssets(t *testing.T) {
	t.Parallel()
	js := handleClientJS()
	rec := httptest.NewRecorder()
	js.ServeHTTP(rec, httptest.NewRequest("GET", "/client.js", nil))
	if rec.Code != 200 || rec.Header().Get("Content-Type") != "text/javascript; charset=utf-8" ||
		!strings.Contains(rec.Body.String(), "export class WsRelay") {
		t.Fatalf("/client.js: %d %q", rec.Code, rec.Header())
	}
	// A page on another origin imports it as a module, which browsers
	// fetch with CORS.
	if got := rec.Header().Get("Access-Control-Allow-Origin"); got != "*" {
		t.Fatalf("/client.js: Access-Control-Allow-Origin %q, want *", got)
	}
	etag := rec.Header().Get("ETag")
	req := httptest.NewRequest("GET", "/client.js", nil)
	req.Header.Set("If-None-Match", etag)
	rec = httptest.NewRecorder()
	js.ServeHTTP(rec, req)
	if etag == "" || rec.Code != http.StatusNotModified {
		t.Fatalf("revalidation with ETag %q: %d", etag, rec.Code)
	}

	rec = httptest.NewRecorder()
	handleDemo(Config{IngressURL: "http://in.example</script>"}).ServeHTTP(rec, httptest.NewRequest("GET", "/", nil))
	body := rec.Body.String()
	if rec.Code != 200 || !strings.HasPrefix(rec.Header().Get("Content-Type"), "text/html") || rec.Header().Get("Access-Control-Allow-Origin") != "" {
		t.Fatalf("/: %d %q", rec.Code, rec.Header())
	}
	if !strings.Contains(body, `window.WSRELAY_CONFIG = {"ingressURL":"http://in.example\u003c/script\u003e"};`) || strings.Contains(body, "{{.}}") {
		t.Fatalf("/ does not carry the escaped configuration:\n%s", body)
	}
}
