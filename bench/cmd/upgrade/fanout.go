package main

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/wsrelay/wsrelay/bench/harness"
	"github.com/wsrelay/wsrelay/shared/publisher"
	"github.com/wsrelay/wsrelay/shared/testkit/delivery"
)

// ack is one acknowledged publish.
type ack struct {
	seq int
	id  string
}

// traffic is one scenario's clients on one egress, the channels they
// subscribe to, and what was sent to them through one ingress. Channel
// i's messages carry seq 1000·i + n, so that one delivered on another
// channel is a seq that channel never had.
type traffic struct {
	chans []string
	logs  map[string]*delivery.Log
	acked map[string][]ack
	next  []int // per channel, its next n
	ws    []*wsUser
	// alice has two connections, bob and carol one each.
	alice      []*wsUser
	bob, carol *wsUser
	want       map[*wsUser][]sent // targeted messages each client is owed
	n          int                // targeted messages sent

	publishes, batches, batched int
}

// dialTraffic dials four clients of three users on egress, each
// subscribed to some of three channels upg-<tag>-<i>, and waits until they
// are welcomed and subscribed. The caller closes t.ws (closeAll), also
// when it reports false.
func dialTraffic(ctx context.Context, r *result, tag string, egress *harness.Proc) (*traffic, bool) {
	t := &traffic{logs: map[string]*delivery.Log{}, acked: map[string][]ack{}, want: map[*wsUser][]sent{}}
	for i := range 3 {
		ch := fmt.Sprintf("upg-%s-%d", tag, i)
		t.chans = append(t.chans, ch)
		t.logs[ch] = delivery.NewLog()
	}
	t.next = make([]int, len(t.chans))
	plan := []struct {
		user  string
		chans []int
	}{{"alice", []int{0, 1}}, {"alice", []int{1}}, {"bob", []int{0, 2}}, {"carol", []int{2}}}
	for _, p := range plan {
		w, err := dialUser(tag+"-"+p.user, wsURL(egress))
		if err != nil {
			r.bad("dial: %v", err)
			return t, false
		}
		t.ws = append(t.ws, w)
		for _, i := range p.chans {
			if err := w.subscribe(t.chans[i]); err != nil {
				r.bad("%v", err)
				return t, false
			}
		}
	}
	t.alice, t.bob, t.carol = t.ws[:2], t.ws[2], t.ws[3]
	if why := eventually(ctx, 10*time.Second, func() string { return ready(t.ws) }); why != "" {
		r.bad("clients not ready after 10 s: %s", why)
		return t, false
	}
	return t, true
}

func (t *traffic) seq(i int) int { t.next[i]++; return 1000*i + t.next[i] - 1 }

func (t *traffic) record(r *result, ch string, seq int, id string, err error) {
	if err == nil {
		err = t.logs[ch].Ack(seq, id)
	}
	if err != nil {
		t.logs[ch].Fail(seq, err)
		r.bad("publish seq %d to %s: %v", seq, ch, err)
		return
	}
	t.acked[ch] = append(t.acked[ch], ack{seq, id})
}

// publish sends, rounds times, one publish to each channel and one batch
// of two messages to each.
func (t *traffic) publish(ctx context.Context, r *result, pub *publisher.Client, rounds int) {
	for range rounds {
		for i, ch := range t.chans {
			s := t.seq(i)
			res, err := pub.Publish(ctx, ch, publisher.Message{Data: map[string]int{"seq": s}})
			t.record(r, ch, s, res.ID, err)
			t.publishes++
		}
		var items []publisher.Item
		var seqs []int
		for i, ch := range t.chans {
			for range 2 {
				s := t.seq(i)
				items = append(items, publisher.Item{Channel: ch, Message: publisher.Message{Data: map[string]int{"seq": s}}})
				seqs = append(seqs, s)
			}
		}
		res, err := pub.PublishBatch(ctx, items)
		t.batches++
		t.batched += len(items)
		for j, it := range items {
			if err != nil {
				t.record(r, it.Channel, seqs[j], "", err)
				continue
			}
			if res[j].Channel != it.Channel {
				r.bad("batch item %d for %s answered for channel %q", j, it.Channel, res[j].Channel)
			}
			t.record(r, it.Channel, seqs[j], res[j].ID, nil)
		}
	}
}

