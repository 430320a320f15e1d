package publisher

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// TestRedirectNotFollowed: a 3xx (a proxy's redirect to https, to
// another host) is an answer, not followed: a 301, 302 or 303 would turn
// a POST or a DELETE into a GET whose 200 is no answer to the call (a
// Disconnect that disconnected nothing would return nil), and a 307 or
// 308 would send the body and the Idempotency-Key to a host not
// configured.
func TestRedirectNotFollowed(t *testing.T) {
	var elsewhere atomic.Int32
	other := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		elsewhere.Add(1)
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write([]byte(`{"id":"9-9","channel":"c","connections":[],"messages":[],"removed":1}`))
	}))
	t.Cleanup(other.Close)
	for _, status := range []int{301, 302, 303, 307, 308} {
		t.Run(strconv.Itoa(status), func(t *testing.T) {
			for _, where := range []string{"", other.URL} { // the same path on the same host, another host
				redirect := answer{status: status, header: map[string]string{"Location": where + "/v1/connections/c-1"}}
				// What the ingress answers to a GET of the same path.
				record := answer{status: 200, body: `{"id":"c-1","user":"u","instance":"i","channels":[],"connected_at":"2026-01-01T00:00:00Z"}`}
				s := newStub(t, redirect, record)
				var e *Error
				if err := s.client(t, Options{Token: "secret"}).Disconnect(context.Background(), "c-1"); !errors.As(err, &e) || e.Status != status {
					t.Fatalf("Disconnect redirected to %q: %v, want a %d *Error", where, err, status)
				}
				s = newStub(t, redirect, record)
				if _, err := s.client(t, Options{Token: "secret"}).Publish(context.Background(), "c", Message{Data: 1}); !errors.As(err, &e) || e.Status != status {
					t.Fatalf("Publish redirected to %q: %v, want a %d *Error", where, err, status)
				}
				if !strings.Contains(e.Message, where+"/v1/connections/c-1") {
					t.Fatalf("message %q does not say where to", e.Message)
				}
				if n := len(s.requests()); n != 1 {
					t.Fatalf("%d requests to the ingress, want 1", n)
				}
			}
			if n := elsewhere.Load(); n != 0 {
				t.Fatalf("%d requests followed the redirect to another host", n)
			}
		})
	}
}

// TestBatchReplyChecked: a 2xx batch reply without one id per item is
// not taken for a success.
func TestBatchReplyChecked(t *testing.T) {
	items := []Item{{"a", Message{Data: 1}}, {"b", Message{Data: 2}}}
	for _, body := range []string{
		`{"results":[{"id":"1-0","channel":"a"}]}`,
		`{"results":[{"id":"1-0","channel":"a"},{"id":"1-0","channel":"b"},{"id":"2-0","channel":"b"}]}`,
		`{"results":[{"id":"1-0","channel":"a"},{"channel":"b"}]}`,
		`{"results":[{"id":"1-0","channel":"a"},null]}`,
		`{"results":null}`,
		`{}`,
	} {
		s := newStub(t, accepted(body))
		res, err := s.client(t, Options{}).PublishBatch(context.Background(), items)
		if err == nil || !strings.Contains(err.Error(), "unexpected reply") {
			t.Errorf("reply %s: %+v %v, want an unexpected reply", body, res, err)
		}
	}
}

