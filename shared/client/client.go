// Package client is the Go client of the egress WebSocket
// (docs/clients.md): it connects, subscribes, and keeps the subscriptions
// alive across every close the server marks as retryable, resuming each
// channel from the last message id it delivered, so the application sees
// every message once, in order, or is told (Recovered == false) that a
// resume had a gap.
//
// It behaves like the JavaScript client served at /client.js: exponential
// backoff with full jitter between attempts (0.5 s doubling to 20 s by
// default), reset after a stable connection or a planned rotation (idle
// timeout, lifetime, drain); no reconnect after 4003, 1002, 1007, 1008 or 1009
// (the server's, or the client's own for a frame over ReadLimit); a
// fresh token from GetToken after 4004; a dial not welcomed within
// ConnectTimeout dropped and dialled again, and a GetToken that has not
// answered within it given up and asked again. Unlike a browser, it sees the
// status of a refused upgrade: it stops after 400 and 403 (and 401 without
// GetToken), and waits at least the Retry-After of the others.
package client

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"

	chanpkg "github.com/wsrelay/wsrelay/shared/channel"
	"github.com/wsrelay/wsrelay/shared/internal/redact"
	"github.com/wsrelay/wsrelay/shared/internal/retry"
	"github.com/wsrelay/wsrelay/shared/protocol"
	"github.com/wsrelay/wsrelay/shared/query"
	"github.com/wsrelay/wsrelay/shared/stream"
)

// State is the client's connection state.
type State int

// Connection states, in the order a connection goes through them.
const (
	StateConnecting   State = iota // dialling (first time or after a close)
	StateConnected                 // welcomed by the server
	StateDisconnected              // lost; a reconnect is scheduled
	StateClosed                    // final: Close was called or the server refused us for good
)

func (s State) String() string {
	switch s {
	case StateConnecting:
		return "connecting"
	case StateConnected:
		return "connected"
	case StateDisconnected:
		return "disconnected"
	case StateClosed:
		return "closed"
	}
	return "state(" + strconv.Itoa(int(s)) + ")"
}

// Defaults of Options' zero values.
const (
	DefaultMinBackoff  = 500 * time.Millisecond
	DefaultMaxBackoff  = 20 * time.Second
	DefaultStableAfter = 10 * time.Second
	DefaultReadTimeout = 60 * time.Second
	// DefaultConnectTimeout is how long a dial may go without its welcome
	// unless Options.ConnectTimeout says otherwise: the JS client's
	// connectTimeout (activityTimeout + pongTimeout).
	DefaultConnectTimeout = 60 * time.Second
	// DefaultHandshakeTimeout bounds an upgrade when Options.Dialer has no
	// HandshakeTimeout of its own (websocket.DefaultDialer's is the same).
	DefaultHandshakeTimeout = 45 * time.Second
	// DefaultReadLimit is the largest server frame a client reads unless
	// Options.ReadLimit says otherwise. The egress's largest frame is a
	// message: the ingress's MAX_MESSAGE_BYTES (64 KiB by default; SCF
	// caps a WebSocket message at 256 KB) plus a few hundred bytes of
	// envelope, one message per frame, replays included. 1 MiB is four
	// times SCF's cap.
	DefaultReadLimit = 1 << 20
	writeTimeout     = 10 * time.Second
	closeWait        = 5 * time.Second
)

// Options configure Dial. Only URL is required.
type Options struct {
	// URL of the egress socket, e.g. ws://127.0.0.1:8081/ws. Its query is
	// kept and User is added to it. Dial refuses a query with channels
	// (use Subscribe, which resumes across reconnects), with token when
	// Token or GetToken is set, with user when User is set, or with token
	// or user twice, and user information (user:password@), which
	// gorilla's dial refuses.
	URL string
	// Token is a user token (JWT), sent as the "token.<jwt>" subprotocol
	// beside "wsrelay" (not in the URL, which proxies write to their logs).
	// A subprotocol is an HTTP token: Dial refuses a Token with a space,
	// a control or non-ASCII character or one of ()<>@,;:\"/[]?={}, and a
	// GetToken answer like it is an error (asked again after the backoff).
	Token string
	// GetToken, when set, is called for the token before the first dial
	// and again after a 4004 (token expired) close or a 401 at the upgrade.
	// An error is retried after the backoff. It has ConnectTimeout to
	// answer (its ctx's deadline): one that has not returned by then is
	// given up, its ctx cancelled, and counts as an error (a token
	// endpoint that never answers would otherwise hold the client in
	// StateConnecting for ever). Calls never overlap: while a call given
	// up is still running (it does not heed ctx), the next attempt waits
	// for it, ConnectTimeout again, and takes its token if it brings one.
	// It runs on a goroutine of its own, one call at a time; Close cancels
	// its ctx and returns without waiting for it.
	GetToken func(ctx context.Context) (string, error)
	// User names the user in anonymous mode (the user query parameter).
	User string

	// MinBackoff and MaxBackoff bound the delay before a reconnect: the
	// n-th consecutive attempt waits a random time in
	// [0, min(MaxBackoff, MinBackoff·2ⁿ)]. Zero means the default
	// (0.5 s and 20 s).
	MinBackoff, MaxBackoff time.Duration
	// StableAfter is how long a connection must have lasted after its
	// welcome for the backoff to start again from MinBackoff. Zero means 10 s. Planned
	// rotations (codes 1001, 4000, 4001) reset the backoff whatever the
	// connection's age.
	StableAfter time.Duration
	// ReadTimeout is how long the client waits for any frame from the
	// server, its pings included, before it takes the connection for dead
	// (a path that went silent without a close: NAT, Wi-Fi, a proxy) and
	// reconnects. The server pings every PING_INTERVAL (25 s by default):
	// keep this above twice that. Zero means 60 s; negative, no limit.
	// The time the handlers take does not count.
	ReadTimeout time.Duration
	// ConnectTimeout is how long after its dial a connection may go
	// without the server's welcome, the upgrade included: a proxy that
	// accepts the connection and forwards nothing, or a socket upgraded
	// whose welcome never comes (the server's pings do not extend it), is
	// dropped and dialled again after the backoff, whatever ReadTimeout
	// is. It also bounds each wait for GetToken. Zero or negative means
	// DefaultConnectTimeout (60 s). The Dialer's HandshakeTimeout still
	// bounds the upgrade on its own.
	ConnectTimeout time.Duration
	// ReadLimit is the largest frame, in bytes, the client reads from the
	// server: a larger one is not read (a misbehaving server or proxy
	// cannot make the client allocate without bound), and ends the client
	// for good, as the server's 1009 does: it closes the connection with
	// 1009 and Err is a *CloseError with ByClient set. Reconnecting would
	// not help: the resume would replay the same message. Zero means
	// DefaultReadLimit (1 MiB); negative, no limit. Raise it on a
	// deployment whose MAX_MESSAGE_BYTES is near or above it.
	ReadLimit int64

	// Dialer dials the socket; nil means websocket.DefaultDialer. A zero
	// HandshakeTimeout means DefaultHandshakeTimeout here, not no limit.
	// Prefer NetDialContext to NetDial, which takes no ctx: Close does not
	// wait for a NetDial in flight (it finishes on a goroutine of its own,
	// its connection then closed), but ConnectTimeout does not end it.
	Dialer *websocket.Dialer
	// Header is sent with every upgrade request (e.g. Origin).
	Header http.Header

	// OnState, when set, is called on every state change, with the error
	// that caused it (nil for a normal change). It is called from the
	// client's goroutine and must not block.
	OnState func(State, error)
	// OnWelcome, when set, is called with each connection's welcome.
	OnWelcome func(Welcome)
	// OnMessage, when set, receives targeted messages (to this connection
	// or user), which belong to no subscription.
	OnMessage func(Message)
	// OnError, when set, receives server error frames that belong to no
	// subscription, or to one without an OnError of its own.
	OnError func(*ServerError)
}

