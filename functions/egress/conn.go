package main

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"

	"github.com/wsrelay/wsrelay/shared/channel"
	"github.com/wsrelay/wsrelay/shared/protocol"
	"github.com/wsrelay/wsrelay/shared/registry"
	"github.com/wsrelay/wsrelay/shared/stream"
)

// queued is one outgoing frame. Channel messages share one prepared frame
// among all subscribers; replies have their own.
type queued struct {
	pm *websocket.PreparedMessage
	id stream.ID // message id (zero for replies)
	ts int64     // publish time, unix ms (zero for replies)
}

// conn is one WebSocket connection.
//
// Concurrency: the reader goroutine (the HTTP handler) reads frames and
// handles requests; a writer goroutine is the only one that writes data
// frames; control frames (ping, close) are written by anyone, which
// gorilla allows. The fan-out never blocks on a conn: enqueue appends to a
// bounded queue or closes the conn as a slow consumer.
type conn struct {
	s        *Server
	ws       *websocket.Conn
	id       string
	user     string
	allow    func(channel string) bool // nil: any channel
	exp      time.Time                 // token expiry; zero: none
	openedAt time.Time

	lastData  atomic.Int64 // unix nanos of the last data frame either way
	lastPing  atomic.Int64
	framesIn  atomic.Int64
	framesOut atomic.Int64

	mu      sync.Mutex
	queue   []queued
	spare   []queued
	closing bool
	wake    chan struct{}
	done    chan struct{}

	closeOnce sync.Once
	closeCode int
	byServer  bool
	reason    string

	// Owned by the reader goroutine.
	subs      map[string]*chanState
	rec       registry.Record
	badFrames int
	rate      rateWindow
}

