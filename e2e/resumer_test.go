package e2e

import (
	"encoding/json"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/wsrelay/wsrelay/shared/stream"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// resumingClient reconnects after every close, round-robin over urls, and
// resubscribes its channels with "after" = the last id it received: the
// behaviour the client libraries implement, kept minimal here so the test
// checks the server, not a library.
type resumingClient struct {
	t        testing.TB
	urls     []string
	channels []string

	mu        sync.Mutex
	last      map[string]string
	got       map[string][]string
	closes    []int
	recovered []bool
	stop      chan struct{}
	done      chan struct{}
}

func newResumingClient(t testing.TB, urls []string, channels ...string) *resumingClient {
	return newResumingClientFrom(t, urls, nil, channels...)
}

// newResumingClientFrom starts with positions already known (channel →
// last id read), as a client resuming after an earlier session does. They
// are set before the first session starts, so its first subscribe carries
// them.
func newResumingClientFrom(t testing.TB, urls []string, from map[string]string, channels ...string) *resumingClient {
	last := map[string]string{}
	for ch, id := range from {
		if id != "" {
			last[ch] = id
		}
	}
	r := &resumingClient{t: t, urls: urls, channels: channels, last: last, got: map[string][]string{}, stop: make(chan struct{}), done: make(chan struct{})}
	go r.loop()
	t.Cleanup(r.Close)
	return r
}

func (r *resumingClient) Close() {
	select {
	case <-r.stop:
	default:
		close(r.stop)
	}
	<-r.done
}

func (r *resumingClient) loop() {
	defer close(r.done)
	for i := 0; ; i++ {
		select {
		case <-r.stop:
			return
		default:
		}
		r.session(r.urls[i%len(r.urls)])
		select {
		case <-r.stop:
			return
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func (r *resumingClient) session(url string) {
	ws, _, err := websocket.DefaultDialer.Dial(url, nil)
	if err != nil {
		return
	}
	defer ws.Close()
	go func() {
		select {
		case <-r.stop:
			ws.Close()
		case <-r.done:
		}
	}()
	r.mu.Lock()
	for _, ch := range r.channels {
		req := map[string]any{"type": "subscribe", "channel": ch}
		if id, ok := r.last[ch]; ok {
			req["after"] = id
		}
		b, _ := json.Marshal(req)
		_ = ws.WriteMessage(websocket.TextMessage, b)
	}
	r.mu.Unlock()
	for {
		_, b, err := ws.ReadMessage()
		if err != nil {
			code := 1006
			if ce, ok := err.(*websocket.CloseError); ok {
				code = ce.Code
			}
			r.mu.Lock()
			r.closes = append(r.closes, code)
			r.mu.Unlock()
			return
		}
		var f frame
		if json.Unmarshal(b, &f) != nil {
			continue
		}
		r.mu.Lock()
		switch f.Type {
		case "message":
			r.got[f.Channel] = append(r.got[f.Channel], f.ID)
			r.last[f.Channel] = f.ID
		case "subscribed":
			if f.Recovered != nil {
				r.recovered = append(r.recovered, *f.Recovered)
			}
		}
		r.mu.Unlock()
	}
}

// ids returns the ids received on channel, in order.
func (r *resumingClient) ids(ch string) []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.got[ch]...)
}

func (r *resumingClient) closeCodes() []int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]int(nil), r.closes...)
}

// waitFrom is waitAll for a client that first subscribed live while the
// publisher ran: it is owed everything from its first message on.
func (r *resumingClient) waitFrom(ch string, all []string) {
	r.t.Helper()
	testkit.Eventually(r.t, 10*time.Second, func() error {
		if len(r.ids(ch)) == 0 {
			return fmt.Errorf("nothing received on %s", ch)
		}
		return nil
	})
	first := r.ids(ch)[0]
	i := slices.Index(all, first)
	if i < 0 {
		r.t.Fatalf("%s: first id %s was never published", ch, first)
	}
	r.waitAll(ch, all[i:])
}

