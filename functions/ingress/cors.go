package main

import (
	"net/http"
	"strings"

	"github.com/gin-gonic/gin"
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

// originAllowed has the egress's semantics (functions/egress/server.go):
// an origin listed in allowed ("*" allows any), or, when allowed is empty,
// an origin whose host is the request's Host.
func originAllowed(allowed, origin, host string) bool {
	if allowed != "" {
		for _, a := range strings.Split(allowed, ",") {
			a = strings.TrimSpace(a)
			if a == "*" || strings.EqualFold(a, origin) {
				return true
			}
		}
		return false
	}
	_, after, ok := strings.Cut(origin, "://")
	return ok && strings.EqualFold(after, host)
}

func (s *Server) allowsAnyOrigin() bool {
	for _, a := range strings.Split(s.cfg.AllowedOrigins, ",") {
		if strings.TrimSpace(a) == "*" {
			return true
		}
	}
	return false
}

// cors answers preflights (no credential needed) and adds the CORS
// headers to requests from allowed origins. A browser request from any
// other origin is refused with 403 before it does anything; requests
// without Origin (not from a browser) pass untouched.
func (s *Server) cors(c *gin.Context) {
	origin := c.GetHeader("Origin")
	if origin == "" {
		c.Next()
		return
	}
	h := c.Writer.Header()
	anyOrigin := s.allowsAnyOrigin()
	if !anyOrigin {
		h.Add("Vary", "Origin")
	}
	preflight := c.Request.Method == http.MethodOptions && c.GetHeader("Access-Control-Request-Method") != ""
	if preflight {
		h.Add("Vary", "Access-Control-Request-Method")
		h.Add("Vary", "Access-Control-Request-Headers")
	}
	if !originAllowed(s.cfg.AllowedOrigins, origin, c.Request.Host) {
		writeError(c, s.log, errf(403, "origin_not_allowed", "this origin is not in ALLOWED_ORIGINS"))
		return
	}
	if anyOrigin {
		h.Set("Access-Control-Allow-Origin", "*")
	} else {
		h.Set("Access-Control-Allow-Origin", origin)
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
