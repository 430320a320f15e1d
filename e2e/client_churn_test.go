package e2e

import (
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/wsrelay/wsrelay/shared/client"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// TestGoClientChurnAcrossServerCloses: the Go client against the real
// functions, with the egress cutting every connection after a second
// (MAX_LIFETIME), while the application unsubscribes and subscribes its
// channels again all the time, each new subscription after the last id of
// the one before (Handler.After = LastID()): from other goroutines, at
// random moments (in the middle of reconnects, around welcomes, with the
// previous subscribe still unanswered), and from inside OnMessage. Across
// each channel's chain of subscriptions every message published arrives
// exactly once, in order; every resume is recovered; the server refuses
// nothing; and Close leaves no goroutine behind.
func TestGoClientChurnAcrossServerCloses(t *testing.T) {
	leaks := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, leaks) })
	e := env{
		"REDIS_URL":        redistest.URL(t),
		"REDIS_KEY_PREFIX": redistest.Prefix(t),
		"ALLOW_ANONYMOUS":  "true",
		"MAX_LIFETIME":     "1s",
	}
	ing := start(t, "ingress", e)
	eg := start(t, "egress", e)
	pub := newClientPublisher(t, ing.URL)

	var (
		mu       sync.Mutex
		connects int
		problems []string
	)
	problem := func(f string, a ...any) {
		mu.Lock()
		problems = append(problems, fmt.Sprintf(f, a...))
		mu.Unlock()
	}
	c, err := client.Dial(client.Options{
		URL:        "ws" + strings.TrimPrefix(eg.URL, "http") + "/ws",
		User:       "churner",
		MinBackoff: 10 * time.Millisecond,
		MaxBackoff: 100 * time.Millisecond,
		OnWelcome:  func(client.Welcome) { mu.Lock(); connects++; mu.Unlock() },
		OnError:    func(e *client.ServerError) { problem("client error %v", e) },
	})
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	defer func() {
		if !closed {
			c.Close()
		}
	}()

	// One chain of subscriptions per channel. cur is its current
	// subscription, got what its subscriptions delivered, in order.
	type chain struct {
		name  string
		inner bool // churned from inside OnMessage
		cur   *client.Subscription
		links int
		got   []string
		live  bool
	}
	const (
		fromOutside = 3 // churned by a goroutine each
		fromHandler = 3 // churned from inside OnMessage
		steady      = 1 // subscribed once
	)
	var chains []*chain
	var subscribe func(ch *chain, after string)
	// handler is the Handler of the next link of ch; it runs on the
	// client's goroutine.
	handler := func(ch *chain, after string) client.Handler {
		var h client.Handler
		h.After = after
		h.OnSubscribed = func(recovered bool) {
			if !recovered {
				problem("%s: recovered=false", ch.name)
			}
			mu.Lock()
			ch.live = true
			mu.Unlock()
		}
		h.OnError = func(e *client.ServerError) { problem("%s: %v", ch.name, e) }
		h.OnMessage = func(m client.Message) {
			mu.Lock()
			ch.got = append(ch.got, m.ID)
			again := ch.inner && len(ch.got)%4 == 0
			mu.Unlock()
			if again {
				// From inside the handler: end this subscription and
				// go on after the message just handled.
				mu.Lock()
				s := ch.cur
				mu.Unlock()
				s.Unsubscribe()
				subscribe(ch, s.LastID())
			}
		}
		return h
	}
	subscribe = func(ch *chain, after string) {
		s, err := c.Subscribe(ch.name, handler(ch, after))
		if err != nil {
			problem("%s: Subscribe: %v", ch.name, err)
			return
		}
		mu.Lock()
		ch.cur = s
		ch.links++
		mu.Unlock()
	}
	for i := range fromOutside + fromHandler + steady {
		chains = append(chains, &chain{name: fmt.Sprintf("churn%d", i), inner: i >= fromOutside && i < fromOutside+fromHandler})
	}
	for _, ch := range chains {
		subscribe(ch, "")
	}
	testkit.Eventually(t, 10*time.Second, func() error {
		mu.Lock()
		defer mu.Unlock()
		for _, ch := range chains {
			if !ch.live {
				return fmt.Errorf("%s not live yet", ch.name)
			}
		}
		return nil
	})

	stop := make(chan struct{})
	var wg sync.WaitGroup
	for _, ch := range chains[:fromOutside] {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				case <-time.After(rand.N(150 * time.Millisecond)):
				}
				mu.Lock()
				s := ch.cur
				mu.Unlock()
				s.Unsubscribe()
				subscribe(ch, s.LastID())
			}
		})
	}

	want := map[string][]string{}
	deadline := time.Now().Add(6 * time.Second)
	for i := 0; time.Now().Before(deadline); i++ {
		ch := chains[i%len(chains)].name
		id, err := pub.publish(ch, i)
		if err != nil {
			t.Fatal(err)
		}
		want[ch] = append(want[ch], id)
		time.Sleep(5 * time.Millisecond)
	}
	close(stop)
	wg.Wait()

	testkit.Eventually(t, 15*time.Second, func() error {
		mu.Lock()
		defer mu.Unlock()
		for _, ch := range chains {
			if len(ch.got) < len(want[ch.name]) {
				return fmt.Errorf("%s: %d of %d messages", ch.name, len(ch.got), len(want[ch.name]))
			}
		}
		return nil
	})
	// Late duplicates would come in right after the last message.
	time.Sleep(200 * time.Millisecond)
	mu.Lock()
	for _, ch := range chains {
		if g, w := strings.Join(ch.got, " "), strings.Join(want[ch.name], " "); g != w {
			t.Errorf("%s over %d subscriptions:\n got %s\nwant %s", ch.name, ch.links, g, w)
		}
	}
	if len(problems) > 0 {
		t.Errorf("problems: %v", problems)
	}
	n := connects
	var links []int
	for _, ch := range chains {
		links = append(links, ch.links)
	}
	mu.Unlock()
	if n < 3 {
		t.Errorf("%d connections: the lifetime closes should have forced more", n)
	}
	t.Logf("%d connections; subscriptions per channel %v", n, links)
	closed = true
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
}
