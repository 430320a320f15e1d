package main

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/registry"
	"github.com/wsrelay/wsrelay/shared/stream"
)

// TestUserConnections: GET /v1/users/{user}/connections lists the user's
// live connections as the channel's list does (record shape, limit,
// expired members left out), and refuses a bad user id or limit.
func TestUserConnections(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := t.Context()
	e.register("c1", "bob", "inst-a", "room")
	e.register("c2", "bob", "inst-b")
	e.register("c3", "carol", "inst-a", "room")
	// A member whose score is a REGISTRY_TTL past (the registry's grace
	// for clocks apart) while its record is still there, and one whose
	// record is gone (its instance died).
	e.register("dead", "bob", "inst-x")
	e.rdb.ZAdd(ctx, e.keys.UserConns("bob"), redis.Z{Score: float64(time.Now().Add(-e.srv.cfg.RegistryTTL - time.Second).UnixMilli()), Member: "dead"})
	e.register("gone", "bob", "inst-x")
	e.rdb.Del(ctx, e.keys.Conn("gone"))

	type list struct{ Connections []registry.Record }
	ids := func(l list) []string {
		var out []string
		for _, r := range l.Connections {
			out = append(out, r.ID)
		}
		slices.Sort(out)
		return out
	}
	w := e.do("GET", "/v1/users/bob/connections", "")
	l := decode[list](t, w)
	if w.Code != 200 || !slices.Equal(ids(l), []string{"c1", "c2"}) {
		t.Fatalf("bob: %d %s, want c1 and c2", w.Code, w.Body)
	}
	for _, r := range l.Connections {
		if r.User != "bob" || r.Instance == "" || r.Channels == nil || r.ConnectedAt.IsZero() {
			t.Errorf("record %+v", r)
		}
	}
	if w := e.do("GET", "/v1/users/bob/connections?limit=1", ""); w.Code != 200 || len(decode[list](t, w).Connections) != 1 {
		t.Errorf("limit=1: %d %s", w.Code, w.Body)
	}
	if w := e.do("GET", "/v1/users/ghost/connections", ""); w.Code != 200 || w.Body.String() != `{"connections":[]}` {
		t.Errorf("a user without connections: %d %s", w.Code, w.Body)
	}
	for _, q := range []string{"0", "-1", "x", "10001", "", "5&limit=5"} {
		expectError(t, e.do("GET", "/v1/users/bob/connections?limit="+q, ""), 400, "invalid_limit")
	}
	for _, u := range []string{"a%20b", strings.Repeat("u", 129), "bad!", ".", "..", "%2E%2E"} {
		expectError(t, e.do("GET", "/v1/users/"+u+"/connections", ""), 400, "invalid_user")
	}
}

// TestUserConnectionsStaleAhead: members left behind by removals whose
// ZREM failed (records gone, scores newer than the live connection's)
// do not make GET /v1/users/{user}/connections?limit=1 answer [] while
// the user has a live connection. Before, five of them did.
func TestUserConnectionsStaleAhead(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := t.Context()
	e.register("live", "dora", "inst-a")
	newer := float64(time.Now().Add(e.srv.cfg.RegistryTTL + time.Second).UnixMilli())
	for i := range 5 {
		e.rdb.ZAdd(ctx, e.keys.UserConns("dora"), redis.Z{Score: newer, Member: fmt.Sprint("left", i)})
	}
	w := e.do("GET", "/v1/users/dora/connections?limit=1", "")
	if l := decode[struct{ Connections []registry.Record }](t, w); w.Code != 200 || len(l.Connections) != 1 || l.Connections[0].ID != "live" {
		t.Fatalf("limit=1: %d %s, want the live connection", w.Code, w.Body)
	}
}

