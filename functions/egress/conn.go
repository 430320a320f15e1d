package main

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/redis/go-redis/v9"
	"golang.org/x/time/rate"

	"github.com/wsrelay/wsrelay/shared/auth"
	"github.com/wsrelay/wsrelay/shared/channel"
	"github.com/wsrelay/wsrelay/shared/protocol"
	"github.com/wsrelay/wsrelay/shared/registry"
	"github.com/wsrelay/wsrelay/shared/stream"
)

// queued is one outgoing frame. A channel message is one queued value
// shared by all its subscribers' queues (an entry is one pointer, so a
// backlog of n messages costs a queue 8n bytes); replies have their own.
type queued struct {
	frame    []byte    // a complete frame (wsFrame), shared, never modified
	id       stream.ID // message id (zero for replies)
	ts       int64     // publish time, unix ms (zero for replies)
	targeted bool      // a message to a connection or a user: not history, so a dropped one is lost
	replay   bool      // a resume's replay, whose frame counts against replayBudget
	// A targeted message to a user is one queued value in the queue of
	// each of the user's connections here: holders is how many queues
	// (or writers' batches) hold it, and it is lost (undelivered) only
	// if none of them wrote it and one dropped it (letGo). Not a count
	// per queue: a message the user's other connection wrote went
	// somewhere, and one dropped by two connections is one message.
	holders       atomic.Int32
	sent, dropped atomic.Bool
}

// letGo records that one holder of targeted message q is done with it:
// it wrote q (written), dropped it unwritten (dropped: a close, an
// expired token), or neither (its write failed: the message may or may
// not have reached the client, and is not counted for that alone). It
// reports whether q is now lost: the last holder let go of it, none
// wrote it and one dropped it; the caller counts it undelivered.
func (q *queued) letGo(written, dropped bool) bool {
	if written {
		q.sent.Store(true)
	}
	if dropped {
		q.dropped.Store(true)
	}
	// At or below 0: one queued by hand, which no offer held (tests),
	// is its queue's alone.
	return q.holders.Add(-1) <= 0 && !q.sent.Load() && q.dropped.Load()
}

// lostOf lets go, as dropped, of the targeted messages of qs, and
// returns how many of them that left lost (letGo).
func lostOf(qs []*queued) int64 {
	var n int64
	for _, q := range qs {
		if q.targeted && q.letGo(false, true) {
			n++
		}
	}
	return n
}

// replayBudget bounds the bytes of replayed frames a connection holds
// queued or being written. A live message's frame is shared by every
// queue it is in, so a queue of SEND_QUEUE frames costs only pointers;
// a replay builds each connection's frames for it (unless replays share
// its read, history; the budget counts them as its own), and with 60 KB
// messages half a SEND_QUEUE of them was some 30 MB per connection that
// resumed from far back and did not read, held until WRITE_TIMEOUT. A
// frame larger than the budget is still sent, alone.
const replayBudget = 1 << 20

// conn is one WebSocket connection.
//
// Concurrency: the reader goroutine (serve) reads frames and handles
// requests; after the upgrade one writer at a time writes to the socket
// (c.writing): the writer goroutine (writeLoop), which is handed data
// frames, pongs and the close frame, or the maintenance sweep writing a
// ping while no writer runs (ping). The writer runs only while there is
// something to write: the first frame queued starts it and it ends when
// the queue is empty, so an idle connection costs one goroutine, not two.
// The fan-out never blocks on a conn: enqueue appends to a bounded queue
// or closes the conn as a slow consumer. (A catch-up waits a bounded
// time for room between messages: pacer.)
type conn struct {
	s        *Server
	nc       net.Conn // the socket; gorilla/websocket only did the handshake
	id       string
	user     string
	allow    func(channel string) bool // nil: any channel
	exp      time.Time                 // token expiry; zero: none
	openedAt time.Time
	lifetime time.Duration // MAX_LIFETIME less this connection's jitter; 0: none

	// lastData, lastPing and lastRead are times on the monotonic clock
	// (mono), not the wall clock's unix nanos: the sweep measures how long
	// a socket was idle or silent by them, and a wall clock stepped
	// forward (NTP after a VM's resume, a host whose clock was set after
	// the instance started) dropped every socket at the next sweep, as
	// idle or "missed pong", while one stepped back stopped the pings, and
	// the drop of dead peers, for as long as the step.
	lastData atomic.Int64 // the last data frame either way
	lastPing atomic.Int64
	lastRead atomic.Int64 // the last frame of any kind from the client
	// handling: the reader is carrying out a frame's requests (or the
	// URL's ?channels), which may wait on Redis for seconds; it reads
	// nothing meanwhile, the client's pongs included, so the sweep
	// counts the client as busy, not silent. lastRead is set when done.
	handling atomic.Bool
	// writeSince is the unix nanos at which the writer's write in
	// progress began, 0 when none is: the sweep counts a connection
	// being written to as neither idle nor silent (busyWrite).
	writeSince atomic.Int64
	framesIn   atomic.Int64 // data frames from the client, however many requests each holds (log line)
	framesOut  atomic.Int64 // data frames to the client, welcome included (log line)

	// regMu orders this connection's registry writes: a change of its
	// channels (the record updated and written under it) and the
	// refresh's copy and rewrite. Without it a refresh could copy the
	// record, a channel be left, and the refresh then write the left
	// channel's membership back, which nothing removed until it expired.
	regMu sync.Mutex
	// listed (set under regMu) is whether the connection's record was
	// written (openConn); a server close removes it at once (unlist),
	// not when the client has answered the close, and no registry write
	// puts it back once closeStarted is set.
	listed atomic.Bool
	// regTry is when the latest write of the record ended (openConn's, or
	// a refresh's, whether it succeeded or Redis failed it), on the
	// server's clock (Server.clock). Longer than REGISTRY_TTL ago, the
	// record has expired (a write is made before it ends) and no write
	// was even tried since: the instance did not run (frozen by its
	// platform, stopped, starved), and the connection was out of the
	// registry meanwhile (Server.closeLapsed). A write that hung until a
	// partition healed counts from its end, not its start.
	regTry     atomic.Int64
	regStalled atomic.Int64   // Server.stalled at regTry
	unlisting  sync.WaitGroup // the unlist a server close started
	unlisted   bool           // set by unlist before it is Done: the removal was made (or failed, and was logged)

	mu        sync.Mutex
	queue     []*queued
	spare     []*queued
	closing   bool
	replaying int      // bytes of replayed frames queued or in the writer's batch (replayBudget)
	unpaced   bool     // a catch-up gave up waiting for room: none waits for c again until the writer takes the queue (pacer)
	closeMsg  []byte   // close frame for the writer to send
	closeSent bool     // a close frame has been written
	ctrl      [][]byte // control frames for the writer to send first
	writing   bool     // a writer goroutine is running (or has ended the socket, or openConn holds writes until the connection is registered)
	ended     bool     // serve is finishing: no writer starts any more
	writers   sync.WaitGroup
	done      chan struct{} // closed when the reader has ended

	// writeDeadline (mono) is the socket's write deadline as the writer
	// last set it; only the writer of the moment uses it. The socket's
	// own runs on the monotonic clock: kept by the wall clock, a clock
	// stepped back had it still far off once it had passed, and the next
	// write failed at once (armWriteDeadline).
	writeDeadline int64

	// closeMu makes closeWith and lostOnWrite one after the other, and
	// closed says closeWith has closed the connection (once). A server
	// close that found no loss and then set its own read bound past
	// lostOnWrite's second kept a reader whose client had reset
	// WRITE_TIMEOUT longer, and logged the client's end as its own.
	closeMu sync.Mutex
	closed  bool
	// writeLost is set when a write found the peer gone (lostOnWrite):
	// the reader ends the connection, as the client's.
	writeLost atomic.Bool
	// closeStarted is set as closeWith or lostOnWrite starts: the sweep
	// then leaves the connection alone (no pings, and no close again per
	// tick for a cause that matches again while the close waits for the
	// client's reply).
	closeStarted atomic.Bool
	// pongOwed is set as the server pings: the client's first pong after
	// it is free, others cost a MAX_FRAMES_PER_SECOND token (readLoop).
	pongOwed  atomic.Bool
	closeCode int
	byServer  bool
	reason    string

	// Owned by the reader goroutine.
	fr        frameReader
	subs      map[string]*chanState
	rec       registry.Record
	badFrames int
	frames    *rate.Limiter // MAX_FRAMES_PER_SECOND, from the first request (a ?channels name included)
}

