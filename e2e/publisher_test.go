package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	pubpkg "github.com/wsrelay/wsrelay/shared/publisher"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// publisherKeys: a full key, a key scoped to chat:* and an admin-only
// key (docs/security.md).
const publisherKeys = "k-full,k-chat=chat:*,k-admin=+admin"

// startIngressWithKeys starts an ingress that needs an API key, on the
// test's Redis and key prefix.
func startIngressWithKeys(t *testing.T, redisURL, prefix string) *proc {
	t.Helper()
	return start(t, "ingress", env{
		"REDIS_URL":        redisURL,
		"REDIS_KEY_PREFIX": prefix,
		"API_KEYS":         publisherKeys,
	})
}

// newPublisher is a publisher of url with token and short backoffs; its
// idle connections are closed at cleanup (goleak).
func newPublisher(t *testing.T, url, token string) *pubpkg.Client {
	t.Helper()
	p, err := pubpkg.New(pubpkg.Options{URL: url, Token: token, MinBackoff: 10 * time.Millisecond, MaxBackoff: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.CloseIdleConnections)
	return p
}

// history reads all of channel's retained messages, paging from the
// oldest.
func history(t *testing.T, p *pubpkg.Client, ch string) []pubpkg.HistoryMessage {
	t.Helper()
	var all []pubpkg.HistoryMessage
	after := "0"
	for {
		page, err := p.History(context.Background(), ch, after, 1000)
		if err != nil {
			t.Fatalf("history of %s: %v", ch, err)
		}
		if len(page.Messages) == 0 {
			return all
		}
		all = append(all, page.Messages...)
		after = page.Next
	}
}

// TestPublisherRoundTrip: the publisher's calls against the real
// functions: publish, batch, history (paged), sends to a user and to a
// connection, disconnect.
func TestPublisherRoundTrip(t *testing.T) {
	leaks := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, leaks) })
	redisURL, prefix := redistest.URL(t), redistest.Prefix(t)
	ing := startIngressWithKeys(t, redisURL, prefix)
	eg := start(t, "egress", env{
		"REDIS_URL":        redisURL,
		"REDIS_KEY_PREFIX": prefix,
		"ALLOW_ANONYMOUS":  "true",
	})
	pub := newPublisher(t, ing.URL, "k-full")
	ctx := context.Background()

	first, err := pub.Publish(ctx, "room", pubpkg.Message{Data: map[string]string{"text": "hello <b>"}, Event: "chat", From: "alice"})
	if err != nil {
		t.Fatal(err)
	}
	if first.Channel != "room" || first.ID == "" || first.Replayed {
		t.Fatalf("publish: %+v", first)
	}
	batch, err := pub.PublishBatch(ctx, []pubpkg.Item{
		{Channel: "room", Message: pubpkg.Message{Data: 1}},
		{Channel: "other", Message: pubpkg.Message{Data: json.RawMessage(`{"x": [1, 2]}`), Event: "tick"}},
		{Channel: "room", Message: pubpkg.Message{Data: 2}},
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(batch) != 3 || batch[1].Channel != "other" || batch[2].Channel != "room" {
		t.Fatalf("batch: %+v", batch)
	}

	// The newest, without after: no recovered.
	latest, err := pub.History(ctx, "room", "", 0)
	if err != nil {
		t.Fatal(err)
	}
	if latest.Recovered != nil || len(latest.Messages) != 3 || latest.Next != batch[2].ID {
		t.Fatalf("latest history: %+v", latest)
	}
	m := latest.Messages[0]
	if m.ID != first.ID || m.Channel != "room" || m.Event != "chat" || m.From != "alice" || m.TS == 0 ||
		string(m.Data) != `{"text":"hello <b>"}` {
		t.Fatalf("first message: %+v (data %s)", m, m.Data)
	}
	// Paged from the oldest, two at a time.
	page, err := pub.History(ctx, "room", "0", 2)
	if err != nil {
		t.Fatal(err)
	}
	if page.Recovered == nil || !*page.Recovered || len(page.Messages) != 2 || page.Next != batch[0].ID {
		t.Fatalf("first page: %+v", page)
	}
	page, err = pub.History(ctx, "room", page.Next, 2)
	if err != nil {
		t.Fatal(err)
	}
	if len(page.Messages) != 1 || page.Messages[0].ID != batch[2].ID || string(page.Messages[0].Data) != "2" {
		t.Fatalf("second page: %+v", page)
	}
	// Paged back from the newest, two at a time, to an empty page.
	back, err := pub.HistoryBefore(ctx, "room", batch[2].ID, 1)
	if err != nil {
		t.Fatal(err)
	}
	if back.Recovered != nil || len(back.Messages) != 1 || back.Messages[0].ID != batch[0].ID || back.Next != batch[0].ID {
		t.Fatalf("page before the newest: %+v", back)
	}
	if back, err = pub.HistoryBefore(ctx, "room", back.Messages[0].ID, 2); err != nil || len(back.Messages) != 1 || back.Messages[0].ID != first.ID {
		t.Fatalf("page before that: %+v, %v", back, err)
	}
	if back, err = pub.HistoryBefore(ctx, "room", first.ID, 2); err != nil || len(back.Messages) != 0 || back.Next != "" {
		t.Fatalf("page before the oldest: %+v, %v", back, err)
	}
	if _, err := pub.HistoryBefore(ctx, "room", "", 0); !errors.Is(err, pubpkg.ErrInvalid) {
		t.Fatalf("before \"\": %v, want ErrInvalid", err)
	}
	if other := history(t, pub, "other"); len(other) != 1 || other[0].ID != batch[1].ID || string(other[0].Data) != `{"x":[1,2]}` {
		t.Fatalf("history of other: %+v", other)
	}
	if n, err := pub.ClearHistory(ctx, "other"); err != nil || n != 1 {
		t.Fatalf("clear other: %d, %v", n, err)
	}
	if other := history(t, pub, "other"); len(other) != 0 {
		t.Fatalf("history of other after clearing it: %+v", other)
	}

	// Targeted sends reach a live connection.
	ws := dial(t, eg.wsURL("user=ada"))
	testkit.Eventually(t, 10*time.Second, func() error { // until the egress has registered it
		n, err := pub.SendToUser(ctx, "ada", pubpkg.Message{Data: "to ada"})
		if err != nil || n != 1 {
			return fmt.Errorf("send to ada: %d connections, %v", n, err)
		}
		return nil
	})
	ws.waitFrame(func(f frame) bool { return f.Target == "user" && string(f.Data) == `"to ada"` })
	res, err := pub.SendToConnection(ctx, ws.welcome.ConnectionID, pubpkg.Message{Data: "to you", Event: "direct"})
	if err != nil {
		t.Fatal(err)
	}
	if res.Connection != ws.welcome.ConnectionID || res.ID == "" {
		t.Fatalf("send to connection: %+v", res)
	}
	ws.waitFrame(func(f frame) bool { return f.Target == "connection" && f.ID == res.ID && f.Event == "direct" })

	// The registry: the connection's record, and the channel's list once
	// it subscribes.
	rec, err := pub.Connection(ctx, ws.welcome.ConnectionID)
	if err != nil || rec.ID != ws.welcome.ConnectionID || rec.User != "ada" || rec.Instance == "" || rec.ConnectedAt.IsZero() {
		t.Fatalf("connection record: %+v, %v", rec, err)
	}
	if list, err := pub.ChannelConnections(ctx, "room", 0); err != nil || len(list) != 0 {
		t.Fatalf("room's connections before the subscribe: %+v, %v", list, err)
	}
	ws.subscribe("room")
	testkit.Eventually(t, 10*time.Second, func() error {
		list, err := pub.ChannelConnections(ctx, "room", 10)
		if err != nil || len(list) != 1 || list[0].ID != ws.welcome.ConnectionID || !slices.Equal(list[0].Channels, []string{"room"}) {
			return fmt.Errorf("room's connections: %+v, %v", list, err)
		}
		return nil
	})
	if n, err := pub.SendToUser(ctx, "nobody", pubpkg.Message{Data: 1}); err != nil || n != 0 {
		t.Fatalf("send to nobody: %d, %v", n, err)
	}

	if err := pub.Disconnect(ctx, ws.welcome.ConnectionID); err != nil {
		t.Fatal(err)
	}
	select {
	case <-ws.closed:
	case <-time.After(10 * time.Second):
		t.Fatal("not disconnected")
	}
	ws.mu.Lock()
	code := ws.closeCode
	ws.mu.Unlock()
	if code != 4003 {
		t.Fatalf("closed with %d, want 4003", code)
	}
	testkit.Eventually(t, 10*time.Second, func() error {
		var e *pubpkg.Error
		if err := pub.Disconnect(ctx, ws.welcome.ConnectionID); !errors.As(err, &e) || e.Code != "connection_not_found" {
			return fmt.Errorf("disconnect of a closed connection: %v", err)
		}
		return nil
	})
	var e *pubpkg.Error
	if _, err := pub.Connection(ctx, ws.welcome.ConnectionID); !errors.As(err, &e) || e.Code != "connection_not_found" {
		t.Fatalf("record of a closed connection: %v", err)
	}
}

// TestPublisherExactlyOnceAcrossLostReply: the ingress serves a publish
// but its reply is lost on the way back (a proxy closes the publisher's
// connection instead of forwarding it). The publisher sees a transport
// error and retries with the same Idempotency-Key: the ingress answers
// with the first attempt's reply and writes nothing again, so history
// holds the message once, with the id the publisher got.
func TestPublisherExactlyOnceAcrossLostReply(t *testing.T) {
	leaks := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, leaks) })
	ing := startIngressWithKeys(t, redistest.URL(t), redistest.Prefix(t))
	proxy := newProxy(t, strings.TrimPrefix(ing.URL, "http://"))
	pub := newPublisher(t, "http://"+proxy.Addr(), "k-full")
	direct := newPublisher(t, ing.URL, "k-full")
	ctx := context.Background()

	proxy.DropReplies(1)
	res, err := pub.Publish(ctx, "orders", pubpkg.Message{Data: map[string]int{"order": 42}})
	if err != nil {
		t.Fatal(err)
	}
	if proxy.Dropped() != 1 {
		t.Fatalf("%d replies dropped, want 1: the test proves nothing", proxy.Dropped())
	}
	got := history(t, direct, "orders")
	if len(got) != 1 {
		t.Fatalf("history holds %d messages, want 1: %+v", len(got), got)
	}
	if got[0].ID != res.ID || !res.Replayed {
		t.Fatalf("history has %s, the publisher got %+v (want the same id, replayed)", got[0].ID, res)
	}

	// A batch over two channels, the same way, on a new connection (the
	// proxy drops the reply of a connection's first request).
	pub.CloseIdleConnections()
	proxy.DropReplies(1)
	batch, err := pub.PublishBatch(ctx, []pubpkg.Item{
		{Channel: "orders", Message: pubpkg.Message{Data: 43}},
		{Channel: "invoices", Message: pubpkg.Message{Data: 1}},
		{Channel: "orders", Message: pubpkg.Message{Data: 44}},
	})
	if err != nil {
		t.Fatal(err)
	}
	if proxy.Dropped() != 2 {
		t.Fatalf("%d replies dropped, want 2", proxy.Dropped())
	}
	orders, invoices := history(t, direct, "orders"), history(t, direct, "invoices")
	if len(orders) != 3 || orders[1].ID != batch[0].ID || orders[2].ID != batch[2].ID ||
		len(invoices) != 1 || invoices[0].ID != batch[1].ID {
		t.Fatalf("after the batch: orders %+v, invoices %+v; the publisher got %+v", orders, invoices, batch)
	}
}

