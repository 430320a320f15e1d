// Package publisher is the Go client of the ingress HTTP API
// (docs/api.md), for backend services: it publishes to channels (one
// message or a batch), sends to one connection or to every connection of
// a user, disconnects a connection or every connection of a user, reads
// and clears a channel's history and reads the connection registry. It
// is the server-side counterpart of package client, which receives.
//
// Its point is safe retries. Every POST carries an Idempotency-Key: the
// caller's (WithIdempotencyKey), or a random one made once per call. Each
// retry of the call sends the same key and the same body, so a publish
// whose outcome the caller could not see (a timeout, a connection closed
// before the response, a 503 after part of a batch was written) is
// written exactly once: the ingress answers the retry with the first
// attempt's reply (Result.Replayed) and writes nothing again.
//
// # Retry policy
//
// A call makes at most Options.MaxAttempts attempts (4 by default). It
// retries after:
//   - a transport error: the request could not be sent or no whole
//     response came back (a timeout, a connection refused, reset or closed
//     before the whole response, a 2xx whose JSON is cut short or that
//     has no body), except a TLS certificate error. A POST's retry
//     carries the same Idempotency-Key, so one whose first attempt was
//     written all the same gets that attempt's reply, not a second write;
//   - 503 (the ingress cannot reach Redis), and 502 or 504 (a gateway's);
//   - 429 with Retry-After (a rate limit). A 429 without it (a batch
//     larger than the burst) can never pass and is final;
//   - 409 idempotency_in_progress (an attempt with the same key is still
//     being written).
//
// Every other status is final: a 3xx (a redirect, not followed), the
// rest of the 4xx (the request is wrong or not allowed, which a retry
// cannot change) and 500 (a bug in the ingress). The wait before retry
// n (0-based) is a random time in [0, min(MaxBackoff, MinBackoff·2ⁿ)]
// (full jitter, 100 ms doubling to 5 s by default), and at least the
// response's Retry-After (seconds or an HTTP date, at most
// MaxRetryAfter; one that is neither, a negative number say, counts as
// none). The reads (History, Connection, ChannelConnections,
// UserConnections: GET) and the deletes (Disconnect, DisconnectUser,
// ClearHistory) are idempotent by themselves: they are retried on the
// same conditions, without a key.
//
// The call's ctx bounds it all: when ctx ends, the call returns at once
// with an error that wraps both ctx.Err() and the last attempt's error.
// When the attempts run out, or an answer is final, the call returns the
// last attempt's error; so it does, at once, when the wait before the
// next retry would end after ctx's deadline (that retry could never be
// made), and that error does not wrap ctx.Err(), which has not ended. An answer of the ingress is an *Error (use
// errors.As), with the HTTP status and the ingress's error code; a
// redirect is not followed, and is an *Error too. Input the ingress
// would refuse (a channel name outside its alphabet, nil Data, Data
// nested more than MaxDataDepth levels deep, a bad Idempotency-Key) is
// refused before any request, with an error that wraps ErrInvalid. The
// error of a POST or a DELETE that may have been carried out all the
// same (an attempt without an answer, a 503, …) wraps ErrOutcomeUnknown,
// whatever the last attempt's answer was. An attempt that never had a
// connection (a connection refused, a host name not resolved, a TLS
// handshake that failed) sent nothing: it is retried as any transport
// error, and does not make the outcome unknown.
//
// A Client is safe for concurrent use.
package publisher

import (
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/wsrelay/wsrelay/shared/channel"
	"github.com/wsrelay/wsrelay/shared/internal/redact"
	"github.com/wsrelay/wsrelay/shared/jsondepth"
)

// Defaults of Options' zero values.
const (
	DefaultTimeout     = 10 * time.Second
	DefaultMaxAttempts = 4
	DefaultMinBackoff  = 100 * time.Millisecond
	DefaultMaxBackoff  = 5 * time.Second
)

