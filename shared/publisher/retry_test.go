package publisher

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// handlerTransport answers requests with a handler, in memory: no
// socket, so that a synctest bubble's clock runs while a call waits.
type handlerTransport struct{ h http.Handler }

func (t handlerTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	if err := r.Context().Err(); err != nil {
		return nil, err
	}
	w := httptest.NewRecorder()
	t.h.ServeHTTP(w, r)
	return w.Result(), nil
}

// sequence answers with status and header until its n-th request, then
// 202.
func sequence(n int, status int, header http.Header, requests *atomic.Int32) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if int(requests.Add(1)) > n {
			w.WriteHeader(http.StatusAccepted)
			_, _ = w.Write([]byte(`{"id":"1-0","channel":"c"}`))
			return
		}
		for k, v := range header {
			w.Header()[k] = v
		}
		w.WriteHeader(status)
		_, _ = w.Write([]byte(`{"error":{"code":"x","message":"y"}}`))
	})
}

func inMemory(t *testing.T, h http.Handler) *Client {
	t.Helper()
	c, err := New(Options{URL: "http://ingress.test", HTTPClient: &http.Client{Transport: handlerTransport{h}},
		MinBackoff: time.Millisecond, MaxBackoff: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestRetryAfterForms: Retry-After in seconds or as a date is waited
// for, a huge one is capped at MaxRetryAfter, and one that is neither is
// ignored.
func TestRetryAfterForms(t *testing.T) {
	for _, tc := range []struct {
		name     string
		value    func() string
		min, max time.Duration
	}{
		{"seconds", func() string { return "3" }, 3 * time.Second, 4 * time.Second},
		{"date", func() string { return time.Now().Add(5 * time.Second).UTC().Format(http.TimeFormat) }, 4 * time.Second, 6 * time.Second},
		{"past date", func() string { return time.Now().Add(-time.Hour).UTC().Format(http.TimeFormat) }, 0, time.Second},
		{"capped", func() string { return "86400" }, MaxRetryAfter, MaxRetryAfter + time.Second},
		{"capped digits", func() string { return "99999999999999999999999" }, MaxRetryAfter, MaxRetryAfter + time.Second},
		// MaxRetryAfter is the documented minute.
		{"capped at a minute", func() string { return "3600" }, time.Minute, time.Minute + time.Second},
		// Not a Retry-After: the backoff alone (1 ms here).
		{"negative", func() string { return "-5" }, 0, time.Millisecond},
		{"fraction", func() string { return "1.5" }, 0, time.Millisecond},
		{"garbage", func() string { return "soon" }, 0, time.Millisecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				var n atomic.Int32
				c := inMemory(t, sequence(1, http.StatusServiceUnavailable, http.Header{"Retry-After": {tc.value()}}, &n))
				start := time.Now()
				if _, err := c.Publish(context.Background(), "c", Message{Data: 1}); err != nil {
					t.Fatal(err)
				}
				// The bubble's clock moves only by the waits: exact.
				if d := time.Since(start); d < tc.min || d > tc.max {
					t.Fatalf("retried after %v, want %v–%v", d, tc.min, tc.max)
				}
				if n.Load() != 2 {
					t.Fatalf("%d requests", n.Load())
				}
			})
		})
	}
}

// TestBackoffBounds: without Retry-After the wait before retry n (from
// 0) is at most min(MaxBackoff, MinBackoff·2ⁿ): full jitter, 1 s
// doubling to a cap of 3 s here. Random, so checked over many calls;
// in the bubble the gaps are exact.
func TestBackoffBounds(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var times []time.Time
		var n atomic.Int32
		seq := sequence(3, http.StatusServiceUnavailable, nil, &n)
		c, err := New(Options{URL: "http://ingress.test", MinBackoff: time.Second, MaxBackoff: 3 * time.Second,
			HTTPClient: &http.Client{Transport: handlerTransport{http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				times = append(times, time.Now()) // one request at a time
				seq.ServeHTTP(w, r)
			})}}})
		if err != nil {
			t.Fatal(err)
		}
		bounds := []time.Duration{time.Second, 2 * time.Second, 3 * time.Second}
		for call := range 20 {
			times = times[:0]
			n.Store(0)
			if _, err := c.Publish(context.Background(), "c", Message{Data: 1}); err != nil {
				t.Fatal(err)
			}
			if len(times) != 4 {
				t.Fatalf("call %d: %d requests, want 4", call, len(times))
			}
			for i, max := range bounds {
				if gap := times[i+1].Sub(times[i]); gap > max {
					t.Fatalf("call %d: retry %d after %v, want at most %v", call, i, gap, max)
				}
			}
		}
	})
}

// TestCancelDuringBackoff: a call waiting out a Retry-After returns when
// its ctx is cancelled, with both ctx's error and the last answer.
func TestCancelDuringBackoff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var n atomic.Int32
		c := inMemory(t, sequence(100, http.StatusServiceUnavailable, http.Header{"Retry-After": {"30"}}, &n))
		// No deadline: the wait cannot be known to outlast ctx, so it is
		// begun and ended by the cancel.
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		time.AfterFunc(2*time.Second, cancel)
		start := time.Now()
		_, err := c.Publish(ctx, "c", Message{Data: 1})
		if d := time.Since(start); d != 2*time.Second {
			t.Fatalf("returned after %v, want at the cancel, 2 s", d)
		}
		var e *Error
		if !errors.Is(err, context.Canceled) || !errors.As(err, &e) || e.Status != 503 || e.RetryAfter != 30*time.Second {
			t.Fatalf("error %v", err)
		}
		if n.Load() != 1 {
			t.Fatalf("%d requests", n.Load())
		}
	})
}

