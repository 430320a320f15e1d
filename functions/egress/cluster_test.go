package main

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/http/httptest"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/stream"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// clusterEgress is an egress served by httptest on a Redis Cluster.
type clusterEgress struct {
	srv   *httptest.Server
	s     *Server
	ks    keys.Scheme
	store *stream.Store
	logs  *testkit.SyncBuffer // its log, JSON from INFO up; in the test's output if it fails
}

func startClusterEgress(t *testing.T, rdb *redis.ClusterClient, addrs string) *clusterEgress {
	t.Helper()
	return startClusterEgressWith(t, rdb, addrs, nil)
}

// startClusterEgressWith is startClusterEgress with more settings.
func startClusterEgressWith(t *testing.T, rdb *redis.ClusterClient, addrs string, more map[string]string) *clusterEgress {
	t.Helper()
	prefix := redistest.Prefix(t)
	vars := map[string]string{
		"REDIS_CLUSTER_ADDRS": addrs,
		"REDIS_KEY_PREFIX":    prefix,
		"ALLOW_ANONYMOUS":     "true",
		"SHUTDOWN_GRACE":      "1s",
	}
	maps.Copy(vars, more)
	cfg, err := loadConfig(func(k string) string { return vars[k] })
	if err != nil {
		t.Fatal(err)
	}
	logs := &testkit.SyncBuffer{}
	log := slog.New(slog.NewJSONHandler(logs, nil))
	t.Cleanup(func() {
		redistest.Cleanup(rdb, prefix) // after the server stops
		if t.Failed() {
			t.Logf("egress log:\n%s", logs.String())
		}
	})
	s := NewServer(cfg, log, rdb)
	srv, _ := startEgress(t, s)
	return &clusterEgress{srv: srv, s: s, ks: keys.Scheme{Prefix: prefix}, store: stream.NewStore(rdb), logs: logs}
}

// episodesEnded fails t unless every node whose Pub/Sub outage the egress
// logged ("redis subscription error") has its end logged too ("redis
// subscription back"), within d.
func (e *clusterEgress) episodesEnded(t *testing.T, d time.Duration) {
	t.Helper()
	testkit.Eventually(t, d, func() error {
		open := map[any]int{}
		for _, l := range e.logs.JSONLines(t) {
			switch l["msg"] {
			case "redis subscription error":
				open[l["node"]]++
			case "redis subscription back":
				open[l["node"]]--
			}
		}
		for node, n := range open {
			if n != 0 {
				return fmt.Errorf("node %v: %d outages logged without their end", node, n)
			}
		}
		return nil
	})
}

// clusterPublisher publishes to each of its channels from a goroutine of its
// own until stopped, message n after message n-1 was acknowledged: a
// failed publish (a master down, a slot moving) is retried after
// retryAfter, with 2 s for each attempt. It stops with the test at the
// latest. Its acked lists are what collector.check expects.
type clusterPublisher struct {
	mu      sync.Mutex
	acked   map[string][]string
	retries int
	// pause, held for writing, holds publishing between attempts (while
	// a test syncs and stops a master).
	pause  sync.RWMutex
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

func startClusterPublisher(t *testing.T, e *clusterEgress, chans []string, retryAfter time.Duration) *clusterPublisher {
	ctx, cancel := context.WithCancel(context.Background())
	p := &clusterPublisher{acked: map[string][]string{}, cancel: cancel}
	t.Cleanup(func() { p.stop() }) // a test that failed before its own stop
	for _, ch := range chans {
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			for n := 0; ctx.Err() == nil; n++ {
				for ctx.Err() == nil {
					p.pause.RLock()
					pctx, pcancel := context.WithTimeout(ctx, 2*time.Second)
					id, err := e.publish(pctx, ch, n)
					pcancel()
					p.pause.RUnlock()
					p.mu.Lock()
					if err == nil {
						p.acked[ch] = append(p.acked[ch], id)
						p.mu.Unlock()
						break
					}
					p.retries++
					p.mu.Unlock()
					time.Sleep(retryAfter)
				}
				time.Sleep(10 * time.Millisecond)
			}
		}()
	}
	return p
}

// ackedOn returns the ids acknowledged on ch so far.
func (p *clusterPublisher) ackedOn(ch string) []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.acked[ch]...)
}

