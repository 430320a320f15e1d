package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/gorilla/websocket"

	"github.com/wsrelay/wsrelay/shared/channel"
	"github.com/wsrelay/wsrelay/shared/protocol"
	"github.com/wsrelay/wsrelay/shared/query"
	"github.com/wsrelay/wsrelay/shared/registry"
)

// refuseUpgrade answers an upgrade request with an HTTP error, and counts
// it (wsrelay_egress_upgrades_refused_total).
func (s *Server) refuseUpgrade(w http.ResponseWriter, status int, code, msg string) {
	s.metrics.refused(code)
	writeHTTPError(w, status, code, msg)
}

// handleWS upgrades GET /ws and runs the connection to its end.
func (s *Server) handleWS(w http.ResponseWriter, r *http.Request) {
	if s.draining.Load() {
		w.Header().Set("Retry-After", "1")
		s.refuseUpgrade(w, http.StatusServiceUnavailable, "draining", "instance is shutting down; connect again")
		return
	}
	id, aerr := s.authenticate(r)
	if aerr != nil {
		if aerr.status == http.StatusUnauthorized {
			// RFC 9110 §11.6.1: a 401 names the scheme it wants; RFC
			// 6750 §3.1: a token sent and refused (expired too) adds
			// error="invalid_token", as the ingress's 401s do.
			challenge := `Bearer realm="wsrelay"`
			if aerr.code == protocol.CodeInvalidToken || aerr.code == "token_expired" {
				challenge += `, error="invalid_token"`
			}
			w.Header().Set("WWW-Authenticate", challenge)
		}
		s.refuseUpgrade(w, aerr.status, aerr.code, aerr.msg)
		return
	}
	// Repeated channels parameters (?channels=a&channels=b,c, as
	// URLSearchParams.append writes a list) are one list, as if
	// comma-joined, and checked as one.
	var initial []string
	if query.Malformed(r.URL.RawQuery, "channels") {
		s.refuseUpgrade(w, http.StatusBadRequest, protocol.CodeInvalidChannel, "channels is malformed (a ';', a bad %-escape, or one of more than 10000 parameters)")
		return
	}
	if q := strings.Join(r.URL.Query()["channels"], ","); q != "" {
		// A list longer than a connection may hold asks for what it
		// cannot have: refused whole, as a subscribe over the limit is
		// answered, rather than answered name by name at
		// MAX_FRAMES_PER_SECOND, which for a URL of half a million
		// names held the request, and the list's copies (some 20 MB),
		// for hours.
		if n := strings.Count(q, ",") + 1; n > s.cfg.MaxSubscriptions {
			s.refuseUpgrade(w, http.StatusBadRequest, protocol.CodeTooManySubs,
				fmt.Sprintf("channels: %d names; a connection holds at most %d subscriptions", n, s.cfg.MaxSubscriptions))
			return
		}
		for _, ch := range strings.Split(q, ",") {
			if !channel.ValidName(ch) {
				s.refuseUpgrade(w, http.StatusBadRequest, protocol.CodeInvalidChannel, "channels: "+strconv.Quote(ch)+" is not a channel name")
				return
			}
			initial = append(initial, ch)
		}
	}
	if n := s.open.Add(1); s.cfg.MaxConnections > 0 && n > int64(s.cfg.MaxConnections) {
		s.open.Add(-1)
		w.Header().Set("Retry-After", "1")
		s.refuseUpgrade(w, http.StatusServiceUnavailable, "too_many_connections", "instance is full; connect again (another instance may take you)")
		return
	}
	// An upgrade request has no body: its client sends nothing more until
	// the server's answer (RFC 6455 §4.1). Upgraded, a body that came
	// with the head (gorilla finds its bytes buffered as it takes the
	// socket over) had the connection closed without an answer, and one
	// that came later (after Expect: 100-continue's wait) was read as
	// WebSocket frames. Refused here, net/http deals with the body.
	if r.ContentLength != 0 {
		s.open.Add(-1)
		w.Header().Set("Sec-WebSocket-Version", "13") // as the upgrader's refusals say (NewServer)
		s.refuseUpgrade(w, http.StatusBadRequest, "bad_handshake", "an upgrade request has no body (a Content-Length other than 0, or Transfer-Encoding)")
		return
	}
	ws, err := s.upgrader.Upgrade(w, r, id.responseHeader())
	if err != nil {
		s.open.Add(-1)
		return // the upgrader has answered
	}
	c := s.newConn(ws, id)
	// The connection is set up here, then read in a goroutine of its own
	// and this handler returns, so net/http's per-request state (request,
	// response writer and their buffers) is freed instead of living as
	// long as the socket, and the long-lived reader starts with a small
	// stack that the set-up's deep calls did not grow.
	// Add to the WaitGroup under drainMu, so that it never races with
	// drain's Wait: a socket upgraded once draining has begun is closed
	// at once (1001) instead.
	s.drainMu.Lock()
	if s.draining.Load() {
		s.drainMu.Unlock()
		s.open.Add(-1)
		c.refuse(protocol.CloseGoingAway, "server shutting down: reconnect", nil)
		return
	}
	s.wg.Add(1)
	s.drainMu.Unlock()
	// The connection's requests run on the reader's side, one at a time,
	// and are over when it ends: nothing is left to cancel then, so they
	// share a plain background context (a cancelable one would keep a
	// map of its children, per socket, for nothing).
	ctx := context.Background()
	if !s.openConn(ctx, c, initial) {
		s.open.Add(-1)
		s.wg.Done()
		return
	}
	go c.serve(ctx)
}