// Bounds of the ingress that a call checks before sending (docs/api.md).
const (
	// MaxBatchItems is the most items a batch may hold, the largest
	// MAX_BATCH_ITEMS; an ingress may be configured with fewer (400
	// invalid_batch above it).
	MaxBatchItems = 1000
	// MaxHistoryLimit is the largest page a History call may ask for.
	MaxHistoryLimit = 1000
	// MaxIdempotencyKeyLen is the longest Idempotency-Key.
	MaxIdempotencyKeyLen = 255
	// MaxDataDepth is how deeply a message's Data may nest arrays and
	// objects (deeper is 400 invalid_json: a history page holds data
	// three levels down, past some JSON decoders' limits).
	MaxDataDepth = 64
)

// ErrInvalid is wrapped by the errors of input refused before any
// request: what the ingress would answer with a 400 (or a 404, for a
// connection id outside the alphabet of ids).
var ErrInvalid = errors.New("publisher: invalid input")

// ErrOutcomeUnknown is wrapped by the error of a POST or a DELETE (a
// publish, a send, Disconnect, DisconnectUser, ClearHistory) that may
// have been carried out although it failed: an attempt got no answer (a
// timeout, a connection closed or reset, ctx ending while it was sent), a
// 5xx (a 503 after part of a batch was written, a gateway's after
// forwarding it), 409 idempotency_in_progress, or a 2xx that is not the
// endpoint's reply; whatever a later attempt answered. Such a call is
// repeated safely only with the same Idempotency-Key
// (WithIdempotencyKey). An error that does not wrap it says that nothing
// was done: the input was refused before any request (ErrInvalid), or
// every attempt was refused (a 4xx *Error: the ingress writes nothing
// then, and a proxy's refusal did not reach it; a 3xx, not followed) or
// failed before any byte of the request was sent (it got no connection:
// a connection refused, say; the error says "not sent").
var ErrOutcomeUnknown = errors.New("publisher: outcome unknown")

// Options configure New. Only URL is required.
type Options struct {
	// URL is the ingress's base URL, http:// or https://host[:port]. A
	// path is kept as the prefix of every endpoint's path (an API
	// gateway's stage, e.g. https://service-….apigw.tencentcs.com/release;
	// an SCF function URL has none).
	// A query, a fragment or user information is refused.
	URL string
	// Token is an API key or a user token (JWT), sent as
	// "Authorization: Bearer <Token>" (docs/security.md). Empty: no
	// Authorization header (an ingress with ALLOW_ANONYMOUS=true).
	Token string
	// HTTPClient sends the requests; nil means a client of the
	// publisher's own, over http.DefaultTransport, with a Timeout of
	// DefaultTimeout (10 s). Its Timeout bounds each attempt, the
	// response's body included (a server that stops or trickles it), the
	// call's ctx the whole call; with a zero Timeout only ctx bounds an
	// attempt. New takes a copy, whose CheckRedirect follows no redirect:
	// a 3xx is returned as an *Error, since following it would turn a
	// POST or a DELETE into a GET (301, 302, 303) or send the message to
	// a host not configured (307, 308).
	HTTPClient *http.Client
	// MaxAttempts is the most attempts a call makes, the first included:
	// 1 never retries. Zero means 4; negative is refused.
	MaxAttempts int
	// MinBackoff and MaxBackoff bound the wait before a retry: retry n
	// (0-based) waits a random time in [0, min(MaxBackoff, MinBackoff·2ⁿ)],
	// and at least the response's Retry-After. Zero (or negative) means
	// the default, 100 ms and 5 s.
	MinBackoff, MaxBackoff time.Duration
}

// Client calls one ingress. Its methods are safe for concurrent use; it
// holds no goroutine and needs no closing (see CloseIdleConnections).
type Client struct {
	base        string // scheme://host[:port] and the escaped path prefix, without a trailing slash
	auth        string // the Authorization header, or ""
	hc          *http.Client
	maxAttempts int
	minBackoff  time.Duration
	maxBackoff  time.Duration
}

