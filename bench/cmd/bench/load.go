package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"

	"github.com/wsrelay/wsrelay/bench/harness"
)

// base is the bench's clock origin: send times in payloads are monotonic
// nanoseconds since base, so publisher and subscriber (same process) agree.
var base = time.Now()

func now() int64 { return int64(time.Since(base)) }

// payload is the publish body: data carries the publish sequence number
// and the send time, padded so that data is dataSize bytes.
const dataSize = 100

func payload(seq int, sent int64) []byte {
	b := make([]byte, 0, dataSize+16)
	b = append(b, `{"data":{"s":`...)
	b = strconv.AppendInt(b, int64(seq), 10)
	b = append(b, `,"t":`...)
	b = strconv.AppendInt(b, sent, 10)
	b = append(b, `,"p":"`...)
	// data starts after `{"data":` (8 bytes); it ends with `"}` and the
	// body with one more `}`.
	for len(b)-8+2 < dataSize {
		b = append(b, 'x')
	}
	return append(b, `"}}`...)
}

// subscriber is one bench WebSocket client subscribed to one channel.
type subscriber struct {
	ws       *websocket.Conn
	total    int64  // the scenario's publishes: sequence numbers are below it
	seen     []byte // bitmap by publish sequence number
	expected int
	// accept, when set, says which sequence numbers belong to the
	// subscriber's channel; a message it refuses, or one outside the
	// scenario's numbers, is counted as stray (misrouted), not as got.
	accept func(seq int64) bool
	got    int
	dups   int
	stray  int
	lats   []uint32 // end-to-end latency, µs
	seqs   []uint32 // the sequence number of each lats entry
	last   int64    // receipt time of the last message, bench clock
	done   chan struct{}
	pings  bool // the server pings with empty commands (Centrifugo)
}

var (
	// A 16 KiB read buffer, as a client expecting bursts would use: with
	// gorilla's small default a subscriber makes one read syscall per one
	// or two frames, and the load generator would take the CPU the egress
	// needs on these shared cores. The bench's own memory is not measured.
	dialer   = &websocket.Dialer{ReadBufferSize: 16 << 10, WriteBufferSize: 256, HandshakeTimeout: 10 * time.Second}
	dataKey  = []byte(`"data":{"s":`) // only message frames carry it
	emptyCmd = []byte(`{}`)
	sentKey  = []byte(`,"t":`)
)

// dialSubscriber opens a socket to the system under test, subscribed to
// ch, and waits for the subscription's confirmation. total is the number
// of publishes in the scenario.
func dialSubscriber(ctx context.Context, sys *sut, ch string, total int, rcvd *tally) (*subscriber, error) {
	url := "ws://127.0.0.1:" + strconv.Itoa(sys.sub.Port) + sys.kind.wsPath(ch)
	ws, resp, err := dialer.DialContext(ctx, url, nil)
	if err != nil {
		if resp != nil {
			return nil, fmt.Errorf("dial %s: %w (HTTP %d)", ch, err, resp.StatusCode)
		}
		return nil, fmt.Errorf("dial %s: %w", ch, err)
	}
	_ = ws.SetReadDeadline(time.Now().Add(10 * time.Second))
	if err := sys.kind.subscribe(ws, ch); err != nil {
		ws.Close()
		return nil, fmt.Errorf("subscribe to %s: %w", ch, err)
	}
	_ = ws.SetReadDeadline(time.Time{})
	// lats has room for every message from the start: growing it while
	// messages arrive would make garbage, and GC work, in the bench itself.
	s := &subscriber{ws: ws, total: int64(total), seen: make([]byte, (total+7)/8), lats: make([]uint32, 0, total), seqs: make([]uint32, 0, total), done: make(chan struct{}), pings: sys.kind == centrifugo}
	go s.read(rcvd)
	return s, nil
}

// read consumes frames until the socket closes. It reads each frame into
// one reused buffer and parses only what it needs.
func (s *subscriber) read(rcvd *tally) {
	defer close(s.done)
	buf := make([]byte, 0, 512)
	for {
		_, r, err := s.ws.NextReader()
		if err != nil {
			return
		}
		buf = buf[:0]
		for {
			if len(buf) == cap(buf) {
				buf = slices.Grow(buf, 512)
			}
			n, err := r.Read(buf[len(buf):cap(buf)])
			buf = buf[:len(buf)+n]
			if err == io.EOF {
				break
			}
			if err != nil {
				return
			}
		}
		t := now()
		if s.pings && bytes.Contains(buf, emptyCmd) {
			// Centrifugo's ping, alone or among pushes: an empty
			// command answers it. (close may write at the same time:
			// gorilla allows WriteControl so.)
			_ = s.ws.WriteMessage(websocket.TextMessage, emptyCmd)
		}
		// A frame holds one message (wsrelay) or several, one per line
		// (Centrifugo).
		for rest := buf; ; {
			seq, sent, next, found := nextData(rest)
			if !found {
				break
			}
			rest = next
			s.record(seq, sent, t, rcvd)
		}
	}
}