// Welcome is the server's first frame on each connection.
type Welcome struct {
	ConnectionID string `json:"connection_id"`
	User         string `json:"user"`
	Instance     string `json:"instance"`
	// MaxFrameBytes is the largest frame the server reads; a server that
	// announces it reads several requests per frame, and the client packs
	// each connection's subscribes into as few frames as fit. Zero: an
	// older server, one request per frame.
	MaxFrameBytes int64 `json:"max_frame_bytes"`
}

// Message is a delivered message.
type Message struct {
	Channel string          `json:"channel,omitempty"` // empty for targeted messages
	Target  string          `json:"target,omitempty"`  // "connection" or "user" for targeted messages
	ID      string          `json:"id"`
	Event   string          `json:"event,omitempty"`
	From    string          `json:"from,omitempty"`
	TS      int64           `json:"ts"` // publish time, unix milliseconds
	Data    json.RawMessage `json:"data"`
}

// ServerError is an error frame of the server.
type ServerError struct {
	Code    string
	Message string
}

func (e *ServerError) Error() string { return e.Code + ": " + e.Message }

// RefusedError is an upgrade the server refused with an HTTP status. 400
// (a request the server will never take: a bad User, say) and 403 (origin
// not allowed) end the client for good, and so does 401 (token missing,
// invalid or expired) for a client without GetToken; others are retried,
// no sooner than the response's Retry-After.
type RefusedError struct {
	Status int
	// Code and Message are the egress's error body ({"error":{"code",
	// "message"}}, docs/protocol.md); empty when the refusal came from
	// something else, a gateway for instance.
	Code, Message string
	// RetryAfter is the response's Retry-After (at most MaxRetryAfter), or 0.
	RetryAfter time.Duration
}

func (e *RefusedError) Error() string {
	s := "client: upgrade refused: " + strconv.Itoa(e.Status) + " " + http.StatusText(e.Status)
	if e.Code != "" {
		s += ": " + e.Code + ": " + e.Message
	}
	return s
}

// MaxRetryAfter bounds the wait a refusal's Retry-After can ask for, so
// that a wrong header cannot park a client for hours.
const MaxRetryAfter = 5 * time.Minute

// refused reads a refused upgrade's response: status, error body and
// Retry-After (delay-seconds or an HTTP date, RFC 9110 §10.2.3).
func refused(resp *http.Response) *RefusedError {
	e := &RefusedError{Status: resp.StatusCode}
	var body struct {
		Error struct {
			Code    string `json:"code"`
			Message string `json:"message"`
		} `json:"error"`
	}
	// gorilla leaves at most 1 KiB of the body in resp.Body.
	if resp.Body != nil && json.NewDecoder(resp.Body).Decode(&body) == nil {
		e.Code, e.Message = body.Error.Code, body.Error.Message
	}
	e.RetryAfter, _ = retry.After(resp.Header, MaxRetryAfter)
	return e
}

// finalRefusal reports whether a refused upgrade ends the client: what a
// retry of the same request cannot change. A 401 can change with a fresh
// token, when there is a GetToken to ask.
func finalRefusal(status int, getToken bool) bool {
	switch status {
	case http.StatusBadRequest, http.StatusForbidden:
		return true
	case http.StatusUnauthorized:
		return !getToken
	}
	return false
}

// CloseError is the close that ended the client for good: the server's,
// or the client's own 1009 for a frame over Options.ReadLimit (ByClient).
type CloseError struct {
	Code   int
	Reason string
	// ByClient: the client closed the connection (1009: the server sent
	// a frame over ReadLimit), not the server.
	ByClient bool
}

func (e *CloseError) Error() string {
	if e.ByClient {
		return fmt.Sprintf("client: closed the connection with %d (%s): not reconnecting", e.Code, e.Reason)
	}
	return fmt.Sprintf("closed by the server with %d (%s): not reconnecting", e.Code, e.Reason)
}

// DisconnectError is a server close after which the client reconnects
// (and resumes): the error OnState is given with StateDisconnected, so
// that an application can tell a drain (1001) or the platform's idle
// (4000) and lifetime (4001) closes from a lost connection.
type DisconnectError struct {
	Code   int
	Reason string
}

func (e *DisconnectError) Error() string {
	return fmt.Sprintf("client: closed by the server: %d %s", e.Code, e.Reason)
}

// ErrClosed is returned by calls on a closed client.
var ErrClosed = errors.New("client: closed")

