package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/redistest"
)

// TestPublishResultsMatchAnswers sends publishes of every kind through a
// real HTTP server and checks wsrelay_ingress_publishes_total and
// wsrelay_ingress_http_requests_total against the answers the client got.
func TestPublishResultsMatchAnswers(t *testing.T) {
	t.Parallel()
	key := strings.Repeat("k", 40)
	pubOnly := strings.Repeat("p", 40)
	e, _ := newSecEnv(t, map[string]string{"API_KEYS": key + "," + pubOnly + "=ok-*", "PUBLISH_RATE_PER_KEY": "0.001", "PUBLISH_BURST_PER_KEY": "6"})
	ts := httptest.NewServer(e.srv)
	defer ts.Close()
	results := map[string]int{}
	classes := map[string]int{}
	do := func(method, path, body, cred string, hdr ...string) {
		req, _ := http.NewRequest(method, ts.URL+path, strings.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		if cred != "" {
			req.Header.Set("Authorization", "Bearer "+cred)
		}
		for i := 0; i < len(hdr); i += 2 {
			req.Header.Set(hdr[i], hdr[i+1])
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		var eb errorBody
		_ = json.Unmarshal(b, &eb)
		res := "accepted"
		if resp.StatusCode >= 300 {
			res = eb.Error.Code
		}
		results[res]++
		route := path
		switch {
		case strings.HasPrefix(path, "/v1/channels/"):
			route = "/v1/channels/:channel/messages"
		case strings.HasPrefix(path, "/v1/connections/"):
			route = "/v1/connections/:id/messages"
		case strings.HasPrefix(path, "/v1/users/"):
			route = "/v1/users/:user/messages"
		}
		classes[fmt.Sprintf(`method="%s",route="%s",status="%dxx"`, method, route, resp.StatusCode/100)]++
	}
	do("POST", "/v1/channels/ok-a/messages", `{"data":1}`, key)
	do("POST", "/v1/channels/ok-a/messages", `{"data":1}`, key, "Idempotency-Key", "i1")
	do("POST", "/v1/channels/ok-a/messages", `{"data":1}`, key, "Idempotency-Key", "i1") // replayed
	do("POST", "/v1/channels/ok-a/messages", `{"data":2}`, key, "Idempotency-Key", "i1") // reused
	do("POST", "/v1/channels/ok-a/messages", `{"nodata":1}`, key)
	do("POST", "/v1/channels/ok-a/messages", `{"data":1}`, "")
	do("POST", "/v1/channels/ok-a/messages", `{"data":1}`, "wrong-key-wrong-key-wrong-key-wrong")
	do("POST", "/v1/channels/no-a/messages", `{"data":1}`, pubOnly)
	do("POST", "/v1/channels/bad%20name/messages", `{"data":1}`, key)
	do("POST", "/v1/channels/ok-a/messages", `{"data":"`+strings.Repeat("x", 70000)+`"}`, key)
	do("POST", "/v1/messages", `{"messages":[{"channel":"ok-a","data":1},{"channel":"ok-b","data":2}]}`, key)
	do("POST", "/v1/messages", `{"messages":[{"channel":"ok-a","data":1},{"channel":"ok-b"}]}`, key)
	do("POST", "/v1/connections/nobody/messages", `{"data":1}`, key)
	do("POST", "/v1/users/nobody/messages", `{"data":1}`, key)
	do("POST", "/v1/users/nobody/messages", `{"data":1}`, pubOnly)
	for range 5 {
		do("POST", "/v1/channels/ok-a/messages", `{"data":1}`, pubOnly) // rate limited past the burst
	}
	req, _ := http.NewRequest("GET", ts.URL+"/metrics", nil)
	req.Header.Set("Authorization", "Bearer "+key)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	m := string(b)
	total := 0
	for r, n := range results {
		total += n
		if w := fmt.Sprintf(`wsrelay_ingress_publishes_total{result="%s"} %d`+"\n", r, n); !strings.Contains(m, w) {
			t.Errorf("no %q", w)
		}
	}
	for k, n := range classes {
		if w := fmt.Sprintf(`wsrelay_ingress_http_requests_total{%s} %d`+"\n", k, n); !strings.Contains(m, w) {
			t.Errorf("no %q", w)
		}
	}
	t.Logf("client saw %v", results)
	if t.Failed() {
		t.Logf("client saw %v %v\n%s", results, classes, grepLines(m, "wsrelay_ingress_"))
	}
}

func grepLines(page, prefix string) string {
	var b strings.Builder
	for l := range strings.Lines(page) {
		if strings.HasPrefix(l, prefix) {
			b.WriteString(l)
		}
	}
	return b.String()
}

// blockAppends holds every pipeline that runs a script until release is
// closed, and tells entered of each.
type blockAppends struct{ entered, release chan struct{} }

func (h blockAppends) DialHook(next redis.DialHook) redis.DialHook          { return next }
func (h blockAppends) ProcessHook(next redis.ProcessHook) redis.ProcessHook { return next }
func (h blockAppends) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		for _, c := range cmds {
			if n := c.Name(); n == "evalsha" || n == "eval" {
				h.entered <- struct{}{}
				<-h.release
				break
			}
		}
		return next(ctx, cmds)
	}
}

