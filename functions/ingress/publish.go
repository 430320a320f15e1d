package main

import (
	"errors"
	"net/http"
	"strconv"
	"time"

	"github.com/gin-gonic/gin"

	"github.com/wsrelay/wsrelay/shared/channel"
	"github.com/wsrelay/wsrelay/shared/registry"
	"github.com/wsrelay/wsrelay/shared/stream"
)

type publishResult struct {
	ID      string `json:"id"`
	Channel string `json:"channel"`
}

// appendJSON appends r as JSON. Neither field needs escaping: ids are
// "<ms>-<seq>" and channel names match channel.ValidName.
func (r publishResult) appendJSON(b []byte) []byte {
	b = append(b, `{"id":"`...)
	b = append(b, r.ID...)
	b = append(b, `","channel":"`...)
	b = append(b, r.Channel...)
	return append(b, `"}`...)
}

func (s *Server) channelLimits() stream.Limits {
	return stream.Limits{
		MaxLen:   s.cfg.HistorySize,
		MaxAgeMS: s.cfg.HistoryTTL.Milliseconds(),
		TTLMS:    s.cfg.HistoryTTL.Milliseconds(),
	}
}

// inboxLimits bound an egress instance's inbox: a dead instance's inbox
// expires by itself, even if written to after the instance died.
func (s *Server) inboxLimits() stream.Limits {
	return stream.Limits{MaxLen: 10000, MaxAgeMS: 2 * s.cfg.RegistryTTL.Milliseconds(), TTLMS: 2 * s.cfg.RegistryTTL.Milliseconds()}
}

func (s *Server) channelAppend(ch string, p publishBody, from string, now int64) stream.Append {
	return stream.Append{
		Stream: s.keys.Stream(ch),
		Notify: s.keys.Notify(ch),
		Msg:    stream.Message{Channel: ch, Event: p.Event, From: from, TS: now, Data: p.Data},
		Limits: s.channelLimits(),
	}
}

// errInvalidChannel answers a channel name that channel.ValidName refuses.
func errInvalidChannel() *apiError {
	return errf(400, "invalid_channel", "channel must match ^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")
}

// channelRoute begins every /v1/channels/{channel}/… handler, in the
// order the API documents its errors: the channel name (400), the
// credential (401), then the permission may grants (403). On false the
// error has been written.
func (s *Server) channelRoute(c *gin.Context, may func(*principal, string) error) (string, *principal, bool) {
	ch := c.Param("channel")
	if !channel.ValidName(ch) {
		writeError(c, s.log, errInvalidChannel())
		return "", nil, false
	}
	who, err := s.authenticate(c)
	if err != nil {
		writeError(c, s.log, err)
		return "", nil, false
	}
	if err := may(who, ch); err != nil {
		writeError(c, s.log, err)
		return "", nil, false
	}
	return ch, who, true
}

// handlePublish: POST /v1/channels/{channel}/messages.
func (s *Server) handlePublish(c *gin.Context) {
	ch, who, ok := s.channelRoute(c, (*principal).mayPublish)
	if !ok {
		return
	}
	body, err := readBody(c, s.cfg.MaxMessageBytes)
	if err != nil {
		writeError(c, s.log, err)
		return
	}
	p, ae := decodeMessage(body, false)
	if ae != nil {
		writeError(c, s.log, ae)
		return
	}
	from, err := who.from(p.From)
	if err != nil {
		writeError(c, s.log, err)
		return
	}
	if err := s.allowPublishes(c, who, 1); err != nil {
		writeError(c, s.log, err)
		return
	}
	s.idempotent(c, who, body, func() (int, any, error) {
		ids, err := s.appendFor(c, []stream.Append{s.channelAppend(ch, p, from, time.Now().UnixMilli())})
		if err != nil {
			return 0, nil, err
		}
		return http.StatusAccepted, publishResult{ID: ids[0], Channel: ch}, nil
	})
}

