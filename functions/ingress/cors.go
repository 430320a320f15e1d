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
// without Origin (not from a browser) pass untouched.
func (s *Server) cors(c *gin.Context) {
	o := c.GetHeader("Origin")
	if o == "" {
		c.Next()
		return
	}
	h := c.Writer.Header()
	anyOrigin := origin.AllowsAny(s.cfg.AllowedOrigins)
	if !anyOrigin {
		h.Add("Vary", "Origin")
	}
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
