package publisher

import (
	"bytes"
	"cmp"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptrace"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
	"unicode"

	"github.com/wsrelay/wsrelay/shared/internal/retry"
)

// MaxRetryAfter bounds the wait a response's Retry-After can ask for, so
// that a wrong header cannot hold a call for hours (its ctx can still end
// it sooner).
const MaxRetryAfter = time.Minute

// maxReplyBytes bounds what is read of a reply: a history page of small
// messages holds at most 4 MiB of them, and its JSON little more. A
// history page of one large message (maxHistoryReplyBytes) and a list of
// registry records may take more (request.maxReply).
const maxReplyBytes = 8 << 20

// maxMessageBytes is the largest MAX_MESSAGE_BYTES an ingress takes: the
// largest message its history can hold.
const maxMessageBytes = 64 << 20

// maxHistoryReplyBytes bounds a history page. A page holds at most 4 MiB
// of messages, but always at least one whatever its size (docs/api.md),
// so on an ingress whose MAX_MESSAGE_BYTES is raised a page of one
// message can take up to 64 MiB: under maxReplyBytes alone, that
// message, and every page from it on, could not be read.
const maxHistoryReplyBytes = maxReplyBytes + maxMessageBytes

// Error is an answer of the ingress, or of a gateway in front of it, with
// a status other than 2xx.
type Error struct {
	// Status is the HTTP status.
	Status int
	// Code and Message are the ingress's error body ({"error": {"code",
	// "message"}}, docs/api.md): Code is its snake_case code
	// (invalid_channel, forbidden, rate_limited, …). From something else
	// (a gateway's page), Code is "" and Message is the start of the body.
	Code, Message string
	// Index is the position of the batch item the error is about
	// (PublishBatch), or nil.
	Index *int
	// RetryAfter is the response's Retry-After (at most MaxRetryAfter),
	// or 0.
	RetryAfter time.Duration

	hasRetryAfter bool // a Retry-After header was read, even "0"
}

func (e *Error) Error() string {
	s := "publisher: " + strconv.Itoa(e.Status) + " " + http.StatusText(e.Status)
	if e.Code != "" {
		s += ": " + e.Code
	}
	if e.Index != nil {
		s += " (item " + strconv.Itoa(*e.Index) + ")"
	}
	if e.Message != "" {
		s += ": " + e.Message
	}
	return s
}

// retryable reports whether the same request may succeed later (the
// package documentation's policy).
func (e *Error) retryable() bool {
	switch e.Status {
	case http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
		return true
	case http.StatusTooManyRequests:
		// Without Retry-After: a batch larger than the burst, which no
		// wait lets through.
		return e.hasRetryAfter
	case http.StatusConflict:
		return e.Code == "idempotency_in_progress"
	}
	return false
}

// newError reads a non-2xx answer.
func newError(status int, h http.Header, body []byte) *Error {
	e := &Error{Status: status}
	var b struct {
		Error *struct {
			Code    string `json:"code"`
			Message string `json:"message"`
			Index   *int   `json:"index"`
		} `json:"error"`
	}
	if json.Unmarshal(body, &b) == nil && b.Error != nil && b.Error.Code != "" {
		e.Code, e.Message, e.Index = b.Error.Code, b.Error.Message, b.Error.Index
	} else {
		e.Message = snippet(body)
	}
	if loc := h.Get("Location"); status/100 == 3 && loc != "" {
		// Not followed (Options.HTTPClient): where to, for whoever fixes
		// the URL.
		e.Message = "not followed to " + snippet([]byte(loc))
	}
	e.RetryAfter, e.hasRetryAfter = retry.After(h, MaxRetryAfter)
	return e
}

// snippet is the start of a body that is not the ingress's JSON (a
// gateway's HTML or text), on one line, for an error message.
func snippet(b []byte) string {
	const n = 200
	if len(b) > n {
		b = b[:n]
	}
	s := strings.ToValidUTF8(string(b), "") // a rune cut in two is dropped
	s = strings.Join(strings.Fields(s), " ")
	return strings.Map(func(r rune) rune {
		if unicode.IsControl(r) {
			return -1
		}
		return r
	}, s)
}

// transportError is an attempt that got no whole answer: the request was
// not sent, or the connection failed, closed or timed out before the
// reply was read. Whether the ingress acted on it is unknown, unless
// notSent.
type transportError struct {
	op  string // "POST /v1/messages"
	err error
	// notSent: the attempt never had a connection (a dial refused, a
	// name not resolved, a TLS handshake failed), so no byte of the
	// request went out (connTrace).
	notSent bool
}