// stop ends publishing and returns what was acknowledged, and how many
// attempts failed.
func (p *clusterPublisher) stop() (map[string][]string, int) {
	p.cancel()
	p.wg.Wait()
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.acked, p.retries
}

// publish appends one message to ch as ingress does and returns its id.
func (e *clusterEgress) publish(ctx context.Context, ch string, n int) (string, error) {
	ids, err := e.store.Append(ctx, []stream.Append{{
		Stream: e.ks.Stream(ch),
		Notify: e.ks.Notify(ch),
		Msg:    stream.Message{Channel: ch, Event: "e", TS: time.Now().UnixMilli(), Data: json.RawMessage(fmt.Sprintf(`{"n":%d}`, n))},
		Limits: stream.Limits{MaxLen: 10000, TTLMS: 600000},
	}})
	if err != nil {
		return "", err
	}
	return ids[0], nil
}

// channelsOnEveryMaster picks perMaster channel names for each master.
func channelsOnEveryMaster(t *testing.T, rdb *redis.ClusterClient, ks keys.Scheme, masters, perMaster int) (chans []string, owner map[string]string) {
	t.Helper()
	owner = make(map[string]string)
	count := make(map[string]int)
	for i := 0; len(chans) < masters*perMaster; i++ {
		if i > 10000 {
			t.Fatal("could not spread channels over the masters")
		}
		ch := fmt.Sprintf("room-%d", i)
		m, err := rdb.MasterForKey(context.Background(), ks.Notify(ch))
		if err != nil {
			t.Fatal(err)
		}
		addr := m.Options().Addr
		if count[addr] < perMaster {
			count[addr]++
			chans = append(chans, ch)
			owner[ch] = addr
		}
	}
	return chans, owner
}

// collector reads a socket's message frames, by channel.
type collector struct {
	ws   *websocket.Conn
	mu   sync.Mutex
	got  map[string][]string // channel → ids in arrival order
	subs map[string]bool
	done chan struct{}
}

func dialCollector(t *testing.T, srv *httptest.Server, chans []string) *collector {
	t.Helper()
	url := "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws?channels=" + strings.Join(chans, ",")
	ws, _, err := websocket.DefaultDialer.Dial(url, nil)
	if err != nil {
		t.Fatal(err)
	}
	c := &collector{ws: ws, got: map[string][]string{}, subs: map[string]bool{}, done: make(chan struct{})}
	go func() {
		defer close(c.done)
		for {
			_, b, err := ws.ReadMessage()
			if err != nil {
				return
			}
			var f struct{ Type, Channel, ID, Code, Message string }
			_ = json.Unmarshal(b, &f)
			c.mu.Lock()
			switch f.Type {
			case "message":
				c.got[f.Channel] = append(c.got[f.Channel], f.ID)
			case "subscribed":
				c.subs[f.Channel] = true
			case "error":
				t.Errorf("error frame: %s", b)
			}
			c.mu.Unlock()
		}
	}()
	t.Cleanup(func() { ws.Close(); <-c.done })
	testkit.Eventually(t, 10*time.Second, func() error {
		c.mu.Lock()
		defer c.mu.Unlock()
		if len(c.subs) != len(chans) {
			return fmt.Errorf("%d of %d subscriptions confirmed", len(c.subs), len(chans))
		}
		return nil
	})
	return c
}

// check waits until every acknowledged id arrived and then checks that
// each channel's ids arrived once each, in publish order.
func (c *collector) check(t *testing.T, acked map[string][]string, within time.Duration) {
	t.Helper()
	testkit.Eventually(t, within, func() error {
		c.mu.Lock()
		defer c.mu.Unlock()
		for ch, want := range acked {
			seen := make(map[string]bool, len(c.got[ch]))
			for _, id := range c.got[ch] {
				seen[id] = true
			}
			for _, id := range want {
				if !seen[id] {
					return fmt.Errorf("%s: acknowledged %s not delivered (%d of %d arrived)", ch, id, len(c.got[ch]), len(want))
				}
			}
		}
		return nil
	})
	c.mu.Lock()
	defer c.mu.Unlock()
	for ch := range acked {
		var prev stream.ID
		for _, s := range c.got[ch] {
			id, ok := stream.ParseID(s)
			if !ok || !prev.Less(id) {
				t.Fatalf("%s: id %s after %s: duplicate or out of order", ch, s, prev)
			}
			prev = id
		}
	}
}