// newConn is the connection of a socket just upgraded, not yet set up:
// its writes are held (c.writing) until openConn has registered it.
func (s *Server) newConn(ws *websocket.Conn, id *identity) *conn {
	now := time.Now()
	c := &conn{
		s:        s,
		nc:       ws.NetConn(),
		id:       randomID(12),
		user:     id.user,
		allow:    id.allow,
		exp:      id.exp,
		openedAt: now,
		lifetime: lifetimeOf(s.cfg.MaxLifetime, sweepEvery(s.cfg)),
		done:     make(chan struct{}),
		subs:     make(map[string]*chanState),
		writing:  true, // held until the connection is registered
	}
	c.fr.init(ws.NetConn(), s.cfg.MaxFrameBytes)
	c.lastData.Store(mono(now))
	c.lastRead.Store(mono(now))
	c.lastPing.Store(mono(now))
	// Until openConn lets the welcome go (once the connection is
	// registered, which may wait for Redis), the sweep counts the
	// connection as being written to: neither idle nor silent, nor due
	// a ping it could not answer (the ping would wait behind the
	// welcome). Without it a registration longer than 2×PING_INTERVAL
	// dropped the client as "missed pong" before its welcome.
	c.writeSince.Store(now.UnixNano())
	c.rec = registry.Record{ID: c.id, User: c.user, Instance: s.instance, Channels: []string{}, ConnectedAt: now.UTC().Truncate(time.Millisecond)}
	return c
}

// lifetimeOf is how long a connection may live under a MAX_LIFETIME of
// limit, with the sweep that closes it running every tick (sweepEvery,
// at most limit/20): from nine tenths of limit to limit less a tick,
// drawn per connection (870 s → 783–869 s). Clients that connected
// together (after a deploy, an outage, a network blip) would otherwise
// all be closed together every limit, and reconnect in a burst each
// time: on SCF, a burst of new instances and cold starts. The sweep
// closes the connection at its first tick past this, so never more than
// limit after it opened, which keeps the close ahead of the platform's
// cut.
func lifetimeOf(limit, tick time.Duration) time.Duration {
	if limit <= 0 {
		return 0
	}
	return limit - tick - rand.N(limit/10-tick+1)
}