// New checks opts and returns a Client. It sends nothing.
func New(opts Options) (*Client, error) {
	u, err := url.Parse(opts.URL)
	if err != nil {
		// Not quoted, nor net/url's message, which quotes the URL or the
		// piece it cannot read: either may be in a password.
		return nil, errors.New("publisher: bad URL: it does not parse (not quoted: it may hold a password); want http:// or https://host[:port], with an optional path prefix")
	}
	if (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("publisher: bad URL %q (want http:// or https://host[:port], with an optional path prefix)", redact.URL(u))
	}
	switch {
	case u.RawQuery != "" || u.ForceQuery:
		return nil, fmt.Errorf("publisher: URL %q has a query (not shown: it may hold a credential): give the ingress's base URL", redact.URL(u))
	case u.Fragment != "" || strings.Contains(opts.URL, "#"):
		return nil, fmt.Errorf("publisher: URL %q has a fragment: give the ingress's base URL", redact.URL(u))
	case u.User != nil:
		return nil, fmt.Errorf("publisher: URL %q has user information: give the credential as Token", redact.URL(u))
	}
	if !validToken(opts.Token) {
		return nil, errors.New("publisher: Token must be printable ASCII without spaces (an API key or a JWT)")
	}
	if opts.MaxAttempts < 0 {
		return nil, fmt.Errorf("publisher: MaxAttempts %d is negative (1: no retry, 0: %d)", opts.MaxAttempts, DefaultMaxAttempts)
	}
	hc := http.Client{Timeout: DefaultTimeout}
	if opts.HTTPClient != nil {
		hc = *opts.HTTPClient
	}
	// A redirect is not followed but returned (an *Error): a 301, 302 or
	// 303 would turn a POST or a DELETE into a GET, whose answer is none
	// to the call (a Disconnect would succeed having disconnected
	// nothing), and a 307 or 308 would send the message somewhere not
	// configured. The ingress itself never redirects.
	hc.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	c := &Client{
		base:        u.Scheme + "://" + u.Host + strings.TrimRight(u.EscapedPath(), "/"),
		hc:          &hc,
		maxAttempts: opts.MaxAttempts,
		minBackoff:  opts.MinBackoff,
		maxBackoff:  opts.MaxBackoff,
	}
	if opts.Token != "" {
		c.auth = "Bearer " + opts.Token
	}
	if c.maxAttempts == 0 {
		c.maxAttempts = DefaultMaxAttempts
	}
	if c.minBackoff <= 0 {
		c.minBackoff = DefaultMinBackoff
	}
	if c.maxBackoff <= 0 {
		c.maxBackoff = DefaultMaxBackoff
	}
	c.maxBackoff = max(c.maxBackoff, c.minBackoff)
	return c, nil
}

// validToken: an API key (printable ASCII without spaces) or a JWT
// (base64url and dots) fits a header value as is.
func validToken(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] <= ' ' || s[i] > '~' {
			return false
		}
	}
	return true
}

// CloseIdleConnections closes the idle keep-alive connections of the
// HTTPClient's transport (http.Client.CloseIdleConnections): with the
// default HTTPClient, those of http.DefaultTransport, which other users
// of it share.
func (c *Client) CloseIdleConnections() { c.hc.CloseIdleConnections() }

// Message is a message to publish or send.
type Message struct {
	// Data is the payload, required: any value encoding/json marshals to
	// something other than null (a nil map or slice marshals to null),
	// nesting arrays and objects at most MaxDataDepth levels deep. A
	// json.RawMessage goes as it is, compacted; a []byte, as encoding/json
	// has it, is a base64 string. '<', '>' and '&' are not escaped, so
	// subscribers get them as they are.
	Data any
	// Event optionally names the message for the receiver: at most 64
	// printable ASCII characters, without '"' or '\'.
	Event string
	// From optionally names the sending user (a user id). It is kept with
	// an API key; with a user token the ingress sets it to the token's
	// subject whatever is sent (docs/security.md).
	From string
}

// Item is one message of a batch and its channel.
type Item struct {
	Channel string
	Message
}

// Result is the ingress's reply to one message.
type Result struct {
	// ID is the message's id: for a channel, its stream entry id
	// (<unix ms>-<seq>), the same in history, in the delivered frame and
	// as a resume cursor.
	ID string
	// Channel is the channel published to (Publish, PublishBatch).
	Channel string
	// Connection is the connection sent to (SendToConnection).
	Connection string
	// Replayed is true when the ingress answered with the reply it had
	// kept for the call's Idempotency-Key (Idempotent-Replayed: true): an
	// earlier attempt of this call, or an earlier call with the same
	// WithIdempotencyKey, had written the message, and nothing was
	// written again.
	Replayed bool
}

// Option sets an option of one call.
type Option func(*callOptions)

