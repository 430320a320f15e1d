package main

import (
	"time"

	"github.com/gin-gonic/gin"

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
	msg := stream.Message{Route: stream.Disconnect(id), TS: time.Now().UnixMilli(), Data: []byte("null")}
	if _, err := s.appendStreams(ctx, []stream.Append{s.inboxAppend(rec.Instance, msg)}); err != nil {
		s.writeError(c, err)
		return
	}
	s.log.Info("disconnect requested", "conn", id, "instance", rec.Instance, "by", who.id)
	c.JSON(202, gin.H{"connection": id, "status": "disconnecting"})
}
