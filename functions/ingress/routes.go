package main

import "github.com/gin-gonic/gin"

// routes lists the whole ingress API (docs/api.md).
func (s *Server) routes(r *gin.Engine) {
	r.Use(noStore, s.cors) // before the routes, so preflights need no credential
	// HEAD wherever GET (RFC 9110 §9.3.2), with the same handlers:
	// net/http discards the body of a HEAD, and keeps GET's headers
	// (Content-Length too, for a body written before the handler
	// returns). Load balancers probe with it; e2e/openapi_test.go checks
	// that every GET route has its HEAD.
	r.GET("/healthz", s.handleHealthz)
	r.HEAD("/healthz", s.handleHealthz)
	r.GET("/readyz", s.handleReadyz)
	r.HEAD("/readyz", s.handleReadyz)
	r.GET("/metrics", s.guardMetrics, s.metrics.handler())
	r.HEAD("/metrics", s.guardMetrics, s.metrics.handler())

	v1 := r.Group("/v1")
	v1.POST("/channels/:channel/messages", s.handlePublish)
	v1.GET("/channels/:channel/messages", s.handleHistory)
	v1.HEAD("/channels/:channel/messages", s.handleHistory)
	v1.DELETE("/channels/:channel/messages", s.handleClearHistory)
	v1.GET("/channels/:channel/connections", s.handleChannelConnections)
	v1.HEAD("/channels/:channel/connections", s.handleChannelConnections)
	v1.POST("/messages", s.handleBatch)
	v1.POST("/connections/:id/messages", s.handleSendToConnection)
	v1.GET("/connections/:id", s.handleGetConnection)
	v1.HEAD("/connections/:id", s.handleGetConnection)
	v1.DELETE("/connections/:id", s.handleDisconnect)
	v1.POST("/users/:user/messages", s.handleSendToUser)
	v1.GET("/users/:user/connections", s.handleUserConnections)
	v1.HEAD("/users/:user/connections", s.handleUserConnections)
	v1.DELETE("/users/:user/connections", s.handleUserDisconnect)

	r.NoRoute(func(c *gin.Context) {
		s.writeError(c, errf(404, "not_found", "no such endpoint; see docs/api.md"))
	})
	// gin answers a method a path does not take with the Allow header
	// (RFC 9110 §15.5.6), listing the methods it does.
	r.NoMethod(func(c *gin.Context) {
		s.writeError(c, errf(405, "method_not_allowed", "method not allowed on this endpoint"))
	})
}

// guardMetrics refuses a scrape of /metrics without METRICS_TOKEN, when it
// is set.
func (s *Server) guardMetrics(c *gin.Context) {
	if !s.sec.metrics.Allows(c.Request) {
		c.Header("WWW-Authenticate", `Bearer realm="metrics"`)
		s.writeError(c, errf(401, "unauthorized", "/metrics needs METRICS_TOKEN as a bearer token"))
	}
}