type callOptions struct {
	key    string
	keySet bool // WithIdempotencyKey was given, even with ""
}

// WithIdempotencyKey sends key as the call's Idempotency-Key instead of a
// random one: a call repeated with the same key and the same input within
// the ingress's IDEMPOTENCY_WINDOW (24 h by default) is written once,
// whichever process makes it. The key is 1–255 printable ASCII
// characters, neither starting nor ending with a space (HTTP would strip
// it); anything else is refused before any request. The ingress scopes a
// key to the credential and the endpoint's path; the same key with
// another body is 422 idempotency_key_reused.
func WithIdempotencyKey(key string) Option {
	return func(o *callOptions) { o.key, o.keySet = key, true }
}

// idempotencyKey is the key for one POST call: the caller's, checked, or
// a fresh random one (26 base32 characters, 130 bits), which every
// attempt of the call sends.
func idempotencyKey(opts []Option) (string, error) {
	var o callOptions
	for _, f := range opts {
		f(&o)
	}
	if !o.keySet {
		return rand.Text(), nil
	}
	k := o.key
	if k == "" || len(k) > MaxIdempotencyKeyLen || !printable(k) || k[0] == ' ' || k[len(k)-1] == ' ' {
		return "", fmt.Errorf("%w: Idempotency-Key %q: want 1–255 printable ASCII characters, not starting or ending with a space", ErrInvalid, k)
	}
	return k, nil
}

func printable(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] > 0x7e {
			return false
		}
	}
	return true
}

// messageBody is a publish body, and a batch item with Channel.
type messageBody struct {
	Channel string          `json:"channel,omitempty"`
	Data    json.RawMessage `json:"data"`
	Event   string          `json:"event,omitempty"`
	From    string          `json:"from,omitempty"`
}

// body checks m as the ingress would and marshals its Data.
func (m Message) body() (messageBody, error) {
	if m.Data == nil {
		return messageBody{}, errors.New("message without Data (the ingress requires data: missing_data)")
	}
	data, err := marshal(m.Data)
	if err != nil {
		return messageBody{}, fmt.Errorf("marshal Data: %w", err)
	}
	switch {
	case string(data) == "null":
		return messageBody{}, errors.New("message Data marshals to null (the ingress requires data: missing_data)")
	case !utf8.Valid(data):
		return messageBody{}, errors.New("message Data is not valid UTF-8")
	case jsondepth.Exceeds(data, MaxDataDepth):
		return messageBody{}, fmt.Errorf("message Data nests arrays and objects more than %d levels deep (the ingress refuses it: invalid_json)", MaxDataDepth)
	case !channel.ValidEvent(m.Event):
		return messageBody{}, fmt.Errorf("event %q: want at most 64 printable ASCII characters without '\"' or '\\'", m.Event)
	case m.From != "" && !channel.ValidUser(m.From):
		return messageBody{}, fmt.Errorf("from %q: want a user id, %s", m.From, channel.UserRule)
	}
	return messageBody{Data: data, Event: m.Event, From: m.From}, nil
}

// marshal is json.Marshal without HTML escaping, as the ingress stores
// and delivers data.
func marshal(v any) ([]byte, error) {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(b.Bytes(), []byte("\n")), nil
}

// invalid wraps the error of a check with ErrInvalid.
func invalid(err error) error { return fmt.Errorf("%w: %w", ErrInvalid, err) }

func checkChannel(ch string) error {
	if !channel.ValidName(ch) {
		return fmt.Errorf("channel %q: want ^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$", ch)
	}
	return nil
}

// checkID checks a user or connection id: 1–128 characters of the
// channel alphabet.
func checkID(what, id string) error {
	if !channel.ValidUser(id) {
		return fmt.Errorf("%s %q: want %s", what, id, channel.UserRule)
	}
	return nil
}

// Publish publishes m to channel: POST /v1/channels/{channel}/messages.
// A nil error means the message is in Redis (in the channel's history,
// and delivered to its subscribers), once however many attempts it took.
func (c *Client) Publish(ctx context.Context, ch string, m Message, opts ...Option) (Result, error) {
	if err := checkChannel(ch); err != nil {
		return Result{}, invalid(err)
	}
	return c.send(ctx, "/v1/channels/"+url.PathEscape(ch)+"/messages", m, opts)
}