// openConn registers the connection, says welcome and makes its initial
// subscriptions. On failure it closes the socket and returns false.
func (s *Server) openConn(ctx context.Context, c *conn, initial []string) bool {
	// A targeted send made right after "welcome" must arrive, so the
	// instance's inbox must be live first. On a freshly started instance
	// (SCF starts one per connection) the first socket can get here
	// before the inbox subscription is confirmed.
	select {
	case <-s.hub.inbox.ready:
	case <-time.After(5 * time.Second):
		c.refuse(protocol.CloseTryAgainLater, "registry unavailable: retry", errUnavailable)
		return false
	}
	// The hub sees the connection before the registry does, so that a
	// send that found its record always finds the connection here. The
	// welcome goes ahead of everything the writer sends (c.ctrl), so that
	// it is the first frame even when a message to the user or to the
	// connection is being delivered at this moment, or an operator's
	// disconnect (a server close drops the queue, not c.ctrl), and
	// nothing is written until the record is in: c.writing, set above,
	// holds the writer back.
	user := c.user
	// idle_timeout_ms rounds a part of a ms up: clients wait longer than
	// it before they ping, which a value rounded down would not ensure.
	idleMs := (s.cfg.IdleTimeout + time.Millisecond - 1).Milliseconds()
	welcome := &protocol.Reply{Type: protocol.TypeWelcome, ConnectionID: c.id, User: &user, Instance: s.instance,
		MaxFrameBytes: s.cfg.MaxFrameBytes, IdleTimeoutMs: idleMs}
	c.mu.Lock()
	c.ctrl = append(c.ctrl, c.reply(welcome).frame)
	c.mu.Unlock()
	s.hub.addConn(c)
	var err error
	c.regMu.Lock()
	if !c.closeStarted.Load() { // closed already (a drain): no record to write, and none for unlist to remove
		// REDIS_TIMEOUT to wait for a pipeline, which has one of its own.
		rctx, rcancel := context.WithTimeout(ctx, s.cfg.Redis.Timeout)
		err = s.regPut.Put(rctx, c.recordCopy())
		rcancel()
		at := s.clock()
		c.regTry.Store(at)
		c.regStalled.Store(s.stallAt(at))
		s.regDone(err, "put", c.id)
		c.listed.Store(err == nil)
	}
	c.regMu.Unlock()
	if err != nil {
		// Nothing was written to the socket: take the connection back.
		// Closing done makes a registry refresh that saw it remove its
		// record again, and the record is removed here too, in case the
		// write that timed out was made; not when it never left (a
		// storm's queue for the pipelines, where the removal would be
		// one more round trip for nothing).
		s.hub.removeConn(c)
		close(c.done)
		c.refuse(protocol.CloseTryAgainLater, "registry unavailable: retry", err)
		if !errors.Is(err, registry.ErrNotWritten) {
			rctx, rcancel := context.WithTimeout(context.Background(), s.cfg.Redis.Timeout)
			_ = s.reg.Remove(rctx, c.recordCopy())
			rcancel()
		}
		return false
	}
	c.framesOut.Add(1) // the welcome, sent now
	// The welcome is the connection's first data frame: IDLE_TIMEOUT
	// counts from it (docs/protocol.md), and the client's silence from
	// here too, as after a write (conn.write). From newConn's time, a
	// registration that waited on Redis was counted as idle time, and
	// the client was closed 4000 that much less than IDLE_TIMEOUT after
	// its welcome.
	mnow := monoNow()
	c.lastData.Store(mnow)
	c.lastRead.Store(mnow)
	c.writeSince.Store(0)
	c.mu.Lock()
	c.writing = false
	if len(c.queue) > 0 || len(c.ctrl) > 0 || c.closeMsg != nil {
		c.startWriterLocked()
	}
	c.mu.Unlock()
	s.metrics.connections.Inc()
	if s.draining.Load() {
		// Draining began after this socket was accepted and before drain
		// could see it: close it like the others, without subscribing
		// its channels (round trips for a socket already going, and up
		// to 5 s each with Redis down, which the drain does not wait for).
		c.closeWith(protocol.CloseGoingAway, "server shutting down: reconnect and resume", true)
		return true
	}

	// Each name is a subscribe, answered by a frame: it counts against
	// MAX_FRAMES_PER_SECOND as a frame's subscribes do (a URL holds up to
	// 1 MiB of names), and waits for room in the queue, or a list longer
	// than SEND_QUEUE would overflow it (4002) however fast the client
	// reads. The reader has not started (c.frames is still this
	// goroutine's), and the client counts as busy meanwhile, as while
	// the reader holds a frame's requests (handling).
	c.handling.Store(true)
	defer c.doneHandling()
	for _, ch := range initial {
		// Stop once the socket is closing (4002, an operator's
		// disconnect): the names left would cost Redis round trips, and
		// replies, for a socket that has ended, as the rest of a frame's
		// requests do not (onFrame). throttle and waitRoom say so.
		if !c.throttle() || !c.waitRoom(ctx) {
			break
		}
		c.subscribe(ctx, ch, nil, nil)
	}
	return true
}

