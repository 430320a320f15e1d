package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/wsrelay/wsrelay/shared/client"
	"github.com/wsrelay/wsrelay/shared/stream"
	"github.com/wsrelay/wsrelay/shared/testkit/delivery"
)

// wsUser is one WebSocket client (shared/client, which resumes its
// subscriptions after the last id it got) and what it saw.
type wsUser struct {
	user   string
	c      *client.Client
	chains []*delivery.Chain // its subscriptions, one chain each

	mu       sync.Mutex
	welcomes []client.Welcome
	targeted []client.Message
	closes   []int    // close codes of the connections the server ended
	errs     []string // error frames
}

func dialUser(user, url string) (*wsUser, error) {
	w := &wsUser{user: user}
	c, err := client.Dial(client.Options{
		URL:        url,
		Token:      token(user),
		MinBackoff: 50 * time.Millisecond,
		MaxBackoff: 500 * time.Millisecond,
		OnWelcome: func(wl client.Welcome) {
			w.mu.Lock()
			w.welcomes = append(w.welcomes, wl)
			w.mu.Unlock()
		},
		OnMessage: func(m client.Message) {
			w.mu.Lock()
			w.targeted = append(w.targeted, m)
			w.mu.Unlock()
		},
		OnState: func(_ client.State, err error) {
			if code := closeCode(err); code != 0 {
				w.mu.Lock()
				w.closes = append(w.closes, code)
				w.mu.Unlock()
			}
		},
		OnError: func(e *client.ServerError) {
			w.mu.Lock()
			w.errs = append(w.errs, e.Error())
			w.mu.Unlock()
		},
	})
	if err != nil {
		return nil, err
	}
	w.c = c
	return w, nil
}

// closeCode is the close code of the connection err ended, 1006 for one
// lost without a close, 0 for none.
func closeCode(err error) int {
	var ce *client.CloseError
	var de *client.DisconnectError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &ce):
		return ce.Code
	case errors.As(err, &de):
		return de.Code
	case strings.HasPrefix(err.Error(), "client: connection lost"):
		return 1006
	}
	return 0
}

// subscribe subscribes to ch at its live end: a new chain.
func (w *wsUser) subscribe(ch string) error {
	cn := delivery.NewChain(ch, nil)
	if _, err := cn.Subscribe(w.c, ""); err != nil {
		return fmt.Errorf("%s: subscribe %s: %w", w.user, ch, err)
	}
	w.chains = append(w.chains, cn)
	return nil
}

// conn is the current connection's id, "" before the first welcome.
func (w *wsUser) conn() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.welcomes) == 0 {
		return ""
	}
	return w.welcomes[len(w.welcomes)-1].ConnectionID
}

// instances are the instances of its connections so far, in order.
func (w *wsUser) instances() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []string
	for _, wl := range w.welcomes {
		out = append(out, wl.Instance)
	}
	return out
}

// ready says why the clients are not all welcomed and subscribed yet,
// or "".
func ready(ws []*wsUser) string {
	for _, w := range ws {
		if w.conn() == "" {
			return w.user + " not welcomed"
		}
		for _, cn := range w.chains {
			if !cn.Subscribed() {
				return w.user + " not subscribed to " + cn.Channel()
			}
		}
	}
	return ""
}

// owed names the first chain still owed a message, or "".
func owed(ws []*wsUser, logs map[string]*delivery.Log) string {
	for _, w := range ws {
		for _, cn := range w.chains {
			if p, _ := cn.Check(logs[cn.Channel()], false); len(p) > 0 {
				return w.user + " on " + cn.Channel() + ": " + p[0]
			}
		}
	}
	return ""
}

// checkChains adds each chain's breaches of the delivery contract to r,
// and each resume told recovered:false: nothing is trimmed here, so
// every resume must be recovered.
func checkChains(r *result, ws []*wsUser, logs map[string]*delivery.Log) {
	for _, w := range ws {
		for _, cn := range w.chains {
			problems, gaps := cn.Check(logs[cn.Channel()], true)
			for _, p := range problems {
				r.bad("%s on %s: %s", w.user, cn.Channel(), p)
			}
			for _, g := range gaps {
				r.bad("%s on %s: resumed with %s", w.user, cn.Channel(), g)
			}
		}
		w.mu.Lock()
		for _, e := range w.errs {
			r.bad("%s: error frame %s", w.user, e)
		}
		w.mu.Unlock()
	}
}

// sent is one targeted message as it should arrive: its n, and whether
// it was sent to the user or to the connection.
type sent struct {
	n      int
	target string // "user" or "connection"
}

// checkTargeted compares the targeted messages each client got with
// want: each once, none to a client it was not sent to.
func checkTargeted(r *result, ws []*wsUser, want map[*wsUser][]sent) {
	for _, w := range ws {
		exp := map[sent]int{}
		for _, s := range want[w] {
			exp[s]++
		}
		got := map[sent]int{}
		w.mu.Lock()
		for _, m := range w.targeted {
			var d struct{ N *int }
			if json.Unmarshal(m.Data, &d) != nil || d.N == nil {
				r.bad("%s: targeted message %s with data %s", w.user, m.ID, m.Data)
				continue
			}
			if _, ok := stream.ParseID(m.ID); !ok {
				r.bad("%s: targeted message n=%d with id %q, not a stream id", w.user, *d.N, m.ID)
			}
			got[sent{*d.N, m.Target}]++
		}
		w.mu.Unlock()
		var bad []string
		for _, s := range slices.SortedFunc(maps.Keys(exp), bySent) {
			if got[s] != exp[s] {
				bad = append(bad, fmt.Sprintf("n=%d to the %s: %d times, want %d", s.n, s.target, got[s], exp[s]))
			}
		}
		for _, s := range slices.SortedFunc(maps.Keys(got), bySent) {
			if exp[s] == 0 {
				bad = append(bad, fmt.Sprintf("n=%d to the %s: got %d, sent to others (misrouted)", s.n, s.target, got[s]))
			}
		}
		if len(bad) > 0 {
			r.bad("%s: targeted messages: %s", w.user, strings.Join(bad, "; "))
		}
	}
}

func bySent(a, b sent) int {
	if a.n != b.n {
		return a.n - b.n
	}
	return strings.Compare(a.target, b.target)
}

func targetedGot(ws []*wsUser, want map[*wsUser][]sent) string {
	for _, w := range ws {
		w.mu.Lock()
		n := len(w.targeted)
		w.mu.Unlock()
		if n < len(want[w]) {
			return fmt.Sprintf("%s got %d of %d targeted messages", w.user, n, len(want[w]))
		}
	}
	return ""
}

func closeAll(ws []*wsUser) {
	for _, w := range ws {
		if w != nil && w.c != nil {
			_ = w.c.Close()
		}
	}
}