// enqueue queues q for the writer, or closes c as a slow consumer when
// its queue is full. It reports whether the queue is at least half full
// after it (never once c is closing), for a producer that paces itself
// by the queue (pacer).
func (c *conn) enqueue(q *queued) (backlogged bool) {
	_, backlogged = c.offer(q)
	return backlogged
}

// offer is enqueue, also reporting whether q was queued: not when c is
// closing (the server began its close: the queue is dropped) or q found
// its queue full.
func (c *conn) offer(q *queued) (queued, backlogged bool) {
	c.mu.Lock()
	if c.closing {
		c.mu.Unlock()
		return false, false
	}
	if len(c.queue) >= c.s.cfg.SendQueue {
		c.mu.Unlock()
		// closeWith does not block (the writer sends the close frame) and
		// marks the conn closing, so this happens once per connection;
		// logEnd counts it.
		c.closeWith(protocol.CloseSlowConsumer, "slow consumer: resume from your last id", true)
		return false, false
	}
	c.queue = append(c.queue, q)
	c.startWriterLocked()
	backlogged = !c.roomLocked()
	c.mu.Unlock()
	return true, backlogged
}

// roomLocked reports whether c's queue is less than half full, the room
// a producer that can wait waits for (waitRoom, pacer); c.mu is held.
func (c *conn) roomLocked() bool { return len(c.queue) < c.s.cfg.SendQueue/2 }

// backlogged reports whether c's queue is at least half full and c is
// not closing, nor given up on by a catch-up (giveUpPacing): what a
// catch-up waits on (pacer).
func (c *conn) backlogged() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return !c.closing && !c.unpaced && !c.roomLocked()
}

// giveUpPacing marks c as a connection a catch-up waited for in vain:
// catch-ups do not wait for it again until its writer takes its queue.
func (c *conn) giveUpPacing() {
	c.mu.Lock()
	c.unpaced = true
	c.mu.Unlock()
}

// startWriterLocked starts the writer unless one is running; c.mu is
// held. The writer empties the queue before it ends, so a frame queued
// while one runs needs nothing more.
func (c *conn) startWriterLocked() {
	if c.writing || c.ended {
		return
	}
	c.writing = true
	c.writers.Add(1)
	go c.writeLoop()
}

// vecs pools the writers' iovec slices: a writer exists only while it has
// frames to send, so the slice is not kept per connection.
var vecs = sync.Pool{New: func() any { v := make([][]byte, 0, 16); return &v }}

// enqueueWait is enqueue for replays: it waits for room instead of
// closing, because the reader goroutine producing the replay can wait,
// and for the replayed bytes c holds to leave room for q's frame under
// replayBudget (or to be none).
func (c *conn) enqueueWait(ctx context.Context, q *queued) bool {
	q.replay = true
	for !c.enqueueIfRoom(q) {
		if c.isClosing() || !c.pause(ctx) {
			return false
		}
	}
	return true
}

// enqueueIfRoom queues q if c's queue is less than half full (the room
// waitRoom waits for) and, for a replayed frame, if the replayed bytes c
// holds leave room for it under replayBudget (or are none), and reports
// whether it did; never once c is closing.
func (c *conn) enqueueIfRoom(q *queued) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closing || !c.roomLocked() {
		return false
	}
	if q.replay {
		if c.replaying > 0 && c.replaying+len(q.frame) > replayBudget {
			return false
		}
		c.replaying += len(q.frame)
	}
	c.queue = append(c.queue, q)
	c.startWriterLocked()
	return true
}

// waitRoom waits until c's queue is less than half full, for a producer
// that can wait; false once c is closing.
func (c *conn) waitRoom(ctx context.Context) bool {
	for {
		c.mu.Lock()
		closing, room := c.closing, c.roomLocked()
		c.mu.Unlock()
		if closing {
			return false
		}
		if room {
			return true
		}
		if !c.pause(ctx) {
			return false
		}
	}
}

// pause is a producer's wait for the writer to make room: 5 ms, or false
// if ctx ends or c's reader does. The producer is c's reader, handling a
// request (c.handling): it reads none of the client's frames meanwhile,
// its pongs among them, and the sweep counts the client as busy, not
// silent. A client that stopped reading is dropped by the write timeout
// instead, which ends the wait.
func (c *conn) pause(ctx context.Context) bool {
	select {
	case <-ctx.Done():
		return false
	case <-c.done:
		return false
	case <-time.After(5 * time.Millisecond):
		return true
	}
}

func (c *conn) reply(r *protocol.Reply) *queued {
	return &queued{frame: wsFrame(opText, r.Encode())}
}

func (c *conn) sendReply(r *protocol.Reply) { c.enqueue(c.reply(r)) }

func (c *conn) sendError(code, msg string, ref json.RawMessage) {
	c.sendReply(&protocol.Reply{Type: protocol.TypeError, Code: code, Message: msg, Ref: ref})
}

