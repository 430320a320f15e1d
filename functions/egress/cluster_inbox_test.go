package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/wsrelay/wsrelay/shared/redisconn"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/stream"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// TestClusterInboxSlotMoves: the slot of the instance's inbox is moved to
// another master while messages to a user of the instance flow. Appends
// refused while the slot migrates (TRYAGAIN) are retried; every append
// Redis acknowledged reaches the user's socket once, in order, the
// instance's readiness comes back, and nothing is logged as a failure.
func TestClusterInboxSlotMoves(t *testing.T) {
	c := redistest.StartOwnedCluster(t, 3, 0, "the test does not reshard a cluster it does not own")
	rdb := c.Client(t)
	e := startClusterEgressWith(t, rdb, c.AddrsEnv(), map[string]string{"PROBE_INTERVAL": "250ms"})
	s := e.srv.Config.Handler.(*Server)
	ctx := context.Background()
	ws, _, err := websocket.DefaultDialer.Dial("ws"+strings.TrimPrefix(e.srv.URL, "http")+"/ws?user=alice", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	next(t, ws, "welcome")
	var mu sync.Mutex
	var got []string
	readDone := make(chan struct{})
	go func() {
		defer close(readDone)
		for {
			_, b, err := ws.ReadMessage()
			if err != nil {
				return
			}
			var f struct{ Type, ID string }
			_ = json.Unmarshal(b, &f)
			if f.Type == "message" {
				mu.Lock()
				got = append(got, f.ID)
				mu.Unlock()
			}
		}
	}()
	ready := func() int {
		resp, err := http.Get(e.srv.URL + "/readyz")
		if err != nil {
			return 0
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	testkit.Eventually(t, 10*time.Second, func() error {
		if code := ready(); code != 200 {
			return fmt.Errorf("readyz %d", code)
		}
		return nil
	})

	inbox := s.hub.inbox.stream
	store := stream.NewStore(rdb)
	var amu sync.Mutex
	var acked []string
	refused := 0
	sctx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; sctx.Err() == nil; i++ {
			a := stream.Append{Stream: inbox, Notify: s.hub.inbox.notify,
				Msg:    stream.Message{Route: stream.ToUser("alice"), TS: time.Now().UnixMilli(), Data: []byte(strconv.Itoa(i))},
				Limits: stream.Limits{MaxLen: 10000, MaxAgeMS: 60000, TTLMS: 60000}}
			for sctx.Err() == nil {
				ids, err := store.Append(sctx, []stream.Append{a})
				if err == nil {
					amu.Lock()
					acked = append(acked, ids[0])
					amu.Unlock()
					break
				}
				if !redisconn.SlotMoving(err) {
					if sctx.Err() == nil {
						t.Errorf("append %d: %v", i, err)
					}
					return
				}
				amu.Lock()
				refused++
				amu.Unlock()
				time.Sleep(5 * time.Millisecond)
			}
			time.Sleep(2 * time.Millisecond)
		}
	}()
	count := func() int { amu.Lock(); defer amu.Unlock(); return len(acked) }
	testkit.Eventually(t, 10*time.Second, func() error {
		if count() < 20 {
			return fmt.Errorf("%d sent", count())
		}
		return nil
	})
	var unready []string
	rctx, rstop := context.WithCancel(ctx)
	rdone := make(chan struct{})
	go func() {
		defer close(rdone)
		for rctx.Err() == nil {
			resp, err := http.Get(e.srv.URL + "/readyz")
			if err == nil {
				if resp.StatusCode != 200 {
					var b strings.Builder
					_, _ = fmt.Fprint(&b, resp.StatusCode)
					unready = append(unready, b.String()+" at "+time.Now().Format("15:04:05.000"))
				}
				resp.Body.Close()
			}
			time.Sleep(50 * time.Millisecond)
		}
	}()
	move := c.BeginKeySlotMove(t, inbox)
	time.Sleep(300 * time.Millisecond) // sends meet the migration
	move.MigrateKeys(t)
	move.Finish(t)
	moved := time.Now()
	before := count()
	testkit.Eventually(t, 10*time.Second, func() error {
		if count() < before+20 {
			return fmt.Errorf("sends after the move have not resumed (%d)", count()-before)
		}
		return nil
	})
	stop()
	wg.Wait()
	time.Sleep(time.Second)
	rstop()
	<-rdone
	t.Logf("readyz not 200: %v", unready)
	amu.Lock()
	t.Logf("inbox slot %d moved from %s to %s; %d acknowledged, %d refused while it moved", move.Slot, move.Src.Options().Addr, move.Dst.Options().Addr, len(acked), refused)
	want := append([]string(nil), acked...)
	amu.Unlock()
	testkit.Eventually(t, 10*time.Second, func() error {
		mu.Lock()
		defer mu.Unlock()
		if len(got) < len(want) {
			return fmt.Errorf("%d of %d delivered", len(got), len(want))
		}
		return nil
	})
	mu.Lock()
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Errorf("delivered %d, acknowledged %d: not once each in order", len(got), len(want))
	}
	mu.Unlock()
	testkit.Eventually(t, 10*time.Second, func() error {
		if code := ready(); code != 200 {
			return fmt.Errorf("readyz %d %v after the move", code, time.Since(moved))
		}
		return nil
	})
	// A message sent now is delivered live, through the new master.
	noWarnings(t, e.logs)
}
