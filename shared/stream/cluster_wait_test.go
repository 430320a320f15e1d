package stream

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redisconn"
	"github.com/wsrelay/wsrelay/shared/redistest"
)

// TestClusterWaitMastersIndependent: with WaitForReplicas on a cluster, a
// pipeline's appends (the Batcher's: concurrent publishes to any channels,
// or a batch across channels) run per master, each with its WAIT. Masters
// whose replica is gone answer their WAIT only at its timeout; the appends
// to a healthy master in the same pipeline must still be acknowledged, and
// not wait for the others' timeouts one after the other, past the
// pipeline's deadline (the ingress's REDIS_TIMEOUT).
func TestClusterWaitMastersIndependent(t *testing.T) {
	c := redistest.StartOwnedCluster(t, 3, 1, "the test cannot stop its nodes")
	rdb := c.Client(t)
	ctx := context.Background()
	ks := keys.Scheme{Prefix: redistest.Prefix(t)}
	t.Cleanup(func() { redistest.Cleanup(rdb, ks.Prefix) })

	// One channel per master, and each master's replica.
	chanOf := map[string]string{} // master addr → channel
	for i := 0; len(chanOf) < 3; i++ {
		ch := fmt.Sprintf("w-%d", i)
		m, err := rdb.MasterForKey(ctx, ks.Stream(ch))
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := chanOf[m.Options().Addr]; !ok {
			chanOf[m.Options().Addr] = ch
		}
	}
	replicaOf := map[string]string{} // master addr → replica addr
	for _, a := range c.Addrs() {
		n := redis.NewClient(&redis.Options{Addr: a, DisableIdentity: true})
		info, err := n.Info(ctx, "replication").Result()
		n.Close()
		if err != nil {
			t.Fatal(err)
		}
		var host, port string
		for _, l := range strings.Split(info, "\r\n") {
			if v, ok := strings.CutPrefix(l, "master_host:"); ok {
				host = v
			}
			if v, ok := strings.CutPrefix(l, "master_port:"); ok {
				port = v
			}
		}
		if host != "" {
			replicaOf[host+":"+port] = a
		}
	}
	var masters []string
	for m := range chanOf {
		masters = append(masters, m)
	}
	healthy := masters[0]

	s := NewStore(rdb)
	s.WaitForReplicas(1, 500*time.Millisecond)
	appends := func() []Append {
		var as []Append
		for _, m := range masters {
			ch := chanOf[m]
			as = append(as, Append{Stream: ks.Stream(ch), Notify: ks.Notify(ch),
				Msg: Message{Channel: ch, TS: 1, Data: []byte(`1`)}, Limits: Limits{MaxLen: 100, TTLMS: 60000}})
		}
		return as
	}
	// Once every replica is in sync, every append is acknowledged.
	deadline := time.Now().Add(20 * time.Second)
	for {
		_, errs := s.appendEach(ctx, appends())
		ok := true
		for _, err := range errs {
			ok = ok && err == nil
		}
		if ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("appends before the replicas stop: %v", errs)
		}
		time.Sleep(200 * time.Millisecond)
	}
	for _, m := range masters[1:] {
		c.StopNode(t, c.Index(replicaOf[m]))
	}
	// When each master's pipeline runs: the node clients the Store runs
	// them on are those MasterForKey gives.
	spans := &pipelineSpans{}
	for _, m := range masters {
		node, err := rdb.MasterForKey(ctx, ks.Stream(chanOf[m]))
		if err != nil {
			t.Fatal(err)
		}
		node.AddHook(spans.on(m))
	}
	// The ingress bounds a pipeline by REDIS_TIMEOUT (1 s by default,
	// PUBLISH_WAIT_TIMEOUT 500 ms); the masters come in map order.
	for round := range 6 {
		spans.reset()
		pctx, cancel := context.WithTimeout(ctx, time.Second)
		start := time.Now()
		_, errs := s.appendEach(pctx, appends())
		took := time.Since(start)
		cancel()
		if errs[0] != nil {
			t.Fatalf("round %d: the append to the healthy master %s failed after %s: %v", round, healthy, took.Round(time.Millisecond), errs[0])
		}
		for i, err := range errs[1:] {
			if err == nil {
				t.Fatalf("round %d: append %d to a master without replica acknowledged", round, i+1)
			}
		}
		// Each lagging master's pipeline lasts at least its WAIT's 500 ms
		// in Redis; run at once they overlap, however slow the machine,
		// and one after the other they never do. (The time the whole
		// pipeline takes tells the two apart only while the machine adds
		// less than 400 ms: 1.1 s beside 20 busy loops, at once.)
		a, b := spans.first(masters[1]), spans.first(masters[2])
		if a == nil || b == nil {
			t.Fatalf("round %d: no pipeline seen on a lagging master (%v, %v): the Store ran them on other clients", round, a, b)
		}
		if !a.start.Before(b.end) || !b.start.Before(a.end) {
			t.Fatalf("round %d: the masters' WAITs ran one after the other: %s's pipeline %s, %s's %s (all of it %s)",
				round, masters[1], a.from(start), masters[2], b.from(start), took.Round(time.Millisecond))
		}
	}
}