// writeLoop is the only goroutine that writes to the socket after the
// upgrade: data frames, pings, pongs and the close frame. It writes every
// frame queued since its last write with one writev, so a busy socket costs
// one system call per batch, not per message, and it ends when nothing is
// left. When the server closes the conn, the close frame follows the
// frames in flight, so it reaches even a client that was slow; what was
// still queued is dropped (the client resumes).
func (c *conn) writeLoop() {
	defer c.writers.Done()
	nc := c.nc
	vp := vecs.Get().(*[][]byte)
	vec := (*vp)[:0]
	defer func() {
		clear(vec)
		*vp = vec[:0]
		vecs.Put(vp)
	}()
	for {
		c.mu.Lock()
		if len(c.ctrl) == 0 && len(c.queue) == 0 && c.closeMsg == nil {
			c.writing = false
			c.shrinkLocked()
			c.mu.Unlock()
			return
		}
		// The clock is read once per batch, here, where c.exp (which
		// a refresh moves, under mu) is read with it.
		now := time.Now()
		closeMsg := c.closeMsg
		vec = append(vec[:0], c.ctrl...)
		clear(c.ctrl)
		c.ctrl = c.ctrl[:0]
		// What is queued goes first, the close frame after it: closeWith
		// has emptied the queue unless the close keeps it.
		batch := c.queue
		c.queue = c.spare[:0]
		c.spare = nil
		c.unpaced = false // it reads: catch-ups may wait for it again
		// c.expired's check, under the mu held here.
		expired := c.expiredLocked(now)
		c.mu.Unlock()
		replayed := 0
		if expired {
			// No message goes out once the token has expired, however
			// long ago it was queued: a process frozen past exp reads
			// what Redis held for it as it runs again, and the sweep
			// need not have closed the connection first. The replies
			// go (a refresh's refusal among them), and the 4004 close
			// follows them (closeTokenExpired drops what is still
			// queued), whatever the clock says by then.
			batch, replayed = c.dropMessages(batch)
			c.closeTokenExpired()
		}
		for i := range batch {
			vec = append(vec, batch[i].frame)
		}
		if closeMsg != nil {
			vec = append(vec, closeMsg)
		}
		var err error
		if len(vec) > 0 { // not when only messages were queued, and dropped
			err = c.write(nc, vec, batch, now)
		}
		if err != nil {
			// Not written, nor dropped: lost only if a holder dropped it.
			var lost int64
			for _, q := range batch {
				if q.targeted && q.letGo(false, false) {
					lost++
				}
			}
			if lost > 0 {
				c.s.hub.undelivered.Add(lost)
			}
		}
		clear(vec)
		if closeMsg != nil {
			// The socket is done with: c.writing stays true, so no
			// writer starts again.
			c.mu.Lock()
			c.closeMsg, c.closeSent = nil, true
			c.mu.Unlock()
			// Wait briefly for the client's close reply, then end.
			_ = c.nc.SetReadDeadline(time.Now().Add(time.Second))
			return
		}
		if err != nil {
			// The socket is dead, or a frame on it is cut off mid-way:
			// nothing more may go out on it, not even a close frame still
			// owed (a server close begun before this write), which the
			// peer would read as the cut frame's payload. What is
			// queued never goes either, and is dropped here: a close
			// the client's frames caused (keepsQueue) left it for this
			// writer, and no close drops it now (closeWith has run),
			// so its targeted messages were neither counted nor let
			// go of, and a message to the user that the user's other
			// connections dropped went uncounted (letGo).
			c.mu.Lock()
			c.closeMsg, c.closeSent = nil, true
			c.dropQueueLocked()
			c.mu.Unlock()
			// A write that timed out is the server dropping a peer that
			// stopped reading; any other failure is the peer having ended
			// the TCP connection (reset, or cut by the platform), which
			// the writer happened to notice before the reader: the
			// client's end, which the reader records (lostOnWrite).
			// c.writing stays true: the socket is dead to writes.
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				c.closeWith(1006, "write failed", true)
				// closeWith may have run already, for the close owed:
				// close the socket here too.
				_ = c.nc.Close()
			} else {
				c.lostOnWrite()
			}
			return
		}
		for _, q := range batch {
			if q.replay {
				replayed += len(q.frame)
			}
		}
		clear(batch)
		c.mu.Lock()
		c.replaying -= replayed
		if c.spare == nil {
			c.spare = batch[:0]
		}
		c.mu.Unlock()
	}
}

// dropMessages takes the messages, live or replayed, out of batch, for
// a connection whose token has expired (writeLoop), and returns what is
// left, the replies, and the bytes of the replayed frames it dropped
// (replayBudget). Targeted messages dropped are counted as undelivered,
// as closeWith counts those it drops. Only the writer calls it.
func (c *conn) dropMessages(batch []*queued) (replies []*queued, replayed int) {
	replies = batch[:0]
	var lost int64
	for _, q := range batch {
		switch {
		case q.id == (stream.ID{}):
			replies = append(replies, q)
		case q.replay:
			replayed += len(q.frame)
		case q.targeted && q.letGo(false, true):
			lost++
		}
	}
	clear(batch[len(replies):])
	if lost > 0 {
		c.s.hub.undelivered.Add(lost)
	}
	return replies, replayed
}

// keepQueue is the most room for frames an idle connection keeps in each
// of its queue and spare slices between writes (512 bytes), so that
// steady traffic, whose batches are smaller, does not allocate them again
// for each batch.
const keepQueue = 64

// shrinkLocked lets go of the queue's and spare's storage when a backlog
// (a replay, a burst the client fell behind on) grew it: up to 8 bytes a
// frame of SEND_QUEUE each, which an idle connection would otherwise keep
// for the rest of its life, as much again as the rest of it. The writer
// calls it as it ends, with the queue empty; c.mu is held.
func (c *conn) shrinkLocked() {
	if cap(c.queue) > keepQueue {
		c.queue = nil
	}
	if cap(c.spare) > keepQueue {
		c.spare = nil
	}
}

// write writes vec, which holds the data frames of batch, starting at
// now, and accounts for them once written. While it writes, the sweep
// counts the connection neither idle nor silent (writeSince): its frames
// are going out, however long a large batch takes a client that reads
// it steadily, and the server's ping waits behind them, so the client
// cannot answer it (a client that stops reading is dropped by
// WRITE_TIMEOUT instead). The time the write took does not count toward
// the client's silence either: the write's end moves its last read
// forward as much, and the ping sent next has a whole 2×PING_INTERVAL
// for its answer. Only the writer calls it.
func (c *conn) write(nc net.Conn, vec [][]byte, batch []*queued, now time.Time) error {
	c.writeSince.Store(now.UnixNano())
	err := c.writeAll(nc, net.Buffers(vec), now)
	start, took := mono(now), int64(time.Since(now))
	for {
		last := c.lastRead.Load()
		if last >= start || c.lastRead.CompareAndSwap(last, last+took) {
			break
		}
	}
	if err == nil {
		c.wrote(batch, now)
	}
	// Last, once lastRead and lastData say what the write did: the sweep
	// judges the connection by them from here on.
	c.writeSince.Store(0)
	return err
}

// busyWrite reports whether the writer is in the middle of a write.
func (c *conn) busyWrite() bool { return c.writeSince.Load() != 0 }

// wrote accounts for the data frames of batch, written from now on.
func (c *conn) wrote(batch []*queued, now time.Time) {
	if len(batch) == 0 {
		return
	}
	for i := range batch {
		if batch[i].id != (stream.ID{}) { // a message, live or replayed
			c.s.metrics.observeDelivery(now, batch[i].ts)
			if batch[i].targeted {
				batch[i].letGo(true, false)
			}
		}
	}
	c.framesOut.Add(int64(len(batch)))
	c.lastData.Store(monoNow())
}