// refuse closes a connection just upgraded, before it was set up
// (draining, or the registry unavailable: err), the way every connection
// ends (hangUp): its close frame is the only frame it is sent, and its
// end is logged and counted as any other's, a warning when err is set
// (SCF counts it as an invocation the server closed, 439).
func (c *conn) refuse(code int, reason string, err error) {
	c.closeWith(code, reason, true) // no writer starts: c.writing holds it
	c.unlisting.Wait()              // nothing to remove: not listed
	c.mu.Lock()
	c.ctrl = nil // the welcome, not sent
	c.mu.Unlock()
	c.finishWrites()
	c.hangUp(err)
}

// serve reads the connection to its end, then forgets it everywhere. It
// is the reader goroutine's first frame, kept small (the clean-up is a call
// of its own) because it is on the stack for the connection's whole life.
func (c *conn) serve(ctx context.Context) {
	c.readLoop(ctx)
	c.finish()
}

// finish forgets an ended connection everywhere.
func (c *conn) finish() {
	s := c.s
	defer s.wg.Done()
	defer s.open.Add(-1)
	// The writer sends what close frame it owes (bounded by its write
	// deadline) first.
	close(c.done)
	c.finishWrites()
	s.hub.removeConn(c)
	for ch := range c.subs {
		c.subs[ch].remove(c)
		s.hub.release(c.subs[ch])
		s.metrics.subscriptions.Dec()
	}
	// A server close removed the record as it began (unlist); the other
	// ends remove it now.
	c.unlisting.Wait()
	if !c.unlisted {
		dctx, dcancel := context.WithTimeout(context.Background(), s.cfg.Redis.Timeout)
		s.regDone(s.reg.Remove(dctx, c.recordCopy()), "remove", c.id)
		dcancel()
	}
	s.metrics.connections.Dec()
	c.hangUp(nil)
}

// hangUp ends the socket once its close frame is out (finishWrites), and
// logs and counts the connection's end (err, if any, makes it a warning).
// Every connection ends here, refused ones included.
func (c *conn) hangUp(err error) {
	c.linger()
	c.nc.Close()
	c.logEnd(err)
}

