package publisher

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/wsrelay/wsrelay/shared/stream"
)

// answer is what the stub ingress does with one request.
type answer struct {
	status int
	header map[string]string
	body   string
	hangup bool   // close the connection without an answer, as a lost reply
	stall  bool   // answer nothing until the client gives up
	raw    string // write this response as it is, then close the connection
	hold   bool   // with raw: keep the connection open until the client closes it
	reset  bool   // reset the connection (RST) without an answer
}

// seen is a request the stub received.
type seen struct {
	method, path, query string // path escaped, as sent
	header              http.Header
	body                string
}

// stub is a stand-in ingress: it answers requests with its answers in
// order, the last one repeated, and keeps what it received.
type stub struct {
	srv *httptest.Server

	mu      sync.Mutex
	answers []answer
	reqs    []seen
	conns   int // connections opened
}

func newStub(t *testing.T, answers ...answer) *stub {
	t.Helper()
	s := &stub{answers: answers}
	s.srv = httptest.NewUnstartedServer(http.HandlerFunc(s.serve))
	s.srv.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		if st == http.StateNew {
			s.mu.Lock()
			s.conns++
			s.mu.Unlock()
		}
	}
	s.srv.Start()
	t.Cleanup(s.srv.Close)
	return s
}

func (s *stub) serve(w http.ResponseWriter, r *http.Request) {
	b, _ := io.ReadAll(r.Body)
	s.mu.Lock()
	s.reqs = append(s.reqs, seen{method: r.Method, path: r.URL.EscapedPath(), query: r.URL.RawQuery, header: r.Header.Clone(), body: string(b)})
	a := answer{status: http.StatusAccepted, body: `{"id":"1-0","channel":"c"}`}
	if len(s.answers) > 0 {
		a = s.answers[0]
		if len(s.answers) > 1 {
			s.answers = s.answers[1:]
		}
	}
	s.mu.Unlock()
	switch {
	case a.hangup:
		conn, _, err := w.(http.Hijacker).Hijack()
		if err == nil {
			conn.Close()
		}
		return
	case a.reset:
		conn, _, err := w.(http.Hijacker).Hijack()
		if err == nil {
			_ = conn.(*net.TCPConn).SetLinger(0)
			conn.Close()
		}
		return
	case a.raw != "":
		conn, _, err := w.(http.Hijacker).Hijack()
		if err == nil {
			_, _ = io.WriteString(conn, a.raw)
			if a.hold {
				_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
				_, _ = io.Copy(io.Discard, conn) // until the client closes it
			}
			conn.Close()
		}
		return
	case a.stall:
		select {
		case <-r.Context().Done():
		case <-time.After(10 * time.Second):
		}
		return
	}
	for k, v := range a.header {
		w.Header().Set(k, v)
	}
	if a.body != "" {
		w.Header().Set("Content-Type", "application/json")
	}
	w.WriteHeader(a.status)
	_, _ = io.WriteString(w, a.body)
}

func (s *stub) requests() []seen {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]seen(nil), s.reqs...)
}

func (s *stub) connections() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.conns
}

