package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/gin-gonic/gin"

	"github.com/wsrelay/wsrelay/shared/channel"
	"github.com/wsrelay/wsrelay/shared/query"
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
		s.writeError(c, errInvalidChannel())
		return "", nil, false
	}
	who, err := s.authenticate(c)
	if err != nil {
		s.writeError(c, err)
		return "", nil, false
	}
	if err := may(who, ch); err != nil {
		s.writeError(c, err)
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
		s.writeError(c, err)
		return
	}
	p, ae := decodeMessage(body, false)
	if ae != nil {
		s.writeError(c, ae)
		return
	}
	from, err := who.from(p.From)
	if err != nil {
		s.writeError(c, err)
		return
	}
	if err := s.allowPublishes(c, who, 1); err != nil {
		s.writeError(c, err)
		return
	}
	s.idempotent(c, who, body, func() (int, []byte, error) {
		ids, err := s.appendFor(c, []stream.Append{s.channelAppend(ch, p, from, time.Now().UnixMilli())})
		if err != nil {
			return 0, nil, err
		}
		// Without encoding/json's reflection, on the hot path.
		return http.StatusAccepted, publishResult{ID: ids[0], Channel: ch}.appendJSON(make([]byte, 0, 64)), nil
	})
}

// handleBatch: POST /v1/messages. All items are validated before anything
// is written.
func (s *Server) handleBatch(c *gin.Context) {
	who, err := s.authenticate(c)
	if err != nil {
		s.writeError(c, err)
		return
	}
	body, err := readBody(c, s.cfg.MaxBatchBytes)
	if err != nil {
		s.writeError(c, err)
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
		s.writeError(c, err)
		return
	}
	now := time.Now().UnixMilli()
	as := make([]stream.Append, len(items))
	for i, p := range items {
		as[i] = s.channelAppend(p.Channel, p, froms[i], now)
	}
	if err := s.allowPublishes(c, who, len(items)); err != nil {
		s.writeError(c, err)
		return
	}
	s.idempotent(c, who, body, func() (int, []byte, error) {
		ids, err := s.appendFor(c, as)
		if err != nil {
			return 0, nil, err
		}
		res := make([]publishResult, len(ids))
		for i, id := range ids {
			res[i] = publishResult{ID: id, Channel: items[i].Channel}
		}
		return http.StatusAccepted, encodeReply(gin.H{"results": res}), nil
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
		s.writeError(c, err)
		return
	}
	id := c.Param("id")
	s.idempotent(c, who, body, func() (int, []byte, error) {
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
		return http.StatusAccepted, encodeReply(gin.H{"id": ids[0], "connection": id}), nil
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
		s.writeError(c, err)
		return nil, false
	}
	return who, true
}

// readMessage reads and validates one message body; on refusal it has
// answered.
func (s *Server) readMessage(c *gin.Context) ([]byte, publishBody, bool) {
	body, err := readBody(c, s.cfg.MaxMessageBytes)
	if err != nil {
		s.writeError(c, err)
		return nil, publishBody{}, false
	}
	p, ae := decodeMessage(body, false)
	if ae != nil {
		s.writeError(c, ae)
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
	user, who, ok := s.userRoute(c)
	if !ok {
		return
	}
	body, p, ok := s.readMessage(c)
	if !ok {
		return
	}
	if err := s.allowPublishes(c, who, 1); err != nil {
		s.writeError(c, err)
		return
	}
	s.idempotent(c, who, body, func() (int, []byte, error) {
		recs, err := s.reg.User(c.Request.Context(), user, maxConnsRead)
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
		return http.StatusAccepted, encodeReply(gin.H{"user": user, "connections": len(recs)}), nil
	})
}

// handleGetConnection: GET /v1/connections/{id}.
func (s *Server) handleGetConnection(c *gin.Context) {
	if _, ok := s.admin(c); !ok {
		return
	}
	rec, err := s.liveConnection(c, c.Param("id"))
	if err != nil {
		s.writeError(c, err)
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
	s.listConnections(c, ch, s.reg.Channel)
}

// listConnections answers a registry list read, a channel's or a user's
// (read, given name): at most ?limit= records (default 1000, at most
// maxConnsRead), as {"connections": […]}.
func (s *Server) listConnections(c *gin.Context, name string, read func(context.Context, string, int64) ([]*registry.Record, error)) {
	limit, ae := parseLimit(c, 1000, maxConnsRead)
	if ae != nil {
		s.writeError(c, ae)
		return
	}
	recs, err := read(c.Request.Context(), name, int64(limit))
	if err != nil {
		s.writeError(c, err)
		return
	}
	c.JSON(200, gin.H{"connections": recs})
}

// queryOnce reads a query parameter that takes one value: ok is false
// when it is absent, and a repeated one (?limit=5&limit=10) is an error
// with code, the parameter's code for a bad value, since which value was
// meant cannot be told (docs/api.md).
func queryOnce(c *gin.Context, name, code string) (v string, ok bool, ae *apiError) {
	if query.Malformed(c.Request.URL.RawQuery, name) {
		return "", false, errf(400, code, name+" is malformed (a ';', a bad %-escape, or one of more than 10000 parameters)")
	}
	vs, ok := c.GetQueryArray(name)
	if len(vs) > 1 {
		return "", false, errf(400, code, name+" must be given once, not "+strconv.Itoa(len(vs))+" times")
	}
	if !ok {
		return "", false, nil
	}
	return vs[0], true, nil
}

// parseCursor reads the history cursor query parameter name (after or
// before): as given, and as an id; ok is false when it is absent, an
// error when it is present and not a message id, or repeated.
func parseCursor(c *gin.Context, name string) (raw string, id stream.ID, ok bool, ae *apiError) {
	raw, ok, ae = queryOnce(c, name, "invalid_cursor")
	if ae != nil || !ok {
		return raw, id, ok, ae
	}
	if id, ok = stream.ParseID(raw); !ok {
		return raw, id, false, errf(400, "invalid_cursor", name+" must be a message id such as 1700000000000-0")
	}
	return raw, id, true, nil
}

// parseLimit reads the limit query parameter: def when it is absent, an
// error when it is present and not an integer 1–max (empty included), or
// repeated.
func parseLimit(c *gin.Context, def, max int) (int, *apiError) {
	q, ok, ae := queryOnce(c, "limit", "invalid_limit")
	if ae != nil {
		return 0, ae
	}
	if !ok {
		return def, nil
	}
	n, err := strconv.Atoi(q)
	if err != nil || n < 1 || n > max {
		return 0, errf(400, "invalid_limit", "limit must be an integer 1–"+strconv.Itoa(max))
	}
	return n, nil
}

// historyPageBytes bounds the messages of one history page, counted as
// their frames (what the JSON page repeats, nearly byte for byte). limit
// alone let one request read limit × MAX_MESSAGE_BYTES (65 MB by default)
// from Redis and hold several copies of it while decoding and encoding:
// a few parallel requests ran the ingress out of memory. A page holds at
// least one message, whatever its size, so that paging always advances.
const historyPageBytes = 4 << 20

// historyChunk is the most entries one Redis read of a page asks for. A
// page is read chunk by chunk until it reaches its limit or its budget,
// so a request holds at most the budget and one chunk.
const historyChunk = 64

// historyPage collects a page's entries within limit and historyPageBytes.
type historyPage struct {
	limit   int
	chunk   int            // entries per read: historyChunk, fewer for large messages
	entries []stream.Entry // in the order read (newest first for historyLatest)
	// json is each entry's message JSON (taken by take; zero for an
	// entry left out), msgs how many entries are messages, left how many
	// are not, and bad and badID the error and id of the first of those
	// read.
	json       []stream.MessageJSON
	msgs, left int
	bad        error
	badID      string
	bytes      int
	full       bool // limit or budget reached
	// mark and markBytes are len(entries) and bytes at the last next.
	mark, markBytes int
}

func (s *Server) newHistoryPage(limit int) *historyPage {
	// A chunk no larger than the budget either, however large
	// MAX_MESSAGE_BYTES is set.
	chunk := int(min(historyChunk, max(1, historyPageBytes/s.cfg.MaxMessageBytes)))
	return &historyPage{limit: limit, chunk: chunk}
}

// next is how many entries the next read should ask for: a chunk, or
// fewer near the page's limit or near its budget, where it asks for as
// many as the budget still holds at the average size of the entries the
// last read added, and one more to fill it. A whole chunk read there was
// mostly dropped: a page of 60 KiB messages read a second chunk of 64
// (another 4 MB from Redis) to keep 4 of them. (The last read's entries,
// not the page's: after large entries, small ones would otherwise be read
// a few at a time.)
func (p *historyPage) next() int {
	n := min(p.chunk, p.limit-p.msgs)
	if k := len(p.entries) - p.mark; k > 0 {
		avg := max(1, (p.bytes-p.markBytes)/k)
		n = min(n, max(0, historyPageBytes-p.bytes)/avg+1)
	}
	p.mark, p.markBytes = len(p.entries), p.bytes
	return n
}

// take adds e, an entry read, as add does, with its message's JSON. An
// entry no message can be made of is left out: it counts toward neither
// limit nor budget, and is kept without its frame, for its id and
// predecessor (the cursor, and the check between two reads). Counted, a
// page of them was empty while messages followed it, and a reader paging
// until an empty page stopped there.
func (p *historyPage) take(e stream.Entry) bool {
	if p.full {
		return false
	}
	if p.json == nil {
		p.json = make([]stream.MessageJSON, 0, min(p.limit, p.chunk))
	}
	m, err := e.JSON()
	if err != nil {
		if p.left++; p.bad == nil {
			p.bad, p.badID = err, e.ID
		}
		p.entries = append(p.entries, stream.Entry{ID: e.ID, Prev: e.Prev})
		p.json = append(p.json, stream.MessageJSON{})
		return true
	}
	if !p.add(e) {
		return false
	}
	p.json = append(p.json, m)
	return true
}

// add appends e, a message, unless the page is full or e would take it
// over the budget (the first message goes in whatever its size); false
// when the page is full.
func (p *historyPage) add(e stream.Entry) bool {
	n := len(e.Head) + len(e.ID) + len(e.Tail)
	if p.full || p.msgs > 0 && p.bytes+n > historyPageBytes {
		p.full = true
		return false
	}
	p.entries = append(p.entries, e)
	p.msgs++
	p.bytes += n
	p.full = p.msgs >= p.limit
	return true
}

// historyAfter reads the page after `after`, chunk by chunk. The first
// chunk's Batch is returned: it says whether the page follows `after`
// (recovered) and where it starts when it does not. A later chunk that
// does not follow the page (the stream was trimmed past the page between
// two reads) is dropped and the page ends before it: the next page, after
// the page's last id, then starts at the oldest message left and says
// recovered false.
func (s *Server) historyAfter(ctx context.Context, key string, after stream.ID, limit int) (*historyPage, stream.Batch, error) {
	p := s.newHistoryPage(limit)
	var first stream.Batch
	for pos := after; ; {
		n := p.next()
		b, err := s.store.Resume(ctx, key, pos, int64(n))
		if err != nil {
			return nil, first, err
		}
		if len(p.entries) == 0 {
			first = b
		} else if !b.Continuous {
			break
		}
		for _, e := range b.Entries {
			if !p.take(e) {
				break
			}
		}
		if p.full || len(b.Entries) < n {
			break
		}
		pos = stream.MustParseID(p.entries[len(p.entries)-1].ID)
	}
	return p, first, nil
}

// historyLatest reads the newest limit entries (below `before`, when
// bounded), newest first in chunks, and returns them oldest first. When
// the budget cuts the page it holds the newest messages that fit.
// Trimming between two reads only ends the page early (it removes the
// oldest entries); a chunk that does not end with the predecessor of the
// page's oldest entry (entries lost between two reads, as a failover to a
// replica that lagged loses them) is dropped, so that a page never has a
// hole, as one read never had.
func (s *Server) historyLatest(ctx context.Context, key string, before stream.ID, bounded bool, limit int) (*historyPage, error) {
	p := s.newHistoryPage(limit)
	for {
		n := p.next()
		var es []stream.Entry
		var err error
		if len(p.entries) == 0 {
			if bounded {
				es, err = s.store.LatestBefore(ctx, key, before, int64(n))
			} else {
				es, err = s.store.Latest(ctx, key, int64(n))
			}
		} else {
			oldest := p.entries[len(p.entries)-1]
			es, err = s.store.LatestBefore(ctx, key, stream.MustParseID(oldest.ID), int64(n))
			if err == nil && !p.follows(es) {
				break
			}
		}
		if err != nil {
			return nil, err
		}
		for i := len(es) - 1; i >= 0; i-- { // newest first
			if !p.take(es[i]) {
				break
			}
		}
		if p.full || len(es) < n {
			break
		}
	}
	slices.Reverse(p.entries)
	slices.Reverse(p.json)
	return p, nil
}

// follows reports whether es, the read below a historyLatest page's
// oldest entry (oldest first), holds no hole where it meets the page: the
// newest of its entries at or below the predecessor that the page's oldest
// message names is that predecessor. The entries above it are not in the
// chain (another application's, which no append names: the message after
// them names the message before them) and are passed over; a page whose
// oldest entries are such, read after an entry no append wrote, can only
// be checked past them. Compared with the newest entry read alone, such
// an entry was taken for a hole: the page ended at it, empty when it was
// the newest (?limit=1), and a reader paging back stopped there.
func (p *historyPage) follows(es []stream.Entry) bool {
	var want stream.ID
	known := false
	for i := len(p.entries) - 1; i >= 0 && !known; i-- { // oldest first
		want, known = stream.ParseID(p.entries[i].Prev)
	}
	// Past want already (a hole inside one read, which a page keeps as
	// one read did), nothing is left to check.
	if !known || !want.Less(stream.MustParseID(p.entries[len(p.entries)-1].ID)) {
		return true
	}
	for i := len(es) - 1; i >= 0; i-- {
		if id := stream.MustParseID(es[i].ID); !want.Less(id) {
			return id == want
		}
	}
	return true
}

// handleClearHistory: DELETE /v1/channels/{channel}/messages (admin and
// the channel). Removes every message the channel's stream holds; the
// channel goes on (its next message continues the chain, with a greater
// id), and subscribers are not disturbed. A reader resuming from a
// removed message is told recovered:false, as after trimming.
func (s *Server) handleClearHistory(c *gin.Context) {
	ch, who, ok := s.channelRoute(c, (*principal).mayClearHistory)
	if !ok {
		return
	}
	n, err := s.store.Clear(c.Request.Context(), s.keys.Stream(ch))
	if err != nil {
		s.writeError(c, err)
		return
	}
	s.log.Info("history removed", "channel", ch, "messages", n, "by", who.id)
	c.JSON(200, gin.H{"channel": ch, "removed": n})
}

// handleHistory: GET /v1/channels/{channel}/messages?after=&limit=, or
// ?before=&limit= to page back from a message towards older ones.
func (s *Server) handleHistory(c *gin.Context) {
	ch, _, ok := s.channelRoute(c, (*principal).mayReadHistory)
	if !ok {
		return
	}
	limit, ae := parseLimit(c, 100, 1000)
	if ae != nil {
		s.writeError(c, ae)
		return
	}
	var (
		p    *historyPage
		err  error
		page historyBody
	)
	after, afterID, hasAfter, ae := parseCursor(c, "after")
	if ae != nil {
		s.writeError(c, ae)
		return
	}
	_, beforeID, hasBefore, ae := parseCursor(c, "before")
	if ae != nil {
		s.writeError(c, ae)
		return
	}
	page.next = after
	switch {
	case hasAfter && hasBefore:
		s.writeError(c, errf(400, "invalid_cursor", "after and before cannot be used together"))
		return
	case hasBefore:
		p, err = s.historyLatest(c.Request.Context(), s.keys.Stream(ch), beforeID, true, limit)
	case hasAfter:
		// Read like a resume, so that the page says whether messages
		// after the cursor were trimmed before it (recovered false).
		var b stream.Batch
		p, b, err = s.historyAfter(c.Request.Context(), s.keys.Stream(ch), afterID, limit)
		page.recovered = &b.Continuous
		if !b.Continuous {
			// No message after a cursor the stream does not go on from
			// (one ahead of it, one whose stream is gone, or one trimmed
			// and followed only by entries left out): the next page
			// starts where the stream does.
			page.next = b.From.String()
			if p != nil && len(p.entries) > 0 {
				page.next = p.entries[len(p.entries)-1].ID
			}
		}
	default:
		p, err = s.historyLatest(c.Request.Context(), s.keys.Stream(ch), stream.Zero, false, limit)
	}
	if err != nil {
		s.writeError(c, err)
		return
	}
	// Every message's JSON is settled (as the page was read) before
	// anything is written, so that the status is final: the body is then
	// written out of the entries read from Redis, which are not copied
	// (stream.Entry.JSON).
	page.msgs = p.json[:0] // the messages, in place
	for i := range p.entries {
		if p.entries[i].Head == "" && p.entries[i].Tail == "" {
			continue // left out: no message has an empty frame
		}
		page.msgs = append(page.msgs, p.json[i])
		page.next = p.entries[i].ID
	}
	if p.bad != nil {
		s.undecodable.Fail(p.bad, "channel", ch, "id", p.badID, "left_out", p.left)
	} else if len(p.entries) > 0 {
		s.undecodable.OK()
	}
	c.Render(200, &page)
}

// historyBody renders a history page, byte for byte as gin's PureJSON did
// a gin.H of its fields ({"messages":[…],"next":…,"recovered":…} and a
// newline; data as stored, <, > and & not escaped: equal as JSON, but not
// byte for byte, which a client hashing or signing data would see). It
// writes the messages' stored bytes through a buffer of at most
// historyWriteBuffer, where encoding the page built it whole in memory,
// after several copies of every message: about 30 MB allocated for a
// page of 4 MiB (docs/benchmarks.md).
type historyBody struct {
	msgs      []stream.MessageJSON
	next      string
	recovered *bool // with after only
}

// historyWriteBuffer is the most a history body is buffered by before it
// is written to the connection.
const historyWriteBuffer = 32 << 10

func (p *historyBody) WriteContentType(w http.ResponseWriter) {
	if h := w.Header(); len(h["Content-Type"]) == 0 {
		h["Content-Type"] = jsonContentTypes
	}
}

func (p *historyBody) Render(w http.ResponseWriter) error {
	p.WriteContentType(w)
	next := jsonString(p.next)
	n := len(`{"messages":[],"next":,"recovered":false}`+"\n") + len(next)
	for i := range p.msgs {
		n += p.msgs[i].Len() + 1
	}
	// One write of a body up to historyWriteBuffer, as gin's was.
	bw := bufio.NewWriterSize(w, min(n, historyWriteBuffer))
	bw.WriteString(`{"messages":[`)
	for i := range p.msgs {
		if i > 0 {
			bw.WriteByte(',')
		}
		m := &p.msgs[i]
		bw.WriteByte('{')
		bw.WriteString(m.Head)
		bw.WriteString(m.ID)
		bw.WriteString(m.Tail)
	}
	bw.WriteString(`],"next":`)
	bw.WriteString(next)
	if p.recovered != nil {
		bw.WriteString(`,"recovered":`)
		bw.WriteString(strconv.FormatBool(*p.recovered))
	}
	bw.WriteString("}\n")
	return bw.Flush()
}

// jsonString is s as a JSON string, as encoding/json writes it without
// HTML escaping. The cursors it is given (ids, and an after that
// stream.ParseID took) need no escaping.
func jsonString(s string) string {
	if stream.PlainString(s) {
		return `"` + s + `"`
	}
	var b strings.Builder
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(s) // a string always encodes
	return strings.TrimSuffix(b.String(), "\n")
}
