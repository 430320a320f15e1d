package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/wsrelay/wsrelay/shared/auth"
	"github.com/wsrelay/wsrelay/shared/client"
	pubpkg "github.com/wsrelay/wsrelay/shared/publisher"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// clientPublisher publishes through the ingress with its own HTTP client,
// so that its keep-alive connections can be closed (goleak).
type clientPublisher struct {
	hc      *http.Client
	ingress string
}

func newClientPublisher(t testing.TB, ingress string) *clientPublisher {
	p := &clientPublisher{hc: &http.Client{Transport: &http.Transport{}, Timeout: 5 * time.Second}, ingress: ingress}
	t.Cleanup(p.hc.CloseIdleConnections)
	return p
}

// publish posts data to channel ch and returns the message id.
func (p *clientPublisher) publish(ch string, data any) (string, error) {
	b, _ := json.Marshal(map[string]any{"data": data})
	resp, err := p.hc.Post(p.ingress+"/v1/channels/"+ch+"/messages", "application/json", bytes.NewReader(b))
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	rb, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusAccepted {
		return "", fmt.Errorf("publish: %d %s", resp.StatusCode, rb)
	}
	var out struct{ ID string }
	if err := json.Unmarshal(rb, &out); err != nil || out.ID == "" {
		return "", fmt.Errorf("publish: bad answer %s", rb)
	}
	return out.ID, nil
}

// goSubscription is a subscription of the Go client c to ch whose
// confirmations (OnSubscribed) and messages a test waits for.
type goSubscription struct {
	c    *client.Client
	ch   string
	live chan bool
	got  chan client.Message
}

func subscribeGo(t testing.TB, c *client.Client, ch string) *goSubscription {
	t.Helper()
	s := &goSubscription{c: c, ch: ch, live: make(chan bool, 4), got: make(chan client.Message, 1)}
	if _, err := c.Subscribe(ch, client.Handler{
		OnSubscribed: func(bool) { s.live <- true },
		OnMessage:    func(m client.Message) { s.got <- m },
	}); err != nil {
		t.Fatal(err)
	}
	return s
}

// waitLive waits up to 10 s for the next confirmation; when says which
// one it is, for the failure.
func (s *goSubscription) waitLive(t testing.TB, when string) {
	t.Helper()
	select {
	case <-s.live:
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: not subscribed %s (state %v, Err %v)", s.ch, when, s.c.State(), s.c.Err())
	}
}

// roundTrip publishes data to the channel through pub and returns the
// message delivered, which must be that one and come within 10 s.
func (s *goSubscription) roundTrip(t testing.TB, pub *clientPublisher, data any) client.Message {
	t.Helper()
	id, err := pub.publish(s.ch, data)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-s.got:
		if m.ID != id {
			t.Fatalf("%s: got %s, want %s", s.ch, m.ID, id)
		}
		return m
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: %s not delivered (state %v, Err %v)", s.ch, id, s.c.State(), s.c.Err())
		return client.Message{}
	}
}