func (c *conn) enqueue(q queued) {
	c.mu.Lock()
	if c.closing {
		c.mu.Unlock()
		return
	}
	if len(c.queue) >= c.s.cfg.SendQueue {
		c.mu.Unlock()
		c.s.metrics.slowConsumers.Inc()
		go c.closeWith(protocol.CloseSlowConsumer, "slow consumer: resume from your last id", true)
		return
	}
	c.queue = append(c.queue, q)
	c.mu.Unlock()
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// enqueueWait is enqueue for replays: it waits for room instead of
// closing, because the reader goroutine producing the replay can wait.
func (c *conn) enqueueWait(ctx context.Context, q queued) bool {
	for {
		c.mu.Lock()
		if c.closing {
			c.mu.Unlock()
			return false
		}
		if len(c.queue) < c.s.cfg.SendQueue/2 {
			c.mu.Unlock()
			c.enqueue(q)
			return true
		}
		c.mu.Unlock()
		select {
		case <-ctx.Done():
			return false
		case <-c.done:
			return false
		case <-time.After(5 * time.Millisecond):
		}
	}
}

func (c *conn) reply(r *protocol.Reply) queued {
	pm, _ := websocket.NewPreparedMessage(websocket.TextMessage, r.Encode())
	return queued{pm: pm}
}

func (c *conn) sendReply(r *protocol.Reply) { c.enqueue(c.reply(r)) }

func (c *conn) sendError(code, msg string, ref json.RawMessage) {
	c.sendReply(&protocol.Reply{Type: protocol.TypeError, Code: code, Message: msg, Ref: ref})
}

// writeLoop writes queued frames until the conn closes.
func (c *conn) writeLoop() {
	for {
		select {
		case <-c.done:
			return
		case <-c.wake:
		}
		for {
			c.mu.Lock()
			batch := c.queue
			c.queue = c.spare[:0]
			c.spare = nil
			c.mu.Unlock()
			if len(batch) == 0 {
				c.mu.Lock()
				c.spare = batch
				c.mu.Unlock()
				break
			}
			now := time.Now()
			_ = c.ws.SetWriteDeadline(now.Add(c.s.cfg.WriteTimeout))
			for i := range batch {
				if err := c.ws.WritePreparedMessage(batch[i].pm); err != nil {
					c.closeWith(1006, "write failed", true)
					return
				}
				if batch[i].ts > 0 {
					c.s.metrics.observeDelivery(now, batch[i].ts)
				}
			}
			c.framesOut.Add(int64(len(batch)))
			c.lastData.Store(time.Now().UnixNano())
			clear(batch)
			c.mu.Lock()
			if c.spare == nil {
				c.spare = batch[:0]
			}
			c.mu.Unlock()
		}
	}
}

// closeWith closes the connection once, recording who closed it and why.
// The close frame is sent with a short deadline; the reader then ends.
func (c *conn) closeWith(code int, reason string, byServer bool) {
	c.closeOnce.Do(func() {
		c.mu.Lock()
		c.closing = true
		c.closeCode, c.byServer, c.reason = code, byServer, reason
		c.mu.Unlock()
		if byServer && code != 1006 {
			msg := websocket.FormatCloseMessage(code, reason)
			_ = c.ws.WriteControl(websocket.CloseMessage, msg, time.Now().Add(time.Second))
		}
		// Let the reader see the client's close reply, or give up soon.
		_ = c.ws.SetReadDeadline(time.Now().Add(time.Second))
		if code == 1006 {
			_ = c.ws.NetConn().Close()
		}
	})
}

// readLoop handles client frames until the connection ends.
func (c *conn) readLoop(ctx context.Context) {
	pongWait := 2 * c.s.cfg.PingInterval
	c.ws.SetReadLimit(c.s.cfg.MaxFrameBytes)
	_ = c.ws.SetReadDeadline(time.Now().Add(pongWait))
	c.ws.SetPongHandler(func(string) error {
		return c.ws.SetReadDeadline(time.Now().Add(pongWait))
	})
	c.ws.SetCloseHandler(func(code int, text string) error {
		c.closeWith(code, "client closed", false)
		msg := websocket.FormatCloseMessage(code, "")
		_ = c.ws.WriteControl(websocket.CloseMessage, msg, time.Now().Add(time.Second))
		return nil
	})
	for {
		mt, data, err := c.ws.ReadMessage()
		if err != nil {
			c.noteReadError(err)
			return
		}
		_ = c.ws.SetReadDeadline(time.Now().Add(pongWait))
		c.framesIn.Add(1)
		c.lastData.Store(time.Now().UnixNano())
		if !c.rate.allow(time.Now(), c.s.cfg.MaxFramesPerSecond) {
			c.sendError(protocol.CodeRateLimited, "too many frames per second", nil)
			if c.abuse() {
				return
			}
			continue
		}
		if mt != websocket.TextMessage {
			c.sendError(protocol.CodeBinaryFrame, "only text frames holding one JSON object are accepted", nil)
			if c.abuse() {
				return
			}
			continue
		}
		req, err := protocol.Decode(data)
		if err != nil {
			var ef *protocol.ErrFrame
			errors.As(err, &ef)
			c.sendError(ef.Code, ef.Message, req.Ref)
			if c.abuse() {
				return
			}
			continue
		}
		c.handle(ctx, &req)
	}
}

// abuse counts a bad frame; ten in a row close the connection (1008).
func (c *conn) abuse() bool {
	c.badFrames++
	if c.badFrames >= 10 {
		c.closeWith(protocol.ClosePolicy, "too many invalid frames", true)
		return true
	}
	return false
}

func (c *conn) noteReadError(err error) {
	var ce *websocket.CloseError
	var ne net.Error
	switch {
	case errors.As(err, &ce) && ce.Code == websocket.CloseAbnormalClosure:
		c.closeWith(1006, "connection lost", false)
	case errors.As(err, &ce):
		c.closeWith(ce.Code, "client closed", false)
	case errors.Is(err, websocket.ErrReadLimit):
		c.closeWith(protocol.CloseTooBig, "frame too large", true)
	case errors.As(err, &ne) && ne.Timeout():
		c.closeWith(1006, "missed pong", true)
	default:
		c.closeWith(1006, "connection lost", false)
	}
}

func (c *conn) handle(ctx context.Context, req *protocol.Request) {
	switch req.Type {
	case protocol.TypePing:
		c.badFrames = 0
		c.sendReply(&protocol.Reply{Type: protocol.TypePong, Ref: req.Ref})
	case protocol.TypeSubscribe:
		var after *stream.ID
		if req.After != nil {
			id, ok := stream.ParseID(*req.After)
			if !ok {
				c.sendError(protocol.CodeInvalidAfter, `"after" must be a message id such as 1700000000000-0`, req.Ref)
				c.abuse()
				return
			}
			after = &id
		}
		if c.subscribe(ctx, req.Channel, after, req.Ref) {
			c.badFrames = 0
		}
	case protocol.TypeUnsubscribe:
		if c.unsubscribe(ctx, req.Channel, req.Ref) {
			c.badFrames = 0
		}
	case protocol.TypeRefresh:
		c.refresh(req)
	}
}

// subscribe makes channel live for c, replaying from after when given.
func (c *conn) subscribe(ctx context.Context, ch string, after *stream.ID, ref json.RawMessage) bool {
	if !channel.ValidName(ch) {
		c.sendError(protocol.CodeInvalidChannel, "channel must match ^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$", ref)
		c.abuse()
		return false
	}
	if _, ok := c.subs[ch]; ok {
		c.sendError(protocol.CodeAlreadySubscribed, "already subscribed to "+ch, ref)
		return false
	}
	if c.allow != nil && !c.allow(ch) {
		c.sendError(protocol.CodeForbidden, "not allowed to subscribe to "+ch, ref)
		return false
	}
	if len(c.subs) >= c.s.cfg.MaxSubscriptions {
		c.sendError(protocol.CodeTooManySubs, "subscription limit reached", ref)
		return false
	}
	cs, err := c.s.hub.acquire(ctx, ch)
	if err != nil {
		c.sendError(protocol.CodeUnavailable, "cannot subscribe now (Redis unavailable); retry", ref)
		return false
	}
	c.subs[ch] = cs
	c.mu.Lock()
	c.rec.Channels = append(c.rec.Channels, ch)
	c.mu.Unlock()
	rctx, cancel := context.WithTimeout(ctx, c.s.cfg.Redis.Timeout)
	if err := c.s.reg.Put(rctx, c.recordCopy()); err != nil {
		c.s.log.Warn("registry update", "conn", c.id, "err", err.Error())
	}
	cancel()
	c.s.metrics.subscriptions.Inc()
	if after == nil {
		cs.subscribeLive(c, c.reply(&protocol.Reply{Type: protocol.TypeSubscribed, Channel: ch, Ref: ref}))
		return true
	}
	return c.resume(ctx, cs, *after, ref)
}

// resume replays the channel after `after` and then goes live, with no gap
// and no duplicate at the seam: live messages are buffered from before the
// first stream read, and merged by id after the last.
func (c *conn) resume(ctx context.Context, cs *chanState, after stream.ID, ref json.RawMessage) bool {
	r := cs.startResume(c)
	entries, recovered, err := c.s.hub.store.Resume(ctx, cs.stream, after, replayBatch)
	if err != nil {
		cs.remove(c)
		c.dropSub(ctx, cs.name)
		c.sendError(protocol.CodeUnavailable, "cannot read history now (Redis unavailable); retry", ref)
		return false
	}
	rec := recovered
	c.enqueue(c.reply(&protocol.Reply{Type: protocol.TypeSubscribed, Channel: cs.name, Recovered: &rec, Ref: ref}))
	last := after
	for {
		for i := range entries {
			id := stream.MustParseID(entries[i].ID)
			pm, _ := websocket.NewPreparedMessage(websocket.TextMessage, entries[i].Frame())
			if !c.enqueueWait(ctx, queued{pm: pm, id: id}) {
				cs.remove(c)
				return false
			}
			last = id
		}
		if len(entries) < replayBatch {
			break
		}
		entries, err = c.s.hub.store.After(ctx, cs.stream, last, replayBatch)
		if err != nil {
			cs.remove(c)
			c.closeWith(protocol.CloseInternal, "history read failed: resume again", true)
			return false
		}
	}
	if !cs.finishResume(c, r, last) {
		c.closeWith(protocol.CloseSlowConsumer, "slow consumer: resume from your last id", true)
		return false
	}
	return true
}

func (c *conn) unsubscribe(ctx context.Context, ch string, ref json.RawMessage) bool {
	if !channel.ValidName(ch) {
		c.sendError(protocol.CodeInvalidChannel, "channel must match ^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$", ref)
		c.abuse()
		return false
	}
	cs, ok := c.subs[ch]
	if !ok {
		c.sendError(protocol.CodeNotSubscribed, "not subscribed to "+ch, ref)
		return false
	}
	cs.remove(c)
	c.dropSub(ctx, ch)
	c.sendReply(&protocol.Reply{Type: protocol.TypeUnsubscribed, Channel: ch, Ref: ref})
	return true
}

// dropSub forgets a subscription locally and in the registry.
func (c *conn) dropSub(ctx context.Context, ch string) {
	cs := c.subs[ch]
	delete(c.subs, ch)
	if cs != nil {
		c.s.hub.release(cs)
		c.s.metrics.subscriptions.Dec()
	}
	c.mu.Lock()
	chans := make([]string, 0, len(c.rec.Channels))
	for _, x := range c.rec.Channels {
		if x != ch {
			chans = append(chans, x)
		}
	}
	c.rec.Channels = chans
	c.mu.Unlock()
	rctx, cancel := context.WithTimeout(ctx, c.s.cfg.Redis.Timeout)
	defer cancel()
	if err := c.s.reg.LeaveChannel(rctx, c.recordCopy(), ch); err != nil {
		c.s.log.Warn("registry update", "conn", c.id, "err", err.Error())
	}
}

// recordCopy is a copy of the registry record safe to hand to another
// goroutine.
func (c *conn) recordCopy() *registry.Record {
	c.mu.Lock()
	defer c.mu.Unlock()
	r := c.rec
	r.Channels = append([]string(nil), c.rec.Channels...)
	return &r
}

// rateWindow counts frames in the current one-second window.
type rateWindow struct {
	start time.Time
	n     int
}

func (w *rateWindow) allow(now time.Time, limit int) bool {
	if limit <= 0 {
		return true
	}
	if now.Sub(w.start) >= time.Second {
		w.start, w.n = now, 0
	}
	w.n++
	return w.n <= limit
}

// expired reports whether the connection's token has expired.
func (c *conn) expired(now time.Time) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return !c.exp.IsZero() && now.After(c.exp)
}

// refresh handles a "refresh" frame (a fresh token); without token auth
// there is nothing to refresh.
func (c *conn) refresh(req *protocol.Request) {
	c.sendError(protocol.CodeInvalidToken, "this server does not use tokens", req.Ref)
}