// TestAppendLatencyCountsRoundTrips: docs/metrics.md, the append latency
// histogram observes one append round trip to Redis per request that
// appends. A publish whose client left while its appends waited for a
// pipeline (withdrawn: nothing sent to Redis) made no round trip.
func TestAppendLatencyCountsRoundTrips(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	h := blockAppends{entered: make(chan struct{}, 4), release: make(chan struct{})}
	e.rdb.AddHook(h)
	var wg sync.WaitGroup
	// Four pipelines in flight (the batcher's most), each held in Redis.
	// One publish at a time, each once the one before is held: started
	// together, two could share a pipeline, and the fourth never come.
	for i := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			e.do("POST", fmt.Sprintf("/v1/channels/lat%d/messages", i), `{"data":1}`)
		}()
		select {
		case <-h.entered:
		case <-time.After(10 * time.Second):
			close(h.release) // the held ones go on
			t.Fatalf("publish %d never reached Redis", i)
		}
	}
	// A fifth waits for a pipeline (given 300 ms to get there); its
	// client leaves.
	ctx, cancel := context.WithCancel(context.Background())
	req := httptest.NewRequest("POST", "/v1/channels/lat9/messages", strings.NewReader(`{"data":1}`)).WithContext(ctx)
	req.Header.Set("Content-Type", "application/json")
	w := httptest.NewRecorder()
	done := make(chan struct{})
	go func() { e.srv.ServeHTTP(w, req); close(done) }()
	time.Sleep(300 * time.Millisecond)
	cancel()
	<-done
	close(h.release)
	wg.Wait()
	m := e.do("GET", "/metrics", "").Body.String()
	for _, want := range []string{`wsrelay_ingress_publishes_total{result="canceled"} 1`, `wsrelay_ingress_publishes_total{result="accepted"} 4`,
		"wsrelay_ingress_messages_appended_total 4", "wsrelay_ingress_append_latency_seconds_count 4"} {
		if !strings.Contains(m, want+"\n") {
			t.Errorf("no %q in\n%s", want, grepLines(m, "wsrelay_ingress_"))
		}
	}
}

// TestMessagesAppendedCountsEachEntryOnce: docs/metrics.md,
// wsrelay_ingress_messages_appended_total counts stream entries
// appended. A retry with the same Idempotency-Key that its record does
// not answer runs again, and its appends find their once-keys set and
// write nothing: they count nothing either. Before, the retry counted
// them again, once more than the stream held: after a 202 whose record
// was not saved, and when a request outlived its claim and its retry
// ran alongside it. The appends of a batch answered with an error that
// Redis wrote count as they are written, and its retry counts the
// others: each entry once.
func TestMessagesAppendedCountsEachEntryOnce(t *testing.T) {
	t.Parallel()
	appended := func(e *testEnv) string {
		m := e.do("GET", "/metrics", "").Body.String()
		return strings.TrimSuffix(grepLines(m, "wsrelay_ingress_messages_appended_total "), "\n")
	}
	t.Run("record lost", func(t *testing.T) {
		t.Parallel()
		e, failing := newEnvRecordsFail(t, slog.New(slog.NewTextHandler(io.Discard, nil)))
		failing.Store(true)
		expectStatus(t, e.do("POST", "/v1/channels/r/messages", `{"data":1}`, "Idempotency-Key", "k"), 202)
		failing.Store(false)
		expectStatus(t, e.do("POST", "/v1/channels/r/messages", `{"data":1}`, "Idempotency-Key", "k"), 202)
		if n, got := e.xlen("r"), appended(e); n != 1 || got != "wsrelay_ingress_messages_appended_total 1" {
			t.Errorf("XLEN %d, %q: want 1 entry counted once", n, got)
		}
	})
	t.Run("claim outlived", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t)
		// The first attempt's reply from Redis is held once its append
		// has run; its claim expires meanwhile and its retry runs.
		hold := redistest.NewHold(func(cmds []redis.Cmder) bool {
			return slices.ContainsFunc(cmds, func(c redis.Cmder) bool { return c.Name() == "evalsha" || c.Name() == "eval" })
		})
		e.rdb.AddHook(hold)
		t.Cleanup(hold.Release)
		first := make(chan *httptest.ResponseRecorder, 1)
		go func() { first <- e.do("POST", "/v1/channels/r/messages", `{"data":1}`, "Idempotency-Key", "k") }()
		select {
		case <-hold.Hit():
		case <-time.After(10 * time.Second):
			t.Fatal("the append never reached Redis")
		}
		claims, err := e.rdb.Keys(t.Context(), e.keys.Prefix+":{k:*").Result()
		if err != nil || len(claims) != 1 {
			t.Fatalf("claim keys %v, %v: want one", claims, err)
		}
		e.rdb.Del(t.Context(), claims[0])
		expectStatus(t, e.do("POST", "/v1/channels/r/messages", `{"data":1}`, "Idempotency-Key", "k"), 202)
		hold.Release()
		expectStatus(t, <-first, 202)
		if n, got := e.xlen("r"), appended(e); n != 1 || got != "wsrelay_ingress_messages_appended_total 1" {
			t.Errorf("XLEN %d, %q: want 1 entry counted once", n, got)
		}
	})
	t.Run("batch partly written", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t)
		// b's stream key holds a string: its append fails, a's is written.
		if err := e.rdb.Set(t.Context(), e.keys.Stream("b"), "x", 0).Err(); err != nil {
			t.Fatal(err)
		}
		const batch = `{"messages":[{"channel":"a","data":1},{"channel":"b","data":1}]}`
		if w := e.do("POST", "/v1/messages", batch, "Idempotency-Key", "k"); w.Code == 202 {
			t.Fatalf("batch with b's key taken: %d %s, want an error", w.Code, w.Body)
		}
		e.rdb.Del(t.Context(), e.keys.Stream("b"))
		expectStatus(t, e.do("POST", "/v1/messages", batch, "Idempotency-Key", "k"), 202)
		if na, nb, got := e.xlen("a"), e.xlen("b"), appended(e); na != 1 || nb != 1 || got != "wsrelay_ingress_messages_appended_total 2" {
			t.Errorf("XLEN a %d, b %d, %q: want 2 entries, each counted once", na, nb, got)
		}
	})
}