// TestPublisherSendToUserAcrossLostReply: a send to a user whose reply
// is lost is retried with its Idempotency-Key, and the retry's replay
// says so (SendToUserResult's Replayed, which SendToUser's count alone
// cannot tell): the user's connection gets the message once, and a
// caller repeating the send with its own key learns that it made none.
func TestPublisherSendToUserAcrossLostReply(t *testing.T) {
	leaks := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, leaks) })
	redisURL, prefix := redistest.URL(t), redistest.Prefix(t)
	ing := startIngressWithKeys(t, redisURL, prefix)
	eg := start(t, "egress", env{
		"REDIS_URL":        redisURL,
		"REDIS_KEY_PREFIX": prefix,
		"ALLOW_ANONYMOUS":  "true",
	})
	proxy := newProxy(t, strings.TrimPrefix(ing.URL, "http://"))
	pub := newPublisher(t, "http://"+proxy.Addr(), "k-admin")
	direct := newPublisher(t, ing.URL, "k-admin")
	ctx := context.Background()

	ws := dial(t, eg.wsURL("user=ada"))
	testkit.Eventually(t, 10*time.Second, func() error { // until the egress has registered it
		if n, err := direct.SendToUser(ctx, "ada", pubpkg.Message{Data: "warm-up"}); err != nil || n != 1 {
			return fmt.Errorf("send to ada: %d connections, %v", n, err)
		}
		return nil
	})

	proxy.DropReplies(1)
	res, err := pub.SendToUserResult(ctx, "ada", pubpkg.Message{Data: "once"}, pubpkg.WithIdempotencyKey("notice-7"))
	if err != nil {
		t.Fatal(err)
	}
	if proxy.Dropped() != 1 {
		t.Fatalf("%d replies dropped, want 1: the test proves nothing", proxy.Dropped())
	}
	if want := (pubpkg.UserResult{User: "ada", Connections: 1, Replayed: true}); res != want {
		t.Fatalf("after a lost reply: %+v, want %+v", res, want)
	}
	// The same call again, as another process would make it: a replay,
	// nothing sent.
	again, err := direct.SendToUserResult(ctx, "ada", pubpkg.Message{Data: "once"}, pubpkg.WithIdempotencyKey("notice-7"))
	if err != nil || !again.Replayed || again.Connections != 1 {
		t.Fatalf("repeated with its key: %+v, %v, want a replay", again, err)
	}
	fresh, err := direct.SendToUserResult(ctx, "ada", pubpkg.Message{Data: "last"})
	if err != nil || fresh.Replayed || fresh.Connections != 1 || fresh.User != "ada" {
		t.Fatalf("a new send: %+v, %v, want one connection, not replayed", fresh, err)
	}
	ws.waitFrame(func(f frame) bool { return f.Target == "user" && string(f.Data) == `"last"` })
	n := 0
	for _, f := range ws.messages("") {
		if f.Target == "user" && string(f.Data) == `"once"` {
			n++
		}
	}
	if n != 1 {
		t.Fatalf("the connection got the send %d times, want once", n)
	}
}