// waitAcked is for publishers that see failures: a publish answered 503
// may still have been written (its reply was lost), so the client may get
// messages that were never acknowledged. It checks that every acknowledged
// id from the client's first message on arrives, that nothing arrives
// twice, and that ids arrive in stream order.
func (r *resumingClient) waitAcked(ch string, acked []string) {
	r.t.Helper()
	ackedSet := map[string]bool{}
	for _, id := range acked {
		ackedSet[id] = true
	}
	var owed []string
	testkit.Eventually(r.t, 20*time.Second, func() error {
		got := r.ids(ch)
		if len(got) == 0 {
			return fmt.Errorf("nothing received on %s", ch)
		}
		first := stream.MustParseID(got[0])
		owed = owed[:0]
		for _, id := range acked {
			if !stream.MustParseID(id).Less(first) {
				owed = append(owed, id)
			}
		}
		have := map[string]bool{}
		for _, id := range got {
			have[id] = true
		}
		for _, id := range owed {
			if !have[id] {
				return fmt.Errorf("acknowledged %s not received (%d received)", id, len(got))
			}
		}
		return nil
	})
	time.Sleep(100 * time.Millisecond)
	got := r.ids(ch)
	extra := 0
	for i, id := range got {
		if i > 0 && !stream.MustParseID(got[i-1]).Less(stream.MustParseID(id)) {
			r.t.Fatalf("%s: %s after %s: duplicate or out of order", ch, id, got[i-1])
		}
		if !ackedSet[id] {
			extra++
		}
	}
	r.t.Logf("%s: %d acknowledged owed, all received once in order; %d more received whose publish was answered with an error (written, reply lost)", ch, len(owed), extra)
}

// waitAll waits until the client has received len(want) messages on ch,
// then checks them against want: the same ids, in order, none twice.
// It waits up to a minute: TestSlowConsumer's resume replays 28 MB
// (1.7 s on an idle machine, 16.8 s of the 20 it had beside 20 busy
// loops).
func (r *resumingClient) waitAll(ch string, want []string) {
	r.t.Helper()
	testkit.Eventually(r.t, time.Minute, func() error {
		if n := len(r.ids(ch)); n < len(want) {
			return fmt.Errorf("%d of %d messages on %s", n, len(want), ch)
		}
		return nil
	})
	time.Sleep(100 * time.Millisecond)
	got := r.ids(ch)
	lost, dup := compare(got, want)
	if lost != 0 || dup != 0 || len(got) != len(want) {
		r.t.Fatalf("%s: received %d, published %d, lost %d, duplicated %d: %s", ch, len(got), len(want), lost, dup, diff(got, want))
	}
	for i := range want {
		if got[i] != want[i] {
			r.t.Fatalf("%s: message %d is %s, want %s (out of order)", ch, i, got[i], want[i])
		}
	}
}

// compare counts ids of want missing from got and ids received twice.
func compare(got, want []string) (lost, dup int) {
	seen := map[string]int{}
	for _, id := range got {
		seen[id]++
		if seen[id] == 2 {
			dup++
			fmt.Println("duplicate id", id)
		}
	}
	for _, id := range want {
		if seen[id] == 0 {
			lost++
		}
	}
	return lost, dup
}

// publisher publishes to ch through the ingress URLs until stopped,
// retrying what failed; it keeps the ids that were acknowledged.
type publisher struct {
	t     testing.TB
	urls  []string
	ch    string
	mu    sync.Mutex
	ids   []string
	fails int
	stop  chan struct{}
	done  chan struct{}
}

func startPublisher(t testing.TB, urls []string, ch string, every time.Duration) *publisher {
	p := &publisher{t: t, urls: urls, ch: ch, stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(p.done)
		for i := 0; ; i++ {
			select {
			case <-p.stop:
				return
			case <-time.After(every):
			}
			var res struct{ ID string }
			st := postQuiet(p.urls[i%len(p.urls)]+"/v1/channels/"+ch+"/messages", map[string]any{"data": i}, &res)
			p.mu.Lock()
			if st == 202 {
				p.ids = append(p.ids, res.ID)
			} else {
				p.fails++
			}
			p.mu.Unlock()
		}
	}()
	t.Cleanup(func() { p.Stop() })
	return p
}

// Stop stops publishing and returns the acknowledged ids.
func (p *publisher) Stop() []string {
	select {
	case <-p.stop:
	default:
		close(p.stop)
	}
	<-p.done
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.ids...)
}

func (p *publisher) count() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.ids)
}