// client is a Client of the stub with short backoffs; opts.URL, when
// set, is a path prefix.
func (s *stub) client(t *testing.T, opts Options) *Client {
	t.Helper()
	opts.URL = s.srv.URL + opts.URL
	if opts.MinBackoff == 0 {
		opts.MinBackoff, opts.MaxBackoff = time.Millisecond, 5*time.Millisecond
	}
	if opts.HTTPClient == nil {
		// Its own transport, so that no connection outlives the test.
		opts.HTTPClient = &http.Client{Transport: &http.Transport{}, Timeout: 5 * time.Second}
		t.Cleanup(opts.HTTPClient.CloseIdleConnections)
	}
	c, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// patientHTTP is an HTTP client for tests of replies of many megabytes:
// under make test's load (every package at once, -race) reading one took
// longer than stub.client's 5 s, and the timed-out attempt was retried
// (a second request where the test counts one).
func patientHTTP(t *testing.T) *http.Client {
	hc := &http.Client{Transport: &http.Transport{}, Timeout: time.Minute}
	t.Cleanup(hc.CloseIdleConnections)
	return hc
}

func accepted(body string, header ...string) answer {
	a := answer{status: http.StatusAccepted, body: body, header: map[string]string{}}
	for i := 0; i+1 < len(header); i += 2 {
		a.header[header[i]] = header[i+1]
	}
	return a
}

func failure(status int, code string, header ...string) answer {
	a := answer{status: status, body: `{"error":{"code":"` + code + `","message":"said the stub"}}`, header: map[string]string{}}
	for i := 0; i+1 < len(header); i += 2 {
		a.header[header[i]] = header[i+1]
	}
	return a
}

func TestPublishRequest(t *testing.T) {
	s := newStub(t, accepted(`{"id":"1700000000000-0","channel":"room:1@x"}`))
	c := s.client(t, Options{Token: "k1"})
	res, err := c.Publish(context.Background(), "room:1@x", Message{Data: map[string]string{"text": "<b>&"}, Event: "chat", From: "alice"})
	if err != nil {
		t.Fatal(err)
	}
	if res != (Result{ID: "1700000000000-0", Channel: "room:1@x"}) {
		t.Fatalf("result %+v", res)
	}
	r := s.requests()[0]
	if r.method != "POST" || r.path != "/v1/channels/room:1@x/messages" {
		t.Fatalf("%s %s", r.method, r.path)
	}
	if got := r.header.Get("Content-Type"); got != "application/json" {
		t.Fatalf("Content-Type %q", got)
	}
	if got := r.header.Get("Authorization"); got != "Bearer k1" {
		t.Fatalf("Authorization %q", got)
	}
	if k := r.header.Get("Idempotency-Key"); len(k) < 22 || len(k) > MaxIdempotencyKeyLen {
		t.Fatalf("Idempotency-Key %q", k)
	}
	// HTML characters as the caller wrote them: subscribers get the bytes.
	if want := `{"data":{"text":"<b>&"},"event":"chat","from":"alice"}`; r.body != want {
		t.Fatalf("body %s, want %s", r.body, want)
	}
}

func TestRawMessagePassesThrough(t *testing.T) {
	s := newStub(t)
	c := s.client(t, Options{})
	if _, err := c.Publish(context.Background(), "c", Message{Data: json.RawMessage(`{ "x" : [1, 2], "h": "<>" }`)}); err != nil {
		t.Fatal(err)
	}
	r := s.requests()[0]
	if want := `{"data":{"x":[1,2],"h":"<>"}}`; r.body != want {
		t.Fatalf("body %s, want %s", r.body, want)
	}
	if r.header.Get("Authorization") != "" {
		t.Fatalf("Authorization %q without a Token", r.header.Get("Authorization"))
	}
}

// TestReplayedOnlyWhenTrue: Result.Replayed is Idempotent-Replayed: true,
// not the header's presence.
func TestReplayedOnlyWhenTrue(t *testing.T) {
	s := newStub(t, accepted(`{"id":"1-0","channel":"c"}`, "Idempotent-Replayed", "false"),
		accepted(`{"id":"1-0","channel":"c"}`, "Idempotent-Replayed", "true"))
	c := s.client(t, Options{})
	for _, want := range []bool{false, true} {
		res, err := c.Publish(context.Background(), "c", Message{Data: 1})
		if err != nil || res.Replayed != want {
			t.Fatalf("%+v %v, want Replayed %v", res, err, want)
		}
	}
}

// TestRetriesWithTheSameKey: each retryable failure is retried with the
// Idempotency-Key and the body of the first attempt; the next call has
// a key of its own.
func TestRetriesWithTheSameKey(t *testing.T) {
	ok := accepted(`{"id":"5-0","channel":"c"}`, "Idempotent-Replayed", "true")
	gateway := answer{status: http.StatusBadGateway, body: "<html><body>502 Bad Gateway</body></html>"}
	for _, tc := range []struct {
		name string
		fail answer
		opts Options
	}{
		{"503", failure(503, "unavailable", "Retry-After", "0"), Options{}},
		{"503 without Retry-After", failure(503, "unavailable"), Options{}},
		{"502 from a gateway", gateway, Options{}},
		{"504 from a gateway", answer{status: http.StatusGatewayTimeout, body: "upstream timed out"}, Options{}},
		{"429 with Retry-After", failure(429, "rate_limited", "Retry-After", "0"), Options{}},
		{"409 in progress", failure(409, "idempotency_in_progress", "Retry-After", "0"), Options{}},
		{"connection closed before the reply", answer{hangup: true}, Options{}},
		{"timeout", answer{stall: true}, Options{HTTPClient: &http.Client{Transport: &http.Transport{}, Timeout: 100 * time.Millisecond}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newStub(t, tc.fail, tc.fail, ok)
			if tc.opts.HTTPClient != nil {
				t.Cleanup(tc.opts.HTTPClient.CloseIdleConnections)
			}
			c := s.client(t, tc.opts)
			res, err := c.Publish(context.Background(), "c", Message{Data: 1, Event: "e"})
			if err != nil {
				t.Fatal(err)
			}
			if res.ID != "5-0" || !res.Replayed {
				t.Fatalf("result %+v, want 5-0, replayed", res)
			}
			reqs := s.requests()
			if len(reqs) != 3 {
				t.Fatalf("%d requests, want 3", len(reqs))
			}
			key := reqs[0].header.Get("Idempotency-Key")
			for i, r := range reqs {
				if k := r.header.Get("Idempotency-Key"); k != key || k == "" {
					t.Fatalf("attempt %d: Idempotency-Key %q, attempt 0 had %q", i, k, key)
				}
				if r.body != reqs[0].body {
					t.Fatalf("attempt %d: body %s, attempt 0 had %s", i, r.body, reqs[0].body)
				}
			}
			if _, err := c.Publish(context.Background(), "c", Message{Data: 1, Event: "e"}); err != nil {
				t.Fatal(err)
			}
			if k := s.requests()[3].header.Get("Idempotency-Key"); k == key {
				t.Fatalf("the next call reused the key %q", k)
			}
		})
	}
}

// TestCutShortReplyRetried: a 2xx whose body ends before its JSON does,
// on a connection whose close ends the body (nothing for net/http to
// notice), is a reply that did not come back whole: retried with the same
// key, and the replay is the result.
func TestCutShortReplyRetried(t *testing.T) {
	ok := accepted(`{"id":"5-0","channel":"c"}`, "Idempotent-Replayed", "true")
	for _, body := range []string{`{"id":"5-`, ``} {
		cut := answer{raw: "HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n" + body}
		s := newStub(t, cut, ok)
		c := s.client(t, Options{})
		res, err := c.Publish(context.Background(), "c", Message{Data: 1})
		if err != nil || res.ID != "5-0" || !res.Replayed {
			t.Fatalf("body %q: %+v %v, want 5-0, replayed", body, res, err)
		}
		reqs := s.requests()
		if len(reqs) != 2 || reqs[1].header.Get("Idempotency-Key") != reqs[0].header.Get("Idempotency-Key") {
			t.Fatalf("body %q: %d requests, want 2 with one key", body, len(reqs))
		}
	}
	// A whole reply that is not the endpoint's is final.
	s := newStub(t, accepted(`<html>ok</html>`), ok)
	if _, err := s.client(t, Options{}).Publish(context.Background(), "c", Message{Data: 1}); err == nil || len(s.requests()) != 1 {
		t.Fatalf("an HTML 202: %v after %d requests, want an error after 1", err, len(s.requests()))
	}
}

func TestCallersKey(t *testing.T) {
	s := newStub(t, failure(503, "unavailable"), accepted(`{"id":"1-0","channel":"c"}`))
	c := s.client(t, Options{})
	if _, err := c.Publish(context.Background(), "c", Message{Data: true}, WithIdempotencyKey("order 42/1")); err != nil {
		t.Fatal(err)
	}
	for i, r := range s.requests() {
		if k := r.header.Get("Idempotency-Key"); k != "order 42/1" {
			t.Fatalf("attempt %d: Idempotency-Key %q", i, k)
		}
	}
}

// TestFinalErrors: answers a retry cannot change are returned at once,
// as *Error with the ingress's code.
func TestFinalErrors(t *testing.T) {
	for _, tc := range []struct {
		status int
		code   string
		header []string
	}{
		{400, "invalid_channel", nil},
		{400, "missing_data", nil},
		{401, "unauthorized", nil},
		{403, "forbidden", nil},
		{404, "connection_not_found", nil},
		{409, "conflict", nil},
		{413, "payload_too_large", nil},
		{415, "unsupported_media_type", nil},
		{422, "idempotency_key_reused", nil},
		{429, "rate_limited", nil}, // a batch larger than the burst
		{429, "rate_limited", []string{"Retry-After", "soon"}},
		{429, "rate_limited", []string{"Retry-After", "-1"}},
		{500, "internal", nil},
	} {
		t.Run(tc.code, func(t *testing.T) {
			s := newStub(t, failure(tc.status, tc.code, tc.header...), accepted(`{"id":"1-0","channel":"c"}`))
			c := s.client(t, Options{})
			_, err := c.Publish(context.Background(), "c", Message{Data: 1})
			var e *Error
			if !errors.As(err, &e) {
				t.Fatalf("error %v (%T), want *Error", err, err)
			}
			if e.Status != tc.status || e.Code != tc.code || e.Message != "said the stub" || e.Index != nil {
				t.Fatalf("error %+v", e)
			}
			if errors.Is(err, ErrInvalid) {
				t.Fatal("an answer of the ingress wraps ErrInvalid")
			}
			if n := len(s.requests()); n != 1 {
				t.Fatalf("%d requests, want 1", n)
			}
		})
	}
}

func TestBatchErrorIndex(t *testing.T) {
	s := newStub(t, answer{status: 400, body: `{"error":{"code":"invalid_channel","message":"message 1: no","index":1}}`})
	c := s.client(t, Options{})
	_, err := c.PublishBatch(context.Background(), []Item{{"a", Message{Data: 1}}, {"b", Message{Data: 2}}})
	var e *Error
	if !errors.As(err, &e) || e.Index == nil || *e.Index != 1 || e.Code != "invalid_channel" {
		t.Fatalf("error %v", err)
	}
	if !strings.Contains(err.Error(), "(item 1)") {
		t.Fatalf("error text %q", err)
	}
}

func TestMaxAttempts(t *testing.T) {
	// 0: the documented default, 4.
	for _, tc := range []struct{ max, want int }{{0, 4}, {1, 1}, {3, 3}} {
		s := newStub(t, failure(503, "unavailable"))
		c := s.client(t, Options{MaxAttempts: tc.max})
		_, err := c.Publish(context.Background(), "c", Message{Data: 1})
		var e *Error
		if !errors.As(err, &e) || e.Status != 503 || e.Code != "unavailable" {
			t.Fatalf("MaxAttempts %d: error %v", tc.max, err)
		}
		if n := len(s.requests()); n != tc.want {
			t.Fatalf("MaxAttempts %d: %d requests, want %d", tc.max, n, tc.want)
		}
	}
}

// TestRetryAfterRespected measures a lower bound only.
func TestRetryAfterRespected(t *testing.T) {
	s := newStub(t, failure(429, "rate_limited", "Retry-After", "1"), accepted(`{"id":"1-0","channel":"c"}`))
	c := s.client(t, Options{})
	start := time.Now()
	if _, err := c.Publish(context.Background(), "c", Message{Data: 1}); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d < time.Second {
		t.Fatalf("retried after %v, before the Retry-After of 1 s", d)
	}
}

func TestNonJSONErrorBody(t *testing.T) {
	page := "<html>\n<head><title>502 Bad Gateway</title></head>\n" + strings.Repeat("x", 1000) + "</html>"
	s := newStub(t, answer{status: http.StatusBadGateway, body: page})
	c := s.client(t, Options{MaxAttempts: 1})
	_, err := c.Publish(context.Background(), "c", Message{Data: 1})
	var e *Error
	if !errors.As(err, &e) || e.Status != 502 || e.Code != "" {
		t.Fatalf("error %v", err)
	}
	if !strings.HasPrefix(e.Message, "<html> <head><title>502 Bad Gateway") || len(e.Message) > 200 {
		t.Fatalf("message %q", e.Message)
	}
}

func TestReplyTooLarge(t *testing.T) {
	big := `{"id":"c1","user":"` + strings.Repeat("1", maxReplyBytes) + `"}`
	s := newStub(t, answer{status: 200, body: big})
	c := s.client(t, Options{HTTPClient: patientHTTP(t)})
	_, err := c.Connection(context.Background(), "c1")
	if err == nil || !strings.Contains(err.Error(), "larger than") {
		t.Fatalf("error %v", err)
	}
	if n := len(s.requests()); n != 1 {
		t.Fatalf("%d requests, want 1", n)
	}
}

// TestReplyAtTheLimit: a reply of exactly maxReplyBytes is read; the
// bound refuses only what is over it.
func TestReplyAtTheLimit(t *testing.T) {
	head, tail := `{"id":"c1","user":"`, `"}`
	body := head + strings.Repeat("1", maxReplyBytes-len(head)-len(tail)) + tail
	s := newStub(t, answer{status: 200, body: body})
	c := s.client(t, Options{HTTPClient: patientHTTP(t)})
	rec, err := c.Connection(context.Background(), "c1")
	if err != nil || len(rec.User) != maxReplyBytes-len(head)-len(tail) {
		t.Fatalf("a reply of %d bytes: user of %d bytes, %v", len(body), len(rec.User), err)
	}
}

// TestLargeMessagePageRead: a history page holds at most 4 MiB of
// messages but always at least one, so an ingress whose
// MAX_MESSAGE_BYTES is raised (up to 64 MiB) serves a page of one
// message larger than the 8 MiB other replies are held to. History and
// HistoryBefore read it: refused as too large, that message and every
// page after it could never be read.
func TestLargeMessagePageRead(t *testing.T) {
	data := `"` + strings.Repeat("x", maxReplyBytes) + `"`
	page := `{"messages":[{"channel":"c","id":"5-0","ts":5,"data":` + data + `}],"next":"5-0"}`
	s := newStub(t, answer{status: 200, body: page}, answer{status: 200, body: page})
	c := s.client(t, Options{HTTPClient: patientHTTP(t)})
	p, err := c.History(context.Background(), "c", "0", 0)
	if err != nil || len(p.Messages) != 1 || len(p.Messages[0].Data) != len(data) {
		t.Fatalf("History: %d messages, %v", len(p.Messages), err)
	}
	p, err = c.HistoryBefore(context.Background(), "c", "6-0", 0)
	if err != nil || len(p.Messages) != 1 || len(p.Messages[0].Data) != len(data) {
		t.Fatalf("HistoryBefore: %d messages, %v", len(p.Messages), err)
	}
}

// TestEndlessReplyNotRead: a reply that never ends (a misbehaving
// gateway) is read up to the bound and no further: the publisher stops
// reading and drops the connection, rather than reading it all into
// memory and only then finding it too large.
func TestEndlessReplyNotRead(t *testing.T) {
	const most = 64 << 20 // what the server sends at most, when nobody stops it
	wrote := make(chan int, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusOK)
		_, _ = io.WriteString(w, `{"id":"c1","user":"`)
		chunk := []byte(strings.Repeat("1", 32<<10))
		n := 0
		for n < most {
			if _, err := w.Write(chunk); err != nil {
				break // the client closed the connection
			}
			n += len(chunk)
		}
		wrote <- n
	}))
	t.Cleanup(srv.Close)
	c, err := New(Options{URL: srv.URL, HTTPClient: patientHTTP(t), MinBackoff: time.Millisecond, MaxBackoff: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Connection(context.Background(), "c1"); err == nil || !strings.Contains(err.Error(), "larger than") {
		t.Fatalf("error %v, want one that says the reply is too large", err)
	}
	select {
	case n := <-wrote:
		// The bound, plus what the sockets' buffers took in.
		if n >= most/2 {
			t.Fatalf("the server wrote %d bytes before the client stopped reading; the bound is %d", n, maxReplyBytes)
		}
	case <-time.After(time.Minute):
		t.Fatal("the server is still writing a minute later")
	}
}

// TestConnectionListsTakeRoom: a list of registry records is not held to
// the 8 MiB of other replies, since each record lists its channels: a
// thousand connections with a hundred long channel names each is a
// 13 MB answer the ingress gives as it should. The room grows with the
// limit asked for, and stays bounded by it.
func TestConnectionListsTakeRoom(t *testing.T) {
	chans := make([]string, 100)
	for i := range chans {
		chans[i] = fmt.Sprintf("%03d", i) + strings.Repeat("c", 125)
	}
	rec, err := json.Marshal(Connection{ID: "abcdefghijklmnop", User: strings.Repeat("u", 128), Instance: "inst", Channels: chans, ConnectedAt: time.Now()})
	if err != nil {
		t.Fatal(err)
	}
	list := func(n int) string {
		return `{"connections":[` + strings.TrimSuffix(strings.Repeat(string(rec)+",", n), ",") + `]}`
	}
	if body := list(1000); len(body) <= maxReplyBytes {
		t.Fatalf("the list is %d bytes, want more than %d", len(body), maxReplyBytes)
	}
	s := newStub(t, answer{status: 200, body: list(1000)}, answer{status: 200, body: list(1000)}, answer{status: 200, body: list(1000)})
	c := s.client(t, Options{HTTPClient: patientHTTP(t)})
	ctx := context.Background()
	got, err := c.ChannelConnections(ctx, "c", 0) // the ingress's default, 1000
	if err != nil || len(got) != 1000 || len(got[999].Channels) != 100 {
		t.Fatalf("ChannelConnections: %d records, %v", len(got), err)
	}
	if got, err = c.UserConnections(ctx, "alice", 1000); err != nil || len(got) != 1000 {
		t.Fatalf("UserConnections: %d records, %v", len(got), err)
	}
	// Asked for 10, a reply that size is not what was asked for.
	if _, err := c.ChannelConnections(ctx, "c", 10); err == nil || !strings.Contains(err.Error(), "larger than") {
		t.Fatalf("limit 10, a 13 MB reply: %v", err)
	}
}

// TestConnectionReused: replies, errors included, are read whole, so
// every call goes over one keep-alive connection.
func TestConnectionReused(t *testing.T) {
	s := newStub(t, failure(503, "unavailable"), failure(400, "invalid_event"),
		accepted(`{"id":"1-0","channel":"c"}`), answer{status: 200, body: `{"messages":[],"next":""}`})
	c := s.client(t, Options{})
	ctx := context.Background()
	if _, err := c.Publish(ctx, "c", Message{Data: 1}); err == nil {
		t.Fatal("want the 400")
	}
	if _, err := c.Publish(ctx, "c", Message{Data: 1}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.History(ctx, "c", "", 0); err != nil {
		t.Fatal(err)
	}
	if n := s.connections(); n != 1 {
		t.Fatalf("%d connections for %d requests, want 1", n, len(s.requests()))
	}
}

func TestEndpoints(t *testing.T) {
	ctx := context.Background()
	type call struct {
		name        string
		answer      answer
		do          func(c *Client) error
		method      string
		path, query string
		key         bool // carries an Idempotency-Key
	}
	for _, tc := range []call{
		{"batch", accepted(`{"results":[{"id":"1-0","channel":"a"},{"id":"1-0","channel":"b"}]}`), func(c *Client) error {
			res, err := c.PublishBatch(ctx, []Item{{"a", Message{Data: 1, Event: "tick"}}, {"b", Message{Data: 2}}})
			if err == nil && (len(res) != 2 || res[1] != (Result{ID: "1-0", Channel: "b"})) {
				t.Errorf("results %+v", res)
			}
			return err
		}, "POST", "/v1/messages", "", true},
		{"connection", accepted(`{"id":"3-0","connection":"c-1:x"}`), func(c *Client) error {
			res, err := c.SendToConnection(ctx, "c-1:x", Message{Data: "hi"})
			if err == nil && res != (Result{ID: "3-0", Connection: "c-1:x"}) {
				t.Errorf("result %+v", res)
			}
			return err
		}, "POST", "/v1/connections/c-1:x/messages", "", true},
		{"user", accepted(`{"user":"alice@example.com","connections":3}`), func(c *Client) error {
			n, err := c.SendToUser(ctx, "alice@example.com", Message{Data: "hi"})
			if err == nil && n != 3 {
				t.Errorf("connections %d", n)
			}
			return err
		}, "POST", "/v1/users/alice@example.com/messages", "", true},
		{"user, the whole reply", accepted(`{"user":"alice@example.com","connections":3}`), func(c *Client) error {
			res, err := c.SendToUserResult(ctx, "alice@example.com", Message{Data: "hi"})
			if err == nil && res != (UserResult{User: "alice@example.com", Connections: 3}) {
				t.Errorf("result %+v", res)
			}
			return err
		}, "POST", "/v1/users/alice@example.com/messages", "", true},
		{"user, replayed", accepted(`{"user":"alice@example.com","connections":0}`, "Idempotent-Replayed", "true"), func(c *Client) error {
			res, err := c.SendToUserResult(ctx, "alice@example.com", Message{Data: "hi"}, WithIdempotencyKey("k"))
			if err == nil && res != (UserResult{User: "alice@example.com", Connections: 0, Replayed: true}) {
				t.Errorf("result %+v, want replayed", res)
			}
			return err
		}, "POST", "/v1/users/alice@example.com/messages", "", true},
		{"disconnect", accepted(`{"connection":"c-1","status":"disconnecting"}`), func(c *Client) error {
			return c.Disconnect(ctx, "c-1")
		}, "DELETE", "/v1/connections/c-1", "", false},
		{"disconnect user", accepted(`{"user":"alice@example.com","disconnected":2}`), func(c *Client) error {
			n, err := c.DisconnectUser(ctx, "alice@example.com")
			if err == nil && n != 2 {
				t.Errorf("disconnected %d", n)
			}
			return err
		}, "DELETE", "/v1/users/alice@example.com/connections", "", false},
		{"disconnect user without connections", accepted(`{"user":"bob","disconnected":0}`), func(c *Client) error {
			n, err := c.DisconnectUser(ctx, "bob")
			if err == nil && n != 0 {
				t.Errorf("disconnected %d", n)
			}
			return err
		}, "DELETE", "/v1/users/bob/connections", "", false},
		{"user connections", answer{status: 200, body: `{"connections":[{"id":"c-1","user":"ada","instance":"i1","channels":[],"connected_at":"2026-01-01T12:00:00Z"}]}`}, func(c *Client) error {
			list, err := c.UserConnections(ctx, "ada", 7)
			if err == nil && (len(list) != 1 || list[0].ID != "c-1" || list[0].User != "ada") {
				t.Errorf("list %+v", list)
			}
			return err
		}, "GET", "/v1/users/ada/connections", "limit=7", false},
		{"user connections, default limit", answer{status: 200, body: `{"connections":[]}`}, func(c *Client) error {
			list, err := c.UserConnections(ctx, "ada", 0)
			if err == nil && (list == nil || len(list) != 0) {
				t.Errorf("list %#v", list)
			}
			return err
		}, "GET", "/v1/users/ada/connections", "", false},
		{"history", answer{status: 200, body: `{"messages":[{"channel":"room","id":"5-1","event":"chat","from":"bob","ts":5,"data":{"a":"<"}}],"next":"5-1","recovered":true}`}, func(c *Client) error {
			p, err := c.History(ctx, "room", "0", 10)
			if err == nil {
				want := HistoryMessage{Channel: "room", ID: "5-1", Event: "chat", From: "bob", TS: 5, Data: json.RawMessage(`{"a":"<"}`)}
				if len(p.Messages) != 1 || p.Next != "5-1" || p.Recovered == nil || !*p.Recovered ||
					p.Messages[0].ID != want.ID || p.Messages[0].From != want.From || p.Messages[0].TS != want.TS || string(p.Messages[0].Data) != string(want.Data) {
					t.Errorf("page %+v", p)
				}
			}
			return err
		}, "GET", "/v1/channels/room/messages", "after=0&limit=10", false},
		{"connection record", answer{status: 200, body: `{"id":"c-1","user":"ada","instance":"i1","channels":["room"],"connected_at":"2026-01-01T12:00:00Z"}`}, func(c *Client) error {
			rec, err := c.Connection(ctx, "c-1")
			if err == nil && (rec.ID != "c-1" || rec.User != "ada" || rec.Instance != "i1" || len(rec.Channels) != 1 || rec.ConnectedAt.Year() != 2026) {
				t.Errorf("record %+v", rec)
			}
			return err
		}, "GET", "/v1/connections/c-1", "", false},
		{"channel connections", answer{status: 200, body: `{"connections":[{"id":"c-1","user":"ada","instance":"i1","channels":["room"],"connected_at":"2026-01-01T12:00:00Z"}]}`}, func(c *Client) error {
			list, err := c.ChannelConnections(ctx, "room", 5)
			if err == nil && (len(list) != 1 || list[0].ID != "c-1") {
				t.Errorf("list %+v", list)
			}
			return err
		}, "GET", "/v1/channels/room/connections", "limit=5", false},
		{"clear history", answer{status: 200, body: `{"channel":"room","removed":7}`}, func(c *Client) error {
			n, err := c.ClearHistory(ctx, "room")
			if err == nil && n != 7 {
				t.Errorf("removed %d", n)
			}
			return err
		}, "DELETE", "/v1/channels/room/messages", "", false},
		{"latest history", answer{status: 200, body: `{"messages":[],"next":""}`}, func(c *Client) error {
			p, err := c.History(ctx, "room", "", 0)
			if err == nil && (p.Recovered != nil || len(p.Messages) != 0) {
				t.Errorf("page %+v", p)
			}
			return err
		}, "GET", "/v1/channels/room/messages", "", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// The path prefix of a gateway's stage is kept, escaped as given.
			s := newStub(t, tc.answer)
			c := s.client(t, Options{URL: "/my%20stage/release/"})
			if err := tc.do(c); err != nil {
				t.Fatal(err)
			}
			r := s.requests()[0]
			if r.method != tc.method || r.path != "/my%20stage/release"+tc.path || r.query != tc.query {
				t.Fatalf("%s %s?%s, want %s /my%%20stage/release%s?%s", r.method, r.path, r.query, tc.method, tc.path, tc.query)
			}
			if got := r.header.Get("Idempotency-Key") != ""; got != tc.key {
				t.Fatalf("Idempotency-Key sent: %v", got)
			}
			if tc.method != "POST" && r.body != "" {
				t.Fatalf("body %q", r.body)
			}
		})
	}
}

// TestIdempotentMethodsRetried: History, Disconnect and DisconnectUser
// are retried on the same conditions, without a key.
func TestIdempotentMethodsRetried(t *testing.T) {
	s := newStub(t, failure(503, "unavailable"), answer{status: 200, body: `{"messages":[],"next":""}`},
		answer{hangup: true}, accepted(`{"connection":"c-1","status":"disconnecting"}`),
		failure(503, "unavailable"), accepted(`{"user":"u","disconnected":1}`))
	c := s.client(t, Options{})
	if _, err := c.History(context.Background(), "c", "", 0); err != nil {
		t.Fatal(err)
	}
	if err := c.Disconnect(context.Background(), "c-1"); err != nil {
		t.Fatal(err)
	}
	if n, err := c.DisconnectUser(context.Background(), "u"); err != nil || n != 1 {
		t.Fatalf("DisconnectUser: %d, %v", n, err)
	}
	reqs := s.requests()
	if len(reqs) != 6 {
		t.Fatalf("%d requests, want 6", len(reqs))
	}
	for _, r := range reqs {
		if r.header.Get("Idempotency-Key") != "" {
			t.Fatalf("%s with an Idempotency-Key", r.method)
		}
	}
}

func TestCanceledBeforeSending(t *testing.T) {
	s := newStub(t)
	c := s.client(t, Options{})
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := c.Publish(ctx, "c", Message{Data: 1})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("error %v", err)
	}
	if n := len(s.requests()); n != 0 {
		t.Fatalf("%d requests", n)
	}
}