// Handler receives one subscription's events. All its functions are
// called from the client's single reader goroutine, one at a time, and
// must not block for long (a blocked handler stalls every subscription).
// They may call Subscribe, Unsubscribe and LastID, not Close (go
// c.Close()). A panic in one is not recovered: it ends the process.
type Handler struct {
	// After, when set, starts the subscription after this message id
	// (e.g. a position the application stored) instead of at the live end.
	After string
	// OnMessage receives each message once, in id order.
	OnMessage func(Message)
	// OnSubscribed is called each time the server confirms the
	// subscription. recovered is true for a plain subscribe and for a
	// resume without a gap; false means messages were lost in between
	// (they were trimmed from the stream) and the application should
	// reload its state.
	OnSubscribed func(recovered bool)
	// OnDuplicate, when set, is called instead of OnMessage for a message
	// the client drops because its id is not above the last one delivered
	// on the subscription: the server sent it twice or out of order,
	// which it never should (docs/protocol.md, Ordering and delivery).
	// For an application's logs or metrics, and for tools that check
	// the server's delivery.
	OnDuplicate func(m Message, last string)
	// OnError receives the server's refusals of this subscription
	// (forbidden, invalid_channel, too_many_subscriptions, …). A refused
	// subscription stays registered and is retried on the next connection,
	// unless Unsubscribe is called. Without it, Options.OnError gets them.
	OnError func(*ServerError)
}

// Subscription is one channel subscription of a Client.
type Subscription struct {
	c       *Client
	channel string
	ref     int
	h       Handler
	last    stream.ID // last delivered id; zero: none yet
	hasLast bool
	// live: the server has answered this subscription's latest subscribe
	// (its ref echoed) on the current connection. Until then, frames for
	// the channel belong to an earlier subscription of the same channel
	// (unsubscribed, its frames still on the wire) and are dropped: taken
	// for this one, they would move its last id past a replay to come.
	live bool
}

// Channel is the subscription's channel.
func (s *Subscription) Channel() string { return s.channel }

// LastID is the id the subscription resumes after: the last message
// delivered (set as its OnMessage is called, so that a handler that
// subscribes again after LastID does not get its own message twice);
// before any, the server's position or Handler.After; "" if none yet. A
// resume that was not recovered sets it to the server's position, which
// can be older (see docs/clients.md). To go on in a new subscription
// (Handler.After) from another goroutine, call Unsubscribe first and
// LastID after it: once Unsubscribe has returned LastID no longer moves,
// while before it a message can be delivered after LastID was read, and
// the new subscription would get it again.
func (s *Subscription) LastID() string {
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	if !s.hasLast {
		return ""
	}
	return idString(s.last)
}

// Unsubscribe ends the subscription; no handler call starts after it
// returns, except one for a frame the reader goroutine had already begun
// to handle (it may start just after).
func (s *Subscription) Unsubscribe() {
	c := s.c
	c.writing.Lock()
	defer c.writing.Unlock()
	c.mu.Lock()
	if c.subs[s.channel] != s {
		c.mu.Unlock()
		return
	}
	delete(c.subs, s.channel)
	delete(c.refs, s.ref)
	ws := c.welcomedConnLocked()
	c.mu.Unlock()
	if ws != nil {
		_ = writeRequest(ws, protocol.Request{Type: protocol.TypeUnsubscribe, Channel: s.channel})
	}
}

// Client is a connection to the egress that reconnects by itself. Its
// methods are safe for concurrent use.
type Client struct {
	opts   Options
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}
	once   sync.Once

	// writing orders the requests: held from a change of the
	// subscriptions to the end of the write that tells the server, so
	// that the server sees them in the order they were made. It is taken
	// before mu, which is never held across a write: a write can block
	// for writeTimeout (a server that stopped reading), and State,
	// LastID, Err and Close must not wait for it.
	writing sync.Mutex

	mu sync.Mutex
	ws *websocket.Conn // nil while disconnected
	// welcomed: the current connection's welcome has been read and its
	// subscribes sent. Before it, a Subscribe or Unsubscribe sends
	// nothing: the subscribes go out with the others once the welcome
	// says how (subscribeFramesLocked).
	welcomed bool
	// closing: the client sent the current connection a close frame
	// (to retry its subscriptions) and waits for the answer, closeWait
	// at most: the server's pings no longer extend the read deadline.
	// Atomic, so that the check on every read takes no lock; changed
	// under mu, with ws.
	closing atomic.Bool
	subs    map[string]*Subscription
	refs    map[int]*Subscription
	nextRef int
	state   State
	err     error // why the client closed for good

	// token is run's GetToken call in flight, or one it gave up on that
	// has not returned yet (getToken); run's goroutine only.
	token *tokenCall

	// backoff, when set (tests, before run starts), replaces
	// retry.Backoff: the wait before the reconnect that follows the n-th
	// consecutive failed attempt.
	backoff func(n int) time.Duration
}

// Dial starts a client. It returns at once: the client connects in the
// background, so subscriptions made right away are sent on connect.
// Close it to stop it.
func Dial(opts Options) (*Client, error) {
	c, err := newClient(opts)
	if err != nil {
		return nil, err
	}
	go c.run()
	return c, nil
}

// newClient checks opts and makes the client Dial runs.
func newClient(opts Options) (*Client, error) {
	u, err := url.Parse(opts.URL)
	if err != nil {
		// Not quoted, nor net/url's message, which quotes the URL or the
		// piece it cannot read: either may be in a password or a token.
		return nil, errors.New("client: bad URL: it does not parse (not quoted: it may hold a password or a token); want ws:// or wss://host/ws")
	}
	if u.User != nil {
		// gorilla's dial refuses it (malformed ws or wss URL) every time:
		// the client would retry it for good as a lost connection.
		return nil, fmt.Errorf("client: URL %q has user information, which a WebSocket URL cannot carry: give the credential as Token or GetToken", redact.URL(u))
	}
	if (u.Scheme != "ws" && u.Scheme != "wss") || u.Host == "" {
		return nil, fmt.Errorf("client: bad URL %q (want ws:// or wss://host/ws)", redact.URL(u))
	}
	if err := checkQuery(u.RawQuery, u.Query(), opts); err != nil {
		return nil, err
	}
	if err := checkHeader(opts); err != nil {
		return nil, err
	}
	if opts.Token != "" && !sendableToken(opts.Token) {
		// Every dial would carry it and be refused (or not be made).
		return nil, errors.New("client: Token " + errTokenChars)
	}
	if opts.MinBackoff <= 0 {
		opts.MinBackoff = DefaultMinBackoff
	}
	if opts.MaxBackoff <= 0 {
		opts.MaxBackoff = DefaultMaxBackoff
	}
	if opts.MaxBackoff < opts.MinBackoff {
		opts.MaxBackoff = opts.MinBackoff
	}
	if opts.StableAfter <= 0 {
		opts.StableAfter = DefaultStableAfter
	}
	if opts.ReadTimeout == 0 {
		opts.ReadTimeout = DefaultReadTimeout
	}
	if opts.ConnectTimeout <= 0 {
		opts.ConnectTimeout = DefaultConnectTimeout
	}
	if opts.ReadLimit == 0 {
		opts.ReadLimit = DefaultReadLimit
	}
	if opts.Dialer == nil {
		opts.Dialer = websocket.DefaultDialer
	} else if opts.Dialer.HandshakeTimeout <= 0 {
		// A Dialer's zero HandshakeTimeout is no limit: an upgrade that
		// a half-open path or a stuck proxy never answers would hold the
		// client for good, with no reconnect. Bound it as gorilla's
		// DefaultDialer does; the caller's Dialer is not changed.
		d := *opts.Dialer
		d.HandshakeTimeout = DefaultHandshakeTimeout
		opts.Dialer = &d
	}
	ctx, cancel := context.WithCancel(context.Background())
	c := &Client{
		opts:   opts,
		ctx:    ctx,
		cancel: cancel,
		done:   make(chan struct{}),
		subs:   make(map[string]*Subscription),
		refs:   make(map[int]*Subscription),
	}
	return c, nil
}

