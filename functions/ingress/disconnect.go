package main

import (
	"time"

	"github.com/gin-gonic/gin"

	"github.com/wsrelay/wsrelay/shared/channel"
	"github.com/wsrelay/wsrelay/shared/stream"
)

// handleDisconnect: DELETE /v1/connections/{id} (admin). The egress
// holding the connection closes it with 4003 (CloseDisconnected: do not
// reconnect). 202: the request is queued on that instance's inbox; 404:
// no live connection has that id.
func (s *Server) handleDisconnect(c *gin.Context) {
	who, ok := s.admin(c)
	if !ok {
		return
	}
	id := c.Param("id")
	rec, err := s.liveConnection(c, id)
	if err != nil {
		s.writeError(c, err)
		return
	}
	ctx := c.Request.Context()
	if _, err := s.appendStreams(ctx, []stream.Append{s.disconnectAppend(rec.Instance, id)}); err != nil {
		s.writeError(c, err)
		return
	}
	s.log.Info("disconnect requested", "conn", id, "instance", rec.Instance, "by", who.id)
	c.JSON(202, gin.H{"connection": id, "status": "disconnecting"})
}

// disconnectAppend is the inbox command that has instance close
// connection id with 4003.
func (s *Server) disconnectAppend(instance, id string) stream.Append {
	return s.inboxAppend(instance, stream.Message{Route: stream.Disconnect(id), TS: time.Now().UnixMilli(), Data: []byte("null")})
}

// maxConnsRead is the most registry records one request reads: a list
// of a channel's or a user's connections (its ?limit= at most), a send to
// a user, a disconnect of a user (docs/api.md).
const maxConnsRead = 10000

// userDisconnectChunk bounds the commands of one append pipeline of a
// user's disconnect, as the batcher bounds the pipelines it shares, so
// that a user with thousands of sockets does not make one pipeline that
// outlasts REDIS_TIMEOUT.
const userDisconnectChunk = 256

// userRoute begins every /v1/users/{user}/… handler, in the order the API
// documents its errors: the credential (401) and the admin scope (403),
// then the user id (400). On false the error has been written.
func (s *Server) userRoute(c *gin.Context) (string, *principal, bool) {
	who, ok := s.admin(c)
	if !ok {
		return "", nil, false
	}
	user := c.Param("user")
	if !channel.ValidUser(user) {
		s.writeError(c, errf(400, "invalid_user", "user must be "+channel.UserRule))
		return "", nil, false
	}
	return user, who, true
}

// handleUserConnections: GET /v1/users/{user}/connections (admin).
func (s *Server) handleUserConnections(c *gin.Context) {
	user, _, ok := s.userRoute(c)
	if !ok {
		return
	}
	s.listConnections(c, user, s.reg.User)
}

// handleUserDisconnect: DELETE /v1/users/{user}/connections (admin). Each
// live connection of the user gets the command DELETE
// /v1/connections/{id} queues, on its instance's inbox. Not one command
// per instance: an egress of an earlier release would ignore a new
// command, and the two releases run side by side during a deploy
// (docs/deployment.md). 202 with how many were told, 0 when none (as a
// send to the user).
func (s *Server) handleUserDisconnect(c *gin.Context) {
	user, who, ok := s.userRoute(c)
	if !ok {
		return
	}
	ctx := c.Request.Context()
	recs, err := s.reg.User(ctx, user, maxConnsRead)
	if err != nil {
		s.writeError(c, err)
		return
	}
	as := make([]stream.Append, len(recs))
	for i, r := range recs {
		as[i] = s.disconnectAppend(r.Instance, r.ID)
	}
	for len(as) > 0 {
		n := min(len(as), userDisconnectChunk)
		// On an error some were told: a retry tells them again, which
		// an egress takes as it took the first (closing, or no longer
		// holding, the connection).
		if _, err := s.appendStreams(ctx, as[:n]); err != nil {
			s.writeError(c, err)
			return
		}
		as = as[n:]
	}
	if len(recs) > 0 {
		s.log.Info("user disconnect requested", "user", user, "connections", len(recs), "by", who.id)
	}
	c.JSON(202, gin.H{"user": user, "disconnected": len(recs)})
}