func TestNew(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts Options
	}{
		{"empty URL", Options{}},
		{"relative", Options{URL: "/v1"}},
		{"no host", Options{URL: "http://"}},
		{"ws scheme", Options{URL: "ws://127.0.0.1:1"}},
		{"ftp scheme", Options{URL: "ftp://127.0.0.1"}},
		{"query", Options{URL: "http://127.0.0.1:1/?stage=release"}},
		{"empty query", Options{URL: "http://127.0.0.1:1/?"}},
		{"fragment", Options{URL: "http://127.0.0.1:1/#x"}},
		{"empty fragment", Options{URL: "http://127.0.0.1:1/#"}},
		{"user info", Options{URL: "http://key:secret@127.0.0.1:1"}},
		// Refused for something else first: the password is not shown
		// either, nor a part of it (net/url quotes the piece it cannot
		// read), nor a token in the query.
		{"user info, ws scheme", Options{URL: "ws://key:secret@127.0.0.1:1"}},
		{"user info, bad port", Options{URL: "http://key:secret@127.0.0.1:x"}},
		{"user info, bad escape", Options{URL: "http://key:secret%zz@127.0.0.1:1"}},
		{"user info and a query", Options{URL: "http://key:secret@127.0.0.1:1/?stage=release"}},
		{"user info and a fragment", Options{URL: "http://key:secret@127.0.0.1:1/#x"}},
		{"token in the query", Options{URL: "http://127.0.0.1:1/?token=secret"}},
		{"bad port", Options{URL: "http://127.0.0.1:x"}},
		{"token with a space", Options{URL: "http://127.0.0.1:1", Token: "a b"}},
		{"token with a newline", Options{URL: "http://127.0.0.1:1", Token: "a\nb"}},
		{"negative MaxAttempts", Options{URL: "http://127.0.0.1:1", MaxAttempts: -1}},
	} {
		if _, err := New(tc.opts); err == nil {
			t.Errorf("%s: New(%+v) accepted", tc.name, tc.opts)
		} else if strings.Contains(err.Error(), "secret") {
			t.Errorf("%s: the error shows the password: %v", tc.name, err)
		}
	}
	c, err := New(Options{URL: "https://gw.example.com/release/", MinBackoff: time.Second, MaxBackoff: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if c.base != "https://gw.example.com/release" || c.maxAttempts != DefaultMaxAttempts || c.maxBackoff != time.Second ||
		c.hc.Timeout != DefaultTimeout {
		t.Fatalf("client %+v", c)
	}
}

// TestLimitsInclusive: the documented maxima are allowed, not refused
// before the request: a 255-character Idempotency-Key, a batch of
// MaxBatchItems (1,000), a connection list of MaxConnectionsLimit
// (10,000).
func TestLimitsInclusive(t *testing.T) {
	results := make([]string, MaxBatchItems)
	for i := range results {
		results[i] = fmt.Sprintf(`{"id":"%d-0","channel":"c"}`, i+1)
	}
	s := newStub(t, accepted(`{"id":"1-0","channel":"c"}`),
		accepted(`{"results":[`+strings.Join(results, ",")+`]}`),
		answer{status: 200, body: `{"connections":[]}`})
	c := s.client(t, Options{})
	ctx := context.Background()
	key := strings.Repeat("k", 255)
	if _, err := c.Publish(ctx, "c", Message{Data: 1}, WithIdempotencyKey(key)); err != nil {
		t.Fatalf("a 255-character key: %v", err)
	}
	items := make([]Item, 1000)
	for i := range items {
		items[i] = Item{"c", Message{Data: i}}
	}
	if res, err := c.PublishBatch(ctx, items); err != nil || len(res) != 1000 {
		t.Fatalf("a batch of 1000: %d results, %v", len(res), err)
	}
	if _, err := c.ChannelConnections(ctx, "c", 10000); err != nil {
		t.Fatalf("limit 10000: %v", err)
	}
	reqs := s.requests()
	if len(reqs) != 3 || reqs[0].header.Get("Idempotency-Key") != key || reqs[2].query != "limit=10000" {
		t.Fatalf("%d requests, want 3 with the key and the limit", len(reqs))
	}
}

// TestInvalidInputSendsNothing: what the ingress would refuse is refused
// before any request, wrapping ErrInvalid.
func TestInvalidInputSendsNothing(t *testing.T) {
	s := newStub(t)
	c := s.client(t, Options{})
	ctx := context.Background()
	ok := Message{Data: 1}
	long := strings.Repeat("a", 129)
	items := make([]Item, MaxBatchItems+1)
	for i := range items {
		items[i] = Item{"c", ok}
	}
	var nilMap map[string]int
	for name, call := range map[string]func() error{
		"channel empty":      func() error { _, err := c.Publish(ctx, "", ok); return err },
		"channel leading -":  func() error { _, err := c.Publish(ctx, "-a", ok); return err },
		"channel with /":     func() error { _, err := c.Publish(ctx, "a/b", ok); return err },
		"channel with space": func() error { _, err := c.Publish(ctx, "a b", ok); return err },
		"channel pattern":    func() error { _, err := c.Publish(ctx, "a*", ok); return err },
		"channel too long":   func() error { _, err := c.Publish(ctx, long, ok); return err },
		"nil Data":           func() error { _, err := c.Publish(ctx, "c", Message{}); return err },
		"nil map Data":       func() error { _, err := c.Publish(ctx, "c", Message{Data: nilMap}); return err },
		"null Data":          func() error { _, err := c.Publish(ctx, "c", Message{Data: json.RawMessage(" null ")}); return err },
		"bad raw Data":       func() error { _, err := c.Publish(ctx, "c", Message{Data: json.RawMessage("{")}); return err },
		"bad UTF-8 Data":     func() error { _, err := c.Publish(ctx, "c", Message{Data: json.RawMessage("\"\xff\"")}); return err },
		"unmarshalable Data": func() error { _, err := c.Publish(ctx, "c", Message{Data: func() {}}); return err },
		"Data too deep": func() error {
			_, err := c.Publish(ctx, "c", Message{Data: json.RawMessage(strings.Repeat("[", 65) + strings.Repeat("]", 65))})
			return err
		},
		"batch item Data too deep": func() error {
			// 65 objects deep, with brackets in strings that close none.
			deep := json.RawMessage(strings.Repeat(`{"s":"]}\"]","x":`, 65) + "1" + strings.Repeat("}", 65))
			_, err := c.PublishBatch(ctx, []Item{{"a", ok}, {"b", Message{Data: deep}}})
			return err
		},
		"event with quote": func() error { _, err := c.Publish(ctx, "c", Message{Data: 1, Event: `a"b`}); return err },
		"event too long": func() error {
			_, err := c.Publish(ctx, "c", Message{Data: 1, Event: strings.Repeat("e", 65)})
			return err
		},
		"from with space": func() error { _, err := c.Publish(ctx, "c", Message{Data: 1, From: "a b"}); return err },
		"empty key":       func() error { _, err := c.Publish(ctx, "c", ok, WithIdempotencyKey("")); return err },
		"long key": func() error {
			_, err := c.Publish(ctx, "c", ok, WithIdempotencyKey(strings.Repeat("k", 256)))
			return err
		},
		"key with newline":    func() error { _, err := c.Publish(ctx, "c", ok, WithIdempotencyKey("a\nb")); return err },
		"key with é":          func() error { _, err := c.Publish(ctx, "c", ok, WithIdempotencyKey("clé")); return err },
		"key ending in space": func() error { _, err := c.Publish(ctx, "c", ok, WithIdempotencyKey("k ")); return err },
		"empty batch":         func() error { _, err := c.PublishBatch(ctx, nil); return err },
		"batch too large":     func() error { _, err := c.PublishBatch(ctx, items); return err },
		"batch item channel": func() error {
			_, err := c.PublishBatch(ctx, []Item{{"a", ok}, {"", ok}})
			if err != nil && !strings.Contains(err.Error(), "item 1") {
				t.Errorf("batch item channel: %v does not name the item", err)
			}
			return err
		},
		"batch item data":  func() error { _, err := c.PublishBatch(ctx, []Item{{"a", Message{}}}); return err },
		"connection id":    func() error { _, err := c.SendToConnection(ctx, "c/1", ok); return err },
		"user":             func() error { _, err := c.SendToUser(ctx, "", ok); return err },
		"user too long":    func() error { _, err := c.SendToUser(ctx, long, ok); return err },
		"disconnect id":    func() error { return c.Disconnect(ctx, "a b") },
		"disconnect user":  func() error { _, err := c.DisconnectUser(ctx, "a/b"); return err },
		"list user":        func() error { _, err := c.UserConnections(ctx, "", 0); return err },
		"list user limit":  func() error { _, err := c.UserConnections(ctx, "u", MaxConnectionsLimit+1); return err },
		"list user -limit": func() error { _, err := c.UserConnections(ctx, "u", -1); return err },
		"history channel":  func() error { _, err := c.History(ctx, ".a", "", 0); return err },
		"record id":        func() error { _, err := c.Connection(ctx, ""); return err },
		"clear channel":    func() error { _, err := c.ClearHistory(ctx, "-a"); return err },
		"list channel":     func() error { _, err := c.ChannelConnections(ctx, "a/b", 0); return err },
		"list limit":       func() error { _, err := c.ChannelConnections(ctx, "c", MaxConnectionsLimit+1); return err },
		"list -limit":      func() error { _, err := c.ChannelConnections(ctx, "c", -1); return err },
		"history after":    func() error { _, err := c.History(ctx, "c", "1-", 0); return err },
		"history after $":  func() error { _, err := c.History(ctx, "c", "$", 0); return err },
		"history limit":    func() error { _, err := c.History(ctx, "c", "", MaxHistoryLimit+1); return err },
		"history -limit":   func() error { _, err := c.History(ctx, "c", "", -1); return err },
	} {
		if err := call(); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: error %v, want ErrInvalid", name, err)
		}
	}
	if n := len(s.requests()); n != 0 {
		t.Fatalf("%d requests for invalid input", n)
	}
}