// send posts m to path, a publish or a send to a connection, and reads
// the reply: {"id", "channel"} or {"id", "connection"}.
func (c *Client) send(ctx context.Context, path string, m Message, opts []Option) (Result, error) {
	b, err := m.body()
	if err != nil {
		return Result{}, invalid(err)
	}
	var out struct {
		ID         string `json:"id"`
		Channel    string `json:"channel"`
		Connection string `json:"connection"`
	}
	rep, err := c.post(ctx, path, b, opts, &out)
	if err != nil {
		return Result{}, err
	}
	if out.ID == "" {
		return Result{}, unexpected(rep)
	}
	return Result{ID: out.ID, Channel: out.Channel, Connection: out.Connection, Replayed: rep.replayed}, nil
}

// PublishBatch publishes items, on any channels, in one request: POST
// /v1/messages. The results are in the items' order. The ingress checks
// every item before it writes any (an *Error's Index is the first bad
// one); within a channel the items are appended in order. Items are
// checked here first as well, so a bad one fails before any request,
// with its index in the error's text.
func (c *Client) PublishBatch(ctx context.Context, items []Item, opts ...Option) ([]Result, error) {
	if len(items) == 0 || len(items) > MaxBatchItems {
		return nil, fmt.Errorf("%w: a batch holds 1–%d items, not %d", ErrInvalid, MaxBatchItems, len(items))
	}
	var in struct {
		Messages []messageBody `json:"messages"`
	}
	in.Messages = make([]messageBody, len(items))
	for i, it := range items {
		if err := checkChannel(it.Channel); err != nil {
			return nil, fmt.Errorf("%w: item %d: %w", ErrInvalid, i, err)
		}
		b, err := it.body()
		if err != nil {
			return nil, fmt.Errorf("%w: item %d: %w", ErrInvalid, i, err)
		}
		b.Channel = it.Channel
		in.Messages[i] = b
	}
	var out struct {
		Results []struct {
			ID      string `json:"id"`
			Channel string `json:"channel"`
		} `json:"results"`
	}
	rep, err := c.post(ctx, "/v1/messages", in, opts, &out)
	if err != nil {
		return nil, err
	}
	if len(out.Results) != len(items) {
		return nil, unexpected(rep)
	}
	res := make([]Result, len(items))
	for i, r := range out.Results {
		if r.ID == "" {
			return nil, unexpected(rep)
		}
		res[i] = Result{ID: r.ID, Channel: r.Channel, Replayed: rep.replayed}
	}
	return res, nil
}

// SendToConnection sends m to one connection: POST
// /v1/connections/{id}/messages (needs a key with admin rights). No live
// connection with that id is an *Error 404 connection_not_found. A retry
// after the first attempt's reply was lost gets that reply, even if the
// connection has gone since.
func (c *Client) SendToConnection(ctx context.Context, id string, m Message, opts ...Option) (Result, error) {
	if err := checkID("connection id", id); err != nil {
		return Result{}, invalid(err)
	}
	return c.send(ctx, "/v1/connections/"+url.PathEscape(id)+"/messages", m, opts)
}

// SendToUser sends m to every live connection of user: POST
// /v1/users/{user}/messages (needs a key with admin rights). It returns
// how many connections were targeted, 0 when the user has none. It is
// SendToUserResult without the rest of the reply: use that to learn
// whether the answer was a replay (UserResult.Replayed).
func (c *Client) SendToUser(ctx context.Context, user string, m Message, opts ...Option) (connections int, err error) {
	res, err := c.SendToUserResult(ctx, user, m, opts...)
	return res.Connections, err
}

// UserResult is the ingress's reply to a send to a user.
type UserResult struct {
	// User is the user sent to.
	User string
	// Connections is how many live connections of the user were
	// targeted, 0 when the user had none. On a replay it is the count of
	// the send that was made, not of the connections live now.
	Connections int
	// Replayed is true when the ingress answered with the reply it had
	// kept for the call's Idempotency-Key (Idempotent-Replayed: true): an
	// earlier attempt of this call, or an earlier call with the same
	// WithIdempotencyKey, had made the send, and nothing was sent again.
	Replayed bool
}