// writeAll writes bufs whole. A write that times out having sent
// something goes on with a fresh deadline, so that only a socket that
// takes no data for WRITE_TIMEOUT is given up on (docs/protocol.md),
// however long a large batch (a replay's backlog) takes to go out to a
// reader that keeps reading. Once the server has closed the connection,
// it does not go on: a client taking a few bytes at a time would
// otherwise hold the socket open for as long as the batch lasts, past
// MAX_LIFETIME or an operator's disconnect. Only the writer calls it.
func (c *conn) writeAll(nc net.Conn, bufs net.Buffers, now time.Time) error {
	for {
		c.armWriteDeadline(now)
		n, err := bufs.WriteTo(nc) // consumes what it wrote, even on error
		var ne net.Error
		if err == nil || n == 0 || !errors.As(err, &ne) || !ne.Timeout() || c.isClosing() {
			return err
		}
		now = time.Now()
	}
}

// armWriteDeadline makes sure a write starting at now fails if the
// socket takes no data for between WRITE_TIMEOUT/2 and WRITE_TIMEOUT.
// Setting the deadline is a timer update in the runtime (5 % of the
// egress's CPU in a fan-out, once per write), so a busy socket re-arms it
// only when less than half the timeout is left. Only the writer calls it.
func (c *conn) armWriteDeadline(now time.Time) {
	t := c.s.cfg.WriteTimeout
	if c.writeDeadline-mono(now) >= int64(t/2) {
		return
	}
	c.writeDeadline = mono(now) + int64(t)
	_ = c.nc.SetWriteDeadline(now.Add(t))
}

// finishWrites is called once by serve after the reader has ended, or by
// refuse: it stops writers from starting, waits for a running one, and
// sends a close frame still owed (the echo of the client's close, a
// refusal's close).
func (c *conn) finishWrites() {
	c.mu.Lock()
	c.ended = true
	c.mu.Unlock()
	c.writers.Wait()
	c.mu.Lock()
	msg := c.closeMsg
	c.closeMsg = nil
	// What ctrl holds goes ahead of the close frame, as the writer would
	// send it: the rest of a ping the sweep began writing just as the
	// connection ended (pingWritten), without which the close frame
	// would be read as that ping's payload.
	out := append(net.Buffers(nil), c.ctrl...)
	c.ctrl = nil
	c.mu.Unlock()
	if msg != nil {
		nc := c.nc
		_ = nc.SetWriteDeadline(time.Now().Add(time.Second))
		out = append(out, msg)
		_, _ = out.WriteTo(nc)
		// As the writer does: wait briefly for the client's close reply.
		_ = nc.SetReadDeadline(time.Now().Add(time.Second))
	}
}

// pong queues the answer to a client's ping for the writer, ahead of
// queued data frames. A pong not yet sent is replaced by the new one
// (RFC 6455 §5.5.3 allows answering only the latest ping), so a client
// that pings without reading cannot grow the connection's memory: pings
// are not data frames, which MAX_FRAMES_PER_SECOND and SEND_QUEUE bound.
func (c *conn) pong(payload []byte) {
	frame := wsFrame(opPong, payload)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closing {
		return
	}
	// A pong is whole in ctrl (only a ping is ever left part-written at
	// its front, and that part never starts with a pong's first byte).
	for i := len(c.ctrl) - 1; i >= 0; i-- {
		if len(c.ctrl[i]) > 0 && c.ctrl[i][0] == frame[0] {
			c.ctrl[i] = frame
			return // a writer is already due to send it
		}
	}
	c.ctrl = append(c.ctrl, frame)
	c.startWriterLocked()
}

// ping sends a server ping. A socket with no writer running and nothing
// queued gets it from the caller (the maintenance sweep) with one
// non-blocking write, so keeping idle sockets alive starts no goroutines;
// otherwise, or for what did not fit, the writer sends it.
func (c *conn) ping() {
	c.mu.Lock()
	if c.closing {
		c.mu.Unlock()
		return
	}
	c.pongOwed.Store(true)
	if c.writing || c.ended || len(c.queue) > 0 || len(c.ctrl) > 0 {
		c.ctrl = append(c.ctrl, pingFrame)
		c.startWriterLocked()
		c.mu.Unlock()
		return
	}
	// The caller is the writer for this one write (counted in c.writers,
	// so that finishWrites waits for it too).
	c.writing = true
	c.writers.Add(1)
	c.mu.Unlock()
	c.pingWritten(c.fr.writeNow(pingFrame))
}

// pingWritten ends ping's own write, which put the first n bytes of
// pingFrame on the socket: the rest, if any, goes first, ahead of the
// close frame too; the writer sends it, or finishWrites when the
// connection ended meanwhile.
func (c *conn) pingWritten(n int) {
	c.mu.Lock()
	c.writing = false
	if n < len(pingFrame) && (n > 0 || !c.closing) {
		// The rest goes first: nothing else was written meanwhile. Half
		// a ping is finished even when closing: the close frame follows.
		c.ctrl = append([][]byte{pingFrame[n:]}, c.ctrl...)
	}
	if len(c.ctrl) > 0 || len(c.queue) > 0 || c.closeMsg != nil {
		c.startWriterLocked()
	}
	c.mu.Unlock()
	c.writers.Done()
}

// closeWith closes the connection once, recording who closed it and why.
// A server close (other than 1006, a dead peer) hands the close frame to
// the writer and drops the queue, but for the closes the client's own
// frames caused (keepsQueue); the reader ends when the client answers
// or after WriteTimeout plus a second. 1006 closes the socket at once.
// It never waits for the socket, so the fan-out, the sweep and the drain
// call it in their own goroutine, not in one started for it that nothing
// would wait for; the writer it starts is the connection's (finishWrites),
// and so is the registry removal a server close starts (unlist), which
// the reader's end waits for. Every way the reader ends goes through it
// first, so that removal is started, if at all, before finish waits.
func (c *conn) closeWith(code int, reason string, byServer bool) {
	c.closeMu.Lock()
	defer c.closeMu.Unlock()
	if c.closed || byServer && c.writeLost.Load() {
		// Closed already; or nothing can reach the client any more, and
		// the end is its own, which the reader records (lostOnWrite).
		return
	}
	c.closed = true
	c.closeStarted.Store(true)
	c.mu.Lock()
	c.closing = true
	c.closeCode, c.byServer, c.reason = code, byServer, reason
	if !byServer || !keepsQueue(code) {
		c.dropQueueLocked()
	}
	if byServer && code != 1006 {
		c.unlisting.Add(1)
		go c.unlist()
		c.closeMsg = wsFrame(opClose, closePayload(code, reason))
		// The bound on the whole close (what is queued and the close
		// frame written, then the client's answer awaited), set
		// while mu keeps the writer from taking the close frame:
		// once the frame is out the writer shortens it to a second,
		// and setting it after that would undo it and keep the
		// connection WRITE_TIMEOUT longer.
		_ = c.nc.SetReadDeadline(time.Now().Add(c.s.cfg.WriteTimeout + time.Second))
		c.startWriterLocked()
	}
	c.mu.Unlock()
	switch {
	case code == 1006:
		_ = c.nc.Close()
	case !byServer:
		_ = c.nc.SetReadDeadline(time.Now().Add(time.Second))
	}
}