// Subscribe subscribes to channel. The subscription lasts until
// Unsubscribe or Close, across reconnects: each new connection resumes it
// after the last id delivered. While connected, it writes the subscribe
// before it returns: up to 10 s against a server that stopped reading
// (the connection is then replaced). Unsubscribe does the same.
func (c *Client) Subscribe(channel string, h Handler) (*Subscription, error) {
	// Refused here, not by the server on every connect: ten refusals in a
	// row close the connection for good (1008).
	if !chanpkg.ValidName(channel) {
		return nil, fmt.Errorf("client: %q is not a channel name (^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$)", channel)
	}
	var after stream.ID
	if h.After != "" {
		id, ok := stream.ParseID(h.After)
		if !ok {
			return nil, fmt.Errorf("client: After %q is not a message id", h.After)
		}
		after = id
	}
	c.writing.Lock()
	defer c.writing.Unlock()
	c.mu.Lock()
	if c.state == StateClosed {
		c.mu.Unlock()
		return nil, ErrClosed
	}
	if _, ok := c.subs[channel]; ok {
		c.mu.Unlock()
		return nil, fmt.Errorf("client: already subscribed to %q", channel)
	}
	c.nextRef++
	s := &Subscription{c: c, channel: channel, ref: c.nextRef, h: h, last: after, hasLast: h.After != ""}
	c.subs[channel] = s
	c.refs[s.ref] = s
	ws := c.welcomedConnLocked()
	var r protocol.Request
	if ws != nil {
		r = s.request()
	}
	c.mu.Unlock()
	if ws != nil {
		_ = writeRequest(ws, r)
	}
	return s, nil
}

// State is the current connection state.
func (c *Client) State() State {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.state
}

// Err is why the client closed for good (a *CloseError for a final close
// code, a *RefusedError for a final refusal of the upgrade), or nil.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Done is closed when the client has stopped (Close, a final close by the
// server, or a final refusal: see RefusedError).
func (c *Client) Done() <-chan struct{} { return c.done }

// Close closes the socket (1000), or ends the dial, the upgrade or the
// wait in progress, and waits for the client's goroutine; a write in
// progress (a server that stopped reading) does not hold it. It is
// idempotent. Handlers and OnState run on that goroutine: one that wants
// the client closed calls go c.Close(), since Close would wait for
// itself. A GetToken call in progress has its ctx cancelled, and is not
// waited for; nor is a Dialer's NetDial in progress, which takes no ctx
// (the connection it returns is closed).
func (c *Client) Close() error {
	c.once.Do(func() {
		c.cancel()
		// Under mu, connect either sees the cancel or has set c.ws.
		c.mu.Lock()
		ws := c.ws
		c.mu.Unlock()
		if ws != nil {
			// Both safe beside a write in progress, which the close of
			// the socket ends: Close does not wait for a blocked write.
			_ = ws.WriteControl(websocket.CloseMessage,
				websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""), time.Now().Add(time.Second))
			_ = ws.Close()
		}
	})
	<-c.done
	return nil
}

// request is the subscribe frame for s; the subscription is not live
// until the server answers it. c.mu is held.
func (s *Subscription) request() protocol.Request {
	s.live = false
	r := protocol.Request{Type: protocol.TypeSubscribe, Channel: s.channel, Ref: json.RawMessage(strconv.Itoa(s.ref))}
	if s.hasLast {
		a := idString(s.last)
		r.After = &a
	}
	return r
}

// welcomedConnLocked is the connection requests go out on: nil before
// its welcome (subscribeFramesLocked sends them then). c.mu is held.
func (c *Client) welcomedConnLocked() *websocket.Conn {
	if !c.welcomed {
		return nil
	}
	return c.ws
}

// writeRequest sends one request; c.writing is held (not c.mu).
func writeRequest(ws *websocket.Conn, r protocol.Request) error {
	b, _ := json.Marshal(r)
	return writeFrame(ws, b)
}

// writeFrame sends one frame; c.writing is held (not c.mu).
func writeFrame(ws *websocket.Conn, b []byte) error {
	_ = ws.SetWriteDeadline(time.Now().Add(writeTimeout))
	err := ws.WriteMessage(websocket.TextMessage, b)
	if err != nil && !errors.Is(err, websocket.ErrCloseSent) {
		// A request that did not go out, a write that timed out (the
		// server stopped reading) as much as a broken socket, leaves a
		// socket that sends nothing again (gorilla fails every later
		// write) while its reads may go on: close it, so that the read
		// ends and the next connection sends every subscription. After
		// a close frame (ErrCloseSent) the read ends by itself.
		_ = ws.Close()
	}
	return err
}

// maxBatchBytes caps a frame of subscribes, whatever the server allows.
const maxBatchBytes = 64 << 10