// record counts one received message.
func (s *subscriber) record(seq, sent, t int64, rcvd *tally) {
	rcvd.any.Add(1)
	if seq < 0 || seq >= s.total || s.accept != nil && !s.accept(seq) {
		s.stray++
		return
	}
	if s.seen[seq/8]&(1<<(seq%8)) != 0 {
		s.dups++
		return
	}
	s.seen[seq/8] |= 1 << (seq % 8)
	s.got++
	s.lats = append(s.lats, uint32(max(0, (t-sent)/1000)))
	s.seqs = append(s.seqs, uint32(seq))
	atomic.StoreInt64(&s.last, t)
	rcvd.delivered.Add(1)
}

// nextData finds the first message in frame with one scan (three scans
// were a fifth of the generator's CPU in S1, taken from the cores the
// system under test needs): its sequence number, its send time and the
// rest of the frame after it. A malformed message is skipped. found is
// false when frame holds no further message.
func nextData(frame []byte) (seq, sent int64, rest []byte, found bool) {
	for {
		i := bytes.Index(frame, dataKey)
		if i < 0 {
			return 0, 0, nil, false
		}
		b := frame[i+len(dataKey):]
		frame = b
		seq, n := leadingInt(b)
		if n == 0 || !bytes.HasPrefix(b[n:], sentKey) {
			continue
		}
		b = b[n+len(sentKey):]
		sent, m := leadingInt(b)
		if m == 0 {
			continue
		}
		return seq, sent, b[m:], true
	}
}

// leadingInt parses the decimal digits b starts with; n is how many.
func leadingInt(b []byte) (v int64, n int) {
	for n < len(b) && b[n] >= '0' && b[n] <= '9' {
		v = v*10 + int64(b[n]-'0')
		n++
	}
	return v, n
}

func (s *subscriber) close() {
	_ = s.ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(1000, ""), time.Now().Add(time.Second))
	s.ws.Close()
	<-s.done
}

// dialMany opens n subscribers, chOf(i) naming each one's channel, with
// bounded parallelism.
func dialMany(ctx context.Context, sys *sut, n int, chOf func(int) string, total int, rcvd *tally) ([]*subscriber, error) {
	subs := make([]*subscriber, n)
	var (
		next  atomic.Int64
		wg    sync.WaitGroup
		errMu sync.Mutex
		first error
	)
	for range 32 {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= n || ctx.Err() != nil {
					return
				}
				s, err := dialSubscriber(ctx, sys, chOf(i), total, rcvd)
				if err != nil {
					errMu.Lock()
					if first == nil {
						first = err
					}
					errMu.Unlock()
					return
				}
				subs[i] = s
			}
		})
	}
	wg.Wait()
	if first == nil && ctx.Err() != nil {
		// Stopped part-way (a signal, the run's deadline): subs has
		// holes, which the callers would dereference.
		first = fmt.Errorf("dialling subscribers: %w", ctx.Err())
	}
	if first != nil {
		closeAll(subs)
		return nil, first
	}
	return subs, nil
}

func closeAll(subs []*subscriber) {
	var wg sync.WaitGroup
	for _, s := range subs {
		if s != nil {
			wg.Go(s.close)
		}
	}
	wg.Wait()
}

// closedCount is how many of subs the server has closed (their reader
// has ended).
func closedCount(subs []*subscriber) int {
	n := 0
	for _, s := range subs {
		select {
		case <-s.done:
			n++
		default:
		}
	}
	return n
}

// publisher posts messages to one ingress over a bounded pool of
// keep-alive HTTP/1.1 connections. It speaks just enough HTTP/1.1 itself
// (one request at a time per connection, a Content-Length response) rather
// than going through net/http's client: the load generator shares the
// machine's two cores with the functions and Redis, and net/http's client
// cost about as much CPU per publish as the ingress itself (35 µs), which
// the bench would otherwise charge to the system under test.
type publisher struct {
	kind kind
	addr string
	pool chan *httpConn // idle connections
	sem  chan struct{}  // one token per open connection, at most conns
}

type httpConn struct {
	c   net.Conn
	r   *bufio.Reader
	buf []byte
}

func newPublisher(sys *sut, conns int) *publisher {
	return &publisher{
		kind: sys.kind,
		addr: "127.0.0.1:" + strconv.Itoa(sys.pub.Port),
		pool: make(chan *httpConn, conns),
		sem:  make(chan struct{}, conns),
	}
}

