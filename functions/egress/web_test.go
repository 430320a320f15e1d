package main

import (
	"crypto/sha256"
	"encoding/base64"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"testing"

	"github.com/wsrelay/wsrelay/shared/redistest"
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
	handleDemo(Config{IngressURL: "http://in.example</script>"}, handleClientJS()).ServeHTTP(rec, httptest.NewRequest("GET", "/", nil))
	body := rec.Body.String()
	if rec.Code != 200 || !strings.HasPrefix(rec.Header().Get("Content-Type"), "text/html") || rec.Header().Get("Access-Control-Allow-Origin") != "" {
		t.Fatalf("/: %d %q", rec.Code, rec.Header())
	}
	if !strings.Contains(body, `window.WSRELAY_CONFIG = {"ingressURL":"http://in.example\u003c/script\u003e"};`) || strings.Contains(body, "{{.}}") {
		t.Fatalf("/ does not carry the escaped configuration:\n%s", body)
	}
}

// TestWebAssetsConditional: /client.js and / answer HEAD with the headers
// of GET (their length included) and revalidate as RFC 9110 §13.1.2 says:
// If-None-Match compares weakly and takes a list or "*". A cache or CDN
// that compresses the file (nginx's gzip, for one) weakens its ETag to
// W/"…", and its revalidations fetched the whole file every five minutes.
func TestWebAssetsConditional(t *testing.T) {
	t.Parallel()
	e := startSecEgress(t, map[string]string{"ALLOW_ANONYMOUS": "true"})
	for _, path := range []string{"/client.js", "/"} {
		resp, err := http.Get(e.srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		etag := resp.Header.Get("ETag")
		if resp.StatusCode != 200 || etag == "" {
			t.Fatalf("GET %s: %d, ETag %q", path, resp.StatusCode, etag)
		}
		req, _ := http.NewRequest("HEAD", e.srv.URL+path, nil)
		head, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		head.Body.Close()
		if head.StatusCode != 200 || head.ContentLength != int64(len(body)) || head.Header.Get("Content-Type") != resp.Header.Get("Content-Type") ||
			head.Header.Get("Cache-Control") != resp.Header.Get("Cache-Control") || head.Header.Get("ETag") != etag {
			t.Errorf("HEAD %s: %d, length %d (GET's body: %d), %q; GET's headers %q", path, head.StatusCode, head.ContentLength, len(body), head.Header, resp.Header)
		}
		for _, inm := range []string{etag, "W/" + etag, `"other", ` + etag, `"other",W/` + etag, "*"} {
			req, _ := http.NewRequest("GET", e.srv.URL+path, nil)
			req.Header.Set("If-None-Match", inm)
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusNotModified || resp.Header.Get("ETag") != etag {
				t.Errorf("GET %s, If-None-Match %s: %d, ETag %q, want 304 with ETag %s", path, inm, resp.StatusCode, resp.Header.Get("ETag"), etag)
			}
		}
		req, _ = http.NewRequest("GET", e.srv.URL+path, nil)
		req.Header.Set("If-None-Match", `"other"`)
		if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != 200 {
			t.Errorf("GET %s, another ETag: %v %v, want 200", path, resp, err)
		} else {
			resp.Body.Close()
		}
	}
}

// TestDemoPinsClientJS: the demo page (no-cache) imports the client.js of
// its own build, by a URL that names that version. A plain "./client.js"
// may be taken from the browser's cache for max-age (5 min) after a
// deploy: the new page then runs against the old module (an import of a
// new export fails, and the page with it).
func TestDemoPinsClientJS(t *testing.T) {
	t.Parallel()
	e := startSecEgress(t, map[string]string{"ALLOW_ANONYMOUS": "true"})
	get := func(path string) *http.Response {
		t.Helper()
		resp, err := http.Get(e.srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { resp.Body.Close() })
		return resp
	}
	js := get("/client.js")
	etag := strings.Trim(js.Header.Get("ETag"), `"`)
	page, _ := io.ReadAll(get("/").Body)
	m := regexp.MustCompile(`from "(\./client\.js[^"]*)"`).FindSubmatch(page)
	if m == nil || !strings.Contains(string(m[1]), etag) {
		t.Fatalf("the demo page imports %q, want a URL naming client.js's version %s", m, etag)
	}
	if pinned := get(strings.TrimPrefix(string(m[1]), ".")); pinned.StatusCode != 200 || pinned.Header.Get("ETag") != js.Header.Get("ETag") {
		t.Fatalf("GET %s: %d, ETag %q", m[1], pinned.StatusCode, pinned.Header.Get("ETag"))
	}
}

// TestDemoSecurityHeaders: the demo page renders what anyone may publish
// and may carry a user token in its URL (?token=): a Content-Security-
// Policy lets only its own scripts run (the two inline ones by hash, no
// inline handler such as onerror) and keeps it out of frames, and Referrer-Policy keeps its URL out of the
// Referer of its requests (every 3 s to the ingress, whose proxy logs it).
func TestDemoSecurityHeaders(t *testing.T) {
	t.Parallel()
	rec := httptest.NewRecorder()
	handleDemo(Config{IngressURL: "https://in.example.com/stage"}, handleClientJS()).ServeHTTP(rec, httptest.NewRequest("GET", "/", nil))
	if got := rec.Header().Get("Referrer-Policy"); got != "no-referrer" {
		t.Errorf("Referrer-Policy %q, want no-referrer", got)
	}
	csp := rec.Header().Get("Content-Security-Policy")
	dirs := map[string]string{}
	for d := range strings.SplitSeq(csp, ";") {
		name, val, _ := strings.Cut(strings.TrimSpace(d), " ")
		dirs[name] = val
	}
	if dirs["frame-ancestors"] != "'none'" || dirs["object-src"] != "'none'" || dirs["base-uri"] != "'none'" ||
		!strings.HasPrefix(dirs["script-src"], "'self' ") || strings.Contains(dirs["script-src"], "unsafe") {
		t.Fatalf("Content-Security-Policy %q", csp)
	}
	// Each inline script is allowed by its hash, and nothing else inline.
	body := rec.Body.String()
	scripts := regexp.MustCompile(`(?s)<script[^>]*>(.*?)</script>`).FindAllStringSubmatch(body, -1)
	if len(scripts) != 2 {
		t.Fatalf("%d inline scripts", len(scripts))
	}
	for _, s := range scripts {
		sum := sha256.Sum256([]byte(s[1]))
		if h := "'sha256-" + base64.StdEncoding.EncodeToString(sum[:]) + "'"; !strings.Contains(dirs["script-src"], h) {
			t.Errorf("script-src %q lacks %s, the hash of %.60q…", dirs["script-src"], h, s[1])
		}
	}
}

// TestWebAssetsBuiltOnFirstRequest: the server builds /client.js and the
// demo page on their first request, not at start. They are 57 KB of
// embedded files, copied, hashed and (the page) rewritten: at start that
// was 0.2 MiB more memory in an instance that only serves a socket, as on
// SCF with one connection per instance (docs/benchmarks.md, S6). Then
// concurrent first requests of both get the same, whole assets, and the
// page names the client.js that /client.js serves. Not parallel: it reads
// the process's allocation count.
func TestWebAssetsBuiltOnFirstRequest(t *testing.T) {
	rdb, prefix := redistest.Client(t)
	cfg, err := loadConfig(func(k string) string {
		return map[string]string{"REDIS_URL": redistest.URL(t), "REDIS_KEY_PREFIX": prefix, "ALLOW_ANONYMOUS": "true"}[k]
	})
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer(cfg, slog.New(slog.DiscardHandler), rdb)
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	s.mux = http.NewServeMux()
	s.routes()
	runtime.ReadMemStats(&after)
	if n := after.TotalAlloc - before.TotalAlloc; n > 16<<10 {
		t.Errorf("the routes allocated %d bytes before any request, want the web assets left for their first", n)
	}

	const each = 4
	recs := make([]*httptest.ResponseRecorder, 2*each)
	var wg sync.WaitGroup
	for i := range recs {
		path := []string{"/client.js", "/"}[i%2]
		recs[i] = httptest.NewRecorder()
		wg.Go(func() { s.ServeHTTP(recs[i], httptest.NewRequest("GET", path, nil)) })
	}
	wg.Wait()
	js, _ := webFiles.ReadFile("web/client.js")
	etag := recs[0].Header().Get("ETag")
	for i, rec := range recs {
		if rec.Code != 200 {
			t.Fatalf("request %d: %d", i, rec.Code)
		}
		if i%2 == 0 && (rec.Body.String() != string(js) || rec.Header().Get("ETag") != etag) {
			t.Errorf("/client.js, request %d: %d bytes, ETag %q; want %d bytes, ETag %q", i, rec.Body.Len(), rec.Header().Get("ETag"), len(js), etag)
		}
		if i%2 == 1 && (rec.Body.String() != recs[1].Body.String() || !strings.Contains(rec.Body.String(), "client.js?v="+strings.Trim(etag, `"`)) ||
			!strings.HasPrefix(rec.Header().Get("Content-Security-Policy"), "script-src 'self' 'sha256-")) {
			t.Errorf("/, request %d: CSP %q, a page that does not import client.js %s or differs from the first", i, rec.Header().Get("Content-Security-Policy"), etag)
		}
	}
}