// subscribeFramesLocked is the frames of the subscribe of every
// subscription, in the order they were made, to send once the
// connection's welcome has been read; c.writing and c.mu are held. A
// server that announced max_frame_bytes gets them packed into as few
// frames as fit (newline-separated, each frame at most
// min(max_frame_bytes, 64 KiB)): a reconnect's burst is then one frame,
// within a platform's per-connection message rate (SCF takes 10 a
// second on a WebSocket function's connection). An older server gets one
// frame each.
func (c *Client) subscribeFramesLocked(maxFrame int64) [][]byte {
	subs := make([]*Subscription, 0, len(c.subs))
	for _, s := range c.subs {
		subs = append(subs, s)
	}
	slices.SortFunc(subs, func(a, b *Subscription) int { return a.ref - b.ref })
	var frames [][]byte
	if maxFrame <= 0 {
		for _, s := range subs {
			b, _ := json.Marshal(s.request())
			frames = append(frames, b)
		}
		return frames
	}
	limit := int(min(maxFrame, maxBatchBytes))
	var buf []byte
	for _, s := range subs {
		b, _ := json.Marshal(s.request())
		if len(buf) > 0 && len(buf)+1+len(b) > limit {
			frames = append(frames, buf)
			buf = nil
		}
		if len(buf) > 0 {
			buf = append(buf, '\n')
		}
		buf = append(buf, b...)
	}
	if len(buf) > 0 {
		frames = append(frames, buf)
	}
	return frames
}

func (c *Client) setState(s State, err error) {
	c.mu.Lock()
	changed := c.state != s
	c.state = s
	if s == StateClosed && err != nil {
		c.err = err
	}
	c.mu.Unlock()
	if changed && c.opts.OnState != nil {
		c.opts.OnState(s, err)
	}
}

// retryable reports whether the client reconnects after close code code.
func retryable(code int) bool {
	switch code {
	case protocol.CloseDisconnected, protocol.CloseProtocolError, protocol.CloseInvalidData, protocol.ClosePolicy, protocol.CloseTooBig:
		return false
	}
	return true
}

// planned reports whether code is a routine rotation, after which the
// backoff starts over.
func planned(code int) bool {
	switch code {
	case protocol.CloseGoingAway, protocol.CloseIdleTimeout, protocol.CloseLifetime:
		return true
	}
	return false
}

// run connects and reconnects until Close or a final close.
func (c *Client) run() {
	defer close(c.done)
	// The first state is connecting already (the zero value): report it,
	// since setState reports changes only.
	if c.opts.OnState != nil {
		c.opts.OnState(StateConnecting, nil)
	}
	attempt := 0
	token, freshToken := c.opts.Token, c.opts.GetToken != nil
	for {
		if c.ctx.Err() != nil {
			c.setState(StateClosed, nil)
			return
		}
		c.setState(StateConnecting, nil)
		if freshToken {
			t, err := c.getToken()
			if err == nil && !sendableToken(t) {
				// Not dialled: asked again after the backoff, as after
				// GetToken's own error.
				err = errors.New("the token " + errTokenChars)
			}
			if err != nil {
				if c.ctx.Err() != nil {
					continue
				}
				c.setState(StateDisconnected, fmt.Errorf("client: get token: %w", err))
				if !c.sleep(c.delay(attempt)) {
					continue
				}
				attempt++
				continue
			}
			token, freshToken = t, false
		}
		code, welcomedAt, err := c.connect(token)
		if c.ctx.Err() != nil {
			continue
		}
		if !retryable(code) || finalRefusal(code, c.opts.GetToken != nil) {
			// A close or refusal that a retry cannot change: the
			// application learns it from Done and Err.
			c.setState(StateClosed, err)
			return
		}
		if code == protocol.CloseTokenExpired || code == http.StatusUnauthorized {
			freshToken = c.opts.GetToken != nil
		}
		if !welcomedAt.IsZero() && (planned(code) || time.Since(welcomedAt) >= c.opts.StableAfter) {
			attempt = 0
		}
		c.setState(StateDisconnected, err)
		delay := c.delay(attempt)
		var re *RefusedError
		if errors.As(err, &re) && re.RetryAfter > delay {
			// The server asked for a pause (503 while draining or full):
			// honour it, spread over half as long again, so that the
			// clients a draining instance turned away do not all come
			// back in the same instant.
			delay = re.RetryAfter + rand.N(re.RetryAfter/2+1)
		}
		if !c.sleep(delay) {
			continue
		}
		attempt++
	}
}

// tokenCall is a call of GetToken, made on a goroutine of its own so
// that one that does not return cannot hold the client.
type tokenCall struct {
	ctx    context.Context // GetToken's: ConnectTimeout, under c.ctx
	cancel context.CancelFunc
	done   chan struct{} // closed when GetToken has returned
	token  string
	err    error
}

// getToken asks GetToken for a token, waiting ConnectTimeout at most, as
// for a dial's welcome: a token endpoint that never answers would
// otherwise leave the client connecting for ever. A call given up has its
// ctx cancelled; if it does not heed it, it is not called again while it
// runs (calls would pile up, one an attempt, and GetToken need not be safe
// for concurrent use): the next attempt waits for that same call, and
// takes its token if one comes. It runs on run's goroutine, which alone
// touches c.token.
func (c *Client) getToken() (string, error) {
	if tc := c.token; tc == nil || (isDone(tc.done) && tc.err != nil) {
		// None yet, or the one given up has failed since (its ctx
		// cancelled, most likely): a fresh call.
		ctx, cancel := context.WithTimeout(c.ctx, c.opts.ConnectTimeout)
		tc = &tokenCall{ctx: ctx, cancel: cancel, done: make(chan struct{})}
		go func() {
			defer close(tc.done)
			defer cancel()
			tc.token, tc.err = c.opts.GetToken(ctx)
		}()
		c.token = tc
	}
	tc := c.token
	late := func(err error) error {
		return fmt.Errorf("GetToken has not returned within ConnectTimeout (%v): %w", c.opts.ConnectTimeout, err)
	}
	t := time.NewTimer(c.opts.ConnectTimeout)
	defer t.Stop()
	select {
	case <-tc.done:
		c.token = nil
		if tc.err != nil && errors.Is(tc.ctx.Err(), context.DeadlineExceeded) {
			return "", late(tc.err) // its ctx's deadline, before the timer
		}
		return tc.token, tc.err
	case <-t.C:
		tc.cancel()
		return "", late(context.DeadlineExceeded)
	case <-c.ctx.Done():
		// Close: not waited for (its ctx, under c.ctx, is cancelled).
		return "", c.ctx.Err()
	}
}

func isDone(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// delay is the backoff before the reconnect after attempt consecutive
// failed attempts.
func (c *Client) delay(attempt int) time.Duration {
	if c.backoff != nil {
		return c.backoff(attempt)
	}
	return retry.Backoff(c.opts.MinBackoff, c.opts.MaxBackoff, attempt)
}

// sleep waits d; false if the client was closed meanwhile.
func (c *Client) sleep(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-c.ctx.Done():
		return false
	}
}

