package main

import (
	"context"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/wsrelay/wsrelay/bench/harness"
	"github.com/wsrelay/wsrelay/shared/keys"
)

// resubscribes is the egress's count of subscriptions Redis confirmed
// again after a lost Pub/Sub connection (each followed by a catch-up from
// the stream).
const resubscribes = "wsrelay_egress_redis_resubscribes_total"

// catchUp makes egress (one release) read what rel's ingress (the other)
// wrote from the streams, where fanout only ever has it delivered from
// the notifications: the stream entry's fields (the route of a targeted
// message above all) are read by an egress only here, after its Pub/Sub
// connection was lost. Clients on egress get some traffic live; then the
// egress is stopped (SIGSTOP), Redis closes its Pub/Sub connection
// (CLIENT KILL), and channel publishes, batches and sends to a user and
// to a connection go through rel's ingress; then it is continued
// (SIGCONT), finds its connection closed, subscribes again and catches
// up from the channels' streams and its inbox stream. Every subscription
// must get every message once and in order, and every targeted message
// must reach each socket it was sent to once.
//
// That those messages can only come from the streams is checked, not
// assumed: the shard channels of the egress's subscriptions and of its
// inbox have a subscriber before the kill, and none after it or after
// the last send (PUBSUB SHARDNUMSUB), while the stopped egress could not
// subscribe again; so every notification of the pause reached nobody.
// The pause is well under a second, far from every ping and read timeout,
// so the clients' sockets stay open across it.
func (u *upgrade) catchUp(ctx context.Context, r *result, tag string, egress *harness.Proc, rel *release) {
	t, ok := dialTraffic(ctx, r, tag, egress)
	defer closeAll(t.ws)
	if !ok {
		return
	}
	// Live first, so that the egress holds a position in each stream
	// (its inbox's too) which the catch-up must continue exactly.
	t.publish(ctx, r, rel.pub, 1)
	t.sendTargeted(ctx, r, rel.pub, 1)
	if why := eventually(ctx, 10*time.Second, t.delivered); why != "" {
		r.bad("live traffic after 10 s: %s", why)
		return
	}
	livePubs, liveSends := t.publishes+t.batched, t.n
	ks := keys.Scheme{Prefix: prefix}
	notify := []string{ks.InboxNotify(t.ws[0].instances()[0])}
	for _, ch := range t.chans {
		notify = append(notify, ks.Notify(ch))
	}
	m, err := harness.Metrics(egress.Base, resubscribes)
	if err != nil {
		r.bad("metrics: %v", err)
	}
	before, haveMetric := m[resubscribes]

	if err := egress.Cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		r.bad("SIGSTOP: %v", err)
		return
	}
	stopped := time.Now()
	var paused time.Duration
	cont := func() {
		if paused == 0 {
			_ = egress.Cmd.Process.Signal(syscall.SIGCONT)
			paused = time.Since(stopped)
		}
	}
	defer cont()
	if why := u.subscribed(ctx, notify, func(n int64) bool { return n > 0 }); why != "" {
		r.bad("before the kill, %s, want at least one: the egress subscribes under other names?", why)
		return
	}
	killed, err := u.killPubSub(ctx, egress)
	switch {
	case err != nil:
		r.bad("kill the egress's Pub/Sub connection: %v", err)
		return
	case killed == 0:
		r.bad("no Pub/Sub connection of the egress found in CLIENT LIST")
		return
	}
	none := func(n int64) bool { return n == 0 }
	if why := u.subscribed(ctx, notify, none); why != "" {
		r.bad("after the kill, %s", why)
		return
	}
	t.publish(ctx, r, rel.pub, 3)
	t.sendTargeted(ctx, r, rel.pub, 2)
	if why := u.subscribed(ctx, notify, none); why != "" {
		r.bad("after the sends, %s: their notifications may have been received", why)
	}
	cont()

	t.check(ctx, r)
	if haveMetric {
		m, err := harness.Metrics(egress.Base, resubscribes)
		switch after := m[resubscribes]; {
		case err != nil:
			r.bad("metrics: %v", err)
		case after <= before:
			r.bad("%s stayed %v: the egress did not subscribe again", resubscribes, after)
		default:
			r.count("%s: %v, was %v", resubscribes, after, before)
		}
	}
	r.count("%d sockets on the %s egress, 3 channels; live through the %s ingress: %d messages, %d targeted sends",
		len(t.ws), other(rel.name), rel.name, livePubs, liveSends)
	r.count("egress stopped for %s, %d Pub/Sub connection(s) of it killed; meanwhile %d messages (publishes and batches) and %d targeted sends (user and connection), notified to no subscriber, then read from the streams",
		paused.Round(time.Millisecond), killed, t.publishes+t.batched-livePubs, t.n-liveSends)
}

// subscribed polls, for up to 2 s, until every shard channel in notify
// has a number of subscribers ok accepts (PUBSUB SHARDNUMSUB), and says
// which has not, or "".
func (u *upgrade) subscribed(ctx context.Context, notify []string, ok func(int64) bool) string {
	return eventually(ctx, 2*time.Second, func() string {
		n, err := u.env.RDB.PubSubShardNumSub(ctx, notify...).Result()
		if err != nil {
			return "PUBSUB SHARDNUMSUB: " + err.Error()
		}
		for _, ch := range notify {
			if !ok(n[ch]) {
				return fmt.Sprintf("%s has %d subscribers", ch, n[ch])
			}
		}
		return ""
	})
}

// killPubSub closes, in Redis, the Pub/Sub connections of egress's
// process (CLIENT KILL ID), found by their ports (CLIENT LIST TYPE
// pubsub's addr= against the process's sockets), and returns how many.
// The other egresses' connections are left alone.
func (u *upgrade) killPubSub(ctx context.Context, egress *harness.Proc) (int, error) {
	_, rport, _ := net.SplitHostPort(u.env.RedisAddr)
	redisPort, err := strconv.Atoi(rport)
	if err != nil {
		return 0, fmt.Errorf("redis address %q: %w", u.env.RedisAddr, err)
	}
	ports, err := harness.TCPLocalPortsTo(egress.Pid(), redisPort)
	if err != nil {
		return 0, fmt.Errorf("the egress's sockets: %w", err)
	}
	list, err := u.env.RDB.Do(ctx, "client", "list", "type", "pubsub").Text()
	if err != nil {
		return 0, fmt.Errorf("CLIENT LIST: %w", err)
	}
	killed := 0
	for line := range strings.Lines(list) {
		var id string
		var port int
		for f := range strings.FieldsSeq(line) {
			k, v, _ := strings.Cut(f, "=")
			switch k {
			case "id":
				id = v
			case "addr":
				if _, p, err := net.SplitHostPort(v); err == nil {
					port, _ = strconv.Atoi(p)
				}
			}
		}
		if id == "" || !slices.Contains(ports, port) {
			continue
		}
		if err := u.env.RDB.ClientKillByFilter(ctx, "ID", id).Err(); err != nil {
			return killed, fmt.Errorf("CLIENT KILL ID %s: %w", id, err)
		}
		killed++
	}
	return killed, nil
}