// linger ends the server's side of the socket without losing what is
// still on its way to the client. A socket closed with the client's bytes
// unread (the rest of a message over MAX_FRAME_BYTES, frames after a
// broken one or after the client's close) is reset by the kernel, which
// throws away what it has not sent yet: the close frame, and the replies
// owed ahead of it (docs/protocol.md), which the client would never
// see, reading a lost connection instead. So the server shuts its
// sending side (the client reads the end of the stream after the close
// frame) and reads and drops what the client sends until the client ends
// its side too, or the read deadline set with the close (a second) has
// passed: a peer already gone, or silent, ends it at once.
//
// Unless the client is still taking what was sent ahead of the close
// frame: a slow consumer closed 4002 may have megabytes in the socket's
// send buffer, which it reads for seconds, answering pings as it goes;
// a socket closed under it would answer its next frame with a reset and
// drop the rest, close frame included. So while the send queue still
// holds bytes (Linux; elsewhere the second is all) and it went down
// within WRITE_TIMEOUT (a peer that takes no data for that long is
// dropped, as a write to it would be), the wait goes on a second at a
// time, and for one more second after it has emptied, for the client to
// read its last bytes. Not while the server drains: its grace is for
// every socket's close; and for lingerMax at most: a client that takes a
// few bytes now and then keeps an ended socket no longer than that.
func (c *conn) linger() {
	tc, ok := c.nc.(interface{ CloseWrite() error })
	if !ok || tc.CloseWrite() != nil {
		return
	}
	var left int        // the bytes the send queue held at the last look
	var moved time.Time // when it last went down
	end := time.Now().Add(c.s.lingerMax)
	for {
		_, err := c.nc.Read(c.fr.buf)
		if err == nil {
			continue
		}
		var ne net.Error
		now := time.Now()
		if !errors.As(err, &ne) || !ne.Timeout() || c.s.draining.Load() || now.After(end) {
			return
		}
		// The shut-down's FIN takes one place in the queue until the
		// client acknowledges it, which a client with a full receive
		// buffer does not: only the bytes before it count.
		n := max(0, c.fr.unsent()-1)
		switch {
		case n > 0 && (moved.IsZero() || n < left):
			left, moved = n, now
		case n > 0 && now.Sub(moved) < c.s.cfg.WriteTimeout:
		case n == 0 && left > 0:
			left = 0 // emptied within the last second: one more to read it
		default:
			return
		}
		_ = c.nc.SetReadDeadline(now.Add(time.Second))
	}
}

// lingerMax is the longest a socket's close waits for a client still
// taking what went ahead of its close frame (linger): 4 MiB, the most a
// Linux send buffer grows to, at 70 KB/s.
const lingerMax = time.Minute

// scfStatus maps a close to the status SCF reports for the invocation.
// SCF's own 455 (idle) and 433 (lifetime) are for its own cuts, which the
// egress sees as a lost connection (456); IDLE_TIMEOUT and MAX_LIFETIME
// close first, with 4000 and 4001, which SCF reports as any other close
// the server started (439). timeoutClose counts those apart.
func scfStatus(code int, byServer bool) int {
	switch {
	case code == 1000 || code == 1010 || code == 1011:
		return 200
	case byServer:
		return 439
	}
	return 456
}

// timeoutClose names the egress's own timeout closes ("idle", "lifetime"),
// for their metric; "" for any other close.
func timeoutClose(code int, byServer bool) string {
	switch {
	case !byServer:
		return ""
	case code == protocol.CloseIdleTimeout:
		return "idle"
	case code == protocol.CloseLifetime:
		return "lifetime"
	}
	return ""
}

func (c *conn) logEnd(err error) {
	c.mu.Lock()
	code, byServer, reason := c.closeCode, c.byServer, c.reason
	c.mu.Unlock()
	if code == 0 {
		code, reason = 1006, "connection lost"
	}
	by := "client"
	if byServer {
		by = "server"
	}
	status := scfStatus(code, byServer)
	c.s.metrics.closed(status, timeoutClose(code, byServer))
	if byServer && code == protocol.CloseSlowConsumer {
		// Counted from the close, once, whichever queue overflowed: the
		// live one (enqueue) or a resume's buffer of live messages
		// (finishResume).
		c.s.metrics.slowConsumers.Inc()
	}
	attrs := []any{
		"conn", c.id,
		"user", c.user,
		"duration_ms", time.Since(c.openedAt).Milliseconds(),
		"frames_in", c.framesIn.Load(),
		"frames_out", c.framesOut.Load(),
		"close_code", code,
		"closed_by", by,
		"reason", reason,
		"scf_status", status,
	}
	if err != nil {
		c.s.log.Warn("connection closed", append(attrs, "err", err.Error())...)
		return
	}
	c.s.log.Info("connection closed", attrs...)
}