// TestGoClientResumesAcrossServerCloses: the Go client, subscribed while
// the egress cuts its connections (idle timeout 2 s, lifetime 3 s),
// receives every message published meanwhile exactly once, in order, and
// Close leaves no goroutine behind.
func TestGoClientResumesAcrossServerCloses(t *testing.T) {
	// Checked last, after the processes and their log readers are gone.
	leaks := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, leaks) })
	e := env{
		"REDIS_URL":        redistest.URL(t),
		"REDIS_KEY_PREFIX": redistest.Prefix(t),
		"ALLOW_ANONYMOUS":  "true",
		"IDLE_TIMEOUT":     "2s",
		"MAX_LIFETIME":     "3s",
	}
	ing := start(t, "ingress", e)
	eg := start(t, "egress", e)
	pub := newClientPublisher(t, ing.URL)

	var (
		mu         sync.Mutex
		got        []client.Message
		subscribed []bool
		states     []client.State
	)
	c, err := client.Dial(client.Options{
		URL:        "ws" + strings.TrimPrefix(eg.URL, "http") + "/ws",
		User:       "go-client",
		MinBackoff: 100 * time.Millisecond,
		MaxBackoff: time.Second,
		OnState: func(s client.State, _ error) {
			mu.Lock()
			states = append(states, s)
			mu.Unlock()
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	sub, err := c.Subscribe("feed", client.Handler{
		OnMessage: func(m client.Message) {
			mu.Lock()
			got = append(got, m)
			mu.Unlock()
		},
		OnSubscribed: func(recovered bool) {
			mu.Lock()
			subscribed = append(subscribed, recovered)
			mu.Unlock()
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, 10*time.Second, func() error {
		mu.Lock()
		defer mu.Unlock()
		if len(subscribed) == 0 {
			return fmt.Errorf("not subscribed yet")
		}
		return nil
	})

	// Publish for ~8 s: bursts, and one pause longer than the idle timeout
	// so that both an idle close and lifetime closes happen under traffic.
	var want []string
	deadline := time.Now().Add(8 * time.Second)
	for i := 0; time.Now().Before(deadline); i++ {
		id, err := pub.publish("feed", map[string]int{"n": i})
		if err != nil {
			t.Fatal(err)
		}
		want = append(want, id)
		switch {
		case i == 20:
			time.Sleep(2500 * time.Millisecond) // let the idle timeout fire
		default:
			time.Sleep(40 * time.Millisecond)
		}
	}
	testkit.Eventually(t, 15*time.Second, func() error {
		mu.Lock()
		defer mu.Unlock()
		if len(got) < len(want) {
			return fmt.Errorf("%d of %d messages", len(got), len(want))
		}
		return nil
	})
	mu.Lock()
	if len(got) != len(want) {
		t.Fatalf("got %d messages, want %d", len(got), len(want))
	}
	for i := range want {
		if got[i].ID != want[i] || got[i].Channel != "feed" {
			t.Fatalf("message %d: %s on %q, want %s", i, got[i].ID, got[i].Channel, want[i])
		}
	}
	connects := 0
	for _, s := range states {
		if s == client.StateConnected {
			connects++
		}
	}
	for i, r := range subscribed {
		if !r {
			t.Errorf("subscription %d: recovered=false, want true (nothing was trimmed)", i)
		}
	}
	mu.Unlock()
	if connects < 3 {
		t.Errorf("connected %d times; the server's idle and lifetime closes should have forced at least 2 reconnects", connects)
	}
	if sub.LastID() != want[len(want)-1] {
		t.Errorf("LastID %s, want %s", sub.LastID(), want[len(want)-1])
	}
	t.Logf("%d messages over %d connections, subscribed replies %v", len(want), connects, subscribed)

	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if c.State() != client.StateClosed {
		t.Errorf("state after Close: %v", c.State())
	}
}

// TestAdminDisconnect: DELETE /v1/connections/{id} on an ingress closes
// that socket on whichever egress holds it, with 4003; the Go client takes
// 4003 as final: it stops instead of reconnecting, and reports the code.
func TestAdminDisconnect(t *testing.T) {
	c := startCluster(t, redistest.URL(t), nil)
	del := func(id string) int {
		req, _ := http.NewRequest(http.MethodDelete, c.ingress[0].URL+"/v1/connections/"+id, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}

	// A raw socket on the other instance: closed with 4003.
	w := dial(t, c.egress[1].wsURL(""))
	if st := del(w.welcome.ConnectionID); st != http.StatusAccepted {
		t.Fatalf("DELETE: %d", st)
	}
	select {
	case <-w.closed:
	case <-time.After(5 * time.Second):
		t.Fatal("the socket was not closed")
	}
	w.mu.Lock()
	code := w.closeCode
	w.mu.Unlock()
	if code != 4003 {
		t.Fatalf("close code %d, want 4003", code)
	}

	// The Go client: one welcome, then it stops with the close code.
	var (
		mu       sync.Mutex
		welcomes []string
	)
	gc, err := client.Dial(client.Options{
		URL:        "ws" + strings.TrimPrefix(c.egress[0].URL, "http") + "/ws",
		MinBackoff: 50 * time.Millisecond,
		MaxBackoff: 100 * time.Millisecond,
		OnWelcome: func(wl client.Welcome) {
			mu.Lock()
			welcomes = append(welcomes, wl.ConnectionID)
			mu.Unlock()
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer gc.Close()
	testkit.Eventually(t, 5*time.Second, func() error {
		mu.Lock()
		defer mu.Unlock()
		if len(welcomes) == 0 {
			return fmt.Errorf("no welcome yet")
		}
		return nil
	})
	mu.Lock()
	id := welcomes[0]
	mu.Unlock()
	if st := del(id); st != http.StatusAccepted {
		t.Fatalf("DELETE: %d", st)
	}
	select {
	case <-gc.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the Go client did not stop after 4003")
	}
	var ce *client.CloseError
	if !errors.As(gc.Err(), &ce) || ce.Code != 4003 {
		t.Fatalf("Err() = %v, want a CloseError with 4003", gc.Err())
	}
	time.Sleep(300 * time.Millisecond) // several backoffs: no reconnect
	mu.Lock()
	n := len(welcomes)
	mu.Unlock()
	if n != 1 {
		t.Fatalf("%d welcomes: the client reconnected after 4003", n)
	}
}

// TestAdminDisconnectUser: DELETE /v1/users/{user}/connections, through
// the Go publisher, closes with 4003 every socket of the user, on both
// egress instances, and no socket of another user: that one still gets
// what is sent to it afterwards.
func TestAdminDisconnectUser(t *testing.T) {
	c := startCluster(t, redistest.URL(t), nil)
	ctx := t.Context()
	p := newPublisher(t, c.ingress[1].URL, "")
	alice := []*wsClient{dial(t, c.egress[0].wsURL("user=alice")), dial(t, c.egress[1].wsURL("user=alice"))}
	bob := dial(t, c.egress[0].wsURL("user=bob"))

	list, err := p.UserConnections(ctx, "alice", 0)
	if err != nil || len(list) != 2 || list[0].Instance == list[1].Instance {
		t.Fatalf("alice's connections: %+v, %v; want two, on two instances", list, err)
	}
	n, err := p.DisconnectUser(ctx, "alice")
	if err != nil || n != 2 {
		t.Fatalf("DisconnectUser: %d, %v; want 2", n, err)
	}
	for i, w := range alice {
		select {
		case <-w.closed:
		case <-time.After(5 * time.Second):
			t.Fatalf("alice's socket %d was not closed", i)
		}
		w.mu.Lock()
		code := w.closeCode
		w.mu.Unlock()
		if code != 4003 {
			t.Fatalf("alice's socket %d: close code %d, want 4003", i, code)
		}
	}
	// Closing them removed their records: the user has none left, and a
	// second request tells none.
	testkit.Eventually(t, 5*time.Second, func() error {
		if list, err := p.UserConnections(ctx, "alice", 0); err != nil || len(list) != 0 {
			return fmt.Errorf("alice's connections after the disconnect: %+v, %v", list, err)
		}
		return nil
	})
	if n, err := p.DisconnectUser(ctx, "alice"); err != nil || n != 0 {
		t.Fatalf("DisconnectUser again: %d, %v; want 0", n, err)
	}
	// Bob's socket, on the instance that closed one of alice's, is open.
	if n, err := p.SendToUser(ctx, "bob", pubpkg.Message{Data: "still here"}); err != nil || n != 1 {
		t.Fatalf("SendToUser bob: %d, %v", n, err)
	}
	bob.waitFrame(func(f frame) bool {
		return f.Type == "message" && f.Target == "user" && string(f.Data) == `"still here"`
	})
	select {
	case <-bob.closed:
		t.Fatal("bob's socket was closed")
	default:
	}
}

// TestGoClientManySubscriptions: the Go client with as many subscriptions
// as MAX_SUBSCRIPTIONS allows, twice MAX_FRAMES_PER_SECOND's default,
// sends them all at once on connect and again on every reconnect. Each
// goes live both times (frames over the rate are held, not refused) and
// the client is never closed for good.
func TestGoClientManySubscriptions(t *testing.T) {
	const n = 100 // MAX_SUBSCRIPTIONS's default; MAX_FRAMES_PER_SECOND's is 50
	e := env{
		"REDIS_URL":        redistest.URL(t),
		"REDIS_KEY_PREFIX": redistest.Prefix(t),
		"ALLOW_ANONYMOUS":  "true",
		"MAX_LIFETIME":     "4s", // one reconnect, which subscribes all again
	}
	ing := start(t, "ingress", e)
	eg := start(t, "egress", e)
	pub := newClientPublisher(t, ing.URL)
	var (
		mu      sync.Mutex
		live    = map[string]int{}
		refused []string
		got     = make(chan string, 1)
	)
	c, err := client.Dial(client.Options{
		URL:        "ws" + strings.TrimPrefix(eg.URL, "http") + "/ws",
		User:       "many",
		MinBackoff: 50 * time.Millisecond,
		MaxBackoff: 100 * time.Millisecond,
		OnError:    func(e *client.ServerError) { mu.Lock(); refused = append(refused, e.Code); mu.Unlock() },
	})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for i := range n {
		ch := fmt.Sprintf("ch%d", i)
		if _, err := c.Subscribe(ch, client.Handler{
			OnSubscribed: func(bool) { mu.Lock(); live[ch]++; mu.Unlock() },
			OnError:      func(e *client.ServerError) { mu.Lock(); refused = append(refused, ch+": "+e.Code); mu.Unlock() },
			OnMessage:    func(m client.Message) { got <- m.ID },
		}); err != nil {
			t.Fatal(err)
		}
	}
	testkit.Eventually(t, 20*time.Second, func() error {
		mu.Lock()
		defer mu.Unlock()
		select {
		case <-c.Done():
			t.Fatalf("the client stopped for good: %v (refused: %v)", c.Err(), refused)
		default:
		}
		if len(refused) > 0 {
			t.Fatalf("refused: %v", refused)
		}
		twice := 0
		for _, k := range live {
			if k >= 2 {
				twice++
			}
		}
		if twice < n {
			return fmt.Errorf("%d of %d subscriptions live again after the reconnect (%d at all)", twice, n, len(live))
		}
		return nil
	})
	id, err := pub.publish(fmt.Sprintf("ch%d", n-1), "last")
	if err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-got:
		if m != id {
			t.Fatalf("got %s, want %s", m, id)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the last subscription got nothing")
	}
}

// TestGoClientBatchesResubscribes: on a reconnect to an egress that
// announces max_frame_bytes, the Go client resubscribes all its channels
// in one frame (the connection log line's frames_in), within SCF's
// limit of 10 messages per second upstream on a WebSocket function's
// connection, and every message
// published across the cut arrives once, in order.
func TestGoClientBatchesResubscribes(t *testing.T) {
	const n = 30
	e := env{
		"REDIS_URL":        redistest.URL(t),
		"REDIS_KEY_PREFIX": redistest.Prefix(t),
		"ALLOW_ANONYMOUS":  "true",
		"MAX_LIFETIME":     "3s",
	}
	ing := start(t, "ingress", e)
	eg := start(t, "egress", e)
	pub := newClientPublisher(t, ing.URL)
	var (
		mu       sync.Mutex
		conns    []string
		live     = map[string]int{}
		got      = map[string][]string{}
		problems []string
	)
	c, err := client.Dial(client.Options{
		URL:        "ws" + strings.TrimPrefix(eg.URL, "http") + "/ws",
		User:       "batcher",
		MinBackoff: 50 * time.Millisecond,
		MaxBackoff: 100 * time.Millisecond,
		OnWelcome: func(w client.Welcome) {
			mu.Lock()
			conns = append(conns, w.ConnectionID)
			if w.MaxFrameBytes != 65536 {
				problems = append(problems, fmt.Sprintf("welcome max_frame_bytes %d", w.MaxFrameBytes))
			}
			mu.Unlock()
		},
		OnError: func(e *client.ServerError) { mu.Lock(); problems = append(problems, e.Code); mu.Unlock() },
	})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for i := range n {
		ch := fmt.Sprintf("batch%d", i)
		if _, err := c.Subscribe(ch, client.Handler{
			OnSubscribed: func(bool) { mu.Lock(); live[ch]++; mu.Unlock() },
			OnError:      func(e *client.ServerError) { mu.Lock(); problems = append(problems, ch+": "+e.Code); mu.Unlock() },
			OnMessage:    func(m client.Message) { mu.Lock(); got[ch] = append(got[ch], m.ID); mu.Unlock() },
		}); err != nil {
			t.Fatal(err)
		}
	}
	testkit.Eventually(t, 10*time.Second, func() error {
		mu.Lock()
		defer mu.Unlock()
		if len(live) < n {
			return fmt.Errorf("%d of %d subscriptions live", len(live), n)
		}
		return nil
	})
	// Publish across the lifetime cut, on every channel, until the client
	// is on its second connection and that one is live on every channel.
	want := map[string][]string{}
	for i := 0; ; i++ {
		ch := fmt.Sprintf("batch%d", i%n)
		id, err := pub.publish(ch, i)
		if err != nil {
			t.Fatal(err)
		}
		want[ch] = append(want[ch], id)
		time.Sleep(20 * time.Millisecond)
		mu.Lock()
		twice := 0
		for _, k := range live {
			if k >= 2 {
				twice++
			}
		}
		again := len(conns) >= 2 && twice == n
		mu.Unlock()
		if again && i >= 2*n {
			break
		}
		if i > 1000 {
			t.Fatal("no reconnect live on every channel after 1,000 publishes")
		}
	}
	testkit.Eventually(t, 10*time.Second, func() error {
		mu.Lock()
		defer mu.Unlock()
		for ch, ids := range want {
			if len(got[ch]) < len(ids) {
				return fmt.Errorf("%s: %d of %d messages", ch, len(got[ch]), len(ids))
			}
		}
		return nil
	})
	mu.Lock()
	for ch, ids := range want {
		if strings.Join(got[ch], " ") != strings.Join(ids, " ") {
			t.Errorf("%s: got %v, want %v", ch, got[ch], ids)
		}
	}
	if len(problems) > 0 {
		t.Errorf("problems: %v", problems)
	}
	second := conns[1]
	mu.Unlock()
	_ = c.Close()
	// The second connection's log line: its only data frame was the
	// resubscribe of all 30.
	testkit.Eventually(t, 10*time.Second, func() error {
		for _, line := range strings.Split(eg.Logs(), "\n") {
			var l struct {
				Msg      string
				Conn     string
				FramesIn *int `json:"frames_in"`
			}
			if json.Unmarshal([]byte(line), &l) != nil || l.Msg != "connection closed" || l.Conn != second || l.FramesIn == nil {
				continue
			}
			if *l.FramesIn != 1 {
				t.Fatalf("the reconnect sent %d frames, want its %d subscribes in 1", *l.FramesIn, n)
			}
			return nil
		}
		return fmt.Errorf("no log line for connection %s yet", second)
	})
}

// TestGoClientRefusedByEgress: the real egress's refusals reach the Go
// client's Err with their code: a user name it will never take (400
// invalid_user) and a token it cannot verify, with no GetToken to ask for
// another (401 invalid_token), end the client at the first dial instead
// of being retried for ever.
func TestGoClientRefusedByEgress(t *testing.T) {
	e := env{
		"REDIS_URL":        redistest.URL(t),
		"REDIS_KEY_PREFIX": redistest.Prefix(t),
		"ALLOW_ANONYMOUS":  "true",
	}
	eg := start(t, "egress", e)
	url := "ws" + strings.TrimPrefix(eg.URL, "http") + "/ws"
	for _, tc := range []struct {
		opts   client.Options
		status int
		code   string
	}{
		{client.Options{URL: url, User: "not a user name"}, http.StatusBadRequest, "invalid_user"},
		{client.Options{URL: url, Token: "not.a.jwt"}, http.StatusUnauthorized, "invalid_token"},
	} {
		tc.opts.MinBackoff, tc.opts.MaxBackoff = time.Millisecond, time.Millisecond
		c, err := client.Dial(tc.opts)
		if err != nil {
			t.Fatal(err)
		}
		select {
		case <-c.Done():
		case <-time.After(10 * time.Second):
			c.Close()
			t.Fatalf("%d %s: the client is still retrying", tc.status, tc.code)
		}
		var re *client.RefusedError
		if !errors.As(c.Err(), &re) || re.Status != tc.status || re.Code != tc.code {
			t.Errorf("Err %v, want a refusal %d %s", c.Err(), tc.status, tc.code)
		}
		c.Close()
	}
}

// TestGoClientReadLimit: with the default ReadLimit, the Go client reads
// the largest message an ingress at SCF's WebSocket cap takes
// (MAX_MESSAGE_BYTES 256 KB, its frame a few hundred bytes more); a client
// whose ReadLimit is below it closes with 1009 when the message is
// replayed to it, and stops for good (a reconnect's resume would replay
// it again), with Err saying so; the egress logs the client's 1009.
func TestGoClientReadLimit(t *testing.T) {
	e := env{
		"REDIS_URL":         redistest.URL(t),
		"REDIS_KEY_PREFIX":  redistest.Prefix(t),
		"ALLOW_ANONYMOUS":   "true",
		"MAX_MESSAGE_BYTES": "262144",
	}
	ing := start(t, "ingress", e)
	eg := start(t, "egress", e)
	pub := newClientPublisher(t, ing.URL)
	url := "ws" + strings.TrimPrefix(eg.URL, "http") + "/ws"
	big := strings.Repeat("x", 262144-len(`{"data":""}`)) // the whole body at the limit

	c, err := client.Dial(client.Options{URL: url, User: "reader"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	sub := subscribeGo(t, c, "big")
	sub.waitLive(t, "at first")
	if m := sub.roundTrip(t, pub, big); len(m.Data) != len(big)+2 {
		t.Fatalf("got %d bytes, want %d", len(m.Data), len(big)+2)
	}

	small, err := client.Dial(client.Options{URL: url, User: "small", ReadLimit: 64 << 10,
		MinBackoff: time.Millisecond, MaxBackoff: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer small.Close()
	if _, err := small.Subscribe("big", client.Handler{After: "0-0"}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-small.Done():
	case <-time.After(10 * time.Second):
		t.Fatalf("the client with a 64 KiB ReadLimit is still running (Err %v)", small.Err())
	}
	var ce *client.CloseError
	if !errors.As(small.Err(), &ce) || ce.Code != 1009 || !ce.ByClient {
		t.Fatalf("Err %v, want the client's own 1009", small.Err())
	}
	testkit.Eventually(t, 5*time.Second, func() error {
		for _, l := range strings.Split(eg.Logs(), "\n") {
			if strings.Contains(l, `"user":"small"`) && strings.Contains(l, `"close_code":1009`) && strings.Contains(l, `"closed_by":"client"`) {
				return nil
			}
		}
		return errors.New("no log line of small's connection closed by the client with 1009")
	})
}

// TestGoClientConnectTimeout: with ReadTimeout off (negative), a dial not
// welcomed within ConnectTimeout is dropped and dialled again, whether its
// upgrade hangs (a proxy that accepts and forwards nothing, which only the
// 45 s HandshakeTimeout ended) or the socket is upgraded and its welcome
// never comes (a proxy that forwards the 101 and holds the rest, which
// nothing ended); once the proxy forwards again, the client subscribes and
// delivers what is published.
func TestGoClientConnectTimeout(t *testing.T) {
	e := env{
		"REDIS_URL":        redistest.URL(t),
		"REDIS_KEY_PREFIX": redistest.Prefix(t),
		"ALLOW_ANONYMOUS":  "true",
	}
	ing := start(t, "ingress", e)
	eg := start(t, "egress", e)
	pub := newClientPublisher(t, ing.URL)
	host := strings.TrimPrefix(eg.URL, "http://")
	for _, tc := range []struct {
		name            string
		fault, recovery func(*tcpProxy)
	}{
		{"upgrade hangs", (*tcpProxy).Stall, (*tcpProxy).Unstall},
		{"no welcome after the upgrade", (*tcpProxy).HoldAfterHeaders, (*tcpProxy).Release},
	} {
		t.Run(tc.name, func(t *testing.T) {
			proxy := newProxy(t, host)
			tc.fault(proxy)
			var (
				mu     sync.Mutex
				drops  []string
				others []string
			)
			c, err := client.Dial(client.Options{
				URL: "ws://" + proxy.Addr() + "/ws", User: "patient",
				ReadTimeout: -1, ConnectTimeout: 500 * time.Millisecond,
				MinBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond,
				OnState: func(s client.State, err error) {
					if s != client.StateDisconnected {
						return
					}
					mu.Lock()
					defer mu.Unlock()
					if err != nil && strings.Contains(err.Error(), "no welcome within ConnectTimeout") {
						drops = append(drops, err.Error())
					} else {
						others = append(others, fmt.Sprint(err))
					}
				},
			})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			sub := subscribeGo(t, c, "e2e-connect-"+strings.ReplaceAll(tc.name, " ", "-"))
			testkit.Eventually(t, 5*time.Second, func() error {
				mu.Lock()
				defer mu.Unlock()
				if len(drops) < 2 || len(others) > 0 {
					return fmt.Errorf("drops %q, other disconnects %q (state %v): want the unwelcomed dials dropped and dialled again", drops, others, c.State())
				}
				return nil
			})
			tc.recovery(proxy)
			sub.waitLive(t, "once the proxy forwards again")
			sub.roundTrip(t, pub, "m1")
		})
	}
}

// TestGoClientTokenExpired: a client given a fixed Token (no GetToken)
// whose token expires is closed by the egress with 4004, dials once more
// with the expired token and stops at the 401 (token_expired) that
// refuses it, instead of dialling it for ever (docs/clients.md: the JS
// client stops at the 4004 itself). With GetToken, the 4004 brings a
// fresh token and the subscription resumes.
func TestGoClientTokenExpired(t *testing.T) {
	const secret = "go-client-expiry-secret-0123456789abcdef"
	e := env{
		"REDIS_URL":        redistest.URL(t),
		"REDIS_KEY_PREFIX": redistest.Prefix(t),
		"JWT_SECRET":       secret,
	}
	// The publisher needs no credential: only the egress checks tokens here.
	ing := start(t, "ingress", env{"REDIS_URL": e["REDIS_URL"], "REDIS_KEY_PREFIX": e["REDIS_KEY_PREFIX"], "ALLOW_ANONYMOUS": "true"})
	eg := start(t, "egress", e)
	pub := newClientPublisher(t, ing.URL)
	sign := func(d time.Duration) string {
		tok, err := auth.SignHS256(secret, auth.Claims{Subject: "alice", Channels: []string{"e2e-*"}, Expires: time.Now().Add(d)})
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	var (
		mu     sync.Mutex
		states []string
	)
	record := func(who string) func(client.State, error) {
		return func(s client.State, err error) {
			var de *client.DisconnectError
			var re *client.RefusedError
			st := who + " " + s.String()
			switch {
			case errors.As(err, &de):
				st += " " + fmt.Sprint(de.Code)
			case errors.As(err, &re):
				st += " " + fmt.Sprint(re.Status)
			}
			mu.Lock()
			states = append(states, st)
			mu.Unlock()
		}
	}
	url := "ws" + strings.TrimPrefix(eg.URL, "http") + "/ws"
	fixed, err := client.Dial(client.Options{URL: url, Token: sign(3 * time.Second), OnState: record("fixed"),
		MinBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer fixed.Close()
	var asked atomic.Int32
	fresh, err := client.Dial(client.Options{URL: url, OnState: record("fresh"),
		MinBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond,
		GetToken: func(context.Context) (string, error) {
			if asked.Add(1) == 1 {
				return sign(3 * time.Second), nil
			}
			return sign(time.Hour), nil
		}})
	if err != nil {
		t.Fatal(err)
	}
	defer fresh.Close()
	sub := subscribeGo(t, fresh, "e2e-expiry")
	select {
	case <-fixed.Done():
	case <-time.After(15 * time.Second):
		t.Fatalf("the client with an expired fixed token is still running (state %v)", fixed.State())
	}
	var re *client.RefusedError
	if !errors.As(fixed.Err(), &re) || re.Status != http.StatusUnauthorized || re.Code != "token_expired" {
		t.Fatalf("Err %v, want the 401 token_expired", fixed.Err())
	}
	defer func() {
		if t.Failed() {
			t.Logf("GetToken asked %d times", asked.Load())
		}
	}()
	sub.waitLive(t, "with the first token")
	sub.waitLive(t, "again after the 4004")
	sub.roundTrip(t, pub, "m1")
	mu.Lock()
	defer mu.Unlock()
	var fixedStates, freshStates []string
	for _, s := range states {
		if strings.HasPrefix(s, "fixed ") {
			fixedStates = append(fixedStates, strings.TrimPrefix(s, "fixed "))
		} else {
			freshStates = append(freshStates, strings.TrimPrefix(s, "fresh "))
		}
	}
	if got, want := strings.Join(fixedStates, ", "), "connecting, connected, disconnected 4004, connecting, closed 401"; got != want {
		t.Errorf("fixed token's states: %s; want %s", got, want)
	}
	if got, want := strings.Join(freshStates, ", "), "connecting, connected, disconnected 4004, connecting, connected"; got != want {
		t.Errorf("GetToken's states: %s; want %s", got, want)
	}
	if n := asked.Load(); n != 2 {
		t.Errorf("GetToken asked %d times, want 2", n)
	}
}
