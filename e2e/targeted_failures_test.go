package e2e

import (
	"context"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// targetedRig is one ingress and three egress instances on a private
// Redis (which the test may stop and restart), REGISTRY_TTL 3 s.
type targetedRig struct {
	t      *testing.T
	srv    *redistest.Server
	rdb    *redis.Client
	prefix string
	in     *proc
	eg     []*proc
}

func newTargetedRig(t *testing.T, srv *redistest.Server) *targetedRig {
	r := &targetedRig{t: t, srv: srv, prefix: redistest.Prefix(t)}
	e := env{"REDIS_URL": srv.URL(), "REDIS_KEY_PREFIX": r.prefix, "ALLOW_ANONYMOUS": "true",
		"REGISTRY_TTL": "3s", "PROBE_INTERVAL": "200ms", "SHUTDOWN_GRACE": "3s"}
	r.in = start(t, "ingress", e)
	for range 3 {
		r.eg = append(r.eg, start(t, "egress", e))
	}
	r.rdb = redis.NewClient(&redis.Options{Addr: srv.Addr()})
	t.Cleanup(func() { r.rdb.Close() })
	return r
}

// subscribeOnEach opens one socket on each egress with query (user and
// channels) and waits until each is subscribed.
func (r *targetedRig) subscribeOnEach(query string) []*wsClient {
	var cls []*wsClient
	for _, eg := range r.eg {
		cls = append(cls, dial(r.t, eg.wsURL(query)))
	}
	for _, cl := range cls {
		cl.waitFrame(func(f frame) bool { return f.Type == "subscribed" })
	}
	return cls
}

// toUser sends data to user and returns the status and the number of
// connections the ingress reported.
func (r *targetedRig) toUser(user string, data any) (int, int) {
	var res map[string]any
	st := postQuiet(r.in.URL+"/v1/users/"+user+"/messages", map[string]any{"data": data}, &res)
	n, _ := res["connections"].(float64)
	return st, int(n)
}

// presence is the ids the ingress lists on channel.
func (r *targetedRig) presence(ch string) map[string]bool {
	var l connList
	getJSON(r.t, r.in.URL+"/v1/channels/"+ch+"/connections", &l)
	out := map[string]bool{}
	for _, c := range l.Connections {
		out[c.ID] = true
	}
	return out
}

// got counts the targeted frames of cl carrying data.
func got(cl *wsClient, target, data string) int {
	n := 0
	for _, f := range cl.messages("") {
		if f.Target == target && string(f.Data) == data {
			n++
		}
	}
	return n
}

// exactlyOnce waits until each client has the frame and checks, a little
// later, that none has it twice.
func exactlyOnce(t *testing.T, target, data string, cls ...*wsClient) {
	t.Helper()
	for _, cl := range cls {
		testkit.Eventually(t, 10*time.Second, func() error {
			if got(cl, target, data) == 0 {
				return fmt.Errorf("%s has not got %s", cl.welcome.ConnectionID, data)
			}
			return nil
		})
	}
	time.Sleep(300 * time.Millisecond)
	for _, cl := range cls {
		if n := got(cl, target, data); n != 1 {
			t.Fatalf("%s got %s %d times", cl.welcome.ConnectionID, data, n)
		}
	}
}

// TestTargetedAcrossFailures: a user with a socket on each of three
// egress instances gets each send to the user once on each socket, before
// and after one instance is killed (its records linger at most
// REGISTRY_TTL, and a send to one of its connections is 202 until then,
// 404 after; what is written to its inbox expires), after another is
// drained (its records go at once), and after Redis restarts empty (the
// survivor registers its sockets again). A send to a connection that
// moved to another instance (a new id) is 404; presence never lists a
// connection closed cleanly.
func TestTargetedAcrossFailures(t *testing.T) {
	srv := redistest.Start(t)
	r := newTargetedRig(t, srv)
	cls := r.subscribeOnEach("user=ann&channels=room")
	if st, n := r.toUser("ann", 1); st != 202 || n != 3 {
		t.Fatalf("send to ann: %d, %d connections", st, n)
	}
	exactlyOnce(t, "user", "1", cls...)

	// SIGKILL egress 2: its record lingers (the send is accepted and
	// counted, written to its inbox), then goes within REGISTRY_TTL.
	dead := cls[2].welcome.Instance
	deadConn := r.in.URL + "/v1/connections/" + cls[2].welcome.ConnectionID
	r.eg[2].kill()
	killed := time.Now()
	// A send to a connection of the dead instance is accepted too, and
	// lost, while its record lingers (docs/api.md): the ingress cannot
	// tell a dead instance from a live one whose Pub/Sub connection is
	// being replaced, which catches its inbox up.
	if st := postQuiet(deadConn+"/messages", map[string]any{"data": "to the dead"}, nil); st != 202 {
		t.Fatalf("send to a connection of the killed instance: %d, want 202 while its record lingers", st)
	}
	if st, n := r.toUser("ann", 2); st != 202 || n != 3 {
		t.Fatalf("send right after the kill: %d, %d connections (want 3: the record lingers)", st, n)
	}
	exactlyOnce(t, "user", "2", cls[0], cls[1])
	inbox := r.prefix + ":{i:" + dead + "}:s"
	if ttl := r.rdb.PTTL(context.Background(), inbox).Val(); ttl <= 0 || ttl > 6*time.Second {
		t.Fatalf("dead instance's inbox TTL %s, want (0, 2×REGISTRY_TTL]", ttl)
	}
	testkit.Eventually(t, 10*time.Second, func() error {
		if st, n := r.toUser("ann", "probe"); st != 202 || n != 2 {
			return fmt.Errorf("send: %d, %d connections", st, n)
		}
		if p := r.presence("room"); len(p) != 2 || p[cls[2].welcome.ConnectionID] {
			return fmt.Errorf("presence %v", p)
		}
		if st := postQuiet(deadConn+"/messages", map[string]any{"data": "probe"}, nil); st != 404 {
			return fmt.Errorf("send to the killed instance's connection: %d", st)
		}
		return nil
	})
	t.Logf("killed instance's records gone after %s (REGISTRY_TTL=3s)", time.Since(killed).Round(100*time.Millisecond))
	// Everything of the dead instance expires: its inbox and its last-id key.
	testkit.Eventually(t, 20*time.Second, func() error {
		ks, err := r.rdb.Keys(context.Background(), r.prefix+":{i:"+dead+"}*").Result()
		if err != nil || len(ks) != 0 {
			return fmt.Errorf("dead instance's keys left: %v %v", ks, err)
		}
		return nil
	})
	t.Logf("killed instance's inbox keys gone after %s", time.Since(killed).Round(100*time.Millisecond))

	// A connection that moved: its old id is 404, the new one is reached.
	old := cls[0].welcome.ConnectionID
	cls[0].ws.Close()
	<-cls[0].closed
	moved := dial(t, r.eg[1].wsURL("user=ann&channels=room"))
	moved.waitFrame(func(f frame) bool { return f.Type == "subscribed" })
	testkit.Eventually(t, 5*time.Second, func() error {
		if p := r.presence("room"); p[old] {
			return fmt.Errorf("presence lists closed %s", old)
		}
		return nil
	})
	if st := postQuiet(r.in.URL+"/v1/connections/"+old+"/messages", map[string]any{"data": "old"}, nil); st != 404 {
		t.Fatalf("send to the old id: %d, want 404", st)
	}
	if st := postQuiet(r.in.URL+"/v1/connections/"+moved.welcome.ConnectionID+"/messages", map[string]any{"data": "new"}, nil); st != 202 {
		t.Fatalf("send to the new id: %d", st)
	}
	exactlyOnce(t, "connection", `"new"`, moved)

	// SIGTERM egress 0 (now without sockets) and egress 1 keeps both.
	// Drain egress 1 instead: its records are removed as it exits.
	if err := r.eg[1].term(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	if p := r.presence("room"); len(p) != 0 {
		t.Fatalf("presence after the drain: %v", p)
	}
	if st, n := r.toUser("ann", 3); st != 202 || n != 0 {
		t.Fatalf("send after the drain: %d, %d connections", st, n)
	}

	// Redis restarts empty: the survivor's sockets are registered again.
	a := dial(t, r.eg[0].wsURL("user=ann&channels=room"))
	b := dial(t, r.eg[0].wsURL("user=ann&channels=room"))
	for _, cl := range []*wsClient{a, b} {
		cl.waitFrame(func(f frame) bool { return f.Type == "subscribed" })
	}
	restarted := time.Now()
	srv.Restart(t) // returns once the new server answers a PING
	testkit.Eventually(t, 15*time.Second, func() error {
		if p := r.presence("room"); len(p) != 2 {
			return fmt.Errorf("presence %v", p)
		}
		return nil
	})
	t.Logf("registry whole again %s after the Redis kill and restart", time.Since(restarted).Round(10*time.Millisecond))
	if st, n := r.toUser("ann", 4); st != 202 || n != 2 {
		t.Fatalf("send after the Redis restart: %d, %d connections", st, n)
	}
	exactlyOnce(t, "user", "4", a, b)

	// Disconnect of both of a user's connections, on two instances.
	third := start(t, "egress", env{"REDIS_URL": srv.URL(), "REDIS_KEY_PREFIX": r.prefix, "ALLOW_ANONYMOUS": "true", "REGISTRY_TTL": "3s", "PROBE_INTERVAL": "200ms"})
	c := dial(t, third.wsURL("user=ann&channels=room"))
	c.waitFrame(func(f frame) bool { return f.Type == "subscribed" })
	for _, cl := range []*wsClient{a, c} {
		req, _ := http.NewRequest(http.MethodDelete, r.in.URL+"/v1/connections/"+cl.welcome.ConnectionID, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 202 {
			t.Fatalf("DELETE: %d", resp.StatusCode)
		}
	}
	for _, cl := range []*wsClient{a, c} {
		select {
		case <-cl.closed:
		case <-time.After(5 * time.Second):
			t.Fatal("not disconnected")
		}
		cl.mu.Lock()
		code := cl.closeCode
		cl.mu.Unlock()
		if code != 4003 {
			t.Fatalf("close code %d", code)
		}
	}
	// The records go as the handlers end, just after the close frames.
	testkit.Eventually(t, 5*time.Second, func() error {
		if p := r.presence("room"); len(p) != 1 || !p[b.welcome.ConnectionID] {
			return fmt.Errorf("presence %v", p)
		}
		return nil
	})
	if st, n := r.toUser("ann", 5); st != 202 || n != 1 {
		t.Fatalf("send after the disconnects: %d, %d connections", st, n)
	}
	exactlyOnce(t, "user", "5", b)
}

// TestTargetedAcrossPersistentRedisRestart: on a Redis with an
// append-only file, an egress is killed and Redis restarts (after being
// down longer than REGISTRY_TTL): the dead instance's records, restored
// from the file, expire as they would have, and the survivor's sockets are
// registered again and reached once each.
func TestTargetedAcrossPersistentRedisRestart(t *testing.T) {
	srv := redistest.StartPersistent(t)
	r := newTargetedRig(t, srv)
	cls := r.subscribeOnEach("user=bo&channels=hall")
	r.eg[2].kill()
	srv.Stop()
	down := time.Now()
	time.Sleep(4 * time.Second) // longer than REGISTRY_TTL: every record has expired
	srv.Restart(t)
	testkit.Eventually(t, 15*time.Second, func() error {
		p := r.presence("hall")
		if len(p) != 2 || !p[cls[0].welcome.ConnectionID] || !p[cls[1].welcome.ConnectionID] {
			return fmt.Errorf("presence %v", p)
		}
		return nil
	})
	t.Logf("registry whole again %s after Redis went down (down 4 s)", time.Since(down).Round(10*time.Millisecond))
	if st, n := r.toUser("bo", 1); st != 202 || n != 2 {
		t.Fatalf("send after the restart: %d, %d connections", st, n)
	}
	exactlyOnce(t, "user", "1", cls[0], cls[1])
}
