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
		resp, err := http.Get(e.srv.URL + "/metrics")
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if !strings.Contains(string(b), "wsrelay_egress_deliveries_total 3\n") {
			return fmt.Errorf("deliveries not 3 in:\n%s", b)
		}
		if strings.Contains(string(b), "wsrelay_egress_delivery_latency_seconds_count 3") {
			return fmt.Errorf("replays counted in the live latency")
		}
		return nil
	})
}