// SendToUserResult sends m to every live connection of user, as
// SendToUser does, and returns the whole reply: the count of connections
// targeted and whether it was a replay of an earlier send with the same
// Idempotency-Key (Result.Replayed's meaning).
func (c *Client) SendToUserResult(ctx context.Context, user string, m Message, opts ...Option) (UserResult, error) {
	if err := checkID("user", user); err != nil {
		return UserResult{}, invalid(err)
	}
	b, err := m.body()
	if err != nil {
		return UserResult{}, invalid(err)
	}
	var out struct {
		User        string `json:"user"`
		Connections *int   `json:"connections"`
	}
	rep, err := c.post(ctx, "/v1/users/"+url.PathEscape(user)+"/messages", b, opts, &out)
	if err != nil {
		return UserResult{}, err
	}
	if out.Connections == nil || *out.Connections < 0 {
		return UserResult{}, unexpected(rep)
	}
	return UserResult{User: out.User, Connections: *out.Connections, Replayed: rep.replayed}, nil
}

// Disconnect asks the egress holding connection id to close it, with
// 4003 (do not reconnect): DELETE /v1/connections/{id} (needs a key with
// admin rights). No live connection with that id is an *Error 404
// connection_not_found; after a retry, that may also mean that a first
// attempt whose reply was lost closed it.
func (c *Client) Disconnect(ctx context.Context, id string) error {
	if err := checkID("connection id", id); err != nil {
		return invalid(err)
	}
	var out struct {
		Status string `json:"status"`
	}
	rep, err := c.do(ctx, &request{method: http.MethodDelete, path: "/v1/connections/" + url.PathEscape(id)}, &out)
	if err != nil {
		return err
	}
	if out.Status != "disconnecting" {
		// A gateway's page, say: the connection may not have been told.
		return unexpected(rep)
	}
	return nil
}

// DisconnectUser asks the egress instances holding the live connections
// of user to close each of them, with 4003 (do not reconnect), and
// returns how many were told, 0 when the user has none: DELETE
// /v1/users/{user}/connections (needs a key with admin rights). The
// ingress reads at most 10,000 of the user's connections per call. A
// connection the user opens while the call runs may survive it, and a
// client holding a valid token can open a new one: to ban a user, also
// stop issuing it tokens (docs/security.md). After a retry, the count is
// the last attempt's: connections a first attempt whose reply was lost
// had closed are not in it.
func (c *Client) DisconnectUser(ctx context.Context, user string) (disconnected int, err error) {
	if err := checkID("user", user); err != nil {
		return 0, invalid(err)
	}
	var out struct {
		Disconnected *int `json:"disconnected"`
	}
	rep, err := c.do(ctx, &request{method: http.MethodDelete, path: "/v1/users/" + url.PathEscape(user) + "/connections"}, &out)
	if err != nil {
		return 0, err
	}
	if out.Disconnected == nil || *out.Disconnected < 0 {
		return 0, unexpected(rep)
	}
	return *out.Disconnected, nil
}

// Connection is a live connection's registry record (docs/api.md,
// "Registry reads"): who it is, which egress instance holds it, and the
// channels it is subscribed to. It mirrors registry.Record, which is not
// imported so that a backend's build does not take in the Redis client.
type Connection struct {
	ID          string    `json:"id"`
	User        string    `json:"user"`
	Instance    string    `json:"instance"`
	Channels    []string  `json:"channels"`
	ConnectedAt time.Time `json:"connected_at"`
}

// Connection reads connection id's registry record: GET
// /v1/connections/{id} (needs a key with admin rights). No live
// connection with that id is an *Error 404 connection_not_found. A
// record outlives its connection by at most the egress's REGISTRY_TTL
// (30 s by default) when its instance died.
func (c *Client) Connection(ctx context.Context, id string) (Connection, error) {
	if err := checkID("connection id", id); err != nil {
		return Connection{}, invalid(err)
	}
	var out Connection
	rep, err := c.do(ctx, &request{method: http.MethodGet, path: "/v1/connections/" + url.PathEscape(id)}, &out)
	if err != nil {
		return Connection{}, err
	}
	if out.ID == "" {
		return Connection{}, unexpected(rep)
	}
	return out, nil
}

// MaxConnectionsLimit is the largest limit a ChannelConnections or
// UserConnections call may ask for.
const MaxConnectionsLimit = 10000