// dropQueueLocked drops what is queued; c.mu is held. Targeted messages
// dropped here are lost (no resume brings them back): counted as
// undelivered, as those that reach a connection already closing are.
func (c *conn) dropQueueLocked() {
	if n := lostOf(c.queue); n > 0 {
		c.s.hub.undelivered.Add(n)
	}
	clear(c.queue)
	c.queue = nil
}

// lostOnWrite ends, as the client's, a connection whose write failed
// other than by timing out: the peer ended the TCP connection. What it
// sent before that is still to be read, and the reader ends the
// connection as if it had noticed first: with the code of the client's
// close frame when one came ahead of the loss, else as a lost
// connection (1006). A client that closed 1000 and then its socket
// while its reader was busy (a replay being written to it) was logged
// and counted as lost (SCF 456), not as the 1000 it sent (200). Until
// the reader ends it, nothing more is queued (closing), the sweep
// leaves it alone (closeStarted), no server close is begun (closeWith)
// and its reads end within a second; the writer, which calls it, has
// ended for good.
func (c *conn) lostOnWrite() {
	c.closeMu.Lock() // before or after a closeWith, not during it
	defer c.closeMu.Unlock()
	c.writeLost.Store(true)
	c.closeStarted.Store(true)
	c.mu.Lock()
	c.closing = true
	c.closeMsg, c.closeSent = nil, true
	c.dropQueueLocked()
	c.mu.Unlock()
	_ = c.nc.SetReadDeadline(time.Now().Add(time.Second))
}

// unlist removes the record of a connection the server is closing from
// the registry as the close begins: the client may take up to
// WRITE_TIMEOUT and a second to answer it, and a send the ingress routed
// here meanwhile would be answered 202 and go nowhere (a connection
// closing takes no message), where a send that finds no record is
// answered 404, or counts one connection fewer for a user. The reader's
// end (finish) waits for it instead of removing the record itself: a
// removal that failed is logged (registry write failed) and the record
// expires within REGISTRY_TTL, as when finish's removal fails, and
// trying again there would add a REDIS_TIMEOUT to a shutdown with Redis
// down. Registry writes under regMu skip a connection once closeStarted
// is set, so none puts the record back.
func (c *conn) unlist() {
	defer c.unlisting.Done()
	c.regMu.Lock() // after openConn's write, if it is under way
	defer c.regMu.Unlock()
	if !c.listed.Load() {
		return // never written (refused, or closed before openConn wrote it)
	}
	ctx, cancel := context.WithTimeout(context.Background(), c.s.cfg.Redis.Timeout)
	err := c.s.reg.Remove(ctx, c.recordCopy())
	cancel()
	c.s.regDone(err, "remove", c.id)
	c.unlisted = true
}

// keepsQueue reports whether a server close with code sends what is
// queued before its close frame: a close the client's own frames caused
// (1002, 1007, 1008, 1009) does, so that the replies to the requests it
// sent before, and the errors that led to a 1008, reach it
// (docs/protocol.md: each request gets its reply). The queue is finite:
// nothing is queued once the connection is closing. Other closes drop it
// (the client resumes what it missed; for a slow consumer, 4002, the
// queue is the problem).
func keepsQueue(code int) bool {
	switch code {
	case protocol.CloseProtocolError, protocol.CloseInvalidData, protocol.ClosePolicy, protocol.CloseTooBig:
		return true
	}
	return false
}

// isClosing reports whether closeWith has run.
func (c *conn) isClosing() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closing
}

// readLoop handles client frames until the connection ends.
// A peer that sends nothing, not even the pong to a ping, for
// 2×PING_INTERVAL is dropped by the maintenance sweep (lastRead), not by a
// read deadline: the reader's wait stays as shallow as it can be.
func (c *conn) readLoop(ctx context.Context) {
	for {
		op, p, err := c.fr.nextPaced(c.throttleFragment)
		if err != nil {
			c.noteReadError(err)
			return
		}
		c.lastRead.Store(monoNow())
		switch op {
		case opClose:
			c.onClientClose(p)
			return
		case opPing:
			// A ping costs a pong's write: counted as a request, or a
			// client could keep a core busy answering a flood of them.
			if c.throttle() {
				c.pong(p)
			}
			continue
		case opPong:
			// The answer to the server's ping is free (each idle socket
			// sends one, and a token bucket would cost it memory);
			// a pong nobody asked for costs a token, as a ping does.
			if !c.pongOwed.Swap(false) {
				c.throttle()
			}
			continue
		}
		if c.isClosing() {
			continue // drain until the client's close reply or the deadline
		}
		// The frame is handled on a short-lived goroutine while this one
		// waits: decoding and a subscribe's Redis round trips need a deep
		// stack, and a goroutine keeps a grown stack until a GC shrinks
		// it. The reader lives as long as the socket and, this way, keeps
		// the small stack its reads need (docs/benchmarks.md, S3).
		stop := make(chan bool, 1)
		go func() { stop <- c.onFrame(ctx, op, p) }()
		if <-stop {
			return
		}
	}
}

// onClientClose handles the client's close frame: the connection ends, and
// unless the server already sent its own close, the client's code is
// echoed (RFC 6455 §5.5.1) through the writer, the socket's only writer.
func (c *conn) onClientClose(p []byte) {
	code, _, err := parseClose(p)
	if err != nil {
		c.closeWith(protocol.CloseProtocolError, err.Error(), true)
		return
	}
	c.closeWith(code, "client closed", false)
	c.mu.Lock()
	if c.closeMsg == nil && !c.closeSent {
		var reply []byte
		if code != 1005 {
			reply = closePayload(code, "")
		}
		c.closeMsg = wsFrame(opClose, reply)
		c.startWriterLocked()
	}
	c.mu.Unlock()
}