// TestOutcomeUnknown: the error of a call that may have been carried
// out (an attempt without an answer, or with an answer that does not
// say, before the final one) wraps ErrOutcomeUnknown; an answer that
// says nothing was done (a 4xx of every attempt, a redirect) and input
// refused before sending do not.
func TestOutcomeUnknown(t *testing.T) {
	hangup := answer{hangup: true}
	rateLimited := failure(429, "rate_limited", "Retry-After", "0")
	publish := func(c *Client, ctx context.Context) error {
		_, err := c.Publish(ctx, "c", Message{Data: 1})
		return err
	}
	for _, tc := range []struct {
		name    string
		answers []answer
		call    func(*Client, context.Context) error
		status  int // of the *Error, 0 for none
		unknown bool
	}{
		{"a lost reply, then rate limited", []answer{hangup, rateLimited}, publish, 429, true},
		{"a 503, then a token expired", []answer{failure(503, "unavailable"), failure(401, "token_expired")}, publish, 401, true},
		{"in progress for ever", []answer{failure(409, "idempotency_in_progress", "Retry-After", "0")}, publish, 409, true},
		{"no reply ever", []answer{hangup}, publish, 0, true},
		{"500", []answer{failure(500, "internal")}, publish, 500, true},
		{"a 2xx that is not the reply", []answer{accepted(`<html>welcome</html>`)}, publish, 0, true},
		// JSON, but without the message's id: no Result to return.
		{"a publish's 2xx without an id", []answer{accepted(`{"channel":"c"}`)}, publish, 0, true},
		{"a send to a connection's 2xx without an id", []answer{accepted(`{"connection":"c-1"}`)}, func(c *Client, ctx context.Context) error {
			_, err := c.SendToConnection(ctx, "c-1", Message{Data: 1})
			return err
		}, 0, true},
		{"a batch reply that is not the reply", []answer{accepted(`{"results":[]}`)}, func(c *Client, ctx context.Context) error {
			_, err := c.PublishBatch(ctx, []Item{{"c", Message{Data: 1}}})
			return err
		}, 0, true},
		{"a lost reply, then a disconnect's 404", []answer{hangup, failure(404, "connection_not_found")}, func(c *Client, ctx context.Context) error {
			return c.Disconnect(ctx, "c-1")
		}, 404, true},
		{"a user disconnect's 503s", []answer{failure(503, "unavailable")}, func(c *Client, ctx context.Context) error {
			_, err := c.DisconnectUser(ctx, "u")
			return err
		}, 503, true},
		{"a user disconnect refused", []answer{failure(403, "forbidden")}, func(c *Client, ctx context.Context) error {
			_, err := c.DisconnectUser(ctx, "u")
			return err
		}, 403, false},
		{"a user disconnect's 2xx that is not the reply", []answer{accepted(`{"user":"u"}`)}, func(c *Client, ctx context.Context) error {
			_, err := c.DisconnectUser(ctx, "u")
			return err
		}, 0, true},
		{"a user disconnect's negative count", []answer{accepted(`{"user":"u","disconnected":-3}`)}, func(c *Client, ctx context.Context) error {
			_, err := c.DisconnectUser(ctx, "u")
			return err
		}, 0, true},
		{"a disconnect's 2xx that is not the reply", []answer{accepted(`<html>welcome</html>`)}, func(c *Client, ctx context.Context) error {
			return c.Disconnect(ctx, "c-1")
		}, 0, true},
		{"a disconnect's empty 2xx", []answer{accepted(`{}`)}, func(c *Client, ctx context.Context) error {
			return c.Disconnect(ctx, "c-1")
		}, 0, true},
		{"a send to a user's negative count", []answer{accepted(`{"user":"u","connections":-1}`)}, func(c *Client, ctx context.Context) error {
			_, err := c.SendToUser(ctx, "u", Message{Data: 1})
			return err
		}, 0, true},
		{"a history removal's negative count", []answer{{status: 200, body: `{"channel":"c","removed":-1}`}}, func(c *Client, ctx context.Context) error {
			_, err := c.ClearHistory(ctx, "c")
			return err
		}, 0, true},
		{"a 2xx too large", []answer{accepted(`{"id":"1-0","x":"` + strings.Repeat("x", maxReplyBytes) + `"}`)}, saying(t, "larger than", publish), 0, true},
		{"refused", []answer{failure(400, "invalid_event")}, publish, 400, false},
		{"rate limited every time", []answer{rateLimited}, publish, 429, false},
		{"redirected", []answer{{status: 302, header: map[string]string{"Location": "https://x/"}}}, publish, 302, false},
		{"a read without a reply", []answer{hangup}, func(c *Client, ctx context.Context) error {
			_, err := c.History(ctx, "c", "", 0)
			return err
		}, 0, false},
		// A read's 2xx that is not its reply is an error too, not a zero
		// value; nothing was done either way.
		{"a connection read's 2xx that is not the reply", []answer{{status: 200, body: `{"user":"u"}`}}, func(c *Client, ctx context.Context) error {
			_, err := c.Connection(ctx, "c-1")
			return err
		}, 0, false},
		{"a history read's 2xx that is not the reply", []answer{{status: 200, body: `{"next":""}`}}, func(c *Client, ctx context.Context) error {
			_, err := c.History(ctx, "c", "", 0)
			return err
		}, 0, false},
		{"ctx ends waiting after a 503", []answer{failure(503, "unavailable", "Retry-After", "30")}, canceledAfter(t, publish), 503, true},
		{"ctx ends waiting after a 429", []answer{failure(429, "rate_limited", "Retry-After", "30")}, canceledAfter(t, publish), 429, false},
		{"ctx ends waiting for the reply", []answer{{stall: true}}, withTimeout(t, publish), 0, true},
		{"canceled before sending", nil, func(c *Client, ctx context.Context) error {
			ctx, cancel := context.WithCancel(ctx)
			cancel()
			return publish(c, ctx)
		}, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newStub(t, tc.answers...)
			// Patient: a timed-out read of the 8 MiB reply would be
			// outcome unknown too, and pass for the wrong reason.
			err := tc.call(s.client(t, Options{HTTPClient: patientHTTP(t)}), context.Background())
			var e *Error
			switch {
			case err == nil:
				t.Fatal("no error")
			case tc.status == 0 && errors.As(err, &e):
				t.Fatalf("error %v, want no *Error", err)
			case tc.status != 0 && (!errors.As(err, &e) || e.Status != tc.status):
				t.Fatalf("error %v, want a %d *Error", err, tc.status)
			case errors.Is(err, ErrOutcomeUnknown) != tc.unknown:
				t.Fatalf("error %v: outcome unknown %v, want %v", err, !tc.unknown, tc.unknown)
			case tc.unknown && !strings.Contains(err.Error(), "outcome unknown"):
				t.Fatalf("error %q does not say that the outcome is unknown", err)
			}
		})
	}
}