// errTokenChars says what a token may hold.
const errTokenChars = "cannot be sent as the token.<token> subprotocol: it must be printable ASCII without spaces or ()<>@,;:\\\"/[]?={} (a JWT fits)"

// sendableToken reports whether t can travel in the "token.<t>"
// subprotocol: a subprotocol is an HTTP token (RFC 6455 §4.1, RFC 9110
// tchar), and a comma would split it in two, a space or a control
// character would have the upgrade refused. "" is no token.
func sendableToken(t string) bool {
	for i := 0; i < len(t); i++ {
		b := t[i]
		if b <= ' ' || b >= 0x7f || strings.IndexByte(`()<>@,;:\"/[]?={}`, b) >= 0 {
			return false
		}
	}
	return true
}

// checkQuery refuses a URL query that would work against the client,
// silently: channels the server subscribes by itself on every connect (no
// ref, so the client drops their messages and its own Subscribe of them
// is answered already_subscribed; no resume position either), a token or
// user that would override the options' (the server reads the query's
// token before the subprotocol, and User replaces the query's user), or a
// token or user given twice, which the egress refuses with 400 on every
// dial.
func checkQuery(rawQuery string, q url.Values, opts Options) error {
	// Go's parser drops a pair with a ';' or a bad %-escape (and every
	// pair of a query of more than 10,000), so the checks below would not
	// see it; the egress refuses it (400) on every dial.
	for _, name := range []string{"channels", "token", "user"} {
		if query.Malformed(rawQuery, name) {
			return fmt.Errorf("client: the URL's %s parameter is malformed (a ';', a bad %%-escape, or one of more than 10000 parameters): the egress refuses it (400)", name)
		}
	}
	if q.Has("channels") {
		return errors.New("client: the URL has a channels parameter: call Subscribe for each channel instead " +
			"(the client resumes its subscriptions across reconnects; the server's own subscriptions of the URL's channels are not delivered)")
	}
	for _, name := range []string{"token", "user"} {
		if n := len(q[name]); n > 1 {
			return fmt.Errorf("client: the URL has %d %s parameters: the egress refuses a repeated %s (400)", n, name, name)
		}
	}
	// An empty token= is no token (docs/protocol.md): the server takes
	// Token's or GetToken's from the subprotocol then.
	if q.Get("token") != "" && (opts.Token != "" || opts.GetToken != nil) {
		return errors.New("client: the URL has a token parameter and Token or GetToken is set: the server would use the URL's token; " +
			"remove it from the URL (Token and GetToken travel as a subprotocol, out of the URLs proxies log)")
	}
	if q.Has("user") && opts.User != "" {
		return errors.New("client: the URL has a user parameter and User is set: give the user one way")
	}
	return nil
}

// checkHeader refuses a Header that gorilla's dial refuses every time,
// which the client would otherwise retry for good as a lost connection: a
// header the WebSocket handshake sets itself, or Sec-WebSocket-Protocol
// beside a token (sent as a subprotocol) or a Dialer's Subprotocols.
func checkHeader(opts Options) error {
	for k := range opts.Header {
		switch http.CanonicalHeaderKey(k) {
		case "Upgrade", "Connection", "Sec-Websocket-Key", "Sec-Websocket-Version", "Sec-Websocket-Extensions":
			return fmt.Errorf("client: Header sets %s, which the WebSocket handshake sets itself", k)
		case "Sec-Websocket-Protocol":
			if opts.Token != "" || opts.GetToken != nil || (opts.Dialer != nil && len(opts.Dialer.Subprotocols) > 0) {
				return fmt.Errorf("client: Header sets %s beside Token, GetToken or Dialer.Subprotocols, which set it: "+
					"give subprotocols in Dialer.Subprotocols (the token is sent as one)", k)
			}
		}
	}
	return nil
}

// dialURL is the URL as given, with User's user parameter added: the
// rest of the query is sent as written, not as Go's parser would
// re-encode it (which drops the pairs it cannot parse), but for the
// bytes a request line cannot carry (a space, a control character,
// non-ASCII), which are percent-encoded as a browser does.
func (c *Client) dialURL() string {
	u, _ := url.Parse(c.opts.URL)
	u.RawQuery = escapeQuery(u.RawQuery)
	if c.opts.User != "" {
		user := "user=" + url.QueryEscape(c.opts.User)
		if u.RawQuery == "" {
			u.RawQuery = user
		} else {
			u.RawQuery += "&" + user
		}
	}
	return u.String()
}

// escapeQuery percent-encodes the bytes of a raw query that may not
// appear in an HTTP request line as they are, leaving every other byte
// (an escape, a ';', a '+') as written.
func escapeQuery(raw string) string {
	const hex = "0123456789ABCDEF"
	var b []byte
	for i := 0; i < len(raw); i++ {
		ch := raw[i]
		if ch > ' ' && ch < 0x7f && !strings.ContainsRune(`"<>\^`+"`"+`{|}`, rune(ch)) {
			if b != nil {
				b = append(b, ch)
			}
			continue
		}
		if b == nil {
			b = append(make([]byte, 0, len(raw)+8), raw[:i]...)
		}
		b = append(b, '%', hex[ch>>4], hex[ch&15])
	}
	if b == nil {
		return raw
	}
	return string(b)
}