// onFrame handles one client data frame; it reports whether the
// connection must end (too many bad requests). A text frame holds one or
// more requests (docs/protocol.md), each handled in turn as if it had come
// alone: its own reply or error, its own token of MAX_FRAMES_PER_SECOND,
// and a bad one counts toward the 1008 close as a bad frame would. It
// runs while the reader waits, so it owns the reader's state.
func (c *conn) onFrame(ctx context.Context, op byte, data []byte) bool {
	c.framesIn.Add(1)
	c.lastData.Store(monoNow())
	c.handling.Store(true)
	defer c.doneHandling()
	if !c.throttle() {
		return false // closed while it waited
	}
	if op != opText {
		c.sendError(protocol.CodeBinaryFrame, "only text frames holding JSON objects are accepted", nil)
		return c.abuse()
	}
	if !utf8.Valid(data) {
		// RFC 6455 §8.1: an endpoint receiving invalid UTF-8 in a text
		// message fails the connection.
		c.closeWith(protocol.CloseInvalidData, "text frame is not UTF-8", true)
		return true
	}
	f := protocol.NewFrame(data)
	for {
		req, err := f.Next()
		if err != nil {
			var ef *protocol.ErrFrame
			errors.As(err, &ef)
			c.sendError(ef.Code, ef.Message, req.Ref)
			if c.abuse() {
				return true
			}
		} else {
			c.handle(ctx, &req)
		}
		if !f.More() {
			return false
		}
		// The next request of the frame: the first token was taken above.
		// Its reply waits for room in the queue, as a ?channels list's
		// do: the client cannot read the replies of a frame's requests
		// before the server has queued them all, and a frame holding more
		// than the queue has room for (the rate limit's burst is a
		// second's worth) would otherwise overflow it, closing 4002 a
		// client that reads as fast as they come. A client that does not
		// read is dropped by WRITE_TIMEOUT instead, which ends the wait.
		// The reader reads nothing (the client's pongs among it) while
		// it holds a frame's requests, whether the limit holds them (a
		// 64 KiB frame of pings, over a minute at 50 per second) or a
		// request takes long (a subscribe waits 5 s while Redis is
		// unreachable): c.handling keeps the sweep from dropping the
		// client as silent meanwhile.
		if c.isClosing() || !c.throttle() || !c.waitRoom(ctx) {
			return false
		}
	}
}

// doneHandling ends what handling marks: the client counts as read now,
// as if the frames it sent meanwhile (pongs) had been read as they came.
func (c *conn) doneHandling() {
	c.lastRead.Store(monoNow())
	c.handling.Store(false)
}

// abuse counts a bad request; ten in a row close the connection (1008).
func (c *conn) abuse() bool {
	c.badFrames++
	if c.badFrames >= 10 {
		c.closeWith(protocol.ClosePolicy, "too many invalid frames", true)
		return true
	}
	return false
}

