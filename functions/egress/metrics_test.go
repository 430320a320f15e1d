//go:build !wsrelay_lean

package main

import (
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/stream"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// TestDeliveriesCountReplays: messages replayed by a resume are counted
// as deliveries, and left out of the live delivery latency.
func TestDeliveriesCountReplays(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"})
	ks := keys.Scheme{Prefix: prefix}
	store := stream.NewStore(rdb)
	for i := range 3 {
		if _, err := store.Append(t.Context(), []stream.Append{{Stream: ks.Stream("r"), Notify: ks.Notify("r"),
			Msg: stream.Message{Channel: "r", TS: time.Now().UnixMilli(), Data: []byte(fmt.Sprint(i))}}}); err != nil {
			t.Fatal(err)
		}
	}
	ws, _, err := websocket.DefaultDialer.Dial("ws"+strings.TrimPrefix(e.srv.URL, "http")+"/ws", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	send(t, ws, map[string]any{"type": "subscribe", "channel": "r", "after": "0-0"})
	for range 3 {
		nextData(t, ws)
	}
	testkit.Eventually(t, 5*time.Second, func() error {
		m, err := scrape(e.srv.URL)
		if err != nil {
			return err
		}
		if !strings.Contains(m, "wsrelay_egress_deliveries_total 3\n") {
			return fmt.Errorf("deliveries not 3 in:\n%s", m)
		}
		if strings.Contains(m, "wsrelay_egress_delivery_latency_seconds_count 3") {
			return fmt.Errorf("replays counted in the live latency")
		}
		return nil
	})
}

// TestRefusedAtConnect: a socket whose registration fails is closed with
// 1013 before anything else is written, leaves no record, and is counted
// among the closes like any other (SCF counts it as a server close, 439).
func TestRefusedAtConnect(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	// The pipelines writing carol's registry records fail.
	rdb.AddHook(redistest.Fail{Pipeline: func(cmds []redis.Cmder) bool {
		for _, c := range cmds {
			if a := c.Args(); len(a) > 1 && a[1] == ks.UserConns("carol") {
				return true
			}
		}
		return false
	}})
	e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"})
	ws, _, err := websocket.DefaultDialer.Dial("ws"+strings.TrimPrefix(e.srv.URL, "http")+"/ws?user=carol", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	_ = ws.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, b, err := ws.ReadMessage()
	if ce, ok := err.(*websocket.CloseError); !ok || ce.Code != 1013 {
		t.Fatalf("first frame %s, %v; want close 1013", b, err)
	}
	if n := len(e.s.hub.snapshotConns()); n != 0 {
		t.Errorf("%d connections left in the hub", n)
	}
	testkit.Eventually(t, 5*time.Second, func() error {
		m, err := scrape(e.srv.URL)
		if err != nil {
			return err
		}
		if !strings.Contains(m, `wsrelay_egress_closes_total{status="439"} 1`+"\n") {
			return fmt.Errorf("the refusal is not counted in:\n%s", m)
		}
		return nil
	})
}

// scrape returns the egress's /metrics page.
func scrape(base string) (string, error) {
	resp, err := http.Get(base + "/metrics")
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

// TestMetricsToken: with METRICS_TOKEN set, /metrics answers only a scrape
// that carries it.
func TestMetricsToken(t *testing.T) {
	t.Parallel()
	const tok = "scrape-token-0123456789"
	e := startSecEgress(t, map[string]string{"ALLOW_ANONYMOUS": "true", "METRICS_TOKEN": tok})
	get := func(auth string) (int, string) {
		req, _ := http.NewRequest("GET", e.srv.URL+"/metrics", nil)
		if auth != "" {
			req.Header.Set("Authorization", auth)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode == 401 && resp.Header.Get("WWW-Authenticate") == "" {
			t.Errorf("401 without WWW-Authenticate")
		}
		return resp.StatusCode, string(b)
	}
	for _, auth := range []string{"", "Bearer wrong", tok} {
		if code, body := get(auth); code != 401 || !strings.Contains(body, `"unauthorized"`) {
			t.Errorf("%q: %d %.200s", auth, code, body)
		}
	}
	if code, body := get("Bearer " + tok); code != 200 || !strings.Contains(body, "wsrelay_egress_") {
		t.Errorf("with the token: %d %.200s", code, body)
	}
}
