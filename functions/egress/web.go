package main

import (
	"bytes"
	"crypto/sha256"
	"embed"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
)

// The browser client and the demo page (docs/clients.md), built into the
// binary so that a deployment serves them with nothing beside it.
//
//go:embed web/client.js web/index.html
var webFiles embed.FS

// webAsset is a file served from memory with a strong ETag.
type webAsset struct {
	body        []byte
	etag        string
	contentType string
	cache       string
	headers     map[string]string // more headers (client.js's CORS, the demo's security headers)
}

func newWebAsset(body []byte, contentType, cache string) *webAsset {
	sum := sha256.Sum256(body)
	return &webAsset{body: body, etag: `"` + hex.EncodeToString(sum[:8]) + `"`, contentType: contentType, cache: cache}
}

func (a *webAsset) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	h := w.Header()
	h.Set("Content-Type", a.contentType)
	h.Set("Cache-Control", a.cache)
	h.Set("ETag", a.etag)
	h.Set("X-Content-Type-Options", "nosniff")
	for k, v := range a.headers {
		h.Set(k, v)
	}
	if noneMatch(r.Header.Values("If-None-Match"), a.etag) {
		w.WriteHeader(http.StatusNotModified)
		return
	}
	h.Set("Content-Length", strconv.Itoa(len(a.body))) // for HEAD too
	if r.Method != http.MethodHead {
		_, _ = w.Write(a.body)
	}
}

// noneMatch reports whether If-None-Match fields hs match etag, as RFC
// 9110 §13.1.2 says: "*", or a list of entity tags compared weakly (a
// proxy that compresses the file weakens its ETag to W/"…"). Written here
// rather than with http.ServeContent, whose range support (multipart,
// MIME types) would add 50 KB to the binary, which is what a
// one-socket instance's memory follows (docs/benchmarks.md, S6).
func noneMatch(hs []string, etag string) bool {
	for _, h := range hs {
		for t := range strings.SplitSeq(h, ",") {
			t = strings.TrimSpace(t)
			if t == "*" || strings.TrimPrefix(t, "W/") == etag {
				return true
			}
		}
	}
	return false
}

// lazyHandler serves with the handler its function returns, which
// builds it on the first call (a sync.OnceValue).
type lazyHandler func() http.Handler

func (h lazyHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) { h().ServeHTTP(w, r) }

// handleClientJS serves GET /client.js. Clients revalidate after five
// minutes (the ETag makes that cheap), so a deploy reaches them quickly.
// Any origin may load it: a page imports it as a module, which browsers
// fetch with CORS, and it is public, static and needs no credential
// (ALLOWED_ORIGINS guards the WebSocket, not this file).
func handleClientJS() *webAsset {
	b, _ := webFiles.ReadFile("web/client.js")
	a := newWebAsset(b, "text/javascript; charset=utf-8", "public, max-age=300")
	a.headers = map[string]string{"Access-Control-Allow-Origin": "*"}
	return a
}

// demoConfig is what the demo page learns from the server.
type demoConfig struct {
	// IngressURL is where the page POSTs messages and reads presence;
	// empty means the page's own origin.
	IngressURL string `json:"ingressURL"`
}

// inlineScripts returns the text of each of page's <script> elements, for
// their hashes in its Content-Security-Policy (a loop, not a regexp
// compiled at start-up: the egress starts for each socket on SCF).
func inlineScripts(page []byte) [][]byte {
	var out [][]byte
	for {
		i := bytes.Index(page, []byte("<script"))
		if i < 0 {
			return out
		}
		page = page[i:]
		open, end := bytes.IndexByte(page, '>'), bytes.Index(page, []byte("</script>"))
		if open < 0 || end < open {
			return out
		}
		out = append(out, page[open+1:end])
		page = page[end:]
	}
}

// handleDemo serves GET / (the chat demo), with the configuration injected
// in place of the page's {{.}} placeholder. The page is revalidated on
// every load (no-cache) and imports the client.js of its own build, by a
// URL that names its version (?v=<its ETag>): a browser that holds an
// older client.js in its cache (max-age) fetches the new one with the new
// page, rather than running the new page against the old module for up to
// five minutes after a deploy.
//
// It renders what anyone may publish and may carry a user token in its
// URL (?token=, docs/clients.md), so its Content-Security-Policy lets only
// its own code run (its two inline scripts by hash, modules from its
// origin: no inline handler, eval or other origin's script) and be framed
// by no one; where it connects is left open (the socket and the ingress
// are wherever INGRESS_URL and a proxy put them). Referrer-Policy:
// no-referrer keeps its URL out of the Referer of its requests (a
// presence poll every 3 s), and so out of the logs of a proxy in front of
// the ingress. client is the served client.js (handleClientJS), whose
// ETag the import names.
func handleDemo(cfg Config, client *webAsset) http.Handler {
	b, _ := webFiles.ReadFile("web/index.html")
	js, _ := json.Marshal(demoConfig{IngressURL: cfg.IngressURL}) // escapes <, > and &
	b = bytes.Replace(b, []byte("{{.}}"), js, 1)
	b = bytes.Replace(b, []byte(`from "./client.js"`), []byte(`from "./client.js?v=`+strings.Trim(client.etag, `"`)+`"`), 1)
	scripts := "'self'"
	for _, m := range inlineScripts(b) {
		sum := sha256.Sum256(m)
		scripts += " 'sha256-" + base64.StdEncoding.EncodeToString(sum[:]) + "'"
	}
	a := newWebAsset(b, "text/html; charset=utf-8", "no-cache")
	a.headers = map[string]string{
		"Content-Security-Policy": "script-src " + scripts + "; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
		"Referrer-Policy":         "no-referrer",
	}
	return a
}