// TestClusterDelivery subscribes one socket to channels owned by every
// master of a three-master cluster: the subscriber needs one Pub/Sub
// connection per master, and every message arrives once, in order.
func TestClusterDelivery(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a Redis Cluster")
	}
	c := redistest.StartCluster(t, 3, 0)
	rdb := c.Client(t)
	e := startClusterEgress(t, rdb, c.AddrsEnv())
	chans, owner := channelsOnEveryMaster(t, rdb, e.ks, 3, 2)
	t.Logf("channels by master: %v", owner)
	col := dialCollector(t, e.srv, chans)
	ctx := context.Background()
	acked := map[string][]string{}
	for n := range 30 {
		for _, ch := range chans {
			id, err := e.publish(ctx, ch, n)
			if err != nil {
				t.Fatal(err)
			}
			acked[ch] = append(acked[ch], id)
		}
	}
	col.check(t, acked, 10*time.Second)
}

// TestClusterFailover stops the master owning some subscribed channels
// while publishing goes on; once its replica is promoted, the egress
// subscribes there and catches up from the stream: every acknowledged
// message arrives exactly once, in order.
func TestClusterFailover(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a Redis Cluster")
	}
	// Replication is asynchronous: a write acknowledged by a master that
	// dies before its replica has it is lost (docs/scaling.md). Without
	// PUBLISH_WAIT_REPLICAS the master is stopped only once its replica is
	// in sync, so the test checks our path, not Redis's replication
	// window; with it (WAIT 1 after each append) the master is stopped in
	// the middle of the traffic, and still nothing acknowledged is lost.
	t.Run("replica-in-sync", func(t *testing.T) { testClusterFailover(t, false) })
	t.Run("wait-replicas", func(t *testing.T) { testClusterFailover(t, true) })
}

func testClusterFailover(t *testing.T, waitReplicas bool) {
	replicas := 1
	if waitReplicas {
		// WAIT 1 after the failover needs a replica of the promoted one:
		// with two per master, the other replica follows the new master.
		// (With one, publishes on that master are refused, not lost,
		// until a replica is back: durability over availability.)
		replicas = 2
	}
	c := redistest.StartCluster(t, 3, replicas)
	if !c.Owned() {
		t.Skip("REDIS_CLUSTER_ADDRS is set: the test cannot stop its nodes")
	}
	rdb := c.Client(t)
	e := startClusterEgress(t, rdb, c.AddrsEnv())
	if waitReplicas {
		e.store.WaitForReplicas(1, 500*time.Millisecond)
	}
	chans, owner := channelsOnEveryMaster(t, rdb, e.ks, 3, 2)
	col := dialCollector(t, e.srv, chans)
	victim := owner[chans[0]]

	pub := startClusterPublisher(t, e, chans, 50*time.Millisecond)
	ackedOn := func(ch string) int { return len(pub.ackedOn(ch)) }
	testkit.Eventually(t, 10*time.Second, func() error {
		if ackedOn(chans[0]) < 20 {
			return fmt.Errorf("only %d published", ackedOn(chans[0]))
		}
		return nil
	})

	if waitReplicas {
		c.StopNode(t, c.Index(victim))
	} else {
		// The victim is synced and stopped between two attempts.
		pub.pause.Lock()
		waitReplicaSynced(t, victim)
		c.StopNode(t, c.Index(victim))
		pub.pause.Unlock()
	}
	stopped := time.Now()
	c.WaitFailover(t, victim, 30*time.Second)
	t.Logf("failover of %s took %s", victim, time.Since(stopped).Round(time.Millisecond))

	before := ackedOn(chans[0])
	testkit.Eventually(t, 20*time.Second, func() error {
		if ackedOn(chans[0]) < before+20 {
			return fmt.Errorf("publishing on the failed-over master has not resumed")
		}
		return nil
	})
	final, retries := pub.stop()
	t.Logf("acknowledged per channel: %d (victim %s), publish retries: %d", len(final[chans[1]]), victim, retries)
	col.check(t, final, 20*time.Second)
	// The dead master's outage ends too, though nothing reads from it
	// again: its channels are on the promoted replica, another address.
	e.episodesEnded(t, 10*time.Second)
	if len(e.logs.Lines(t, "redis subscription error")) == 0 {
		t.Error("no redis subscription error logged for the stopped master: the check above proved nothing")
	}
}