// saying runs call and checks that its error says what.
func saying(t *testing.T, what string, call func(*Client, context.Context) error) func(*Client, context.Context) error {
	return func(c *Client, ctx context.Context) error {
		err := call(c, ctx)
		if err == nil || !strings.Contains(err.Error(), what) {
			t.Errorf("error %v, want one that says %q", err, what)
		}
		return err
	}
}

// withTimeout runs call with a ctx that ends after 100 ms, and checks
// that it returns then, with ctx's error.
func withTimeout(t *testing.T, call func(*Client, context.Context) error) func(*Client, context.Context) error {
	return func(c *Client, ctx context.Context) error {
		ctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
		defer cancel()
		start := time.Now()
		err := call(c, ctx)
		if d := time.Since(start); d > time.Second || !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("returned after %v with %v, want context.DeadlineExceeded at once", d, err)
		}
		return err
	}
}

// canceledAfter runs call with a ctx without a deadline that is
// cancelled after 100 ms, and checks that it returns then, with ctx's
// error. (A wait known to outlast a deadline is not begun: see
// TestRetryPastDeadlineNotWaited.)
func canceledAfter(t *testing.T, call func(*Client, context.Context) error) func(*Client, context.Context) error {
	return func(c *Client, ctx context.Context) error {
		ctx, cancel := context.WithCancel(ctx)
		defer cancel()
		stop := time.AfterFunc(100*time.Millisecond, cancel)
		defer stop.Stop()
		start := time.Now()
		err := call(c, ctx)
		if d := time.Since(start); d > time.Second || !errors.Is(err, context.Canceled) {
			t.Errorf("returned after %v with %v, want context.Canceled at once", d, err)
		}
		return err
	}
}

// TestBrokenRepliesRetried: a reply that breaks off where net/http can
// tell (short of its Content-Length, a chunked body without its end), or
// a connection reset under the request, is retried with the key, and the
// replay is the result.
func TestBrokenRepliesRetried(t *testing.T) {
	ok := accepted(`{"id":"5-0","channel":"c"}`, "Idempotent-Replayed", "true")
	for _, tc := range []struct {
		name string
		fail answer
	}{
		{"short of its length", answer{raw: "HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nContent-Length: 27\r\n\r\n{\"id\":\"5-"}},
		{"chunked without its end", answer{raw: "HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n1b\r\n{\"id\":\"5-0\",\"channel\":\"c\"}\r\n"}},
		{"reset", answer{reset: true}},
		{"headers, then nothing", answer{raw: "HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nContent-Length: 27\r\n\r\n", hold: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newStub(t, tc.fail, ok)
			// A Timeout that bounds each attempt, reading the body included.
			hc := &http.Client{Transport: &http.Transport{}, Timeout: 300 * time.Millisecond}
			t.Cleanup(hc.CloseIdleConnections)
			res, err := s.client(t, Options{HTTPClient: hc}).Publish(context.Background(), "c", Message{Data: 1})
			if err != nil || res.ID != "5-0" || !res.Replayed {
				t.Fatalf("%+v %v, want 5-0, replayed", res, err)
			}
			reqs := s.requests()
			if len(reqs) != 2 || reqs[1].header.Get("Idempotency-Key") != reqs[0].header.Get("Idempotency-Key") {
				t.Fatalf("%d requests, want 2 with one key", len(reqs))
			}
		})
	}
}