func (e *transportError) Error() string {
	if e.notSent {
		return "publisher: " + e.op + ": not sent: " + e.err.Error()
	}
	return "publisher: " + e.op + ": " + e.err.Error()
}
func (e *transportError) Unwrap() error { return e.err }

// request is one call's request, the same for each of its attempts.
type request struct {
	method string
	path   string // escaped, from /v1
	query  string // encoded, or ""
	body   []byte // nil: none
	key    string // Idempotency-Key, or ""
	// maxReply bounds what is read of the reply; 0: maxReplyBytes.
	maxReply int
}

func (r *request) op() string { return r.method + " " + r.path }

// reply is a 2xx answer.
type reply struct {
	method   string
	op       string
	status   int
	body     []byte
	replayed bool // Idempotent-Replayed: true
}

// unexpected is the error for a 2xx reply that is not what the endpoint
// answers: whoever sent it, a POST or a DELETE may have been carried out.
func unexpected(rep *reply) error {
	err := fmt.Errorf("publisher: %s: unexpected reply %d: %q", rep.op, rep.status, snippet(rep.body))
	if rep.method != http.MethodGet {
		return outcomeUnknown{err}
	}
	return err
}

// do makes r's attempts, by the package's retry policy, and decodes the
// reply's JSON into out (unless out is nil).
func (c *Client) do(ctx context.Context, r *request, out any) (*reply, error) {
	var last error
	maybe := false // an attempt of a POST or a DELETE may have been carried out
	for n := 1; ; n++ {
		if ctx.Err() != nil {
			// Nothing sent by this attempt. After a backoff, the select
			// below may have taken the timer with ctx ended as well: an
			// attempt made now would fail before it asked the transport
			// for a connection, an error that does not say it was not
			// sent.
			return nil, stopped(ctx, r, last, maybe)
		}
		rep, err := c.attempt(ctx, r)
		if err == nil && out != nil && json.Unmarshal(rep.body, out) != nil {
			if !cutShort(rep.body) {
				return nil, unexpected(rep)
			}
			// The connection's close ended the body before its JSON
			// ended, or a 2xx came without one: not the reply, so it is
			// retried like a lost one. That cannot write the message
			// twice: a POST's retry carries the call's Idempotency-Key,
			// which the ingress answers with the first attempt's reply,
			// and a DELETE is idempotent by itself.
			what := fmt.Sprintf("the %d reply was cut short: %q", rep.status, snippet(rep.body))
			if len(bytes.TrimSpace(rep.body)) == 0 {
				what = fmt.Sprintf("the %d reply has no body (a success status, but not the endpoint's JSON reply)", rep.status)
			}
			err = &transportError{op: r.op(), err: errors.New(what)}
		}
		if err == nil {
			return rep, nil
		}
		maybe = maybe || r.method != http.MethodGet && !saysNotDone(err)
		var te *transportError
		if ctx.Err() != nil && errors.As(err, &te) {
			// Cut by ctx: this attempt's error is ctx's, and whether it
			// reached the ingress is unknown (maybe).
			return nil, stopped(ctx, r, last, maybe)
		}
		last = err
		final := func() error {
			if n > 1 {
				err = fmt.Errorf("%w (after %d attempts)", err, n)
			}
			if maybe {
				err = outcomeUnknown{err}
			}
			return err
		}
		if n >= c.maxAttempts || !retryable(err) {
			return nil, final()
		}
		wait := retry.Backoff(c.minBackoff, c.maxBackoff, n-1)
		var e *Error
		if errors.As(err, &e) {
			wait = max(wait, e.RetryAfter)
		}
		if dl, ok := ctx.Deadline(); ok && time.Until(dl) <= wait {
			// The retry could never be made: waiting would only hold
			// the caller until the deadline to return ctx's error, and
			// hide this answer (a Retry-After the caller could act on)
			// behind it. So it ends now, as if the attempts had run out.
			return nil, final()
		}
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return nil, stopped(ctx, r, last, maybe)
		}
	}
}

// cutShort reports a body that ends before its JSON value does (or holds
// none), as a reply cut off mid-way does.
func cutShort(b []byte) bool {
	err := json.NewDecoder(bytes.NewReader(b)).Decode(new(json.RawMessage))
	return err == io.EOF || errors.Is(err, io.ErrUnexpectedEOF)
}

// stopped is the error of a call whose ctx ended: ctx.Err(), and the last
// attempt's error when there was one.
func stopped(ctx context.Context, r *request, last error, maybe bool) error {
	var err error
	if last == nil {
		err = fmt.Errorf("publisher: %s: %w", r.op(), ctx.Err())
	} else {
		err = fmt.Errorf("publisher: %s: %w; last attempt: %w", r.op(), ctx.Err(), last)
	}
	if maybe {
		return outcomeUnknown{err}
	}
	return err
}

