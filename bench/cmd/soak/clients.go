package main

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/wsrelay/wsrelay/shared/client"
	"github.com/wsrelay/wsrelay/shared/testkit/delivery"
)

// soakClient is one user's WebSocket client. Its loop (one goroutine)
// owns c and chains; mu guards them for the end and for connID.
type soakClient struct {
	s    *soak
	id   int
	user string

	mu     sync.Mutex
	c      *client.Client
	conn   string                     // the current connection's id (its welcome)
	chains map[string]*delivery.Chain // the open ones, by channel
}

// arrive starts a new client, subscribed to two channels, with a loop of
// its own actions until ctx ends.
func (s *soak) arrive(ctx context.Context) {
	s.mu.Lock()
	id := s.nextID
	s.nextID++
	s.mu.Unlock()
	sc := &soakClient{s: s, id: id, user: "u" + strconv.Itoa(id), chains: map[string]*delivery.Chain{}}
	sc.dial()
	for range 2 {
		sc.subscribeNew()
	}
	s.mu.Lock()
	s.live[id] = sc
	s.mu.Unlock()
	s.clients.Go(func() { sc.loop(ctx) })
}

func (sc *soakClient) dial() {
	s := sc.s
	// The client's handlers all run on its goroutine, one at a time:
	// cur, the connection they are about, needs no lock.
	var cur string
	c, err := client.Dial(client.Options{
		URL:        "ws://" + s.lb.Addr() + "/ws",
		GetToken:   func(context.Context) (string, error) { return token(sc.user), nil },
		MinBackoff: 100 * time.Millisecond,
		MaxBackoff: 2 * time.Second,
		OnWelcome: func(w client.Welcome) {
			s.connects.Add(1)
			cur = w.ConnectionID
			s.targets.welcome(time.Now(), sc.user, cur)
			sc.mu.Lock()
			sc.conn = cur
			sc.mu.Unlock()
		},
		OnState: func(st client.State, err error) {
			if cur == "" || (st != client.StateDisconnected && st != client.StateClosed) {
				return
			}
			s.targets.end(time.Now(), cur, endWhy(st, err))
			cur = ""
		},
		OnMessage: func(m client.Message) {
			s.targetedGot.Add(1)
			s.targets.gotMessage(time.Now(), sc.user, cur, m)
		},
	})
	if err != nil {
		panic("soak: client options refused: " + err.Error()) // a bug of the soak
	}
	sc.mu.Lock()
	sc.c = c
	sc.mu.Unlock()
}

func (sc *soakClient) connID() string {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	return sc.conn
}

// subscribeNew subscribes to a channel the client does not hold yet: a
// new chain.
func (sc *soakClient) subscribeNew() {
	s := sc.s
	var free []string
	for _, ch := range s.channels {
		if sc.chains[ch] == nil {
			free = append(free, ch)
		}
	}
	if len(free) == 0 {
		return
	}
	ch := free[s.intN(len(free))]
	cn := delivery.NewChain(ch, &s.delivered)
	if _, err := cn.Subscribe(sc.c, ""); err != nil {
		s.noteErr("subscribe", err)
		return
	}
	sc.mu.Lock()
	sc.chains[ch] = cn
	sc.mu.Unlock()
	s.mu.Lock()
	s.chains = append(s.chains, cn)
	s.mu.Unlock()
	s.subscribes.Add(1)
}

func (sc *soakClient) loop(ctx context.Context) {
	s := sc.s
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(s.expDelay(s.cfg.churn)):
		}
		switch r := s.intN(100); {
		case r < 35 && len(sc.chains) < 4:
			sc.subscribeNew()
		case r < 60 && len(sc.chains) > 1:
			sc.unsubscribe()
		case r < 90:
			sc.resume()
		case r >= 90:
			sc.leave()
			s.arrive(ctx) // a new one in its place
			return
		}
	}
}

func (sc *soakClient) unsubscribe() {
	chs := slices.Sorted(maps.Keys(sc.chains))
	ch := chs[sc.s.intN(len(chs))]
	cn := sc.chains[ch]
	cn.Subscription().Unsubscribe()
	cn.Close()
	sc.mu.Lock()
	delete(sc.chains, ch)
	sc.mu.Unlock()
	sc.s.unsubscribes.Add(1)
}

// resume closes the client and dials a new one that resumes each
// subscription after the last id the old one delivered, as an
// application that stored its position does after a page reload.
func (sc *soakClient) resume() {
	s := sc.s
	sc.markClosing("close and resume")
	sc.c.Close() // no handler runs after it: the last ids are final
	sc.dial()
	renew := 0
	for _, ch := range slices.Sorted(maps.Keys(sc.chains)) {
		cn := sc.chains[ch]
		after := cn.Subscription().LastID()
		if after == "" {
			// Closed before the server's first answer: there is nothing
			// to resume from, so that chain ends and a new one starts.
			cn.Close()
			sc.mu.Lock()
			delete(sc.chains, ch)
			sc.mu.Unlock()
			renew++
			continue
		}
		if _, err := cn.Subscribe(sc.c, after); err != nil {
			s.noteErr("subscribe", err)
		}
	}
	for range renew {
		sc.subscribeNew()
	}
	s.resumes.Add(1)
}

// leave closes the client for good.
func (sc *soakClient) leave() {
	sc.markClosing("leave")
	sc.closeClient()
	sc.s.mu.Lock()
	delete(sc.s.live, sc.id)
	sc.s.mu.Unlock()
	sc.s.leaves.Add(1)
}

// closeClient closes the client and its chains, when it leaves: the
// messages after the last one it got are no longer owed.
func (sc *soakClient) closeClient() {
	sc.closeConn()
	sc.mu.Lock()
	defer sc.mu.Unlock()
	for _, cn := range sc.chains {
		cn.Close()
	}
}

// closeConn closes the client but not its chains: at the end, once they
// have caught up, everything acknowledged stays owed to them.
func (sc *soakClient) closeConn() {
	sc.mu.Lock()
	c := sc.c
	sc.mu.Unlock()
	c.Close()
}

// markClosing records that the soak is about to close the client's
// connection (why), for the targeted check: a send may miss a connection
// from then on.
func (sc *soakClient) markClosing(why string) {
	if conn := sc.connID(); conn != "" {
		sc.s.targets.closing(time.Now(), conn, why)
	}
}

// endWhy says why a connection ended, from the client's state change.
func endWhy(st client.State, err error) string {
	var de *client.DisconnectError
	var ce *client.CloseError
	switch {
	case errors.As(err, &de):
		return fmt.Sprintf("server close %d %s", de.Code, de.Reason)
	case errors.As(err, &ce):
		return fmt.Sprintf("server close %d %s, final", ce.Code, ce.Reason)
	case err != nil:
		return err.Error()
	case st == client.StateClosed:
		return "closed by the client"
	}
	return st.String()
}