// waitReplicaSynced polls until every replica of the master at addr has
// acknowledged the master's whole replication stream.
func waitReplicaSynced(t *testing.T, addr string) {
	t.Helper()
	m := redis.NewClient(&redis.Options{Addr: addr, DisableIdentity: true})
	defer m.Close()
	testkit.Eventually(t, 10*time.Second, func() error {
		info, err := m.Info(context.Background(), "replication").Result()
		if err != nil {
			return err
		}
		var master string
		var offsets []string
		for _, line := range strings.Split(info, "\r\n") {
			if v, ok := strings.CutPrefix(line, "master_repl_offset:"); ok {
				master = v
			}
			if strings.HasPrefix(line, "slave") && strings.Contains(line, "offset=") {
				_, o, _ := strings.Cut(line, "offset=")
				o, _, _ = strings.Cut(o, ",")
				offsets = append(offsets, o)
			}
		}
		if len(offsets) == 0 {
			return fmt.Errorf("%s has no replica", addr)
		}
		for _, o := range offsets {
			if o != master {
				return fmt.Errorf("replica at offset %s, master at %s", o, master)
			}
		}
		return nil
	})
}

// TestSubscriberClose checks that Close stops every goroutine the
// subscriber started, on a single node and on a cluster, and that a
// confirmation for each channel arrives on the one event stream.
func TestSubscriberClose(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a Redis Cluster")
	}
	single, _ := redistest.Client(t)
	c := redistest.StartCluster(t, 3, 0)
	for _, tc := range []struct {
		name string
		rdb  redis.UniversalClient
	}{
		{"single", single},
		{"cluster", c.Client(t)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ks := keys.Scheme{Prefix: redistest.Prefix(t)}
			sub := newSubscriber(slog.New(slog.DiscardHandler), tc.rdb, nil)
			want := map[string]bool{}
			for i := range 12 {
				ch := ks.Notify(fmt.Sprintf("c%d", i))
				want[ch] = true
				if err := sub.Subscribe(context.Background(), ch); err != nil {
					t.Fatal(err)
				}
			}
			timeout := time.After(10 * time.Second)
			for len(want) > 0 {
				select {
				case ev := <-sub.Events():
					if ev.confirmed {
						delete(want, ev.channel)
					}
				case <-timeout:
					t.Fatalf("unconfirmed: %v", want)
				}
			}
			sub.mu.Lock()
			nodes := len(sub.nodes)
			sub.mu.Unlock()
			t.Logf("Pub/Sub connections for 12 channels: %d", nodes)
			if tc.name == "cluster" && nodes != 3 || tc.name == "single" && nodes != 1 {
				t.Fatalf("%d Pub/Sub connections", nodes)
			}
			sub.Close()
			sub.Close() // idempotent
			testkit.Eventually(t, 5*time.Second, func() error {
				buf := make([]byte, 1<<20)
				stacks := string(buf[:runtime.Stack(buf, true)])
				if strings.Contains(stacks, "(*subscriber)") {
					return fmt.Errorf("subscriber goroutines left:\n%s", stacks)
				}
				return nil
			})
		})
	}
}

// countingConn counts the bytes an instance reads from Redis.
type countingConn struct {
	net.Conn
	n *atomic.Int64
}

func (c countingConn) Read(b []byte) (int, error) {
	k, err := c.Conn.Read(b)
	c.n.Add(int64(k))
	return k, err
}

// readCost counts what one egress instance asks of Redis: commands sent
// (pipelined ones included) and bytes read (replies and Pub/Sub pushes).
type readCost struct {
	cmds  atomic.Int64
	bytes atomic.Int64
}

func (rc *readCost) dialer(ctx context.Context, network, addr string) (net.Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	return countingConn{c, &rc.bytes}, nil
}

func (rc *readCost) DialHook(next redis.DialHook) redis.DialHook { return next }
func (rc *readCost) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error { rc.cmds.Add(1); return next(ctx, cmd) }
}
func (rc *readCost) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		rc.cmds.Add(int64(len(cmds)))
		return next(ctx, cmds)
	}
}