const (
	// defaultConnectionsLimit is the ingress's limit when none is given.
	defaultConnectionsLimit = 1000
	// maxRecordBytes is the room a reply leaves per registry record asked
	// for: a record with 100 channels of 128 characters and its other
	// fields takes about 13.5 KB (100 is the egress's default
	// MAX_SUBSCRIPTIONS; docs/clients.md says what more would need).
	maxRecordBytes = 16 << 10
)

// ChannelConnections lists the live connections subscribed to channel,
// at most limit of them (0: the ingress's default, 1000; at most
// MaxConnectionsLimit): GET /v1/channels/{channel}/connections (needs a
// key with admin rights). A channel nobody is subscribed to gives an
// empty list.
func (c *Client) ChannelConnections(ctx context.Context, ch string, limit int) ([]Connection, error) {
	if err := checkChannel(ch); err != nil {
		return nil, invalid(err)
	}
	return c.connections(ctx, "/v1/channels/"+url.PathEscape(ch)+"/connections", limit)
}

// connections reads a list of registry records at path.
func (c *Client) connections(ctx context.Context, path string, limit int) ([]Connection, error) {
	if limit < 0 || limit > MaxConnectionsLimit {
		return nil, fmt.Errorf("%w: limit %d: want 1–%d, or 0 for the default", ErrInvalid, limit, MaxConnectionsLimit)
	}
	var query string
	if limit > 0 {
		query = "limit=" + strconv.Itoa(limit)
	}
	var out struct {
		Connections []Connection `json:"connections"`
	}
	// The records are not bounded by the ingress's page budget: each
	// lists its channels (MAX_SUBSCRIPTIONS of them, 100 by default, of up
	// to 128 characters), so the reply may take up to about 13 KiB a
	// record. Room for what was asked, then.
	maxReply := max(maxReplyBytes, cmp.Or(limit, defaultConnectionsLimit)*maxRecordBytes)
	rep, err := c.do(ctx, &request{method: http.MethodGet, path: path, query: query, maxReply: maxReply}, &out)
	if err != nil {
		return nil, err
	}
	if out.Connections == nil {
		return nil, unexpected(rep)
	}
	return out.Connections, nil
}

// UserConnections lists the live connections of user, at most limit of
// them (0: the ingress's default, 1000; at most MaxConnectionsLimit): GET
// /v1/users/{user}/connections (needs a key with admin rights). A user
// with no connection gives an empty list.
func (c *Client) UserConnections(ctx context.Context, user string, limit int) ([]Connection, error) {
	if err := checkID("user", user); err != nil {
		return nil, invalid(err)
	}
	return c.connections(ctx, "/v1/users/"+url.PathEscape(user)+"/connections", limit)
}

// ClearHistory removes every message of channel's history and returns
// how many there were: DELETE /v1/channels/{channel}/messages (needs an
// API key with admin rights and the channel). The channel goes on, and
// its subscribers are not disturbed; a client resuming from a removed
// message is told recovered:false.
func (c *Client) ClearHistory(ctx context.Context, ch string) (removed int, err error) {
	if err := checkChannel(ch); err != nil {
		return 0, invalid(err)
	}
	var out struct {
		Removed *int `json:"removed"`
	}
	rep, err := c.do(ctx, &request{method: http.MethodDelete, path: "/v1/channels/" + url.PathEscape(ch) + "/messages"}, &out)
	if err != nil {
		return 0, err
	}
	if out.Removed == nil || *out.Removed < 0 {
		return 0, unexpected(rep)
	}
	return *out.Removed, nil
}

// Page is a page of a channel's history.
type Page struct {
	// Messages are oldest first.
	Messages []HistoryMessage `json:"messages"`
	// Next is the id of the last message of the page: the after of the
	// next page. On an empty page it is the after given (keep polling
	// with it), "" without after on an empty channel, or, when after is
	// ahead of the channel, the channel's last id.
	Next string `json:"next"`
	// Recovered is set only when after was given: true when nothing
	// published after it is missing, false when messages after it were
	// trimmed (or lost) and the page starts at the oldest one left.
	Recovered *bool `json:"recovered"`
}