// saysNotDone reports an attempt's error that says the request was not
// carried out: an answer of the ingress refusing it (a 4xx: docs/api.md,
// "A request rejected with a 4xx wrote nothing"), except 409
// idempotency_in_progress (an attempt with the key is being carried
// out), or a redirect, which answers instead of forwarding; or no
// connection at all, so nothing sent (transportError.notSent). Any other
// failure without an answer, a 5xx (a 503 after part of a batch was
// written, a gateway's after forwarding) or a 2xx that is not the reply
// say nothing.
func saysNotDone(err error) bool {
	if te := (*transportError)(nil); errors.As(err, &te) {
		return te.notSent
	}
	var e *Error
	if !errors.As(err, &e) {
		return false
	}
	return e.Status >= 300 && e.Status < 500 && !(e.Status == http.StatusConflict && e.Code == "idempotency_in_progress")
}

// outcomeUnknown is the error of a POST or a DELETE that may have been
// carried out: it wraps ErrOutcomeUnknown as well.
type outcomeUnknown struct{ err error }

func (e outcomeUnknown) Error() string {
	return e.err.Error() + " (outcome unknown: the ingress may have carried it out)"
}

func (e outcomeUnknown) Unwrap() []error { return []error{e.err, ErrOutcomeUnknown} }

// retryable reports whether an attempt's error allows another attempt.
func retryable(err error) bool {
	var te *transportError
	if errors.As(err, &te) {
		// A certificate the client refuses is refused again.
		var ce *tls.CertificateVerificationError
		return !errors.As(err, &ce)
	}
	var e *Error
	return errors.As(err, &e) && e.retryable()
}

// attempt sends r once and reads the whole answer (up to maxReplyBytes),
// so that the connection can be reused.
func (c *Client) attempt(ctx context.Context, r *request) (*reply, error) {
	u := c.base + r.path
	if r.query != "" {
		u += "?" + r.query
	}
	var body io.Reader
	if r.body != nil {
		body = bytes.NewReader(r.body)
	}
	var sent connTrace
	req, err := http.NewRequestWithContext(httptrace.WithClientTrace(ctx, sent.trace()), r.method, u, body)
	if err != nil {
		return nil, fmt.Errorf("publisher: %s: %w", r.op(), err)
	}
	req.Header.Set("Accept", "application/json")
	if r.body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if r.key != "" {
		req.Header.Set("Idempotency-Key", r.key)
	}
	if c.auth != "" {
		req.Header.Set("Authorization", c.auth)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return nil, &transportError{op: r.op(), err: err, notSent: sent.nothing()}
	}
	defer resp.Body.Close()
	limit := cmp.Or(r.maxReply, maxReplyBytes)
	b, err := io.ReadAll(io.LimitReader(resp.Body, int64(limit)+1))
	if err != nil {
		return nil, &transportError{op: r.op(), err: fmt.Errorf("reading the %d reply: %w", resp.StatusCode, err)}
	}
	if len(b) > limit {
		return nil, fmt.Errorf("publisher: %s: the %d reply is larger than %d bytes", r.op(), resp.StatusCode, limit)
	}
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return nil, newError(resp.StatusCode, resp.Header, b)
	}
	return &reply{method: r.method, op: r.op(), status: resp.StatusCode, body: b, replayed: resp.Header.Get("Idempotent-Replayed") == "true"}, nil
}

// connTrace follows one attempt's connections, to tell a request that
// never left the client. A dial's error alone does not say it: net/http
// resends a request whose kept-alive connection closed under it (one with
// an Idempotency-Key, which every POST here carries) on a new connection,
// so the refused dial of the resend can end an attempt whose request the
// ingress did read. What says it is that the transport asked for a
// connection (GetConn) and never got one (GotConn): every byte of a
// request is written on a connection it got.
type connTrace struct {
	asked, got atomic.Bool // the transport may call them from its own goroutines
}

func (ct *connTrace) trace() *httptrace.ClientTrace {
	return &httptrace.ClientTrace{
		GetConn: func(string) { ct.asked.Store(true) },
		GotConn: func(httptrace.GotConnInfo) { ct.got.Store(true) },
	}
}

// nothing reports that the attempt sent nothing: it asked for a
// connection and got none. An HTTPClient whose Transport does not report
// its connections (not an *http.Transport) never says so: its failures
// keep the outcome unknown.
func (ct *connTrace) nothing() bool { return ct.asked.Load() && !ct.got.Load() }