// pipelineSpans is a go-redis hook for a cluster's node clients that
// records when each of the Store's own pipelines on them (OnNode) began
// and ended, by master.
type pipelineSpans struct {
	mu    sync.Mutex
	spans map[string][]span
}

type span struct{ start, end time.Time }

// from gives when s began and ended, counted from t.
func (s *span) from(t time.Time) string {
	return fmt.Sprintf("%s–%s", s.start.Sub(t).Round(time.Millisecond), s.end.Sub(t).Round(time.Millisecond))
}

func (p *pipelineSpans) reset() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.spans = map[string][]span{}
}

// first is master's first pipeline since reset, or nil.
func (p *pipelineSpans) first(master string) *span {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.spans[master]) == 0 {
		return nil
	}
	return &p.spans[master][0]
}

// on is the hook for master's node client.
func (p *pipelineSpans) on(master string) redis.Hook { return spanHook{p, master} }

type spanHook struct {
	p      *pipelineSpans
	master string
}

func (h spanHook) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h spanHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook { return next }

func (h spanHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		if !OnNode(ctx) {
			return next(ctx, cmds)
		}
		start := time.Now()
		err := next(ctx, cmds)
		end := time.Now()
		h.p.mu.Lock()
		if h.p.spans != nil {
			h.p.spans[h.master] = append(h.p.spans[h.master], span{start, end})
		}
		h.p.mu.Unlock()
		return err
	}
}

// TestClusterMasterDownOthersUnaffected: one master is down (before its
// replica is promoted, or with none) and a pipeline (the Batcher's: the
// concurrent publishes to any channels) holds appends to it and to the
// masters that are up. The appends to the masters that are up are
// written and must be reported so, at once: go-redis's cluster pipeline
// retried the dead master's commands until the deadline and then set the
// deadline's error on every command of the pipeline, written or not, so
// that while one master was down every publish on every master got 503
// after a second (and was written all the same: retried, it was doubled).
func TestClusterMasterDownOthersUnaffected(t *testing.T) {
	c := redistest.StartOwnedCluster(t, 3, 0, "the test cannot stop its nodes")
	// As redisconn configures it: one dial per attempt, 1 s timeouts.
	rdb, err := redisconn.New(redisconn.Config{ClusterAddrs: c.AddrsEnv(), Timeout: time.Second, KeyPrefix: "x"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rdb.Close() })
	cc := rdb.(*redis.ClusterClient)
	ctx := context.Background()
	ks := keys.Scheme{Prefix: redistest.Prefix(t)}
	t.Cleanup(func() { redistest.Cleanup(cc, ks.Prefix) })
	var chans, masters []string
	seen := map[string]bool{}
	for i := 0; len(chans) < 3; i++ {
		ch := fmt.Sprintf("d-%d", i)
		m, err := cc.MasterForKey(ctx, ks.Stream(ch))
		if err != nil {
			t.Fatal(err)
		}
		if a := m.Options().Addr; !seen[a] {
			seen[a] = true
			chans = append(chans, ch)
			masters = append(masters, a)
		}
	}
	s := NewStore(rdb)
	var as []Append
	for _, ch := range chans {
		as = append(as, Append{Stream: ks.Stream(ch), Notify: ks.Notify(ch),
			Msg: Message{Channel: ch, TS: 1, Data: []byte(`1`)}, Limits: Limits{MaxLen: 100, TTLMS: 60000}})
	}
	if _, err := s.Append(ctx, as); err != nil {
		t.Fatal(err)
	}
	c.StopNode(t, c.Index(masters[0]))
	for round := range 3 {
		pctx, cancel := context.WithTimeout(ctx, time.Second)
		start := time.Now()
		_, errs := s.appendEach(pctx, as)
		took := time.Since(start)
		cancel()
		if errs[0] == nil {
			t.Fatalf("round %d: the append to the stopped master succeeded", round)
		}
		for i := 1; i < 3; i++ {
			if errs[i] != nil {
				t.Errorf("round %d: the append to %s, which is up, failed after %s: %v", round, masters[i], took.Round(time.Millisecond), errs[i])
			}
		}
		// Not held to the deadline (1 s) by the master that is down: its
		// dial is refused at once. The bound is the deadline's, less a
		// margin, not a speed: a loaded machine may take a few hundred
		// milliseconds.
		if took > 900*time.Millisecond {
			t.Errorf("round %d: the pipeline took %s, held by the master that is down", round, took.Round(time.Millisecond))
		}
	}
	for i := 1; i < 3; i++ {
		if n, err := rdb.XLen(ctx, ks.Stream(chans[i])).Result(); err != nil || n != 4 {
			t.Errorf("%s holds %d entries (%v), want 4", chans[i], n, err)
		}
	}
}
