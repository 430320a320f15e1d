package main

import (
	"net/http"

	"github.com/gin-gonic/gin"

	"github.com/wsrelay/wsrelay/shared/origin"
)

// CORS headers. Credentials here are bearer tokens the page sets itself,
// not cookies, so Access-Control-Allow-Credentials is never sent and "*"
// is safe when configured.
const (
	corsAllowMethods  = "GET, POST, DELETE, OPTIONS"
	corsAllowHeaders  = "Authorization, Content-Type, Idempotency-Key"
	corsExposeHeaders = "Retry-After, Idempotent-Replayed"
	corsMaxAge        = "600"
)

// cors answers preflights (no credential needed) and adds the CORS
// headers to requests from allowed origins. A browser request from any
// other origin is refused with 403 before it does anything; requests
// without Origin (not from a browser, or a same-origin GET) pass without
// CORS headers.
//
// Every answer says Vary: Origin, with or without an Origin, "*" or not:
// the one to a request without Origin lacks Access-Control-Allow-Origin,
// and a cache that stored it must not give it to a browser's request,
// which would refuse it (the Fetch standard, "CORS protocol and HTTP
// caches"). noStore keeps them out of caches anyway; this holds for a
// cache that ignores it.
func (s *Server) cors(c *gin.Context) {
	h := c.Writer.Header()
	h["Vary"] = varyOrigin
	o := c.GetHeader("Origin")
	if o == "" {
		c.Next()
		return
	}
	anyOrigin := origin.AllowsAny(s.cfg.AllowedOrigins)
	preflight := c.Request.Method == http.MethodOptions && c.GetHeader("Access-Control-Request-Method") != ""
	if preflight {
		h.Add("Vary", "Access-Control-Request-Method")
		h.Add("Vary", "Access-Control-Request-Headers")
	}
	if !origin.Allowed(s.cfg.AllowedOrigins, o, c.Request.Host) {
		s.writeError(c, errf(403, "origin_not_allowed", "this origin is not in ALLOWED_ORIGINS"))
		return
	}
	if anyOrigin {
		h.Set("Access-Control-Allow-Origin", "*")
	} else {
		h.Set("Access-Control-Allow-Origin", o)
	}
	if preflight {
		h.Set("Access-Control-Allow-Methods", corsAllowMethods)
		h.Set("Access-Control-Allow-Headers", corsAllowHeaders)
		h.Set("Access-Control-Max-Age", corsMaxAge)
		c.AbortWithStatus(http.StatusNoContent)
		return
	}
	h.Set("Access-Control-Expose-Headers", corsExposeHeaders)
	c.Next()
}

// noStore keeps every answer out of caches, a browser's or a shared one
// (a CDN, a proxy): each is live (a history page, the registry, readiness,
// metrics), and a history page may hold messages only its caller may
// read. Without it a GET's 200 is cacheable by heuristic (RFC 9111
// §4.2.2), and a cache in front of the ingress may answer a later read
// with a stale page.
func noStore(c *gin.Context) {
	c.Writer.Header()["Cache-Control"] = cacheNoStore
}

// The values of the headers every answer carries, shared rather than
// allocated per request (on the publish path). Never written to: an Add
// to one appends past its capacity, which copies.
var (
	varyOrigin   = []string{"Origin"}
	cacheNoStore = []string{"no-store"}
)