// TestPublisherIngressErrors: the ingress's refusals come back as
// *pubpkg.Error with its code, after one attempt.
func TestPublisherIngressErrors(t *testing.T) {
	leaks := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, leaks) })
	ing := startIngressWithKeys(t, redistest.URL(t), redistest.Prefix(t))
	ctx := context.Background()
	full := newPublisher(t, ing.URL, "k-full")
	chat := newPublisher(t, ing.URL, "k-chat")
	stranger := newPublisher(t, ing.URL, "k-nobody")

	check := func(what string, err error, status int, code string, index *int) {
		t.Helper()
		var e *pubpkg.Error
		if !errors.As(err, &e) {
			t.Fatalf("%s: error %v, want *pubpkg.Error", what, err)
		}
		if e.Status != status || e.Code != code || e.Message == "" || (index == nil) != (e.Index == nil) || index != nil && *index != *e.Index {
			t.Fatalf("%s: %+v, want %d %s", what, e, status, code)
		}
		if strings.Contains(err.Error(), "attempts") {
			t.Fatalf("%s: retried: %v", what, err)
		}
		if errors.Is(err, pubpkg.ErrOutcomeUnknown) {
			t.Fatalf("%s: a refusal, which wrote nothing, said to be of unknown outcome: %v", what, err)
		}
	}

	if _, err := chat.Publish(ctx, "chat:1", pubpkg.Message{Data: 1}); err != nil {
		t.Fatal(err)
	}
	_, err := chat.Publish(ctx, "news", pubpkg.Message{Data: 1})
	check("scoped key outside its scope", err, 403, "forbidden", nil)
	one := 1
	_, err = chat.PublishBatch(ctx, []pubpkg.Item{{Channel: "chat:1", Message: pubpkg.Message{Data: 1}}, {Channel: "news", Message: pubpkg.Message{Data: 2}}})
	check("batch item outside the scope", err, 403, "forbidden", &one)
	_, err = chat.SendToUser(ctx, "ada", pubpkg.Message{Data: 1})
	check("scoped key on an admin route", err, 403, "forbidden", nil)
	_, err = stranger.Publish(ctx, "chat:1", pubpkg.Message{Data: 1})
	check("unknown key", err, 401, "unauthorized", nil)
	err = full.Disconnect(ctx, "no-such-connection")
	check("disconnect of no connection", err, 404, "connection_not_found", nil)

	// Data nested deeper than the ingress takes is refused before any
	// request, at the ingress's bound: 64 levels pass, and 65 are its 400.
	nest := func(n int) json.RawMessage { return json.RawMessage(strings.Repeat("[", n) + strings.Repeat("]", n)) }
	if _, err := full.Publish(ctx, "deep", pubpkg.Message{Data: nest(pubpkg.MaxDataDepth)}); err != nil {
		t.Fatalf("data %d deep: %v", pubpkg.MaxDataDepth, err)
	}
	if _, err := full.Publish(ctx, "deep", pubpkg.Message{Data: nest(pubpkg.MaxDataDepth + 1)}); !errors.Is(err, pubpkg.ErrInvalid) {
		t.Fatalf("data %d deep: %v, want ErrInvalid", pubpkg.MaxDataDepth+1, err)
	}
	req, _ := http.NewRequest(http.MethodPost, ing.URL+"/v1/channels/deep/messages",
		strings.NewReader(`{"data":`+string(nest(pubpkg.MaxDataDepth+1))+`}`))
	req.Header.Set("Authorization", "Bearer k-full")
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var body struct {
		Error struct{ Code string } `json:"error"`
	}
	_ = json.NewDecoder(resp.Body).Decode(&body)
	resp.Body.Close()
	http.DefaultClient.CloseIdleConnections()
	if resp.StatusCode != 400 || body.Error.Code != "invalid_json" {
		t.Fatalf("data %d deep sent to the ingress: %d %s, want 400 invalid_json", pubpkg.MaxDataDepth+1, resp.StatusCode, body.Error.Code)
	}

	// The same key with the same body is the same publish; with another
	// body, a mistake.
	a, err := full.Publish(ctx, "chat:2", pubpkg.Message{Data: "a"}, pubpkg.WithIdempotencyKey("order-7"))
	if err != nil {
		t.Fatal(err)
	}
	again, err := full.Publish(ctx, "chat:2", pubpkg.Message{Data: "a"}, pubpkg.WithIdempotencyKey("order-7"))
	if err != nil || again.ID != a.ID || !again.Replayed {
		t.Fatalf("same key, same body: %+v, %v; first %+v", again, err, a)
	}
	_, err = full.Publish(ctx, "chat:2", pubpkg.Message{Data: "b"}, pubpkg.WithIdempotencyKey("order-7"))
	check("same key, other body", err, 422, "idempotency_key_reused", nil)
	if got := history(t, full, "chat:2"); len(got) != 1 {
		t.Fatalf("history holds %d messages, want 1", len(got))
	}
}