// TestRetryPastDeadlineNotWaited: a call whose next retry would come
// after its ctx's deadline (a 429's Retry-After: 30 with 200 ms left)
// returns at once with the last answer, as when the attempts run out,
// instead of sitting until the deadline to return ctx's error.
func TestRetryPastDeadlineNotWaited(t *testing.T) {
	for _, tc := range []struct {
		status  int
		code    string
		unknown bool // a 503 may have been written; a 429 was not
	}{
		{http.StatusTooManyRequests, "rate_limited", false},
		{http.StatusServiceUnavailable, "unavailable", true},
	} {
		t.Run(strconv.Itoa(tc.status), func(t *testing.T) {
			s := newStub(t, failure(tc.status, tc.code, "Retry-After", "30"))
			c := s.client(t, Options{})
			ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
			defer cancel()
			_, err := c.Publish(ctx, "c", Message{Data: 1})
			// Not a duration (the machine may be slow): the call must
			// have returned before the deadline fired.
			if ctx.Err() != nil {
				t.Fatalf("returned after the deadline: %v", err)
			}
			var e *Error
			switch {
			case !errors.As(err, &e) || e.Status != tc.status || e.RetryAfter != 30*time.Second:
				t.Fatalf("error %v, want the %d with its Retry-After", err, tc.status)
			case errors.Is(err, context.DeadlineExceeded):
				t.Fatalf("error %v wraps ctx's, which had not ended", err)
			case errors.Is(err, ErrOutcomeUnknown) != tc.unknown:
				t.Fatalf("error %v: outcome unknown %v, want %v", err, !tc.unknown, tc.unknown)
			case len(s.requests()) != 1:
				t.Fatalf("%d requests, want 1", len(s.requests()))
			}
		})
	}
}

// TestRetryBeforeDeadlineWaited: a wait that ends before ctx's deadline
// is waited out and the retry made.
func TestRetryBeforeDeadlineWaited(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var n atomic.Int32
		c := inMemory(t, sequence(1, http.StatusTooManyRequests, http.Header{"Retry-After": {"30"}}, &n))
		ctx, cancel := context.WithTimeout(context.Background(), 31*time.Second)
		defer cancel()
		start := time.Now()
		if _, err := c.Publish(ctx, "c", Message{Data: 1}); err != nil {
			t.Fatal(err)
		}
		if d := time.Since(start); d < 30*time.Second || n.Load() != 2 {
			t.Fatalf("%d requests in %v, want 2 after 30 s", n.Load(), d)
		}
	})
}

// cancelAfter is a transport that cancels the call's ctx once an answer
// has come back whole: the call then waits out a retry's backoff with
// ctx already ended.
type cancelAfter struct {
	next   http.RoundTripper
	cancel context.CancelFunc
}

func (t *cancelAfter) RoundTrip(r *http.Request) (*http.Response, error) {
	resp, err := t.next.RoundTrip(r)
	if err != nil {
		return nil, err
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		return nil, err
	}
	resp.Body = io.NopCloser(bytes.NewReader(b))
	t.cancel()
	return resp, nil
}

// TestCanceledBeforeRetryNotSent: a call refused with a retryable 4xx
// (429 with Retry-After: nothing written) whose ctx ends as its backoff
// ends sends nothing more, and its outcome is known: nothing was done.
// The select between the backoff's timer and ctx can take the timer, and
// the attempt that followed, made with ctx ended, got no connection from
// the transport (it checks ctx before it asks for one), so its error said
// nothing about whether it was sent and the call read as outcome unknown.
func TestCanceledBeforeRetryNotSent(t *testing.T) {
	var requests atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		requests.Add(1)
		w.Header().Set("Retry-After", "0")
		w.WriteHeader(http.StatusTooManyRequests)
		_, _ = w.Write([]byte(`{"error":{"code":"rate_limited","message":"slow down"}}`))
	}))
	t.Cleanup(srv.Close)
	tr := &http.Transport{}
	t.Cleanup(tr.CloseIdleConnections)
	ca := &cancelAfter{next: tr}
	c, err := New(Options{URL: srv.URL, HTTPClient: &http.Client{Transport: ca, Timeout: 5 * time.Second},
		MinBackoff: time.Nanosecond, MaxBackoff: time.Nanosecond})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 50 {
		ctx, cancel := context.WithCancel(context.Background())
		ca.cancel = cancel
		requests.Store(0)
		_, err := c.Publish(ctx, "c", Message{Data: 1})
		cancel()
		var e *Error
		switch {
		case !errors.Is(err, context.Canceled) || !errors.As(err, &e) || e.Status != http.StatusTooManyRequests:
			t.Fatalf("call %d: error %v, want ctx's and the 429", i, err)
		case errors.Is(err, ErrOutcomeUnknown):
			t.Fatalf("call %d: error %v: outcome unknown, but the only request was refused with a 429", i, err)
		case requests.Load() != 1:
			t.Fatalf("call %d: %d requests, want 1", i, requests.Load())
		}
	}
}
