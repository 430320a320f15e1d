package e2e

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/wsrelay/wsrelay/shared/protocol"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// TestFrozenEgress: an egress process that does not run (SIGSTOP, as a
// platform freezing its instance or a VM stall would) for longer than
// REGISTRY_TTL lets its connections' records expire, and a send to the
// user meanwhile finds nobody. Once it runs again it closes the
// connection 1013, to reconnect and resume, rather than register it
// again having missed that send; not 1006 for a missed pong, since it
// sent no ping meanwhile. The client, connected again, is found.
func TestFrozenEgress(t *testing.T) {
	t.Parallel()
	// REGISTRY_TTL 6 s, not the 3 s minimum: the egress tells the stall
	// apart from a Redis outage by how much of the records' age it
	// explains, and a busy machine's late refresh before the stop must
	// not use up the margin.
	_, prefix := redistest.Client(t)
	redisURL := redistest.URL(t)
	ing := start(t, "ingress", env{"REDIS_URL": redisURL, "REDIS_KEY_PREFIX": prefix, "ALLOW_ANONYMOUS": "true", "REGISTRY_TTL": "6s"})
	eg := start(t, "egress", env{"REDIS_URL": redisURL, "REDIS_KEY_PREFIX": prefix, "ALLOW_ANONYMOUS": "true", "REGISTRY_TTL": "6s", "PING_INTERVAL": "1s"})
	send := func(n int) int {
		t.Helper()
		st, body := postVia(t, http.DefaultClient, ing.URL+"/v1/users/alice/messages", fmt.Appendf(nil, `{"data":%d}`, n), nil)
		var res struct{ Connections int }
		if st != 202 || json.Unmarshal(body, &res) != nil {
			t.Fatalf("send %d to alice: %d %s", n, st, body)
		}
		return res.Connections
	}
	alice := dial(t, eg.wsURL("user=alice"))
	if n := send(1); n != 1 {
		t.Fatalf("send before the freeze found %d connections", n)
	}

	if err := eg.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	frozen := true
	defer func() {
		if frozen {
			_ = eg.cmd.Process.Signal(syscall.SIGCONT)
		}
	}()
	testkit.Eventually(t, 15*time.Second, func() error {
		if n := send(2); n != 0 {
			return fmt.Errorf("a send while the egress is stopped found %d connections, want 0 once the record expired", n)
		}
		return nil
	})
	time.Sleep(2 * time.Second) // more than 2 × PING_INTERVAL without a ping
	if err := eg.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	frozen = false

	select {
	case <-alice.closed:
	case <-time.After(10 * time.Second):
		t.Fatal("the connection was not closed after the egress ran again")
	}
	alice.mu.Lock()
	code, text := alice.closeCode, alice.closeText
	alice.mu.Unlock()
	if code != protocol.CloseTryAgainLater || !strings.Contains(text, "registration lapsed") {
		t.Fatalf("closed %d %q, want %d registration lapsed", code, text, protocol.CloseTryAgainLater)
	}
	testkit.Eventually(t, 5*time.Second, func() error { // read from its output
		if !strings.Contains(eg.Logs(), "registry records lapsed, closing their connections") {
			return fmt.Errorf("no log line for the lapsed records")
		}
		return nil
	})

	again := dial(t, eg.wsURL("user=alice"))
	if n := send(3); n != 1 {
		t.Fatalf("send after the reconnect found %d connections", n)
	}
	again.waitFrame(func(f frame) bool { return f.Type == "message" && string(f.Data) == "3" })
}
