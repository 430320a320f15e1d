package main

import (
	"github.com/gin-gonic/gin"
)

// principal is who made a request: an API key, a user token, or nobody
// (anonymous mode). Its methods answer nil or the apiError to return.
type principal struct {
	// id identifies the credential for idempotency keys and rate limits;
	// never the secret itself.
	id   string
	user string // user token's sub; empty otherwise
}

// authenticate identifies the caller.
func (s *Server) authenticate(c *gin.Context) (*principal, error) {
	return &principal{id: "anonymous"}, nil
}

func (p *principal) mayPublish(channel string) error      { return nil }
func (p *principal) mayAdmin() error                      { return nil }
func (p *principal) mayReadPresence(channel string) error { return nil }
func (p *principal) mayReadHistory(channel string) error  { return nil }

// from is the sender stamped on a message: a user token's sub always; a
// backend's own "from" otherwise.
func (p *principal) from(bodyFrom string) (string, error) {
	if p.user != "" {
		return p.user, nil
	}
	return bodyFrom, nil
}

// allowPublishes applies publish rate limits for n messages.
func (s *Server) allowPublishes(c *gin.Context, p *principal, n int) error { return nil }

// readBody reads a JSON body of at most limit bytes.
func (s *Server) readBody(c *gin.Context, limit int64) ([]byte, error) {
	return readBody(c, limit)
}