// TestValidCursor: the cursor check is the ingress's (stream.ParseID).
func TestValidCursor(t *testing.T) {
	for _, s := range []string{"0", "0-0", "1700000000000-5", "18446744073709551615-18446744073709551615",
		"18446744073709551616", "-", "1-", "-1", "+1", "1-+1", "1-2-3", " 1", "1.5", "", "$", "a-1", "00-01"} {
		_, want := stream.ParseID(s)
		if got := validCursor(s); got != want && s != "" {
			t.Errorf("validCursor(%q) = %v, stream.ParseID says %v", s, got, want)
		}
	}
}

// TestDataDepth: Data nested 64 levels deep, the ingress's bound, is
// sent, brackets in its strings and ones already closed not counted;
// deeper is refused before any request (TestInvalidInputSendsNothing).
func TestDataDepth(t *testing.T) {
	s := newStub(t)
	c := s.client(t, Options{})
	for _, data := range []json.RawMessage{
		json.RawMessage(strings.Repeat("[", 64) + strings.Repeat("]", 64)),
		json.RawMessage(strings.Repeat(`{"s":"[{\"[{","x":`, 64) + "1" + strings.Repeat("}", 64)),
		json.RawMessage(`"` + strings.Repeat("[", 100) + `"`),
		json.RawMessage(`[` + strings.Repeat(`[1],`, 100) + `{}]`), // wide, 2 levels
	} {
		if _, err := c.Publish(context.Background(), "c", Message{Data: data}); err != nil {
			t.Fatalf("%.40s…: %v", data, err)
		}
	}
	if n := len(s.requests()); n != 4 {
		t.Fatalf("%d requests, want 4", n)
	}
}