// TestTrickledReplyBounded: a reply whose body comes a byte at a time,
// for longer than the HTTPClient's Timeout, fails the attempt then: the
// Timeout bounds each attempt, not only its headers.
func TestTrickledReplyBounded(t *testing.T) {
	var n atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n.Add(1)
		body := `{"id":"5-0","channel":"c"}`
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.WriteHeader(http.StatusAccepted)
		for i := range len(body) {
			_, _ = io.WriteString(w, body[i:i+1])
			w.(http.Flusher).Flush()
			select {
			case <-r.Context().Done():
				return
			case <-time.After(50 * time.Millisecond):
			}
		}
	}))
	t.Cleanup(srv.Close)
	hc := &http.Client{Transport: &http.Transport{}, Timeout: 200 * time.Millisecond}
	t.Cleanup(hc.CloseIdleConnections)
	c, err := New(Options{URL: srv.URL, HTTPClient: hc, MaxAttempts: 2, MinBackoff: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	_, err = c.Publish(context.Background(), "c", Message{Data: 1})
	if d := time.Since(start); err == nil || d > time.Second || n.Load() != 2 {
		t.Fatalf("%v after %v and %d attempts, want a timeout after 2 of 200 ms", err, d, n.Load())
	}
	if !errors.Is(err, ErrOutcomeUnknown) {
		t.Fatalf("error %v, want ErrOutcomeUnknown", err)
	}
}

// TestErrorBodyShapes: an error body with a code the publisher does not
// know keeps it; one that is not {"error": {"code", "message"}} is a
// Message; neither changes what is retried.
func TestErrorBodyShapes(t *testing.T) {
	for _, tc := range []struct {
		body, code, message string
	}{
		{`{"error":{"code":"brand_new","message":"m"}}`, "brand_new", "m"},
		{`{"error":"overloaded"}`, "", `{"error":"overloaded"}`},
		{`{"error":{"code":42}}`, "", `{"error":{"code":42}}`},
		{`{"code":"unavailable","message":"m"}`, "", `{"code":"unavailable","message":"m"}`},
		{`{"error":{"message":"m"}}`, "", `{"error":{"message":"m"}}`},
		{`[]`, "", `[]`},
		{``, "", ``},
	} {
		for _, status := range []int{400, 503} {
			s := newStub(t, answer{status: status, body: tc.body})
			_, err := s.client(t, Options{MaxAttempts: 2}).Publish(context.Background(), "c", Message{Data: 1})
			var e *Error
			if !errors.As(err, &e) || e.Status != status || e.Code != tc.code || e.Message != tc.message {
				t.Fatalf("%d %s: %#v, want code %q, message %q", status, tc.body, err, tc.code, tc.message)
			}
			if want := 1 + status/500; len(s.requests()) != want {
				t.Fatalf("%d %s: %d attempts, want %d", status, tc.body, len(s.requests()), want)
			}
		}
	}
}

// TestConcurrentCalls: one Client used by many goroutines, each call's
// first attempt failing (a 503, a lost reply): every call gets its own
// message's result, each call's attempts carry one key, no two calls the
// same, and nothing is left running afterwards.
func TestConcurrentCalls(t *testing.T) {
	ignore := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, ignore) }) // after the server and the connections are closed
	var (
		mu   sync.Mutex
		keys = map[string]string{} // body → key
	)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		key := r.Header.Get("Idempotency-Key")
		mu.Lock()
		first, seen := keys[string(b)]
		keys[string(b)] = key
		mu.Unlock()
		switch {
		case seen && first != key:
			w.WriteHeader(http.StatusTeapot) // fails the call
		case !seen && len(b)%2 == 0:
			w.Header().Set("Retry-After", "0")
			w.WriteHeader(http.StatusServiceUnavailable)
		case !seen:
			conn, _, _ := w.(http.Hijacker).Hijack()
			conn.Close()
		default:
			w.WriteHeader(http.StatusAccepted)
			_, _ = fmt.Fprintf(w, `{"id":%q,"channel":"c"}`, b)
		}
	}))
	t.Cleanup(srv.Close)
	hc := &http.Client{Transport: &http.Transport{}, Timeout: 5 * time.Second}
	t.Cleanup(hc.CloseIdleConnections)
	c, err := New(Options{URL: srv.URL, HTTPClient: hc, MinBackoff: time.Millisecond, MaxBackoff: 5 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for g := range 16 {
		wg.Go(func() {
			for i := range 20 {
				data := g*1000 + i
				res, err := c.Publish(context.Background(), "c", Message{Data: data})
				if want := fmt.Sprintf(`{"data":%d}`, data); err != nil || res.ID != want {
					t.Errorf("publish %d: %+v %v, want id %s", data, res, err, want)
				}
			}
		})
	}
	wg.Wait()
	distinct := map[string]bool{}
	for _, k := range keys {
		distinct[k] = true
	}
	if len(keys) != 16*20 || len(distinct) != len(keys) {
		t.Fatalf("%d calls with %d keys, want 320 of each", len(keys), len(distinct))
	}
}

// TestRefusedDialNotSent: an attempt whose connection could not be made
// (nothing listens: connection refused) sent nothing, so a call whose
// every attempt failed so has a known outcome, nothing written: its error
// does not wrap ErrOutcomeUnknown. It is retried as any transport error
// is. An attempt that did reach the ingress before it leaves the outcome
// unknown, whatever later attempts got, and so does a request the
// transport wrote on a kept-alive connection and then sent again, by
// itself, on a new one that was refused (net/http resends a request with
// an Idempotency-Key when its connection closes under it: that last
// error is a refused dial, but the request went out).
func TestRefusedDialNotSent(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	refused := ln.Addr().String()
	ln.Close()
	publish := func(c *Client) error {
		_, err := c.Publish(context.Background(), "c", Message{Data: 1})
		return err
	}
	for _, tc := range []struct {
		name    string
		answers []answer
		toStub  int // how many dials reach the stub before the others are refused
		calls   int // calls made, the last one checked
		dials   int // dials in all
		unknown bool
	}{
		{"refused every time", nil, 0, 1, DefaultMaxAttempts, false},
		{"a lost reply, then refused", []answer{{hangup: true}}, 1, 1, DefaultMaxAttempts, true},
		// The first call's dial; the second call's first attempt reuses
		// its connection, and the transport's resend dials; then each
		// later attempt.
		{"written on a kept-alive connection, resent and refused", []answer{accepted(`{"id":"1-0","channel":"c"}`), {hangup: true}}, 1, 2, 1 + DefaultMaxAttempts, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newStub(t, tc.answers...)
			stub := strings.TrimPrefix(s.srv.URL, "http://")
			var dials atomic.Int32
			tr := &http.Transport{DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
				to := refused
				if int(dials.Add(1)) <= tc.toStub {
					to = stub
				}
				return (&net.Dialer{}).DialContext(ctx, network, to)
			}}
			hc := &http.Client{Transport: tr, Timeout: 5 * time.Second}
			t.Cleanup(hc.CloseIdleConnections)
			c := s.client(t, Options{HTTPClient: hc})
			for range tc.calls - 1 {
				if err := publish(c); err != nil {
					t.Fatal(err)
				}
			}
			err := publish(c)
			switch {
			case err == nil:
				t.Fatal("no error")
			case !errors.Is(err, syscall.ECONNREFUSED):
				t.Fatalf("error %v, want the refused dial's", err)
			case errors.Is(err, ErrOutcomeUnknown) != tc.unknown:
				t.Fatalf("error %v: outcome unknown %v, want %v", err, !tc.unknown, tc.unknown)
			case !tc.unknown && !strings.Contains(err.Error(), "not sent"):
				t.Fatalf("error %q does not say that nothing was sent", err)
			}
			if n := int(dials.Load()); n != tc.dials {
				t.Fatalf("%d dials, want %d (every attempt, retried)", n, tc.dials)
			}
		})
	}
}

