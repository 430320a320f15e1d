package publisher

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
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

// TestCancelDuringBackoff: a call waiting out a Retry-After returns when
// its ctx ends, with both ctx's error and the last answer.
func TestCancelDuringBackoff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var n atomic.Int32
		c := inMemory(t, sequence(100, http.StatusServiceUnavailable, http.Header{"Retry-After": {"30"}}, &n))
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		start := time.Now()
		_, err := c.Publish(ctx, "c", Message{Data: 1})
		if d := time.Since(start); d != 2*time.Second {
			t.Fatalf("returned after %v, want at the deadline, 2 s", d)
		}
		var e *Error
		if !errors.Is(err, context.DeadlineExceeded) || !errors.As(err, &e) || e.Status != 503 || e.RetryAfter != 30*time.Second {
			t.Fatalf("error %v", err)
		}
		if n.Load() != 1 {
			t.Fatalf("%d requests", n.Load())
		}
	})
}