// HistoryMessage is a message read from history, with the fields of the
// delivered message frame.
type HistoryMessage struct {
	Channel string          `json:"channel"`
	ID      string          `json:"id"`
	Event   string          `json:"event,omitempty"`
	From    string          `json:"from,omitempty"`
	TS      int64           `json:"ts"` // publish time, unix milliseconds
	Data    json.RawMessage `json:"data"`
}

// History reads a page of channel's history: GET
// /v1/channels/{channel}/messages. With after "", the newest limit
// messages (oldest first); with after a message id, up to limit messages
// after it ("0" starts at the oldest retained). limit 0 means the
// ingress's default (100); at most MaxHistoryLimit. A page also holds at
// most 4 MiB of messages (or a single larger one, on an ingress whose
// MAX_MESSAGE_BYTES allows it), so a short page is not the end: page on
// with Next until a page is empty.
func (c *Client) History(ctx context.Context, ch string, after string, limit int) (Page, error) {
	if err := checkChannel(ch); err != nil {
		return Page{}, invalid(err)
	}
	if after != "" && !validCursor(after) {
		return Page{}, fmt.Errorf("%w: after %q is not a message id (<ms>-<seq>, <ms>, or 0)", ErrInvalid, after)
	}
	q := url.Values{}
	if after != "" {
		q.Set("after", after)
	}
	return c.historyPage(ctx, ch, q, limit)
}

// HistoryBefore reads the page of channel's history before the message id
// before: GET /v1/channels/{channel}/messages?before=. It holds the
// newest limit messages (and at most 4 MiB, or one larger message) with
// ids below before, oldest first; to page back in time, call it again
// with the first message's id until a page is empty (nothing older is
// retained). limit 0 means the ingress's default (100); at most
// MaxHistoryLimit. The page's Recovered is nil.
func (c *Client) HistoryBefore(ctx context.Context, ch string, before string, limit int) (Page, error) {
	if err := checkChannel(ch); err != nil {
		return Page{}, invalid(err)
	}
	if !validCursor(before) {
		return Page{}, fmt.Errorf("%w: before %q is not a message id (<ms>-<seq>, <ms>, or 0)", ErrInvalid, before)
	}
	return c.historyPage(ctx, ch, url.Values{"before": {before}}, limit)
}

// historyPage reads the history page of ch with the cursor in q and
// limit (0: the ingress's default); limit is checked.
func (c *Client) historyPage(ctx context.Context, ch string, q url.Values, limit int) (Page, error) {
	if limit < 0 || limit > MaxHistoryLimit {
		return Page{}, fmt.Errorf("%w: limit %d: want 1–%d, or 0 for the default", ErrInvalid, limit, MaxHistoryLimit)
	}
	if limit > 0 {
		q.Set("limit", strconv.Itoa(limit))
	}
	var p Page
	rep, err := c.do(ctx, &request{method: http.MethodGet, path: "/v1/channels/" + url.PathEscape(ch) + "/messages", query: q.Encode(), maxReply: maxHistoryReplyBytes}, &p)
	if err != nil {
		return Page{}, err
	}
	if p.Messages == nil {
		return Page{}, unexpected(rep)
	}
	return p, nil
}

// validCursor is stream.ParseID's rule ("<ms>-<seq>" or "<ms>", decimal
// uint64s), repeated here to keep the Redis client out of a backend's
// build.
func validCursor(s string) bool {
	if len(s) > 41 {
		return false
	}
	ms, seq, hasSeq := strings.Cut(s, "-")
	if !decimal(ms) || hasSeq && !decimal(seq) {
		return false
	}
	return true
}

func decimal(s string) bool {
	if s == "" || s[0] == '+' {
		return false
	}
	_, err := strconv.ParseUint(s, 10, 64)
	return err == nil
}

// post sends a POST with a JSON body and an Idempotency-Key, and decodes
// the reply into out.
func (c *Client) post(ctx context.Context, path string, in any, opts []Option, out any) (*reply, error) {
	key, err := idempotencyKey(opts)
	if err != nil {
		return nil, err
	}
	body, err := marshal(in)
	if err != nil {
		return nil, fmt.Errorf("publisher: encode request: %w", err)
	}
	return c.do(ctx, &request{method: http.MethodPost, path: path, body: body, key: key}, out)
}