func (c *conn) noteReadError(err error) {
	var pe protocolError
	var ne net.Error
	switch {
	case errors.As(err, &pe):
		c.closeWith(protocol.CloseProtocolError, err.Error(), true)
	case errors.Is(err, errTooBig):
		c.closeWith(protocol.CloseTooBig, "frame too large", true)
	case errors.As(err, &ne) && ne.Timeout() && !c.writeLost.Load():
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
	c.regMu.Lock()
	c.mu.Lock()
	c.rec.Channels = append(c.rec.Channels, ch)
	c.mu.Unlock()
	if !c.closeStarted.Load() { // a closing connection's record is being removed (unlist)
		rctx, cancel := context.WithTimeout(ctx, c.s.cfg.Redis.Timeout)
		c.s.regDone(c.s.reg.JoinChannel(rctx, c.recordCopy(), ch), "join", c.id)
		cancel()
	}
	c.regMu.Unlock()
	c.s.metrics.subscriptions.Inc()
	if after == nil {
		cs.subscribeLive(c, func(pos stream.ID) *queued {
			return c.reply(&protocol.Reply{Type: protocol.TypeSubscribed, Channel: ch, Position: pos.String(), Ref: ref})
		})
		return true
	}
	return c.resume(ctx, cs, *after, ref)
}

// resume replays the channel after `after` and then goes live, with no gap
// and no duplicate at the seam: live messages are buffered from before the
// first stream read, and merged by id after the last (finishResume). When
// a catch-up dropped buffered messages past the replay's last read, the
// replay reads on from the stream first.
func (c *conn) resume(ctx context.Context, cs *chanState, after stream.ID, ref json.RawMessage) bool {
	r := cs.startResume(c)
	b, err := c.readHistory(ctx, cs, after)
	if err != nil {
		cs.remove(c)
		c.dropSub(ctx, cs.name)
		c.sendError(protocol.CodeUnavailable, "cannot read history now (Redis unavailable); retry", ref)
		return false
	}
	// Not recovered, the client continues from where the stream does
	// (b.From), which for an `after` ahead of the stream is not `after`.
	rec := b.Continuous
	if !rec && after.Less(b.From) && r.live.Less(after) {
		// Trimmed past `after`, which this instance has not delivered
		// yet: the client had it from another one, and the messages
		// after it may still reach this one live, its notifications
		// late. If the hub delivers `after`, its buffer holds all that
		// follows: the replay needs no stream.
		if cs.awaitLive(ctx, r, after, c.s.hub.lateWait) {
			rec, b = true, history{Batch: stream.Batch{From: after}}
		}
	}
	c.s.metrics.resumed(rec)
	c.enqueue(c.reply(&protocol.Reply{Type: protocol.TypeSubscribed, Channel: cs.name, Recovered: &rec, Position: b.From.String(), Ref: ref}))
	last, ok := c.replay(ctx, cs, r, b.From, &b)
	for ok {
		var live, readOn bool
		// From the last message the hand-over queued, when it queued
		// some before a catch-up dropped the rest.
		last, live, readOn = cs.finishResume(ctx, c, r, last)
		if !readOn {
			return live
		}
		// A catch-up dropped buffered messages the replay has not read:
		// they are in the stream, unless it lost them since.
		from := last
		if last, ok = c.replay(ctx, cs, r, last, nil); ok && !from.Less(last) {
			cs.remove(c)
			c.closeWith(protocol.CloseInternal, "history trimmed during the replay: resume again", true)
			return false
		}
	}
	return false
}

// replay sends c the channel's messages after last from the stream: b's
// entries, when b is not nil (the resume's first read), then batch
// after batch read from the stream until one comes short of a batch:
// the stream's end when that read was made, from which the buffer of
// live messages takes over (finishResume). It returns the last id it
// sent or passed, and true then; it also stops early, reporting true,
// when the buffer overflowed (the client is a slow consumer: going on
// would not make it one less), and when the stream was trimmed past the
// replay of messages the buffer holds. It reports false when it ended
// the subscription instead (c closed, or closing).
func (c *conn) replay(ctx context.Context, cs *chanState, r *resumer, last stream.ID, b *history) (stream.ID, bool) {
	for {
		if b == nil {
			nb, err := c.readHistory(ctx, cs, last)
			if err != nil {
				cs.remove(c)
				c.closeWith(protocol.CloseInternal, "history read failed: resume again", true)
				return last, false
			}
			if !nb.Continuous {
				if !last.Less(cs.replayNeeds(r)) {
					// Trimmed past the replay while it ran, but only of
					// messages published since it began (or since a
					// catch-up dropped the buffer), which reach c from
					// its live buffer: nothing is lost.
					return last, true
				}
				// Trimmed past the replay while it ran (a slow reader on
				// a busy channel): the client resumes again from what it
				// got and is told recovered:false then.
				cs.remove(c)
				c.closeWith(protocol.CloseInternal, "history trimmed during the replay: resume again", true)
				return last, false
			}
			b = &nb
		}
		for i := range b.Entries {
			id := stream.MustParseID(b.Entries[i].ID)
			frame := b.frame(c.s.hub, cs, i)
			if frame == nil {
				last = id // lost to this client too, but passed
				continue
			}
			if !c.enqueueWait(ctx, &queued{frame: frame, id: id}) {
				cs.remove(c)
				return last, false
			}
			last = id
		}
		if len(b.Entries) < replayBatch || cs.overflowed(r) {
			return last, true
		}
		b = nil
	}
}

// readHistory reads a batch of the channel's stream after `after` for
// c's resume. A read that found no connection of the egress's Redis pool
// free in time (redis.ErrPoolTimeout: never sent, so Redis is not at
// fault) is made again while c is open. In a reconnect storm, thousands
// of clients of a lost instance resuming here at once, their replays,
// registry writes and handshakes queue for the pool for seconds while
// Redis answers each command in microseconds: taken for an outage, that
// wait answered `unavailable` or closed 1011, and each client's
// reconnect redid its handshake, registry writes and reads, adding to
// the queue.
//
// At most half the pool's connections serve such reads at once
// (hub.replayReads): the others wait here, as long as c is open and its
// client has not gone, and a closed c's read fails with
// errClosedDuringRead. A read from the same position of the same
// channel that is still waiting for its turn is joined instead of made
// again (hub.reads): such a storm's clients resume from the same
// message, the last the lost instance sent them, and read the same
// batches. Only a read not yet made is joined: one made before c's
// resume began may lack messages c's live buffer does not hold either
// (resumer.live).
func (c *conn) readHistory(ctx context.Context, cs *chanState, after stream.ID) (history, error) {
	h := c.s.hub
	key := readKey{stream: cs.stream, after: after}
	for {
		r, lead := h.joinRead(key)
		if lead {
			if !c.awaitReplay(ctx, h.replayReads, nil) {
				h.closeRead(key, r)
				h.settleRead(r, nil, stream.Batch{}, errReadAbandoned)
				return history{}, errClosedDuringRead
			}
			shared := h.closeRead(key, r)
			// The read is not c's alone: it is made whole even if c
			// closes meanwhile (ctx is the connection's background).
			b, err := h.store.Resume(ctx, cs.stream, after, replayBatch)
			if sem := h.replayReads; sem != nil {
				<-sem
			}
			var framesOf *chanState // none shared: c builds its own as it goes
			if shared {
				framesOf = cs
			}
			h.settleRead(r, framesOf, b, err)
		} else if !c.awaitReplay(ctx, nil, r.done) {
			h.leaveRead(r)
			return history{}, errClosedDuringRead
		}
		if r.err == errReadAbandoned {
			continue // its leader closed before its turn came: lead or join another
		}
		if !errors.Is(r.err, redis.ErrPoolTimeout) || c.isClosing() || !c.pause(ctx) {
			return r.hist, r.err
		}
	}
}

// readKey names a replay's stream read: the channel's stream and the
// position it reads after (a batch of replayBatch).
type readKey struct {
	stream string
	after  stream.ID
}

// sharedRead is a replay's stream read that other replays join
// (readHistory). hist and err are set before done is closed, and
// read-only after: hist's entries and frames are shared by every replay
// that joined.
type sharedRead struct {
	done   chan struct{}
	joined int // replays that joined it (guarded by hub.readsMu)
	hist   history
	err    error
}

// history is a batch of a channel's stream read for replays, with its
// entries' frames when replays share it (readHistory): built once
// then, instead of once for each. A replay of its own builds each frame
// as it queues it (frame): with large messages, a batch's frames built
// at once would double what a slow client's replay holds.
type history struct {
	stream.Batch
	frames [][]byte // by entry; nil for an entry that is not sendable
}

// frame returns the frame of entry i, nil if it cannot be sent
// (hub.sendable).
func (b *history) frame(h *hub, cs *chanState, i int) []byte {
	if b.frames != nil {
		return b.frames[i]
	}
	if !h.sendable(cs, &b.Entries[i]) {
		return nil
	}
	return entryFrame(&b.Entries[i])
}

// errReadAbandoned is a sharedRead's error when the connection that was
// to make it closed before its turn came: whoever joined it reads again.
var errReadAbandoned = errors.New("the replay read was abandoned before it was made")

// joinRead returns the read of key waiting for its turn, or a new one
// that the caller is to make (lead).
func (h *hub) joinRead(key readKey) (r *sharedRead, lead bool) {
	h.readsMu.Lock()
	defer h.readsMu.Unlock()
	if r := h.reads[key]; r != nil {
		r.joined++
		return r, false
	}
	if h.reads == nil {
		h.reads = make(map[readKey]*sharedRead)
	}
	r = &sharedRead{done: make(chan struct{})}
	h.reads[key] = r
	return r, true
}

// leaveRead takes back a replay's joining of r (joinRead): its
// connection closed before r was made, so r's leader need not build
// frames for it.
func (h *hub) leaveRead(r *sharedRead) {
	h.readsMu.Lock()
	defer h.readsMu.Unlock()
	r.joined--
}

// closeRead closes r to replays that have not joined it yet: it is about
// to be made, and may miss what they need (readHistory), or abandoned.
// It reports whether any had joined it.
func (h *hub) closeRead(key readKey, r *sharedRead) (shared bool) {
	h.readsMu.Lock()
	defer h.readsMu.Unlock()
	if h.reads[key] == r {
		delete(h.reads, key)
	}
	return r.joined > 0
}

// settleRead gives r, closed to joiners (closeRead), its result for
// whoever joined it, with the frames of b's entries built when cs, their
// channel, is not nil.
func (h *hub) settleRead(r *sharedRead, cs *chanState, b stream.Batch, err error) {
	r.hist.Batch, r.err = b, err
	if cs != nil && err == nil {
		frames := make([][]byte, len(b.Entries))
		for i := range b.Entries {
			frames[i] = r.hist.frame(h, cs, i)
		}
		r.hist.frames = frames
	}
	close(r.done)
}

// awaitReplay waits for one of sem's places, or until ready is closed
// (one of them is nil), and reports false if c closed first: nothing
// wakes a closing c's replay (its reader waits for it), so the wait
// looks every 50 ms. It also asks the kernel then whether the client has
// hung up (frameReader.hungUp; Linux, plain sockets): the reader,
// waiting for the replay, reads nothing, so a client gone meanwhile was
// seen only when a ping's write failed, up to PING_INTERVAL later, or
// when its turn came, its read then made for nobody; in a reconnect
// storm, clients that give up and reconnect while their replays wait
// added those reads to the queue. Such a client's connection ends as the
// reader's reads would end it (endHungUp). With both nil it returns true
// at once (a hub that tests build has no sem).
func (c *conn) awaitReplay(ctx context.Context, sem chan struct{}, ready <-chan struct{}) bool {
	if sem == nil && ready == nil {
		return true
	}
	select {
	case sem <- struct{}{}:
		return true
	case <-ready:
		return true
	default:
	}
	t := time.NewTimer(50 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case sem <- struct{}{}:
			return true
		case <-ready:
			return true
		case <-ctx.Done():
			return false
		case <-c.done:
			return false
		case <-t.C:
			if c.isClosing() {
				return false
			}
			if c.fr.hungUp() {
				c.endHungUp()
				return false
			}
			t.Reset(50 * time.Millisecond)
		}
	}
}