// connect runs one connection to its end. code is the close code (1006
// for a lost connection or a failed dial; an HTTP status for a refused
// upgrade, with a *RefusedError: see finalRefusal for which end the
// client), and when the welcome came (zero: none did).
func (c *Client) connect(token string) (code int, welcomedAt time.Time, err error) {
	// The welcome is due ConnectTimeout after the dial: gorilla takes the
	// context's deadline for the upgrade's reads and writes too.
	welcomeBy := time.Now().Add(c.opts.ConnectTimeout)
	noWelcome := func(err error) error {
		return fmt.Errorf("client: no welcome within ConnectTimeout (%v) of the dial: %w", c.opts.ConnectTimeout, err)
	}
	dctx, cancel := context.WithDeadline(c.ctx, welcomeBy)
	defer cancel()
	d, dialed := c.dialer(token)
	ws, resp, err := d.DialContext(dctx, c.dialURL(), c.opts.Header)
	dialed()
	if err != nil {
		if resp != nil {
			return resp.StatusCode, time.Time{}, refused(resp)
		}
		if c.ctx.Err() == nil && !time.Now().Before(welcomeBy) {
			return 1006, time.Time{}, noWelcome(err)
		}
		return 1006, time.Time{}, fmt.Errorf("client: dial: %w", err)
	}
	// ReadTimeout runs while the client waits for the server, from each
	// read (and each ping) on: not while a handler runs, however long.
	// Until the welcome, the read ends at welcomeBy at the latest, pings
	// or not, ReadTimeout or not. It runs on the reader goroutine only
	// (the ping handler is called from ReadMessage), as welcomedAt is set.
	alive := func() {
		if c.closing.Load() {
			return
		}
		var by time.Time // zero: no deadline
		if c.opts.ReadTimeout > 0 {
			by = time.Now().Add(c.opts.ReadTimeout)
		}
		if welcomedAt.IsZero() && (by.IsZero() || by.After(welcomeBy)) {
			by = welcomeBy
		}
		_ = ws.SetReadDeadline(by)
	}
	if c.opts.ReadLimit > 0 {
		// gorilla checks each frame's length before it reads the payload,
		// and answers a frame over the limit with a close 1009.
		ws.SetReadLimit(c.opts.ReadLimit)
	}
	ws.SetPingHandler(func(data string) error {
		alive()
		err := ws.WriteControl(websocket.PongMessage, []byte(data), time.Now().Add(writeTimeout))
		var ne net.Error
		if errors.Is(err, websocket.ErrCloseSent) || (errors.As(err, &ne) && ne.Timeout()) {
			return nil // as gorilla's own handler: the read reports the end
		}
		return err
	})
	c.mu.Lock()
	if c.ctx.Err() != nil { // Close ran before c.ws was set
		c.mu.Unlock()
		ws.Close()
		return websocket.CloseNormalClosure, time.Time{}, nil
	}
	// The subscribes wait for the welcome (dispatch), which says whether
	// the server takes several per frame; Close meanwhile closes ws, which
	// ends the read below, as ReadTimeout does.
	c.ws = ws
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		c.ws, c.welcomed = nil, false
		c.closing.Store(false)
		c.mu.Unlock()
		ws.Close()
	}()

	for {
		alive()
		_, data, err := ws.ReadMessage()
		if err != nil {
			var ce *websocket.CloseError
			if errors.As(err, &ce) && ce.Code != websocket.CloseAbnormalClosure {
				if !retryable(ce.Code) {
					return ce.Code, welcomedAt, &CloseError{Code: ce.Code, Reason: ce.Text}
				}
				return ce.Code, welcomedAt, &DisconnectError{Code: ce.Code, Reason: ce.Text}
			}
			if errors.Is(err, websocket.ErrReadLimit) {
				// Final, as the server's 1009: the resume would bring the
				// same message again, and a server or proxy that sends
				// such frames would have the client reconnect for ever.
				return protocol.CloseTooBig, welcomedAt, &CloseError{Code: protocol.CloseTooBig, ByClient: true,
					Reason: fmt.Sprintf("the server sent a frame over ReadLimit (%d bytes); raise Options.ReadLimit if its messages can be that large", c.opts.ReadLimit)}
			}
			var ne net.Error
			if welcomedAt.IsZero() && errors.As(err, &ne) && ne.Timeout() && !time.Now().Before(welcomeBy) {
				return 1006, time.Time{}, noWelcome(err)
			}
			// Including gorilla's 1006 for a connection that ended without
			// a close frame (a FIN; a reset is a plain error): no close
			// frame carries 1006 (RFC 6455 §7.4.1), so it is no server
			// close.
			return 1006, welcomedAt, fmt.Errorf("client: connection lost: %w", err)
		}
		if c.dispatch(data) && welcomedAt.IsZero() {
			welcomedAt = time.Now()
		}
	}
}

// dialer is the Dialer of one connection: Options.Dialer (not changed)
// with the token's subprotocols, and whose connection Close closes while
// the upgrade is in flight. gorilla's DialContext heeds its context while
// it dials, but not in the HTTP exchange that follows, which only the
// HandshakeTimeout (45 s by default) would end: a server or proxy that takes the
// connection and never answers would hold Close that long. dialed, called
// once DialContext has returned, leaves the connection to connect's own
// handling of Close.
func (c *Client) dialer(token string) (d *websocket.Dialer, dialed func()) {
	dt := *c.opts.Dialer
	if token != "" {
		dt.Subprotocols = append([]string{"wsrelay", "token." + token}, dt.Subprotocols...)
	}
	var stops []func() bool
	watch := func(dial func(context.Context, string, string) (net.Conn, error)) func(context.Context, string, string) (net.Conn, error) {
		return func(ctx context.Context, network, addr string) (net.Conn, error) {
			nc, err := dial(ctx, network, addr)
			if err == nil {
				stops = append(stops, context.AfterFunc(c.ctx, func() { _ = nc.Close() }))
			}
			return nc, err
		}
	}
	// The dial gorilla would make: NetDialContext, else NetDial, else a
	// net.Dialer's; NetDialTLSContext, when set, replaces it for wss.
	next := dt.NetDialContext
	if next == nil {
		if nd := dt.NetDial; nd != nil {
			next = c.untilClose(nd)
		} else {
			next = (&net.Dialer{}).DialContext
		}
	}
	dt.NetDialContext = watch(next)
	if dt.NetDialTLSContext != nil {
		dt.NetDialTLSContext = watch(dt.NetDialTLSContext)
	}
	return &dt, func() {
		for _, stop := range stops {
			stop()
		}
	}
}

// untilClose makes a NetDial, which takes no ctx and which nothing can
// end, one that Close does not wait for: the dial runs on a goroutine of
// its own, and when Close comes first it is left to finish there, the
// connection it returns then closed. That goroutine has no owner to wait
// for it (it ends when NetDial returns, and no later dial follows a
// Close); a NetDialContext, which gorilla prefers when both are set, is
// simply cancelled. ConnectTimeout still does not end a NetDial: the
// dial it gave up on would run on beside the next one, a pile of them
// for a dial that never returns.
func (c *Client) untilClose(nd func(network, addr string) (net.Conn, error)) func(context.Context, string, string) (net.Conn, error) {
	return func(_ context.Context, network, addr string) (net.Conn, error) {
		type dialResult struct {
			nc  net.Conn
			err error
		}
		res := make(chan dialResult) // unbuffered: taken, or the dial was given up
		go func() {
			nc, err := nd(network, addr)
			select {
			case res <- dialResult{nc, err}:
			case <-c.ctx.Done():
				if nc != nil {
					_ = nc.Close()
				}
			}
		}()
		select {
		case r := <-res:
			return r.nc, r.err
		case <-c.ctx.Done():
			return nil, c.ctx.Err()
		}
	}
}