// handleBatch: POST /v1/messages. All items are validated before anything
// is written.
func (s *Server) handleBatch(c *gin.Context) {
	who, err := s.authenticate(c)
	if err != nil {
		writeError(c, s.log, err)
		return
	}
	body, err := readBody(c, s.cfg.MaxBatchBytes)
	if err != nil {
		writeError(c, s.log, err)
		return
	}
	// Each item is checked as it is decoded, so that the first bad item,
	// malformed or not allowed, is the one reported.
	var froms []string
	items, err := decodeBatch(body, s.cfg.MaxBatchItems, s.cfg.MaxMessageBytes, func(p *publishBody) *apiError {
		if err := who.mayPublish(p.Channel); err != nil {
			return err.(*apiError)
		}
		from, err := who.from(p.From)
		if err != nil {
			return err.(*apiError)
		}
		froms = append(froms, from)
		return nil
	})
	if err != nil {
		writeError(c, s.log, err)
		return
	}
	now := time.Now().UnixMilli()
	as := make([]stream.Append, len(items))
	for i, p := range items {
		as[i] = s.channelAppend(p.Channel, p, froms[i], now)
	}
	if err := s.allowPublishes(c, who, len(items)); err != nil {
		writeError(c, s.log, err)
		return
	}
	s.idempotent(c, who, body, func() (int, any, error) {
		ids, err := s.appendFor(c, as)
		if err != nil {
			return 0, nil, err
		}
		res := make([]publishResult, len(ids))
		for i, id := range ids {
			res[i] = publishResult{ID: id, Channel: items[i].Channel}
		}
		return http.StatusAccepted, gin.H{"results": res}, nil
	})
}

// handleSendToConnection: POST /v1/connections/{id}/messages.
func (s *Server) handleSendToConnection(c *gin.Context) {
	who, ok := s.admin(c)
	if !ok {
		return
	}
	body, p, ok := s.readMessage(c)
	if !ok {
		return
	}
	if err := s.allowPublishes(c, who, 1); err != nil {
		writeError(c, s.log, err)
		return
	}
	id := c.Param("id")
	s.idempotent(c, who, body, func() (int, any, error) {
		// Looked up inside, so that a retry after the connection has
		// gone still gets the first attempt's reply.
		rec, err := s.liveConnection(c, id)
		if err != nil {
			return 0, nil, err
		}
		msg := stream.Message{Route: stream.ToConnection(id), Event: p.Event, From: p.From, TS: time.Now().UnixMilli(), Data: p.Data}
		ids, err := s.appendFor(c, []stream.Append{s.inboxAppend(rec.Instance, msg)})
		if err != nil {
			return 0, nil, err
		}
		return http.StatusAccepted, gin.H{"id": ids[0], "connection": id}, nil
	})
}

// admin authenticates the caller and requires the admin scope; on refusal
// it has answered.
func (s *Server) admin(c *gin.Context) (*principal, bool) {
	who, err := s.authenticate(c)
	if err == nil {
		err = who.mayAdmin()
	}
	if err != nil {
		writeError(c, s.log, err)
		return nil, false
	}
	return who, true
}

// readMessage reads and validates one message body; on refusal it has
// answered.
func (s *Server) readMessage(c *gin.Context) ([]byte, publishBody, bool) {
	body, err := readBody(c, s.cfg.MaxMessageBytes)
	if err != nil {
		writeError(c, s.log, err)
		return nil, publishBody{}, false
	}
	p, ae := decodeMessage(body, false)
	if ae != nil {
		writeError(c, s.log, ae)
		return nil, publishBody{}, false
	}
	return body, p, true
}

// liveConnection returns the registry record of connection id, or a 404
// error (an id that cannot be one of ours is simply not found).
func (s *Server) liveConnection(c *gin.Context, id string) (*registry.Record, error) {
	var rec *registry.Record
	err := registry.ErrNotFound
	if channel.ValidUser(id) {
		rec, err = s.reg.Get(c.Request.Context(), id)
	}
	if errors.Is(err, registry.ErrNotFound) {
		return nil, errf(404, "connection_not_found", "no live connection with that id")
	}
	return rec, err
}

func (s *Server) inboxAppend(instance string, msg stream.Message) stream.Append {
	return stream.Append{
		Stream: s.keys.Inbox(instance),
		Notify: s.keys.InboxNotify(instance),
		Msg:    msg,
		Limits: s.inboxLimits(),
	}
}

