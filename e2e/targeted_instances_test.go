package e2e

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// deleteJSON sends DELETE url and decodes the reply into out.
func deleteJSON(t *testing.T, url string, out any) int {
	t.Helper()
	req, _ := http.NewRequest(http.MethodDelete, url, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if out != nil {
		if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
			t.Fatalf("DELETE %s: %v", url, err)
		}
	}
	return resp.StatusCode
}

// TestUserDisconnectWithDeadInstance: DELETE /v1/users/{user}/connections
// for a user with two sockets on one egress, one on another and one on a
// third that was just killed (kill -9) counts all four (the dead one
// until its record expires, docs/api.md), closes the three live ones
// with 4003 "disconnected by operator" and no socket of another user on
// the same instance; then the user's records, and their channel
// memberships, are gone (the dead one's within REGISTRY_TTL), and a
// second request tells nobody.
func TestUserDisconnectWithDeadInstance(t *testing.T) {
	r := newTargetedRig(t, redistest.Start(t))
	live := []*wsClient{
		dial(t, r.eg[0].wsURL("user=cy&channels=den")),
		dial(t, r.eg[0].wsURL("user=cy&channels=den")),
		dial(t, r.eg[1].wsURL("user=cy&channels=den")),
	}
	doomed := dial(t, r.eg[2].wsURL("user=cy&channels=den"))
	other := dial(t, r.eg[0].wsURL("user=dot&channels=den"))
	for _, cl := range append([]*wsClient{doomed, other}, live...) {
		cl.waitFrame(func(f frame) bool { return f.Type == "subscribed" })
	}
	r.eg[2].kill()
	var res struct {
		User         string
		Disconnected int
	}
	if st := deleteJSON(t, r.in.URL+"/v1/users/cy/connections", &res); st != 202 || res.User != "cy" || res.Disconnected != 4 {
		t.Fatalf("DELETE right after the kill: %d %+v, want 202 with 4 (the dead instance's record lingers)", st, res)
	}
	for _, cl := range live {
		select {
		case <-cl.closed:
		case <-time.After(5 * time.Second):
			t.Fatalf("%s was not closed", cl.welcome.ConnectionID)
		}
		cl.mu.Lock()
		code, text := cl.closeCode, cl.closeText
		cl.mu.Unlock()
		if code != 4003 || text != "disconnected by operator" {
			t.Fatalf("%s closed with %d %q, want 4003 \"disconnected by operator\"", cl.welcome.ConnectionID, code, text)
		}
	}
	testkit.Eventually(t, 10*time.Second, func() error {
		var l connList
		if st := getJSON(t, r.in.URL+"/v1/users/cy/connections", &l); st != 200 || len(l.Connections) != 0 {
			return fmt.Errorf("cy's connections: %d %+v", st, l.Connections)
		}
		if p := r.presence("den"); len(p) != 1 || !p[other.welcome.ConnectionID] {
			return fmt.Errorf("den lists %v, want only %s", p, other.welcome.ConnectionID)
		}
		return nil
	})
	if st := deleteJSON(t, r.in.URL+"/v1/users/cy/connections", &res); st != 202 || res.Disconnected != 0 {
		t.Fatalf("DELETE again: %d %+v, want 202 with 0", st, res)
	}
	select {
	case <-other.closed:
		t.Fatal("another user's socket was closed")
	default:
	}
}

// TestTargetedToVanishedClient: a client whose network goes away without
// a close (a proxy holding every byte stands for it) and which
// reconnects to another instance is a new connection with a new id.
// Its old connection stays registered while its egress holds it, past
// REGISTRY_TTL (the egress refreshes it): a send to the old id is 202
// and never reaches the new socket, a send to the user counts both and
// reaches the new socket once. The old record goes once the egress
// misses the pong, within 2 × PING_INTERVAL and a second (docs/api.md).
func TestTargetedToVanishedClient(t *testing.T) {
	srv := redistest.Start(t)
	e := env{"REDIS_URL": srv.URL(), "REDIS_KEY_PREFIX": redistest.Prefix(t), "ALLOW_ANONYMOUS": "true",
		"REGISTRY_TTL": "3s", "PROBE_INTERVAL": "200ms", "PING_INTERVAL": "3s"}
	in := start(t, "ingress", e)
	eg0, eg1 := start(t, "egress", e), start(t, "egress", e)
	px := newProxy(t, strings.TrimPrefix(eg0.URL, "http://"))
	old := dial(t, "ws://"+px.Addr()+"/ws?user=fay")
	px.Stall() // from now on nothing crosses: no close, no pong
	vanished := time.Now()
	moved := dial(t, eg1.wsURL("user=fay"))
	if moved.welcome.ConnectionID == old.welcome.ConnectionID {
		t.Fatal("the reconnected client has its old id")
	}
	oldURL := in.URL + "/v1/connections/" + old.welcome.ConnectionID
	if st := postQuiet(oldURL+"/messages", map[string]any{"data": "to the old id"}, nil); st != 202 {
		t.Fatalf("send to the old id: %d, want 202 (its egress still holds it)", st)
	}
	var res map[string]any
	if st := postQuiet(in.URL+"/v1/users/fay/messages", map[string]any{"data": "to fay"}, &res); st != 202 || res["connections"] != 2.0 {
		t.Fatalf("send to the user: %d %v, want 202 with 2", st, res)
	}
	if st := postQuiet(in.URL+"/v1/connections/"+moved.welcome.ConnectionID+"/messages", map[string]any{"data": "to the new id"}, nil); st != 202 {
		t.Fatalf("send to the new id: %d", st)
	}
	exactlyOnce(t, "user", `"to fay"`, moved)
	exactlyOnce(t, "connection", `"to the new id"`, moved)
	if n := got(moved, "connection", `"to the old id"`); n != 0 {
		t.Fatalf("the new connection got what was sent to the old id")
	}
	// Past REGISTRY_TTL (3 s), short of 2 × PING_INTERVAL (6 s): the
	// record is refreshed, not expired.
	time.Sleep(time.Until(vanished.Add(4 * time.Second)))
	if st := getJSON(t, oldURL, nil); st != 200 {
		t.Fatalf("old connection's record 4 s after its client vanished: %d, want 200 (its egress has not missed the pong yet)", st)
	}
	testkit.Eventually(t, 5*time.Second, func() error {
		return statusIs(getJSON(t, oldURL, nil), 404)
	})
	gone := time.Since(vanished)
	t.Logf("old connection's record gone %s after its client vanished (PING_INTERVAL=3s)", gone.Round(100*time.Millisecond))
	if gone > 8*time.Second {
		t.Fatalf("old record gone after %s, want within 2 × PING_INTERVAL and a second", gone)
	}
	if st := postQuiet(oldURL+"/messages", map[string]any{"data": 1}, nil); st != 404 {
		t.Fatalf("send to the old id once its record is gone: %d", st)
	}
}