func (p *publisher) close() {
	for {
		select {
		case hc := <-p.pool:
			hc.c.Close()
			<-p.sem
		default:
			return
		}
	}
}

// get returns an idle connection, or dials one while fewer than conns are
// open, or waits for one to come back.
func (p *publisher) get(ctx context.Context) (*httpConn, error) {
	select {
	case hc := <-p.pool:
		return hc, nil
	default:
	}
	select {
	case hc := <-p.pool:
		return hc, nil
	case p.sem <- struct{}{}:
		c, err := (&net.Dialer{Timeout: 10 * time.Second}).DialContext(ctx, "tcp", p.addr)
		if err != nil {
			<-p.sem
			return nil, err
		}
		return &httpConn{c: c, r: bufio.NewReaderSize(c, 4096), buf: make([]byte, 0, 512)}, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (p *publisher) discard(hc *httpConn) {
	hc.c.Close()
	<-p.sem
}

var (
	errStatus   = errors.New("unexpected status")
	errResponse = errors.New("malformed response")
)

// publish posts one message with sequence seq to ch and returns the
// duration of the call.
func (p *publisher) publish(ctx context.Context, ch string, seq int) (time.Duration, error) {
	t0 := now()
	hc, err := p.get(ctx)
	if err != nil {
		return 0, err
	}
	hc.buf = p.kind.publishRequest(hc.buf[:0], p.addr, ch, payload(seq, t0))
	b := hc.buf
	_ = hc.c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := hc.c.Write(b); err != nil {
		p.discard(hc)
		return 0, err
	}
	status, body, err := readResponse(hc.r)
	if err != nil {
		p.discard(hc)
		return 0, err
	}
	err = p.kind.publishError(status, body)
	p.pool <- hc
	if err != nil {
		return 0, err
	}
	return time.Duration(now() - t0), nil
}

// readResponse reads one HTTP/1.1 response with a Content-Length body and
// returns the status code and the body, which stays valid until the next
// read from r.
func readResponse(r *bufio.Reader) (int, []byte, error) {
	line, err := r.ReadSlice('\n')
	if err != nil {
		return 0, nil, err
	}
	// "HTTP/1.1 202 Accepted\r\n"
	if len(line) < 12 || !bytes.HasPrefix(line, []byte("HTTP/1.")) {
		return 0, nil, fmt.Errorf("%w: status line %q", errResponse, line)
	}
	status, err := strconv.Atoi(string(line[9:12]))
	if err != nil {
		return 0, nil, fmt.Errorf("%w: status line %q", errResponse, line)
	}
	length := -1
	for {
		line, err = r.ReadSlice('\n')
		if err != nil {
			return 0, nil, err
		}
		if len(line) <= 2 {
			break
		}
		if k, v, ok := bytes.Cut(line, []byte(":")); ok && bytes.EqualFold(k, []byte("Content-Length")) {
			if length, err = strconv.Atoi(string(bytes.TrimSpace(v))); err != nil {
				return 0, nil, fmt.Errorf("%w: Content-Length %q", errResponse, v)
			}
		}
	}
	if length < 0 {
		return 0, nil, fmt.Errorf("%w: no Content-Length", errResponse)
	}
	if length > r.Size() {
		_, err := r.Discard(length)
		return status, nil, err
	}
	body, err := r.Peek(length)
	if err != nil {
		return 0, nil, err
	}
	_, _ = r.Discard(length)
	return status, body, nil
}

// pubStats is what a publishing phase measured.
type pubStats struct {
	ok, failed int
	lats       []uint32 // call duration, µs
	firstErr   error
	start, end int64 // bench clock
}

// publishAll sends n messages, message i to chOf(i), from workers
// concurrent publishers, as fast as they go.
func (p *publisher) publishAll(ctx context.Context, n, workers int, chOf func(int) string) pubStats {
	return p.publishUntil(ctx, n, workers, time.Time{}, 0, chOf)
}

// publishUntil is publishAll bounded by deadline too (zero: none), and
// paced at rate publishes per second in all if rate > 0: message i is
// sent no earlier than i/rate seconds after the start (open loop, as long
// as a worker is free).
func (p *publisher) publishUntil(ctx context.Context, n, workers int, deadline time.Time, rate float64, chOf func(int) string) pubStats {
	var (
		next atomic.Int64
		mu   sync.Mutex
		st   pubStats
		wg   sync.WaitGroup
	)
	st.start = now()
	for range workers {
		wg.Go(func() {
			lats := make([]uint32, 0, 1024)
			ok, failed := 0, 0
			var ferr error
			for ctx.Err() == nil {
				i := int(next.Add(1) - 1)
				if i >= n || (!deadline.IsZero() && time.Now().After(deadline)) {
					break
				}
				if rate > 0 {
					at := time.Duration(float64(i) / rate * 1e9)
					if wait := at - time.Duration(now()-st.start); wait > 0 {
						if harness.SleepCtx(ctx, wait) != nil {
							break
						}
					}
				}
				d, err := p.publish(ctx, chOf(i), i)
				if err != nil {
					failed++
					if ferr == nil {
						ferr = err
					}
					continue
				}
				ok++
				lats = append(lats, uint32(d/time.Microsecond))
			}
			mu.Lock()
			st.ok += ok
			st.failed += failed
			st.lats = append(st.lats, lats...)
			if st.firstErr == nil {
				st.firstErr = ferr
			}
			mu.Unlock()
		})
	}
	wg.Wait()
	st.end = now()
	return st
}

// tally is what a run's subscribers have received so far, counted as
// their readers record it.
type tally struct {
	delivered atomic.Int64 // messages where they belong, each once
	any       atomic.Int64 // every message, duplicates and strays too
}

// settle is how long a run keeps reading once every expected message has
// arrived, until no message at all has come for that long: a duplicate or
// a misrouted message sent after the last expected one still counts.
const settle = 250 * time.Millisecond

// waitDelivered waits until rcvd.delivered reaches want and then nothing
// more arrives for settle, or until nothing expected arrives for quiet.
func waitDelivered(ctx context.Context, rcvd *tally, want int64, quiet time.Duration) {
	last, lastChange := rcvd.delivered.Load(), time.Now()
	for ctx.Err() == nil {
		cur := rcvd.delivered.Load()
		if cur >= want {
			break
		}
		if cur != last {
			last, lastChange = cur, time.Now()
		} else if time.Since(lastChange) > quiet {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	last, lastChange = rcvd.any.Load(), time.Now()
	for ctx.Err() == nil && time.Since(lastChange) < settle {
		time.Sleep(5 * time.Millisecond)
		if cur := rcvd.any.Load(); cur != last {
			last, lastChange = cur, time.Now()
		}
	}
}

// delivery sums up what the subscribers saw.
type delivery struct {
	got, lost, dups, stray int
	last                   int64
	lats                   []uint32
	// byQuarter are the latencies of the messages of each quarter of the
	// publishes, in publish order: a rising median from one to the next
	// is a backlog that grows while publishing goes on.
	byQuarter [][]uint32
}

func collect(subs []*subscriber, total int) delivery {
	var d delivery
	n := 0
	for _, s := range subs {
		n += len(s.lats)
	}
	d.lats = make([]uint32, 0, n)
	for _, s := range subs {
		d.got += s.got
		d.dups += s.dups
		d.stray += s.stray
		d.lost += max(0, s.expected-s.got)
		d.last = max(d.last, atomic.LoadInt64(&s.last))
		d.lats = append(d.lats, s.lats...)
	}
	d.byQuarter = byPart(subs, total, 4)
	return d
}

// byPart splits the subscribers' latencies by which of n equal parts of
// the total publishes each message belongs to, in publish order.
func byPart(subs []*subscriber, total, n int) [][]uint32 {
	parts := make([][]uint32, n)
	for _, s := range subs {
		for i, seq := range s.seqs {
			k := min(n-1, int(seq)*n/max(1, total))
			parts[k] = append(parts[k], s.lats[i])
		}
	}
	return parts
}

// timeline is the latency of the messages of each of n equal parts of the
// publishes, in publish order: "p50/max" in ms per part. S1's closed-loop
// publishers can get ahead of the fan-out at any point of a run, not only
// at its start, which the quarters' medians alone do not show.
func timeline(subs []*subscriber, total, n int) string {
	var b strings.Builder
	for k, lats := range byPart(subs, total, n) {
		if k > 0 {
			b.WriteByte(' ')
		}
		if len(lats) == 0 {
			b.WriteString("–")
			continue
		}
		fmt.Fprintf(&b, "%.0f/%.0f", pct(lats, 50), pct(lats, 100))
	}
	return b.String()
}

// pct returns the p-th percentile of µs samples, in ms (it sorts
// samples): the value at rank (n−1)·p/100, interpolated between the two
// closest ranks, so that p50 over an even number of samples is the mean
// of the two middle ones, as median is.
func pct(samples []uint32, p float64) float64 {
	if len(samples) == 0 {
		return 0
	}
	slices.Sort(samples)
	r := float64(len(samples)-1) * p / 100
	i := int(r)
	v := float64(samples[i])
	if i+1 < len(samples) {
		v += (r - float64(i)) * (float64(samples[i+1]) - v)
	}
	return v / 1000
}