// handleSendToUser: POST /v1/users/{user}/messages. One append per egress
// instance that holds a connection of the user.
func (s *Server) handleSendToUser(c *gin.Context) {
	who, ok := s.admin(c)
	if !ok {
		return
	}
	user := c.Param("user")
	if !channel.ValidUser(user) {
		writeError(c, s.log, errf(400, "invalid_user", "user must be 1–128 characters [A-Za-z0-9_.:@-]"))
		return
	}
	body, p, ok := s.readMessage(c)
	if !ok {
		return
	}
	if err := s.allowPublishes(c, who, 1); err != nil {
		writeError(c, s.log, err)
		return
	}
	s.idempotent(c, who, body, func() (int, any, error) {
		recs, err := s.reg.User(c.Request.Context(), user, 10000)
		if err != nil {
			return 0, nil, err
		}
		instances := map[string]bool{}
		var as []stream.Append
		now := time.Now().UnixMilli()
		for _, r := range recs {
			if !instances[r.Instance] {
				instances[r.Instance] = true
				as = append(as, s.inboxAppend(r.Instance, stream.Message{Route: stream.ToUser(user), Event: p.Event, From: p.From, TS: now, Data: p.Data}))
			}
		}
		if len(as) > 0 {
			if _, err := s.appendFor(c, as); err != nil {
				return 0, nil, err
			}
		}
		return http.StatusAccepted, gin.H{"user": user, "connections": len(recs)}, nil
	})
}

// handleGetConnection: GET /v1/connections/{id}.
func (s *Server) handleGetConnection(c *gin.Context) {
	if _, ok := s.admin(c); !ok {
		return
	}
	rec, err := s.liveConnection(c, c.Param("id"))
	if err != nil {
		writeError(c, s.log, err)
		return
	}
	c.JSON(200, rec)
}

// handleChannelConnections: GET /v1/channels/{channel}/connections.
func (s *Server) handleChannelConnections(c *gin.Context) {
	ch, _, ok := s.channelRoute(c, (*principal).mayReadPresence)
	if !ok {
		return
	}
	limit, ae := parseLimit(c, 1000, 10000)
	if ae != nil {
		writeError(c, s.log, ae)
		return
	}
	recs, err := s.reg.Channel(c.Request.Context(), ch, int64(limit))
	if err != nil {
		writeError(c, s.log, err)
		return
	}
	c.JSON(200, gin.H{"connections": recs})
}

// parseLimit reads the limit query parameter: def when it is absent, an
// error when it is present and not an integer 1–max (empty included).
func parseLimit(c *gin.Context, def, max int) (int, *apiError) {
	q, ok := c.GetQuery("limit")
	if !ok {
		return def, nil
	}
	n, err := strconv.Atoi(q)
	if err != nil || n < 1 || n > max {
		return 0, errf(400, "invalid_limit", "limit must be an integer 1–"+strconv.Itoa(max))
	}
	return n, nil
}

// handleHistory: GET /v1/channels/{channel}/messages?after=&limit=.
func (s *Server) handleHistory(c *gin.Context) {
	ch, _, ok := s.channelRoute(c, (*principal).mayReadHistory)
	if !ok {
		return
	}
	limit, ae := parseLimit(c, 100, 1000)
	if ae != nil {
		writeError(c, s.log, ae)
		return
	}
	var (
		entries []stream.Entry
		err     error
		resp    = gin.H{}
	)
	after, hasAfter := c.GetQuery("after")
	next := after
	if hasAfter {
		id, ok := stream.ParseID(after)
		if !ok {
			writeError(c, s.log, errf(400, "invalid_cursor", "after must be a message id such as 1700000000000-0"))
			return
		}
		// Read like a resume, so that the page says whether messages
		// after the cursor were trimmed before it (recovered false).
		var b stream.Batch
		b, err = s.store.Resume(c.Request.Context(), s.keys.Stream(ch), id, int64(limit))
		entries = b.Entries
		resp["recovered"] = b.Continuous
		if !b.Continuous && len(b.Entries) == 0 {
			// Nothing after a cursor the stream does not go on from (one
			// ahead of it, or one whose stream is gone): the next page
			// starts where the stream does.
			next = b.From.String()
		}
	} else {
		entries, err = s.store.Latest(c.Request.Context(), s.keys.Stream(ch), int64(limit))
	}
	if err != nil {
		writeError(c, s.log, err)
		return
	}
	msgs := make([]stream.Decoded, 0, len(entries))
	for i := range entries {
		d, err := entries[i].Decode()
		if err != nil {
			s.log.Error("undecodable stream entry", "id", entries[i].ID, "err", err.Error())
			continue
		}
		msgs = append(msgs, d)
	}
	if len(entries) > 0 {
		next = entries[len(entries)-1].ID
	}
	resp["messages"], resp["next"] = msgs, next
	// PureJSON: data goes out as it was stored, as the WebSocket delivers
	// it, not with <, > and & escaped as \u003c… (equal as JSON, but not
	// byte for byte, which a client hashing or signing data would see).
	c.PureJSON(200, resp)
}