// publishMany appends one 100-byte message to each channel, n times, in
// pipelines of 1,000.
func publishMany(t *testing.T, store *stream.Store, ks keys.Scheme, chans []string, n int) {
	t.Helper()
	data := json.RawMessage(`"` + strings.Repeat("x", 98) + `"`)
	var batch []stream.Append
	flush := func() {
		if _, err := store.Append(context.Background(), batch); err != nil {
			t.Fatal(err)
		}
		batch = batch[:0]
	}
	for range n {
		for _, ch := range chans {
			batch = append(batch, stream.Append{Stream: ks.Stream(ch), Notify: ks.Notify(ch),
				Msg:    stream.Message{Channel: ch, Event: "e", TS: time.Now().UnixMilli(), Data: data},
				Limits: stream.Limits{MaxLen: 1000, TTLMS: 600000}})
			if len(batch) == 1000 {
				flush()
			}
		}
	}
	if len(batch) > 0 {
		flush()
	}
}

// TestMeasureScaling prints the figures of docs/scaling.md. It runs only
// with WSRELAY_MEASURE=1 (it publishes a few hundred thousand messages).
func TestMeasureScaling(t *testing.T) {
	if os.Getenv("WSRELAY_MEASURE") == "" {
		t.Skip("set WSRELAY_MEASURE=1 to measure")
	}
	ctx := context.Background()

	t.Run("retention memory", func(t *testing.T) {
		srv := redistest.Start(t)
		rdb := redis.NewClient(&redis.Options{Addr: srv.Addr(), DisableIdentity: true})
		defer rdb.Close()
		ks := keys.Scheme{Prefix: "m"}
		store := stream.NewStore(rdb)
		used := func() int64 {
			info := rdb.Info(ctx, "memory").Val()
			for _, l := range strings.Split(info, "\r\n") {
				if v, ok := strings.CutPrefix(l, "used_memory:"); ok {
					n, _ := strconv.ParseInt(v, 10, 64)
					return n
				}
			}
			return 0
		}
		for _, tc := range []struct {
			streams, per int
		}{{1, 100000}, {1000, 100}, {10000, 10}} {
			rdb.FlushAll(ctx)
			before := used()
			var chans []string
			for i := range tc.streams {
				chans = append(chans, fmt.Sprintf("mem%d-%d", tc.streams, i))
			}
			data := json.RawMessage(`"` + strings.Repeat("x", 98) + `"`)
			var batch []stream.Append
			for range tc.per {
				for _, ch := range chans {
					batch = append(batch, stream.Append{Stream: ks.Stream(ch), Notify: ks.Notify(ch),
						Msg:    stream.Message{Channel: ch, Event: "chat", From: "user-12345", TS: time.Now().UnixMilli(), Data: data},
						Limits: stream.Limits{TTLMS: 600000}})
					if len(batch) == 1000 {
						if _, err := store.Append(ctx, batch); err != nil {
							t.Fatal(err)
						}
						batch = batch[:0]
					}
				}
			}
			if len(batch) > 0 {
				if _, err := store.Append(ctx, batch); err != nil {
					t.Fatal(err)
				}
			}
			mu := rdb.MemoryUsage(ctx, ks.Stream(chans[0]), 0).Val()
			total := tc.streams * tc.per
			delta := used() - before
			t.Logf("%d streams × %d messages (data 100 B): MEMORY USAGE of one stream %d B = %.0f B/message; used_memory +%d B = %.0f B/message = %.0f MB per million",
				tc.streams, tc.per, mu, float64(mu)/float64(tc.per), delta, float64(delta)/float64(total), float64(delta)/float64(total))
		}
	})

	t.Run("read cost: one connection, 10000 busy channels", func(t *testing.T) {
		srv := redistest.Start(t)
		var cost readCost
		egressRDB := redis.NewClient(&redis.Options{Addr: srv.Addr(), DisableIdentity: true, Dialer: cost.dialer})
		egressRDB.AddHook(&cost)
		pub := redis.NewClient(&redis.Options{Addr: srv.Addr(), DisableIdentity: true})
		defer pub.Close()
		prefix := redistest.Prefix(t)
		vars := map[string]string{"REDIS_URL": "redis://" + srv.Addr(), "REDIS_KEY_PREFIX": prefix, "ALLOW_ANONYMOUS": "true"}
		cfg, err := loadConfig(func(k string) string { return vars[k] })
		if err != nil {
			t.Fatal(err)
		}
		hs, stop := startEgress(t, NewServer(cfg, slog.New(slog.DiscardHandler), egressRDB))
		defer func() { stop(); egressRDB.Close() }()
		col := dialCollector(t, hs, []string{"mine"})
		ks := keys.Scheme{Prefix: prefix}
		store := stream.NewStore(pub)
		var others []string
		for i := range 10000 {
			others = append(others, fmt.Sprintf("busy-%d", i))
		}
		pub.ConfigResetStat(ctx)
		c0, b0 := cost.cmds.Load(), cost.bytes.Load()
		start := time.Now()
		publishMany(t, store, ks, others, 10)
		publishMany(t, store, ks, []string{"mine"}, 100)
		testkit.Eventually(t, 30*time.Second, func() error {
			col.mu.Lock()
			defer col.mu.Unlock()
			if len(col.got["mine"]) < 100 {
				return fmt.Errorf("%d of 100", len(col.got["mine"]))
			}
			return nil
		})
		el := time.Since(start)
		t.Logf("100,000 messages on 10,000 other channels + 100 on its own, in %s: the instance sent %d Redis commands and read %d bytes from Redis (%.0f B per own message)",
			el.Round(time.Millisecond), cost.cmds.Load()-c0, cost.bytes.Load()-b0, float64(cost.bytes.Load()-b0)/100)
		t.Logf("server commandstats over the burst:\n%s", pub.Info(ctx, "commandstats").Val())
	})

	t.Run("read cost: 10000 subscriptions over 10000 channels on a cluster", func(t *testing.T) {
		c := redistest.StartCluster(t, 3, 0)
		var cost readCost
		rdb := redis.NewClusterClient(&redis.ClusterOptions{Addrs: c.Addrs(), DisableIdentity: true, Dialer: cost.dialer})
		rdb.AddHook(&cost)
		t.Cleanup(func() { rdb.Close() }) // after the egress has stopped
		pub := c.Client(t)
		e := startClusterEgress(t, rdb, c.AddrsEnv())
		srvs := e.srv.Config.Handler.(*Server)
		var chans []string
		for i := range 10000 {
			chans = append(chans, fmt.Sprintf("ch-%d", i))
		}
		c0, b0 := cost.cmds.Load(), cost.bytes.Load()
		start := time.Now()
		var wg sync.WaitGroup
		sem := make(chan struct{}, 64)
		for _, ch := range chans {
			wg.Add(1)
			sem <- struct{}{}
			go func() {
				defer wg.Done()
				defer func() { <-sem }()
				if _, err := srvs.hub.acquire(ctx, ch); err != nil {
					t.Error(err)
				}
			}()
		}
		wg.Wait()
		srvs.hub.sub.mu.Lock()
		conns := len(srvs.hub.sub.nodes)
		srvs.hub.sub.mu.Unlock()
		t.Logf("10,000 channels subscribed in %s over %d Pub/Sub connections (one per master): %d commands, %d bytes read",
			time.Since(start).Round(time.Millisecond), conns, cost.cmds.Load()-c0, cost.bytes.Load()-b0)
		c1, b1 := cost.cmds.Load(), cost.bytes.Load()
		start = time.Now()
		publishMany(t, stream.NewStore(pub), e.ks, chans, 1)
		testkit.Eventually(t, 60*time.Second, func() error {
			n := 0
			for _, ch := range chans {
				if cs := srvs.hub.state(e.ks.Notify(ch)); cs != nil && cs.confirmed && !cs.last.IsZero() {
					n++
				}
			}
			if n < len(chans) {
				return fmt.Errorf("%d of %d delivered", n, len(chans))
			}
			return nil
		})
		t.Logf("one message on each of the 10,000 channels, received in %s: %d commands, %d bytes read (%.0f B per message)",
			time.Since(start).Round(time.Millisecond), cost.cmds.Load()-c1, cost.bytes.Load()-b1, float64(cost.bytes.Load()-b1)/10000)
	})
}