// TestPublisherRidesOutRedisOutage: Redis goes away for a second under a
// publish. The ingress answers 503 meanwhile; the publisher retries, with
// its key, until Redis is back, and the message is written once.
func TestPublisherRidesOutRedisOutage(t *testing.T) {
	leaks := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, leaks) })
	srv := redistest.Start(t)
	ing := startIngressWithKeys(t, srv.URL(), redistest.Prefix(t))
	// The statuses of the publisher's attempts, seen on the wire.
	var (
		mu       sync.Mutex
		statuses []int
	)
	tr := &http.Transport{}
	t.Cleanup(tr.CloseIdleConnections)
	hc := &http.Client{Timeout: 5 * time.Second, Transport: roundTripper(func(r *http.Request) (*http.Response, error) {
		resp, err := tr.RoundTrip(r)
		if err == nil && r.Method == http.MethodPost {
			mu.Lock()
			statuses = append(statuses, resp.StatusCode)
			mu.Unlock()
		}
		return resp, err
	})}
	pub, err := pubpkg.New(pubpkg.Options{URL: ing.URL, Token: "k-full", HTTPClient: hc, MaxAttempts: 50, MinBackoff: 50 * time.Millisecond, MaxBackoff: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	srv.Stop()
	type outcome struct {
		res pubpkg.Result
		err error
	}
	done := make(chan outcome, 1)
	go func() {
		res, err := pub.Publish(ctx, "outage", pubpkg.Message{Data: "through the outage"})
		done <- outcome{res, err}
	}()
	// Redis comes back only once attempts have met the 503: after a fixed
	// second, a goroutine not yet run by then (a loaded machine) made its
	// first attempt against Redis up again, was answered 202 at once, and
	// the test failed for want of a 503 it had never let happen.
	testkit.Eventually(t, 10*time.Second, func() error {
		mu.Lock()
		defer mu.Unlock()
		if len(statuses) < 2 {
			return fmt.Errorf("%d attempts answered so far: %v", len(statuses), statuses)
		}
		return nil
	})
	select {
	case o := <-done:
		t.Fatalf("published while Redis was down: %+v, %v", o.res, o.err)
	default:
	}
	srv.Restart(t)
	o := <-done
	if o.err != nil {
		t.Fatalf("publish across the outage: %v", o.err)
	}
	got := history(t, pub, "outage")
	if len(got) != 1 || got[0].ID != o.res.ID || string(got[0].Data) != `"through the outage"` {
		t.Fatalf("history %+v, want the one message %s", got, o.res.ID)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(statuses) < 2 || statuses[0] != http.StatusServiceUnavailable || statuses[len(statuses)-1] != http.StatusAccepted {
		t.Fatalf("attempts answered %v, want 503s then one 202", statuses)
	}
}

type roundTripper func(*http.Request) (*http.Response, error)

func (f roundTripper) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// TestPublisherReadsLargeMessages: an ingress whose MAX_MESSAGE_BYTES is
// raised past the publisher's 8 MiB reply bound (it may be up to 64 MiB)
// serves a history page of one such message, since a page always holds
// at least one message whatever its size; History and HistoryBefore read
// it, rather than refusing the page as too large, which would leave the
// channel's history unreadable from that message on.
func TestPublisherReadsLargeMessages(t *testing.T) {
	redisURL, prefix := redistest.URL(t), redistest.Prefix(t)
	ing := start(t, "ingress", env{
		"REDIS_URL":         redisURL,
		"REDIS_KEY_PREFIX":  prefix,
		"API_KEYS":          publisherKeys,
		"MAX_MESSAGE_BYTES": "16777216",
		"MAX_BATCH_BYTES":   "16777216",
	})
	pub := newPublisher(t, ing.URL, "k-full")
	ctx := context.Background()
	big := strings.Repeat("x", 9<<20)
	res, err := pub.Publish(ctx, "big", pubpkg.Message{Data: big})
	if err != nil {
		t.Fatal(err)
	}
	after, err := pub.Publish(ctx, "big", pubpkg.Message{Data: 1})
	if err != nil {
		t.Fatal(err)
	}
	all := history(t, pub, "big")
	if len(all) != 2 || all[0].ID != res.ID || len(all[0].Data) != len(big)+2 || all[1].ID != after.ID {
		t.Fatalf("history: %d messages", len(all))
	}
	back, err := pub.HistoryBefore(ctx, "big", after.ID, 0)
	if err != nil {
		t.Fatalf("HistoryBefore: %v", err)
	}
	if len(back.Messages) != 1 || back.Messages[0].ID != res.ID {
		t.Fatalf("HistoryBefore: %d messages", len(back.Messages))
	}
}
