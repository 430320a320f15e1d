package e2e

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/wsrelay/wsrelay/shared/auth"
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

// TestFrozenEgressExpiredToken: tokens whose exp passes while the
// egress process does not run (SIGSTOP, as SCF freezing the instance
// between invocations) get none of the messages published meanwhile,
// after their exp, once the process runs again: the notifications
// waiting in its Redis connection are read at once, and the sweep that
// closes the connections 4004 need not have come first. Each connection
// is closed 4004 with nothing after the message it had before. A
// hundred connections, twice, so that the sweep, which closes them one
// after another, runs alongside the fan-out: with one connection the
// fan-out came first one time in four.
func TestFrozenEgressExpiredToken(t *testing.T) {
	t.Parallel()
	const (
		apiKey    = "key-freeze-0f9e8d7c6b5a49382716"
		jwtSecret = "jwt-secret-freeze-a1b2c3d4e5f60718293a4b5c"
		conns     = 100
	)
	_, prefix := redistest.Client(t)
	e := env{"REDIS_URL": redistest.URL(t), "REDIS_KEY_PREFIX": prefix, "API_KEYS": apiKey, "JWT_SECRET": jwtSecret}
	ing := start(t, "ingress", e)
	eg := start(t, "egress", e)
	publish := func(ch string, n int) {
		t.Helper()
		st, body := postVia(t, http.DefaultClient, ing.URL+"/v1/channels/"+ch+"/messages", fmt.Appendf(nil, `{"data":%d}`, n),
			map[string]string{"Authorization": "Bearer " + apiKey})
		if st != 202 {
			t.Fatalf("publish %d to %s: %d %s", n, ch, st, body)
		}
	}
	// connect opens the connections on ch with a token whose exp is at
	// least window away (whole seconds), and has them get message 1. On a
	// machine too slow to do that with 300 ms to spare, it is done again
	// with twice the window, the slow attempt's connections closed.
	connect := func(ch string, round int) ([]*wsClient, time.Time) {
		t.Helper()
		for window := 6 * time.Second; ; window *= 2 {
			exp := time.Now().Truncate(time.Second).Add(window)
			tok, err := auth.SignHS256(jwtSecret, auth.Claims{Subject: "alice", Channels: []string{"room-*"}, Expires: exp})
			if err != nil {
				t.Fatal(err)
			}
			var clients []*wsClient
			for range conns {
				c := dial(t, eg.wsURL("token="+tok+"&channels="+ch))
				c.waitFrame(func(f frame) bool { return f.Type == "subscribed" })
				clients = append(clients, c)
			}
			publish(ch, 1)
			for _, c := range clients {
				c.waitMessages(ch, 1)
			}
			if time.Until(exp) >= 300*time.Millisecond {
				return clients, exp
			}
			if window >= 24*time.Second {
				t.Fatalf("round %d: %d connections took more than %v to open and get a message", round, conns, window)
			}
			t.Logf("round %d: %d connections took more than %v to open and get a message: again with %v", round, conns, window, 2*window)
			for _, c := range clients {
				c.ws.Close()
				<-c.closed
			}
		}
	}
	for round := range 2 {
		ch := fmt.Sprintf("room-%d", round)
		clients, exp := connect(ch, round)

		if err := eg.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		frozen := true
		thaw := func() {
			if frozen {
				_ = eg.cmd.Process.Signal(syscall.SIGCONT)
				frozen = false
			}
		}
		t.Cleanup(thaw)
		time.Sleep(time.Until(exp) + 500*time.Millisecond)
		for n := 2; n <= 11; n++ {
			publish(ch, n) // after exp, by this machine's clock, the egress's too
		}
		time.Sleep(200 * time.Millisecond) // the notifications reach the egress's socket
		thaw()

		late := 0
		for i, c := range clients {
			select {
			case <-c.closed:
			case <-time.After(10 * time.Second):
				t.Fatalf("round %d: connection %d was not closed after the egress ran again", round, i)
			}
			c.mu.Lock()
			code, text := c.closeCode, c.closeText
			c.mu.Unlock()
			if code != protocol.CloseTokenExpired {
				t.Errorf("round %d: connection %d closed %d %q, want %d", round, i, code, text, protocol.CloseTokenExpired)
			}
			if got := c.messages(ch); len(got) != 1 {
				late++
				if late == 1 {
					var data []string
					for _, f := range got {
						data = append(data, string(f.Data))
					}
					t.Errorf("round %d: connection %d got messages %v, want only 1: those published after its token's exp reached it", round, i, data)
				}
			}
		}
		if late > 0 {
			t.Errorf("round %d: %d of %d connections got messages published after their token's exp", round, late, conns)
		}
	}
}