// TestClusterReshard moves the slot of a subscribed channel to another
// master while publishing goes on: Redis drops the shard subscription, the
// subscriber resolves the channel again and subscribes on the new owner,
// and every acknowledged message arrives exactly once, in order.
func TestClusterReshard(t *testing.T) {
	c := redistest.StartOwnedCluster(t, 3, 0, "the test does not reshard a cluster it does not own")
	rdb := c.Client(t)
	e := startClusterEgress(t, rdb, c.AddrsEnv())
	chans, owner := channelsOnEveryMaster(t, rdb, e.ks, 3, 1)
	col := dialCollector(t, e.srv, chans)
	ctx := context.Background()
	moved := chans[0]
	slot := int(rdb.ClusterKeySlot(ctx, e.ks.Stream(moved)).Val())
	src, dst := owner[moved], owner[chans[1]]

	acked := publishAcross(t, e, chans, moved, func() {
		c.MoveSlot(t, slot, src, dst)
		m, err := rdb.MasterForKey(ctx, e.ks.Stream(moved))
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("slot %d of %s moved from %s to %s (client now routes to %s)", slot, moved, src, dst, m.Options().Addr)
	})
	col.check(t, acked, 15*time.Second)
	noWarnings(t, e.logs)
}

// publishAcross publishes to chans, every 5 ms, while change runs: from
// once 20 messages to moved have been acknowledged until 20 more have
// after it. It returns the messages acknowledged, by channel.
func publishAcross(t *testing.T, e *clusterEgress, chans []string, moved string, change func()) map[string][]string {
	t.Helper()
	pub := startClusterPublisher(t, e, chans, 5*time.Millisecond)
	count := func() int { return len(pub.ackedOn(moved)) }
	testkit.Eventually(t, 10*time.Second, func() error {
		if count() < 20 {
			return fmt.Errorf("%d published", count())
		}
		return nil
	})
	change()
	before := count()
	testkit.Eventually(t, 15*time.Second, func() error {
		if count() < before+20 {
			return fmt.Errorf("publishing after the change has not resumed")
		}
		return nil
	})
	acked, retries := pub.stop()
	t.Logf("publish retries: %d", retries)
	return acked
}