// sendTargeted sends, rounds times: to a user with two connections, to a
// user with one, to a connection of a user who has one and of a user who
// has two.
func (t *traffic) sendTargeted(ctx context.Context, r *result, pub *publisher.Client, rounds int) {
	toUser := func(user string, conns []*wsUser) {
		t.n++
		n := t.n
		got, err := pub.SendToUser(ctx, user, publisher.Message{Data: map[string]int{"n": n}, Event: "targeted"})
		switch {
		case err != nil:
			r.bad("send n=%d to user %s: %v", n, user, err)
			return
		case got != len(conns):
			r.bad("send n=%d to user %s reached %d connections, want %d", n, user, got, len(conns))
		}
		for _, w := range conns {
			t.want[w] = append(t.want[w], sent{n, "user"})
		}
	}
	toConn := func(w *wsUser) {
		t.n++
		n := t.n
		res, err := pub.SendToConnection(ctx, w.conn(), publisher.Message{Data: map[string]int{"n": n}, Event: "targeted"})
		switch {
		case err != nil:
			r.bad("send n=%d to connection %s (%s): %v", n, w.conn(), w.user, err)
			return
		case res.Connection != w.conn():
			r.bad("send n=%d to connection %s answered for %q", n, w.conn(), res.Connection)
		}
		t.want[w] = append(t.want[w], sent{n, "connection"})
	}
	for range rounds {
		toUser(t.alice[0].user, t.alice)
		toUser(t.bob.user, []*wsUser{t.bob})
		toConn(t.carol)
		toConn(t.alice[1])
	}
}

// delivered says what is still owed to a client, or "" once each has
// every acknowledged message of its channels and its targeted messages.
func (t *traffic) delivered() string {
	if o := owed(t.ws, t.logs); o != "" {
		return o
	}
	return targetedGot(t.ws, t.want)
}

// check waits up to 15 s for everything to arrive, gives a duplicate or a
// misrouted message time to show up, and adds every breach to r.
func (t *traffic) check(ctx context.Context, r *result) {
	if why := eventually(ctx, 15*time.Second, t.delivered); why != "" {
		r.bad("after 15 s: %s", why)
	}
	_ = harness.SleepCtx(ctx, 300*time.Millisecond)
	checkChains(r, t.ws, t.logs)
	checkTargeted(r, t.ws, t.want)
}

// fanout runs sockets on egress (one release) and traffic through rel's
// ingress (the other): channel publishes and batches, sends to a user
// and to a connection, then reads history and the registry through the
// same ingress.
func (u *upgrade) fanout(ctx context.Context, r *result, tag string, egress *harness.Proc, rel *release) {
	t, ok := dialTraffic(ctx, r, tag, egress)
	defer closeAll(t.ws)
	if !ok {
		return
	}
	t.publish(ctx, r, rel.pub, 10)
	t.sendTargeted(ctx, r, rel.pub, 3)
	t.check(ctx, r)
	u.checkHistory(ctx, r, rel.pub, t.chans, t.acked)
	u.checkRegistry(ctx, r, rel.pub, t.chans, t.ws)
	r.count("%d sockets on the %s egress, 3 channels", len(t.ws), other(rel.name))
	r.count("through the %s ingress: %d publishes, %d batches of %d messages, %d targeted sends (user and connection), history and registry reads",
		rel.name, t.publishes, t.batches, t.batched/t.batches, t.n)
}

// other is the other release's name.
func other(name string) string { return map[string]string{"old": "new", "new": "old"}[name] }