// TestCertificateRefusedNotRetried: a server whose certificate the client
// does not trust is refused again on every attempt, so the call returns
// after the first (the retry table's "not a TLS certificate error"). The
// handshake failed, so nothing was sent: the outcome is known.
func TestCertificateRefusedNotRetried(t *testing.T) {
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		t.Errorf("a request reached the server: %s %s", r.Method, r.URL)
	}))
	srv.Config.ErrorLog = log.New(io.Discard, "", 0) // its "TLS handshake error" lines
	srv.StartTLS()
	t.Cleanup(srv.Close)
	var dials atomic.Int32
	tr := &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		dials.Add(1)
		return (&net.Dialer{}).DialContext(ctx, network, addr)
	}} // the system's roots, which do not hold httptest's certificate
	hc := &http.Client{Transport: tr, Timeout: 5 * time.Second}
	t.Cleanup(hc.CloseIdleConnections)
	c, err := New(Options{URL: srv.URL, HTTPClient: hc, MinBackoff: time.Millisecond, MaxBackoff: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.Publish(context.Background(), "c", Message{Data: 1})
	var ce *tls.CertificateVerificationError
	switch {
	case !errors.As(err, &ce):
		t.Fatalf("error %v, want a certificate verification error", err)
	case errors.Is(err, ErrOutcomeUnknown) || !strings.Contains(err.Error(), "not sent"):
		t.Fatalf("error %v, want one that says nothing was sent", err)
	}
	if n := dials.Load(); n != 1 {
		t.Fatalf("%d dials, want 1: a refused certificate is not retried", n)
	}
}

// failingTransport fails every request without a connection of its own
// to report (httptrace): a RoundTripper that is not an *http.Transport.
type failingTransport struct{ requests atomic.Int32 }

func (t *failingTransport) RoundTrip(*http.Request) (*http.Response, error) {
	t.requests.Add(1)
	return nil, errors.New("connection reset by the sidecar")
}

// TestOtherTransportOutcomeUnknown: an HTTPClient whose Transport does not
// report its connections (not an *http.Transport: a sidecar's, a
// tracing wrapper) cannot tell an attempt that sent nothing from one whose
// reply was lost, so a POST it failed has an unknown outcome, not "not
// sent".
func TestOtherTransportOutcomeUnknown(t *testing.T) {
	ft := &failingTransport{}
	c, err := New(Options{URL: "http://127.0.0.1:1", HTTPClient: &http.Client{Transport: ft},
		MinBackoff: time.Millisecond, MaxBackoff: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.Publish(context.Background(), "c", Message{Data: 1})
	switch {
	case err == nil || !strings.Contains(err.Error(), "reset by the sidecar"):
		t.Fatalf("error %v, want the transport's", err)
	case !errors.Is(err, ErrOutcomeUnknown) || strings.Contains(err.Error(), "not sent"):
		t.Fatalf("error %v, want an unknown outcome", err)
	}
	if n := ft.requests.Load(); n != DefaultMaxAttempts {
		t.Fatalf("%d attempts, want %d", n, DefaultMaxAttempts)
	}
}

// TestEmptyReplyRetried: a 2xx without a body (a gateway's, or a reply
// cut before its first byte) was accepted by someone, and the request may
// have been written: it is retried with the call's Idempotency-Key, which
// the ingress answers with the first attempt's reply and writes nothing
// again, so the retry cannot duplicate the message. When every attempt
// gets one, the error says what came back (not a reply "cut short") and
// that the outcome is unknown.
func TestEmptyReplyRetried(t *testing.T) {
	empty := answer{status: http.StatusAccepted}
	s := newStub(t, empty, accepted(`{"id":"5-0","channel":"c"}`, "Idempotent-Replayed", "true"))
	res, err := s.client(t, Options{}).Publish(context.Background(), "c", Message{Data: 1})
	if err != nil || res.ID != "5-0" || !res.Replayed {
		t.Fatalf("%+v %v, want 5-0, replayed", res, err)
	}
	s = newStub(t, empty)
	_, err = s.client(t, Options{}).Publish(context.Background(), "c", Message{Data: 1})
	if !errors.Is(err, ErrOutcomeUnknown) || !strings.Contains(err.Error(), "202 reply has no body") {
		t.Fatalf("error %v, want one that says the 202 had no body, outcome unknown", err)
	}
	reqs := s.requests()
	if len(reqs) != DefaultMaxAttempts {
		t.Fatalf("%d requests, want %d", len(reqs), DefaultMaxAttempts)
	}
	for i, r := range reqs {
		if k := r.header.Get("Idempotency-Key"); k == "" || k != reqs[0].header.Get("Idempotency-Key") {
			t.Fatalf("attempt %d: Idempotency-Key %q, attempt 0 had %q", i, k, reqs[0].header.Get("Idempotency-Key"))
		}
	}
}