// frame is any server frame.
type frame struct {
	Type      string          `json:"type"`
	Channel   string          `json:"channel"`
	Recovered *bool           `json:"recovered"`
	Position  string          `json:"position"`
	Code      string          `json:"code"`
	Message   string          `json:"message"`
	Ref       json.RawMessage `json:"ref"`
	Welcome
	// MaxFrameBytes shadows Welcome's, read as it comes: a value that is
	// not an integer must cost only itself (maxFrameBytes), not the
	// welcome, which json.Unmarshal would refuse whole.
	MaxFrameBytes json.RawMessage `json:"max_frame_bytes"`
}

// maxFrameBytes is a welcome's max_frame_bytes: a positive integer, or 0
// for anything else, as if it were absent (an older server: one subscribe
// per frame), since a value the client cannot use tells it nothing.
func maxFrameBytes(raw json.RawMessage) int64 {
	n, err := strconv.ParseInt(string(raw), 10, 64)
	if err != nil || n <= 0 {
		return 0
	}
	return n
}

// dispatch handles one server frame; it reports whether it was a welcome.
func (c *Client) dispatch(data []byte) bool {
	var f frame
	if err := json.Unmarshal(data, &f); err != nil {
		return false
	}
	switch f.Type {
	case protocol.TypeWelcome:
		f.Welcome.MaxFrameBytes = maxFrameBytes(f.MaxFrameBytes)
		c.writing.Lock()
		c.mu.Lock()
		ws, again := c.ws, c.welcomed
		var frames [][]byte
		if !again && ws != nil {
			c.welcomed = true
			frames = c.subscribeFramesLocked(f.Welcome.MaxFrameBytes)
		}
		c.mu.Unlock()
		for _, b := range frames {
			if writeFrame(ws, b) != nil {
				break // it closed the socket: the read reports it
			}
		}
		c.writing.Unlock()
		if again {
			// A second welcome on the connection (a server bug): the
			// subscribes went out after the first, OnWelcome had it.
			return true
		}
		c.setState(StateConnected, nil)
		if c.opts.OnWelcome != nil {
			c.opts.OnWelcome(f.Welcome)
		}
		return true
	case protocol.TypeMessage:
		var m Message
		if err := json.Unmarshal(data, &m); err != nil {
			return false
		}
		if m.Channel == "" {
			if c.opts.OnMessage != nil {
				c.opts.OnMessage(m)
			}
			return false
		}
		id, ok := stream.ParseID(m.ID)
		c.mu.Lock()
		s := c.subs[m.Channel]
		if s == nil || !s.live || !ok {
			c.mu.Unlock() // unsubscribed, or an earlier subscription's
			return false
		}
		if s.hasLast && id.Compare(s.last) <= 0 {
			last := s.last.String()
			c.mu.Unlock()
			if s.h.OnDuplicate != nil {
				s.h.OnDuplicate(m, last)
			}
			return false
		}
		s.last, s.hasLast = id, true
		c.mu.Unlock()
		if s.h.OnMessage != nil {
			s.h.OnMessage(m)
		}
	case protocol.TypeSubscribed:
		c.mu.Lock()
		s := c.subs[f.Channel]
		if s != nil && (string(f.Ref) != strconv.Itoa(s.ref) || s.live) {
			// The answer to an earlier subscription of the channel, or
			// a second answer to this one's subscribe (a server bug): an
			// unrecovered one would take the subscription back to its
			// position and deliver what follows again.
			s = nil
		}
		if s != nil {
			s.live = true
		}
		// A fresh subscription starts from the server's position, so a
		// cut before its first message still resumes without a gap. A
		// resume that was not recovered goes on from where the stream
		// does, which can be behind the id held (one from a Redis that
		// failed over): holding on to it would drop what follows.
		if s != nil && (!s.hasLast || (f.Recovered != nil && !*f.Recovered)) {
			if id, ok := stream.ParseID(f.Position); ok {
				s.last, s.hasLast = id, true
			}
		}
		c.mu.Unlock()
		if s != nil && s.h.OnSubscribed != nil {
			s.h.OnSubscribed(f.Recovered == nil || *f.Recovered)
		}
	case protocol.TypeError:
		if f.Code == protocol.CodeNotSubscribed {
			// The answer to an unsubscribe of a subscription the server
			// had refused (or one it never confirmed): the state the
			// client asked for, not news for any handler.
			return false
		}
		se := &ServerError{Code: f.Code, Message: f.Message}
		var s *Subscription
		if ref, err := strconv.Atoi(string(f.Ref)); err == nil {
			c.mu.Lock()
			s = c.refs[ref]
			c.mu.Unlock()
		}
		if s != nil && f.Code == protocol.CodeUnavailable {
			// The server could not subscribe now: reconnecting retries
			// every subscription, resuming each where it was.
			c.mu.Lock()
			ws := c.ws
			if c.closing.Load() {
				ws = nil // asked already: the deadline stands
			}
			if ws != nil {
				c.closing.Store(true)
			}
			c.mu.Unlock()
			if ws != nil {
				_ = ws.WriteControl(websocket.CloseMessage,
					websocket.FormatCloseMessage(websocket.CloseNormalClosure, "retrying subscription"), time.Now().Add(time.Second))
				// A server that never answers (it stopped reading, or a
				// proxy lost the close) must not keep the client on a
				// socket it can no longer send on.
				_ = ws.SetReadDeadline(time.Now().Add(closeWait))
			}
		}
		// A subscription without its own OnError does not swallow its
		// refusal (forbidden, too_many_subscriptions): the client's hears
		// of it, as the JS client's "error" event does.
		switch {
		case s != nil && s.h.OnError != nil:
			s.h.OnError(se)
		case c.opts.OnError != nil:
			c.opts.OnError(se)
		}
	}
	return false
}

func idString(id stream.ID) string {
	return strconv.FormatUint(id.MS, 10) + "-" + strconv.FormatUint(id.Seq, 10)
}