// TestClusterReshardToNewMaster adds a master to the cluster while
// publishing goes on and moves the slot of a subscribed channel to it:
// neither the egress's cluster client nor the publisher's knows the new
// node when its slot moves. The subscription follows the slot to the new
// node and every acknowledged message arrives exactly once, in order.
func TestClusterReshardToNewMaster(t *testing.T) {
	c := redistest.StartOwnedCluster(t, 3, 0, "the test does not add a node to a cluster it does not own")
	rdb := c.Client(t)
	e := startClusterEgress(t, rdb, c.AddrsEnv())
	chans, owner := channelsOnEveryMaster(t, rdb, e.ks, 3, 1)
	col := dialCollector(t, e.srv, chans)
	ctx := context.Background()
	moved := chans[0]
	slot := int(rdb.ClusterKeySlot(ctx, e.ks.Stream(moved)).Val())
	src := owner[moved]

	acked := publishAcross(t, e, chans, moved, func() {
		dst := c.AddMaster(t)
		c.MoveSlot(t, slot, src, dst)
		t.Logf("slot %d of %s moved from %s to the new master %s", slot, moved, src, dst)
	})
	col.check(t, acked, 15*time.Second)
	// A client resuming on the moved channel from its first acknowledged
	// message gets every later one, once, in order, read from the stream
	// on the new master.
	want := acked[moved][1:]
	ws, _, err := websocket.DefaultDialer.Dial("ws"+strings.TrimPrefix(e.srv.URL, "http")+"/ws", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	if err := ws.WriteJSON(map[string]string{"type": "subscribe", "channel": moved, "after": acked[moved][0]}); err != nil {
		t.Fatal(err)
	}
	var got []string
	_ = ws.SetReadDeadline(time.Now().Add(15 * time.Second))
	for len(got) < len(want) {
		_, b, err := ws.ReadMessage()
		if err != nil {
			t.Fatalf("resume: %v after %d of %d messages", err, len(got), len(want))
		}
		var f struct {
			Type, ID  string
			Recovered *bool
		}
		_ = json.Unmarshal(b, &f)
		switch f.Type {
		case "message":
			got = append(got, f.ID)
		case "subscribed":
			if f.Recovered != nil && !*f.Recovered {
				t.Errorf("resume not recovered: %s", b)
			}
		}
	}
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("resume delivered %d messages, not the %d acknowledged after %s in order", len(got), len(want), acked[moved][0])
	}
	e.episodesEnded(t, 10*time.Second)
	noWarnings(t, e.logs)
}

// noWarnings fails t for each WARN or ERROR line in logs: a reshard is
// routine, and none of its steps is a failure to alert on.
func noWarnings(t *testing.T, logs *testkit.SyncBuffer) {
	t.Helper()
	for _, l := range logs.JSONLines(t) {
		if l["level"] == "WARN" || l["level"] == "ERROR" {
			t.Errorf("a routine reshard logged %v %v %v", l["msg"], l["node"], l["err"])
		}
	}
}