// checkHistory reads each channel's history through pub: every
// acknowledged message, in order, with its channel and data; and a read
// after one of them is recovered and holds the rest.
func (u *upgrade) checkHistory(ctx context.Context, r *result, pub *publisher.Client, chans []string, acked map[string][]ack) {
	for _, ch := range chans {
		want := acked[ch]
		page, err := pub.History(ctx, ch, "", 1000)
		if err != nil {
			r.bad("history of %s: %v", ch, err)
			continue
		}
		if msg := compareHistory(ch, page.Messages, want); msg != "" {
			r.bad("history of %s: %s", ch, msg)
		}
		if len(want) < 5 {
			continue
		}
		page, err = pub.History(ctx, ch, want[4].id, 1000)
		switch {
		case err != nil:
			r.bad("history of %s after %s: %v", ch, want[4].id, err)
		case page.Recovered == nil || !*page.Recovered:
			r.bad("history of %s after %s: recovered %v, want true", ch, want[4].id, page.Recovered)
		default:
			if msg := compareHistory(ch, page.Messages, want[5:]); msg != "" {
				r.bad("history of %s after %s: %s", ch, want[4].id, msg)
			}
		}
	}
}

func compareHistory(ch string, got []publisher.HistoryMessage, want []ack) string {
	if len(got) != len(want) {
		return fmt.Sprintf("%d messages, want %d", len(got), len(want))
	}
	for i, m := range got {
		var d struct{ Seq *int }
		_ = json.Unmarshal(m.Data, &d)
		switch {
		case m.ID != want[i].id:
			return fmt.Sprintf("message %d has id %s, want %s", i, m.ID, want[i].id)
		case m.Channel != ch:
			return fmt.Sprintf("message %s has channel %q", m.ID, m.Channel)
		case d.Seq == nil || *d.Seq != want[i].seq:
			return fmt.Sprintf("message %s has data %s, want seq %d", m.ID, m.Data, want[i].seq)
		}
	}
	return ""
}

// checkRegistry reads, through pub, the registry the egress wrote: a
// channel's connections, a user's, one connection's record.
func (u *upgrade) checkRegistry(ctx context.Context, r *result, pub *publisher.Client, chans []string, ws []*wsUser) {
	instance := ws[0].instances()[0]
	for _, ch := range chans {
		var want []string
		for _, w := range ws {
			if slices.ContainsFunc(w.chains, func(cn *delivery.Chain) bool { return cn.Channel() == ch }) {
				want = append(want, w.conn())
			}
		}
		conns, err := pub.ChannelConnections(ctx, ch, 100)
		if err != nil {
			r.bad("connections of %s: %v", ch, err)
			continue
		}
		var got []string
		for _, c := range conns {
			got = append(got, c.ID)
			if c.Instance != instance {
				r.bad("connections of %s: %s on instance %q, want %q", ch, c.ID, c.Instance, instance)
			}
		}
		slices.Sort(got)
		slices.Sort(want)
		if !slices.Equal(got, want) {
			r.bad("connections of %s: %v, want %v", ch, got, want)
		}
	}
	alice := ws[0].user
	conns, err := pub.UserConnections(ctx, alice, 100)
	if err != nil {
		r.bad("connections of user %s: %v", alice, err)
	} else if len(conns) != 2 {
		r.bad("connections of user %s: %d, want 2", alice, len(conns))
	}
	last := ws[len(ws)-1]
	c, err := pub.Connection(ctx, last.conn())
	if err != nil {
		r.bad("connection %s: %v", last.conn(), err)
		return
	}
	var chs []string
	for _, cn := range last.chains {
		chs = append(chs, cn.Channel())
	}
	if c.User != last.user || c.Instance != instance || strings.Join(c.Channels, ",") != strings.Join(chs, ",") {
		r.bad("connection %s: user %q, instance %q, channels %v; want %q, %q, %v", c.ID, c.User, c.Instance, c.Channels, last.user, instance, chs)
	}
}
