package main

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/wsrelay/wsrelay/shared/testkit"
)

// TestClusterTargetedWhileInboxSlotMoves: while a resharding moves the
// slot of an egress instance's inbox, sends to its connection and user
// and disconnects of them are refused with 503 and Retry-After, nothing
// written, logged as a slot being moved (the sends' messages name the
// Idempotency-Key, the disconnects', which take none, do not); a keyed
// send retried after the move is written once.
func TestClusterTargetedWhileInboxSlotMoves(t *testing.T) {
	c, e, logs := reshardEnv(t)
	e.register("c1", "bob", "inst-a")
	if w := e.do("POST", "/v1/connections/c1/messages", `{"data":0}`); w.Code != 202 {
		t.Fatalf("before the move: %d %s", w.Code, w.Body)
	}
	ctx := t.Context()
	inbox := e.keys.Inbox("inst-a")
	move := c.BeginKeySlotMove(t, inbox)
	for _, r := range []struct{ method, path, body string }{
		{"POST", "/v1/connections/c1/messages", `{"data":1}`},
		{"POST", "/v1/users/bob/messages", `{"data":1}`},
		{"DELETE", "/v1/connections/c1", ""},
		{"DELETE", "/v1/users/bob/connections", ""},
	} {
		w := e.do(r.method, r.path, r.body, "Idempotency-Key", "k-"+r.method)
		if w.Code != 503 || w.Header().Get("Retry-After") != "1" || !strings.Contains(w.Body.String(), "being moved") || strings.Contains(w.Body.String(), "channel") {
			t.Errorf("%s %s while the inbox's slot moves: %d %q %s", r.method, r.path, w.Code, w.Header().Get("Retry-After"), w.Body)
		}
		// A disconnect takes no Idempotency-Key (repeating it is
		// harmless); a send does.
		if (r.method == "DELETE") == strings.Contains(w.Body.String(), "Idempotency-Key") {
			t.Errorf("%s %s while the inbox's slot moves: %s, want the Idempotency-Key named for a send only", r.method, r.path, w.Body)
		}
		t.Logf("%s %s: %d %s", r.method, r.path, w.Code, strings.TrimSpace(w.Body.String()))
	}
	if n := move.Src.XLen(ctx, inbox).Val(); n != 1 {
		t.Errorf("XLEN %d after the refused sends, want 1", n)
	}
	move.MigrateKeys(t)
	move.Finish(t)
	testkit.Eventually(t, 10*time.Second, func() error {
		if w := e.do("POST", "/v1/connections/c1/messages", `{"data":1}`, "Idempotency-Key", "k-POST"); w.Code != 202 {
			return fmt.Errorf("after the move: %d %s", w.Code, w.Body)
		}
		return nil
	})
	if n := move.Dst.XLen(ctx, inbox).Val(); n != 2 {
		t.Errorf("XLEN %d on the new master, want 2", n)
	}
	for _, l := range logs.JSONLines(t) {
		if l["level"] == "WARN" && l["msg"] != "redis cluster slot being moved" {
			t.Errorf("logged %v", l)
		}
	}
}
