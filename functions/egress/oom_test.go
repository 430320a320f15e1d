package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/protocol"
	"github.com/wsrelay/wsrelay/shared/redisconn"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/stream"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// nextMessage reads frames until a message on ch and returns its id.
func nextMessage(t *testing.T, ws *websocket.Conn, ch string) string {
	t.Helper()
	_ = ws.SetReadDeadline(time.Now().Add(5 * time.Second))
	for {
		var m struct{ Type, Channel, ID string }
		if err := ws.ReadJSON(&m); err != nil {
			t.Fatalf("waiting for a message on %s: %v", ch, err)
		}
		if m.Type == "message" && m.Channel == ch {
			return m.ID
		}
	}
}

// TestRedisOutOfMemory: with Redis at its maxmemory (noeviction), a new
// socket is refused with 1013 "registry unavailable: retry"; a socket
// already open stays, subscribes and resumes (reads), though its record
// expires since refreshes are refused. The log says "redis out of memory"
// once, at error level. Once memory is freed, the record comes back (the
// next refresh), the end is logged once, the open socket receives what is
// published, and new sockets are accepted.
func TestRedisOutOfMemory(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	prefix := redistest.Prefix(t)
	rdb, err := redisconn.New(redisconn.Config{URL: rs.URL(), Timeout: time.Second, KeyPrefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rdb.Close() })
	ks := keys.Scheme{Prefix: prefix}
	store := stream.NewStore(rdb)
	publish := func(ch string) (string, error) {
		ids, err := store.Append(context.Background(), []stream.Append{{
			Stream: ks.Stream(ch), Notify: ks.Notify(ch),
			Msg:    stream.Message{Channel: ch, Event: "e", TS: time.Now().UnixMilli(), Data: json.RawMessage(`1`)},
			Limits: stream.Limits{MaxLen: 1000, TTLMS: 600000},
		}})
		if err != nil {
			return "", err
		}
		return ids[0], nil
	}
	env := map[string]string{"ALLOW_ANONYMOUS": "true", "REDIS_URL": rs.URL(), "REDIS_KEY_PREFIX": prefix, "REGISTRY_TTL": "3s", "SHUTDOWN_GRACE": "1s"}
	cfg, err := loadConfig(func(k string) string { return env[k] })
	if err != nil {
		t.Fatal(err)
	}
	logs := &testkit.SyncBuffer{}
	s := NewServer(cfg, slog.New(slog.NewJSONHandler(logs, nil)), rdb)
	s.regOOM.Quiet = 100 * time.Millisecond
	srv, _ := startEgress(t, s)
	dial := func() (*websocket.Conn, error) {
		u := "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws?" + url.Values{"channels": {"a"}, "user": {"alice"}}.Encode()
		ws, _, err := websocket.DefaultDialer.Dial(u, nil)
		if ws != nil {
			t.Cleanup(func() { ws.Close() })
		}
		return ws, err
	}

	ws, err := dial()
	if err != nil {
		t.Fatal(err)
	}
	id := next(t, ws, protocol.TypeWelcome).ConnectionID
	next(t, ws, protocol.TypeSubscribed)
	first, err := publish("a")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := publish("a"); err != nil {
		t.Fatal(err)
	}
	nextMessage(t, ws, "a")
	nextMessage(t, ws, "a")

	free := redistest.OutOfMemory(t, rdb, prefix)
	if _, err := publish("a"); !redisconn.OutOfMemory(err) {
		t.Fatalf("append out of memory: %v, want OOM", err)
	}
	refused, err := dial()
	if err != nil {
		t.Fatal(err)
	}
	_ = refused.SetReadDeadline(time.Now().Add(5 * time.Second))
	var ce *websocket.CloseError
	for {
		if _, _, err = refused.ReadMessage(); err != nil {
			break
		}
	}
	if !errors.As(err, &ce) || ce.Code != protocol.CloseTryAgainLater || ce.Text != "registry unavailable: retry" {
		t.Fatalf("socket opened out of memory ended with %v, want 1013 \"registry unavailable: retry\"", err)
	}

	// The open socket subscribes and resumes: reads need no memory.
	send(t, ws, map[string]any{"type": "subscribe", "channel": "b"})
	next(t, ws, protocol.TypeSubscribed)
	send(t, ws, map[string]any{"type": "unsubscribe", "channel": "a"})
	next(t, ws, protocol.TypeUnsubscribed)
	send(t, ws, map[string]any{"type": "subscribe", "channel": "a", "after": first})
	if r := next(t, ws, protocol.TypeSubscribed); r.Recovered == nil || !*r.Recovered {
		t.Fatalf("resume out of memory: %+v, want recovered", r)
	}
	nextMessage(t, ws, "a")

	// Its record is not refreshed, and expires.
	testkit.Eventually(t, 10*time.Second, func() error {
		if n := rdb.Exists(context.Background(), ks.Conn(id)).Val(); n != 0 {
			return fmt.Errorf("record still there")
		}
		return nil
	})
	var lines []map[string]any
	for _, l := range logs.JSONLines(t) {
		if (l["level"] == "WARN" || l["level"] == "ERROR") && l["msg"] != "connection closed" {
			lines = append(lines, l)
		}
	}
	if len(lines) != 1 || lines[0]["msg"] != "redis out of memory" || lines[0]["level"] != "ERROR" {
		t.Fatalf("out of memory logged %d warnings or errors, want one error \"redis out of memory\":\n%s", len(lines), logs.String())
	}

	free()
	testkit.Eventually(t, 10*time.Second, func() error {
		if n := rdb.Exists(context.Background(), ks.Conn(id)).Val(); n != 1 {
			return fmt.Errorf("record not back")
		}
		return nil
	})
	testkit.Eventually(t, 5*time.Second, func() error {
		if back := len(logs.Lines(t, "redis accepts writes again")); back != 1 {
			return fmt.Errorf("recovery logged %d times, want once:\n%s", back, logs.String())
		}
		return nil
	})
	if _, err := publish("a"); err != nil {
		t.Fatal(err)
	}
	nextMessage(t, ws, "a")
	again, err := dial()
	if err != nil {
		t.Fatal(err)
	}
	next(t, again, protocol.TypeWelcome)
}