// endHungUp ends the connection of a client that hung up while the reader
// was not reading (awaitReplay) as the reader's reads would have ended it:
// with the code of its close frame, if one came ahead of its FIN (a
// client that closed properly and then its socket, logged and counted as
// 1000, SCF 200, not as a lost connection), else as a lost connection
// (noteReadError). What it sent up to its FIN is all in the socket by now
// (a FIN is taken in order), so the frames are read, and dropped, without
// waiting: their replies would go to nobody.
func (c *conn) endHungUp() {
	for {
		op, p, err := c.fr.next()
		switch {
		case err != nil:
			c.noteReadError(err)
			return
		case op == opClose:
			c.onClientClose(p)
			return
		}
	}
}

// errClosedDuringRead is readHistory's error for a connection that
// closed while its read waited its turn.
var errClosedDuringRead = errors.New("connection closed while its history read waited")

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
	c.regMu.Lock()
	defer c.regMu.Unlock()
	if c.closeStarted.Load() {
		// The record is being removed, or is gone: leaving would write it
		// back. ch stays in it, so that the close's own removal, which
		// every end makes (unlist, as a server close begins, or finish),
		// takes ch's membership too, whether it came before this (ch was
		// in the record since subscribe) or comes after. A removal here
		// as well was a second one for every connection that closed
		// while its resume waited: in a reconnect storm, the one that
		// fills the replay reads' queue, a round trip each.
		return
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
	c.s.regDone(c.s.reg.LeaveChannel(rctx, c.recordCopy(), ch), "leave", c.id)
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

// throttle holds a client request over MAX_FRAMES_PER_SECOND (which
// counts requests, however many a frame holds) until the connection's
// token bucket (burst: one second's worth) has room for it, and reports
// false if the connection closed meanwhile. The request is not refused:
// the reader, which waits for it, reads the client's next frame later, so
// a client that sends faster is slowed by TCP's flow control and loses
// nothing. A refusal would be worse for everyone: the reference clients
// send every subscription at once when they connect, and one with more
// than a second's worth would lose the rest. Each wait is one token's
// time (20 ms at the default 50): tokens are taken one at a time.
func (c *conn) throttle() bool {
	n := c.s.cfg.MaxFramesPerSecond
	if n <= 0 {
		return true
	}
	if c.frames == nil {
		c.frames = rate.NewLimiter(rate.Limit(n), n)
	}
	if c.frames.Allow() { // no Reservation on the heap, as Reserve's
		return true
	}
	time.Sleep(c.frames.Reserve().Delay())
	return !c.isClosing()
}

// throttleFragment charges a continuation fragment to
// MAX_FRAMES_PER_SECOND (frameReader.nextPaced), as throttle does a
// request. While it waits the reader reads nothing, the client's pongs
// included, which wait behind the message's fragments: the client
// counts as busy, as while its requests are held (handling), and as read
// once the wait is over. Without it, the sweep dropped a client whose
// message the limit held for 2×PING_INTERVAL as "missed pong".
func (c *conn) throttleFragment() {
	c.handling.Store(true)
	c.throttle()
	c.doneHandling()
}

// expired reports whether the connection's token has expired: from its
// exp on, the instant itself included, as the verifier refuses a token
// at its exp (RFC 7519 §4.1.4, "on or after which").
func (c *conn) expired(now time.Time) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.expiredLocked(now)
}

// expiredLocked is expired with c.mu held.
func (c *conn) expiredLocked(now time.Time) bool {
	return !c.exp.IsZero() && !now.Before(c.exp)
}

// closeExpired closes the connection 4004 if its token has expired by
// now, and reports whether it did: the sweep's check may have been
// overtaken by a refresh. Once the expiry is seen here, no refresh
// succeeds (refresh refuses one that comes after the expiry), so no
// "refreshed" precedes the close.
func (c *conn) closeExpired() bool {
	if !c.expired(time.Now()) {
		return false
	}
	c.closeTokenExpired()
	return true
}

// closeTokenExpired closes the connection 4004. The writer calls it
// without a second look at the clock once it has dropped messages for
// the expiry (writeLoop): a clock set back meanwhile must not leave the
// connection open without them.
func (c *conn) closeTokenExpired() {
	c.closeWith(protocol.CloseTokenExpired, "token expired: reconnect with a fresh token", true)
}

// refresh handles a "refresh" frame: a fresh token for the same user
// replaces the connection's expiry and allowed channels, and is answered
// with "refreshed". Subscriptions the new token no longer allows are
// ended (an "unsubscribed" frame each). A bad token is an error frame; the
// connection stays until the old token expires. Runs on the reader
// goroutine, the only reader of c.allow; c.exp is shared with the sweep.
func (c *conn) refresh(req *protocol.Request) {
	sec := c.s.sec
	if sec.verifier == nil {
		c.sendError(protocol.CodeInvalidToken, "this server does not accept tokens", req.Ref)
		return
	}
	// Too late, whatever the new token holds: looked at before the token,
	// so that a late refresh is never counted as a bad request (its tenth
	// closed the connection 1008, which clients do not reconnect after,
	// instead of 4004) nor answered for its token (docs/security.md).
	if c.expired(time.Now()) {
		c.refuseLateRefresh(req)
		return
	}
	claims, err := sec.verifier.Verify(req.Token)
	if err != nil {
		msg := err.Error()
		if errors.Is(err, auth.ErrTokenExpired) {
			msg = "the new token has already expired"
		}
		c.sendError(protocol.CodeInvalidToken, msg, req.Ref)
		c.abuse()
		return
	}
	if claims.Subject != c.user {
		c.sendError(protocol.CodeForbidden, "the new token is for another user", req.Ref)
		c.abuse()
		return
	}
	allow := sec.allowFor(claims)
	c.mu.Lock()
	if c.expiredLocked(time.Now()) {
		// Too late after all (it expired while the token was checked):
		// the sweep closes the connection 4004, or has begun to
		// (closeExpired), and a "refreshed" would precede that close.
		c.mu.Unlock()
		c.refuseLateRefresh(req)
		return
	}
	c.exp = claims.Expires
	c.allow = allow
	c.mu.Unlock()
	c.badFrames = 0
	for ch := range c.subs {
		if !allow(ch) {
			c.subs[ch].remove(c)
			c.dropSub(context.Background(), ch)
			c.sendReply(&protocol.Reply{Type: protocol.TypeUnsubscribed, Channel: ch})
		}
	}
	c.sendReply(&protocol.Reply{Type: protocol.TypeRefreshed, Ref: req.Ref})
}

// refuseLateRefresh answers a refresh handled once the connection's token
// has expired; uncounted, as the client's only fault is its timing.
func (c *conn) refuseLateRefresh(req *protocol.Request) {
	c.sendError(protocol.CodeInvalidToken, "the connection's token has expired: reconnect with a fresh token", req.Ref)
}