// TestUserDisconnect: DELETE /v1/users/{user}/connections queues, on
// each connection's instance, the command DELETE /v1/connections/{id}
// queues, for every live connection of the user and no other; it answers
// 202 with how many, 0 for a user with none (writing nothing).
func TestUserDisconnect(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.register("c1", "bob", "inst-a", "room")
	e.register("c2", "bob", "inst-a")
	e.register("c3", "bob", "inst-b")
	e.register("c4", "carol", "inst-a", "room")
	e.register("dead", "bob", "inst-c")
	e.rdb.Del(t.Context(), e.keys.Conn("dead")) // its instance died

	type reply struct {
		User         string
		Disconnected *int
	}
	w := e.do("DELETE", "/v1/users/ghost/connections", "")
	if r := decode[reply](t, w); w.Code != 202 || r.User != "ghost" || r.Disconnected == nil || *r.Disconnected != 0 {
		t.Fatalf("a user without connections: %d %s", w.Code, w.Body)
	}
	expectError(t, e.do("DELETE", "/v1/users/a%20b/connections", ""), 400, "invalid_user")
	for _, inst := range []string{"inst-a", "inst-b", "inst-c"} {
		if n := len(e.inbox(inst)); n != 0 {
			t.Fatalf("inbox %s has %d entries before the disconnect", inst, n)
		}
	}

	w = e.do("DELETE", "/v1/users/bob/connections", "")
	if r := decode[reply](t, w); w.Code != 202 || r.User != "bob" || r.Disconnected == nil || *r.Disconnected != 3 {
		t.Fatalf("bob: %d %s, want 202 with 3", w.Code, w.Body)
	}
	for inst, want := range map[string][]stream.Route{
		"inst-a": {stream.Disconnect("c1"), stream.Disconnect("c2")},
		"inst-b": {stream.Disconnect("c3")},
		"inst-c": nil, // expired: never told
	} {
		var got []stream.Route
		for _, en := range e.inbox(inst) {
			got = append(got, en.Route)
		}
		slices.Sort(got)
		if !slices.Equal(got, want) {
			t.Errorf("inbox %s: %v, want %v", inst, got, want)
		}
	}
	// Idempotent by nature: with no egress here to close them, the same
	// connections are live and are told again.
	if w := e.do("DELETE", "/v1/users/bob/connections", ""); w.Code != 202 || !strings.Contains(w.Body.String(), `"disconnected":3`) {
		t.Fatalf("again: %d %s", w.Code, w.Body)
	}
	m := e.do("GET", "/metrics", "").Body.String()
	if !strings.Contains(m, `wsrelay_ingress_messages_appended_total 6`) {
		t.Errorf("metrics do not count the 6 commands:\n%s", m)
	}
}

// TestUserDisconnectMany: a user with more connections than one append
// pipeline takes has every one of them told, on its instance.
func TestUserDisconnectMany(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	const n = 2*userDisconnectChunk + 3
	recs := make([]*registry.Record, n)
	for i := range recs {
		recs[i] = &registry.Record{ID: fmt.Sprint("m", i), User: "many", Instance: fmt.Sprint("inst-", i%2), ConnectedAt: time.Now().UTC()}
	}
	if err := e.srv.reg.Refresh(t.Context(), recs); err != nil {
		t.Fatal(err)
	}
	w := e.do("DELETE", "/v1/users/many/connections", "")
	if w.Code != 202 || !strings.Contains(w.Body.String(), fmt.Sprintf(`"disconnected":%d`, n)) {
		t.Fatalf("%d %s, want 202 with %d", w.Code, w.Body, n)
	}
	total := int64(0)
	for _, inst := range []string{"inst-0", "inst-1"} {
		total += e.rdb.XLen(t.Context(), e.keys.Inbox(inst)).Val()
	}
	if total != n {
		t.Fatalf("%d commands in the inboxes, want %d", total, n)
	}
}

// TestCorruptConnectionRecord: a connection record no egress wrote (not
// JSON, or without its id or instance: an operator's write, another
// application under the prefix) is not a Redis outage. Reading, sending
// to or disconnecting that connection answers 500 internal, which no
// retry mends, with an error line; the user's list leaves it out, and
// nothing is written to any inbox.
func TestCorruptConnectionRecord(t *testing.T) {
	t.Parallel()
	for name, val := range map[string]string{
		"not JSON":    "not json",
		"no instance": `{"id":"c1","user":"bob","channels":[]}`,
		"no id":       `{"user":"bob","instance":"inst-a","channels":[]}`,
	} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			e, logs := newSecEnv(t, map[string]string{"ALLOW_ANONYMOUS": "true"})
			t.Cleanup(e.srv.Close)
			ctx := t.Context()
			e.register("c1", "bob", "inst-a")
			if err := e.rdb.Set(ctx, e.keys.Conn("c1"), val, time.Minute).Err(); err != nil {
				t.Fatal(err)
			}
			for _, r := range [][3]string{
				{"GET", "/v1/connections/c1", ""},
				{"POST", "/v1/connections/c1/messages", `{"data":1}`},
				{"DELETE", "/v1/connections/c1", ""},
			} {
				w := e.do(r[0], r[1], r[2])
				expectError(t, w, 500, "internal")
				if ra := w.Header().Get("Retry-After"); ra != "" {
					t.Errorf("%s %s: Retry-After %q on a fault no retry mends", r[0], r[1], ra)
				}
			}
			if l := logs.Lines(t, "corrupt connection record"); len(l) != 3 || l[0]["level"] != "ERROR" {
				t.Errorf("want 3 ERROR lines, one per request, got %v", l)
			}
			if l := logs.Lines(t, "redis unavailable"); len(l) != 0 {
				t.Errorf("a corrupt record was logged as an outage: %v", l)
			}
			w := e.do("GET", "/v1/users/bob/connections", "")
			expectStatus(t, w, 200)
			if !strings.Contains(w.Body.String(), `"connections":[]`) {
				t.Errorf("user list holds the corrupt record: %s", w.Body)
			}
			if es := e.inbox("inst-a"); len(es) != 0 {
				t.Errorf("inst-a's inbox has %d entries, want none", len(es))
			}
		})
	}
}
