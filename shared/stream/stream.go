// Package stream appends messages to Redis streams and reads them back.
//
// Each channel has one stream (keys.Scheme.Stream). An append is one Lua
// script that, atomically on the channel's slot: reads the id of the
// stream's last entry (prev, cached in the keys.Last key), XADDs the
// message with a Redis-assigned id and records it as the new last id,
// trims by count (approximately, whole stream nodes, so that it stays
// O(1) amortised) and by age (exactly; with the TTL refresh below, once
// per second of the stream's traffic), refreshes the stream's TTL, and
// SPUBLISHes a notification "prev\nid\nts\nroute\nframe" on the channel's
// shard Pub/Sub channel. Egress instances subscribe only to the shard
// channels their sockets need; prev lets them see a gap (a notification
// lost while their Pub/Sub connection was down) and fill it from the
// stream, which stays the source of truth.
package stream

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redisconn"
)

// appendSrc: KEYS[1] stream, KEYS[2] notify channel, KEYS[3] the
// stream's last-id key (keys.Last), optional KEYS[4] once-key (all in one
// slot). ARGV: head, tail, route, ts, maxlen, maxage ms, ttl ms, once-key
// ttl ms. Returns the new entry's id; with a once-key, an append already
// made under that key writes nothing and returns its id in an array of
// one ({id}), so that the caller can tell an entry it appended from one
// found made (wsrelay_ingress_messages_appended_total counts the former
// only) at no cost to the appends that write: their reply stays the id.
//
// The notify channel is passed as a key although it never is one: proxy
// clusters that check scripts (Alibaba Cloud's) refuse a command on a
// name not in KEYS. The price is that Redis Cluster refuses the append
// (TRYAGAIN) for as long as its slot migrates (docs/scaling.md).
//
// The predecessor comes from the last-id key, which every append sets in
// the same atomic step as its XADD; only when that key is missing (first
// append, or expired or evicted) is it read from the stream: the last id
// it generated, its last entry's or, when a Clear emptied it, the last
// one removed. Reading the
// previous entry instead copied its whole body into Lua on every append:
// a fifth of the script's time, for short messages as for 700-byte
// ones (docs/benchmarks.md).
const appendSrc = `
if KEYS[4] then
  local done = redis.call('GET', KEYS[4])
  if done then
    -- A write, so that a WAIT after this call counts replicas that have
    -- the first append too (Redis 7.2+ advances a connection's WAIT
    -- offset only for commands that propagate).
    redis.call('PEXPIRE', KEYS[4], ARGV[8])
    return {done}
  end
end
local prev = redis.call('GET', KEYS[3])
if not prev then
  -- The stream's last generated id: its last entry's (streams are only
  -- appended to and trimmed from the front), or, once a history removal
  -- (Store.Clear) emptied it, the last one removed. No stream: 0-0. One
  -- call either way, so a channel's first append costs what it did.
  prev = '0-0'
  local info = redis.pcall('XINFO', 'STREAM', KEYS[1])
  if not info.err then
    for i = 1, #info, 2 do
      if info[i] == 'last-generated-id' then prev = info[i + 1] end
    end
  end
end
local maxlen = tonumber(ARGV[5])
-- add XADDs the entry; with nomk only to a stream that exists (false
-- otherwise).
local function add(nomk)
  if nomk then
    if maxlen > 0 then
      return redis.call('XADD', KEYS[1], 'NOMKSTREAM', 'MAXLEN', '~', ARGV[5], '*', 'h', ARGV[1], 't', ARGV[2], 'g', ARGV[3], 's', ARGV[4], 'p', prev)
    end
    return redis.call('XADD', KEYS[1], 'NOMKSTREAM', '*', 'h', ARGV[1], 't', ARGV[2], 'g', ARGV[3], 's', ARGV[4], 'p', prev)
  end
  if maxlen > 0 then
    return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], '*', 'h', ARGV[1], 't', ARGV[2], 'g', ARGV[3], 's', ARGV[4], 'p', prev)
  end
  return redis.call('XADD', KEYS[1], '*', 'h', ARGV[1], 't', ARGV[2], 'g', ARGV[3], 's', ARGV[4], 'p', prev)
end
-- An append that creates the stream (the channel's first, or one whose
-- stream expired, was evicted or deleted) is told so by NOMKSTREAM, at
-- no cost to the others: it sets the new stream's TTL below whatever
-- second it falls in. The once-a-second refresh alone left a stream
-- recreated in its last entry's second (evicted before its last-id key,
-- whose TTL is twice its own) with no TTL at all.
local id = add(true)
local created = not id
if created then id = add(false) end
-- Ids compared as decimal strings without leading zeros: by length, then
-- by text (a sequence number may be past what a Lua number holds).
local d, pd = string.find(id, '-', 1, true), string.find(prev, '-', 1, true)
local ms, pms = string.sub(id, 1, d - 1), string.sub(prev, 1, pd - 1)
if #ms < #pms or (#ms == #pms and ms <= pms) then
  local seq, pseq = string.sub(id, d + 1), string.sub(prev, pd + 1)
  if ms ~= pms or #seq < #pseq or (#seq == #pseq and seq <= pseq) then
    -- Redis makes an id greater than its stream's last, but a stream
    -- created anew (expired, evicted) takes Redis's clock, which can be
    -- behind the last id (stepped back, another host's after a
    -- failover, or the same millisecond right after an eviction): ids
    -- going backwards would pass for ones already sent. So the entry
    -- goes after prev instead.
    redis.call('XDEL', KEYS[1], id)
    redis.call('XSETID', KEYS[1], prev)
    id = add(false)
    ms = string.sub(id, 1, string.find(id, '-', 1, true) - 1)
  end
end
local ttl = tonumber(ARGV[7])
if ttl > 0 then
  -- The last id outlives its stream (twice the TTL), so that a stream
  -- recreated after expiring continues the chain instead of starting a
  -- new one at 0-0, which a client at position 0-0 would take for its own.
  redis.call('SET', KEYS[3], id, 'PX', 2 * ttl)
else
  redis.call('SET', KEYS[3], id)
end
-- Trimming by age and refreshing the stream's TTL are done by the first
-- append in each second of a stream's traffic (ids are milliseconds),
-- which is as precise as needed and saves three commands per append on
-- busy channels, and by the append that created the stream. (While
-- Redis's clock is behind the stream's last id, every id keeps that id's
-- millisecond: a busy stream is then refreshed only once the clock has
-- caught up, docs/design.md.) Without a TTL, an expiry the stream was
-- given under an earlier one is taken off (PERSIST), or a stream kept
-- "forever" would still expire whole, busy or not.
ms, pms = tonumber(ms), tonumber(pms)
if created or math.floor(ms / 1000) ~= math.floor(pms / 1000) then
  local maxage = tonumber(ARGV[6])
  if maxage > 0 and ms > maxage then
    -- Exactly: '~' keeps every entry of a node that also holds a young
    -- one (a quiet channel kept messages many times maxage old, as long
    -- as its node took to fill) and removes at most 10,000 a call.
    -- Whole nodes go as cheaply either way; exact adds at most one
    -- node's entries, once a second.
    redis.call('XTRIM', KEYS[1], 'MINID', string.format('%.0f', ms - maxage))
  end
  if ttl > 0 then
    redis.call('PEXPIRE', KEYS[1], ARGV[7])
  else
    redis.call('PERSIST', KEYS[1])
  end
end
redis.call('SPUBLISH', KEYS[2], prev .. '\n' .. id .. '\n' .. ARGV[4] .. '\n' .. ARGV[3] .. '\n' .. ARGV[1] .. id .. ARGV[2])
if KEYS[4] then redis.call('SET', KEYS[4], id, 'PX', ARGV[8]) end
return id
`

// appendSHA and appendSource are the script's SHA-1 (by which EVALSHA
// names it) and its source, as command arguments boxed once.
var (
	appendSHA    any = redis.NewScript(appendSrc).Hash()
	appendSource any = appendSrc
)

// appendCall holds the EVALSHA (or EVAL) command of one append: its
// arguments and the strings they point to. go-redis writes a *string or
// *int64 argument as the value it points to, and boxing a pointer into an
// interface allocates nothing, where boxing a string or an int64
// allocates each (and the typed EvalSha copied keys and arguments into a
// slice of its own): so the script's arguments (ARGV) point into the
// Append and into the call. The keys stay strings, as hooks that look for
// a key in a command's Args expect. An append's command allocates 5 times
// (the call, the last-id key, the keys' boxes) instead of 15
// (docs/benchmarks.md).
type appendCall struct {
	args       [15]any
	head, tail string
}

// appendArgs returns the command that runs a's append: EVALSHA, or EVAL
// with the script's source when load is set. a must not change until the
// command has run.
func appendArgs(a *Append, load bool) []any {
	c := new(appendCall)
	c.head, c.tail = a.Msg.Frame()
	args := append(c.args[:0], "evalsha", appendSHA, 3, a.Stream, a.Notify, keys.Last(a.Stream))
	if load {
		args[0], args[1] = "eval", appendSource
	}
	if a.Once != "" {
		args[2] = 4
		args = append(args, a.Once)
	}
	// ARGV: head, tail, route, ts, maxlen, maxage ms, ttl ms, once-key ttl ms.
	return append(args, &c.head, &c.tail, (*string)(&a.Msg.Route), &a.Msg.TS,
		&a.Limits.MaxLen, &a.Limits.MaxAgeMS, &a.Limits.TTLMS, &a.OnceTTLMS)
}

// Limits bound one stream. Zero means no bound of that kind.
type Limits struct {
	MaxLen   int64 // entries kept (approximately: Redis trims whole nodes)
	MaxAgeMS int64 // entries older than this are trimmed by a later append (the first in each second)
	TTLMS    int64 // the whole stream expires this long (to within a second) after its last append; zero: never (an expiry set before is taken off)
}

// Append is one message to append to one stream.
type Append struct {
	Stream string // key
	Notify string // shard channel, same hash tag as Stream
	Msg    Message
	Limits Limits
	// Once, when set, is a key (same hash tag as Stream) that makes the
	// append happen at most once: the script records the id there for
	// OnceTTLMS and a later append with the same Once returns that id
	// without writing (and Batcher.AppendCount does not count it).
	// Idempotency-Key retries rely on it, so that a retry after a lost
	// reply cannot write twice.
	Once      string
	OnceTTLMS int64
}

// Store appends to and reads from streams. It is safe for concurrent use.
type Store struct {
	rdb redis.UniversalClient

	// waitReplicas, when positive, makes every append wait (Redis WAIT)
	// until that many replicas have it, for at most waitTimeout.
	waitReplicas int
	waitTimeout  time.Duration
}

// NewStore returns a Store using rdb.
func NewStore(rdb redis.UniversalClient) *Store { return &Store{rdb: rdb} }

// ErrNotReplicated is returned for an append that Redis wrote but fewer
// replicas than required acknowledged within the wait timeout: it may be
// lost by a failover, so it is not reported as written.
var ErrNotReplicated = errors.New("stream: append not acknowledged by enough replicas in time")

// WaitForReplicas makes each append count as written only once n replicas
// have it (Redis WAIT after the append pipeline, on the same connection,
// bounded by timeout). Zero n turns it off (the default). Call it before
// the Store is used.
func (s *Store) WaitForReplicas(n int, timeout time.Duration) {
	s.waitReplicas, s.waitTimeout = n, timeout
}

// Append writes every append in one pipeline and returns the ids in order.
// On error, some appends may have been written: callers that need
// at-most-once use an idempotency key (ingress).
func (s *Store) Append(ctx context.Context, as []Append) ([]string, error) {
	ids, errs := s.appendEach(ctx, as)
	for i, err := range errs {
		if err != nil {
			return nil, fmt.Errorf("append %d of %d: %w", i+1, len(as), err)
		}
	}
	return ids, nil
}

// appendEach is Append with one result per append: in a pipeline, one
// append failing does not fail the others. as are one caller's appends.
func (s *Store) appendEach(ctx context.Context, as []Append) ([]string, []error) {
	ids, errs, _ := s.appendLoading(ctx, as, loadFirstOfRepeated(nil, as, 0, len(as)))
	return ids, errs
}

// loadFirstOfRepeated marks in load (allocated, len(as), when nil) the
// first of as[lo:hi], one caller's appends, to each stream that they
// append to more than once, and returns load (nil if nothing is marked).
//
// Those appends are sent with the script's source (EVAL), so that the
// caller's later appends to the stream, sent by hash (EVALSHA), cannot
// run before them. Without it, when Redis's script cache was empty (after
// a restart or a failover), the first append was refused (NOSCRIPT), then
// another connection loaded the script between two reads of the pipeline,
// the second append ran, and the first was appended after it by the
// retry below: out of the caller's order.
func loadFirstOfRepeated(load []bool, as []Append, lo, hi int) []bool {
	if hi-lo < 2 {
		return load
	}
	first := make(map[string]int, hi-lo)
	for i := lo; i < hi; i++ {
		f, seen := first[as[i].Stream]
		if !seen {
			first[as[i].Stream] = i
			continue
		}
		if load == nil {
			load = make([]bool, len(as))
		}
		load[f] = true
	}
	return load
}

// appendLoading is appendEach for appends of several callers, sending as
// EVAL the appends load marks (nil: none). Its third result marks the
// appends that found their once-key set (made before: they wrote
// nothing); nil when none of as has a once-key. (Results not named: the
// goroutines below, capturing them, would move them to the heap.)
func (s *Store) appendLoading(ctx context.Context, as []Append, load []bool) ([]string, []error, []bool) {
	ids := make([]string, len(as))
	errs := make([]error, len(as))
	made := madeFor(as)
	cc, ok := s.rdb.(*redis.ClusterClient)
	if !ok {
		s.appendOn(ctx, s.rdb, as, load, allIndexes(len(as)), ids, errs, made)
		return ids, errs, made
	}
	// On a cluster, each master's appends run in their own pipeline on
	// that master, all at once: a master that is down (before its
	// replica's promotion, or with none) fails its own appends only.
	// go-redis's cluster pipeline retried a dead master's commands until
	// the deadline and then set the deadline's error on every command of
	// the pipeline, written or not: while one master was down, every
	// publish on every master answered 503 after REDIS_TIMEOUT (and was
	// written all the same). With WaitForReplicas, WAIT counts the
	// replicas that have every write made so far on the same connection:
	// each master's appends and its WAIT share that pipeline.
	//
	// The node pipelines' context says so (OnNode) to the hooks of the
	// node clients, which alone see them.
	nctx := context.WithValue(ctx, onNodeKey{}, true)
	groups := make(map[*redis.Client][]int)
	for i := range as {
		node, err := cc.MasterForKey(ctx, as[i].Stream)
		if err != nil {
			errs[i] = fmt.Errorf("append to %s: %w", as[i].Stream, err)
			continue
		}
		groups[node] = append(groups[node], i)
	}
	// Each master's pipeline at once: a master whose WAIT runs to its
	// timeout (a replica gone or lagging) must not hold up the others,
	// nor push their appends past ctx's deadline. appendOn fills only its
	// own indexes.
	var wg sync.WaitGroup
	for node, idx := range groups {
		wg.Go(func() { s.appendOn(nctx, node, as, load, idx, ids, errs, made) })
	}
	wg.Wait()
	// These appends ran on node clients, outside the cluster client's
	// routing, which reloads the slot map only on its own MOVED answers:
	// a failure here (a dead master, a slot moved) would otherwise keep
	// sending the slot's appends to the same node until go-redis's
	// periodic reload, a minute later. The reload is lazy and coalesced.
	for _, err := range errs {
		if err != nil && !errors.Is(err, ErrNotReplicated) {
			cc.ReloadState(ctx)
			break
		}
	}
	// A slot that moved since the slot map was read answers MOVED, and the
	// script did not run: run those appends once more on the master the
	// answer names (go-redis follows redirections only for the commands it
	// routes itself). The answer, not a reloaded map, names it: the map is
	// read from any node, which may not have heard of the move yet. (A
	// slot being migrated answers ASK or TRYAGAIN: the script's keys
	// include the notification channel, which is never a key, so the
	// importing master would answer TRYAGAIN after ASKING; go-redis's own
	// routing fared no better: 503, nothing written, docs/scaling.md.)
	//
	// Only while no earlier append to the same stream failed otherwise: a
	// pipeline can run into a slot's whole migration, its first appends
	// written on the source, the next refused there (TRYAGAIN or ASK,
	// while the slot migrates) and the later ones answered MOVED. Run
	// again, those were written before the refused one, which its retry
	// (with the same once-keys) then appended after them: out of the
	// request's order (docs/api.md). They keep their MOVED (503, nothing
	// written) and are retried with it.
	moved := make(map[string][]int)
	var failed map[string]bool // streams with an append failed for good
	for i, err := range errs {
		if err == nil {
			continue
		}
		if f := strings.Fields(redisError(err)); len(f) == 3 && f[0] == "MOVED" && !failed[as[i].Stream] {
			moved[f[2]] = append(moved[f[2]], i)
			continue
		}
		if failed == nil {
			failed = make(map[string]bool)
		}
		failed[as[i].Stream] = true
	}
	if len(moved) == 0 {
		return ids, errs, made
	}
	var mu sync.Mutex
	found := make(map[string][]*redis.Client)
	_ = cc.ForEachMaster(ctx, func(_ context.Context, node *redis.Client) error { // concurrently
		mu.Lock()
		defer mu.Unlock()
		for target := range moved {
			if sameNode(target, node.Options().Addr) {
				found[target] = append(found[target], node)
			}
		}
		return nil
	})
	for target, nodes := range found {
		if len(nodes) != 1 {
			continue // not sure which: they keep their MOVED (503, nothing written)
		}
		idx := moved[target]
		for _, i := range idx {
			errs[i] = nil
		}
		wg.Go(func() { s.appendOn(nctx, nodes[0], as, load, idx, ids, errs, made) })
	}
	wg.Wait()
	return ids, errs, made
}

// madeFor returns the slice in which appendLoading marks those of as
// found made before, allocated only for appends with once-keys
// (Idempotency-Key publishes): without one, an append always writes.
// (A function, so that made is assigned once: the goroutines that
// capture it then copy it instead of moving it to the heap.)
func madeFor(as []Append) []bool {
	for i := range as {
		if as[i].Once != "" {
			return make([]bool, len(as))
		}
	}
	return nil
}

type onNodeKey struct{}

// OnNode reports whether ctx is that of a pipeline a Store runs itself on
// a cluster master's own client (appends waiting for replicas, which WAIT
// must follow on the same connection). Only that node client's hooks see
// such a pipeline, not the cluster client's: a hook added to the node
// clients (ClusterClient.OnNewNode) that counts only these counts each
// pipeline once, without counting again the commands the cluster client
// routes to the same node clients.
func OnNode(ctx context.Context) bool { return ctx.Value(onNodeKey{}) != nil }

// sameNode reports whether target, a node address from a MOVED answer
// (host:port, an IPv6 host without brackets), is the node go-redis
// reaches at addr. go-redis renames a node that announces a loopback host
// with the host it reached the cluster at, so for those the port decides.
func sameNode(target, addr string) bool {
	i := strings.LastIndexByte(target, ':')
	h, p, err := net.SplitHostPort(addr)
	if i < 0 || err != nil || target[i+1:] != p {
		return false
	}
	th := target[:i]
	if th == h {
		return true
	}
	ip := net.ParseIP(th)
	return ip != nil && ip.IsLoopback()
}

// redisError is the message of the Redis error reply in err, or "".
func redisError(err error) string {
	var re redis.Error
	if errors.As(err, &re) {
		return re.Error()
	}
	return ""
}

func allIndexes(n int) []int {
	idx := make([]int, n)
	for i := range idx {
		idx[i] = i
	}
	return idx
}

type pipeliner interface {
	Pipelined(ctx context.Context, fn func(redis.Pipeliner) error) ([]redis.Cmder, error)
}

// appendOn runs the appends as[idx] in one pipeline on c (followed by WAIT
// when the Store waits for replicas), filling ids and errs at idx, and
// made (nil when no append has a once-key) for those that found their
// once-key set. The appends load marks are sent with the script's source.
func (s *Store) appendOn(ctx context.Context, c pipeliner, as []Append, load []bool, idx []int, ids []string, errs []error, made []bool) {
	cmds := make(map[int]*redis.Cmd, len(idx))
	run := func(idx []int, all bool) *redis.Cmd {
		var wait *redis.Cmd
		queued := make([]redis.Cmder, 0, len(idx)+1)
		_, err := c.Pipelined(ctx, func(p redis.Pipeliner) error {
			for _, i := range idx {
				cmd := p.Do(ctx, appendArgs(&as[i], all || load != nil && load[i])...)
				cmd.SetFirstKeyPos(3) // as EvalSha does
				cmds[i] = cmd
				queued = append(queued, cmd)
			}
			if s.waitReplicas > 0 {
				wait = p.Do(ctx, "WAIT", s.waitReplicas, s.waitTimeout.Milliseconds())
				queued = append(queued, wait)
			}
			return nil
		})
		failUnrun(err, queued...)
		return wait
	}
	wait := run(idx, false)
	// Scripts missing from the script cache did not run: run those again
	// with the script's source. Any other error is final.
	var retry []int
	for _, i := range idx {
		if err := cmds[i].Err(); err != nil && redis.HasErrorPrefix(err, "NOSCRIPT") {
			retry = append(retry, i)
		}
	}
	if len(retry) > 0 {
		if w := run(retry, true); w != nil {
			wait = w // the later WAIT covers the earlier writes too
		}
	}
	replicated := true
	var waitErr error // WAIT itself failed: refused (ACL), or Redis went away
	if wait != nil {
		n, err := wait.Int()
		replicated, waitErr = err == nil && n >= s.waitReplicas, err
	}
	for _, i := range idx {
		c := cmds[i]
		if c.Err() != nil {
			errs[i] = fmt.Errorf("append to %s: %w", as[i].Stream, c.Err())
			continue
		}
		id, before, ok := appendReply(c.Val())
		if !ok {
			errs[i] = fmt.Errorf("append to %s: unexpected reply %T", as[i].Stream, c.Val())
			continue
		}
		if before && made != nil { // nil: no once-key, never made before
			made[i] = true
		}
		if !replicated {
			if waitErr != nil {
				errs[i] = fmt.Errorf("append to %s (written as %s): %w (WAIT: %w)", as[i].Stream, id, ErrNotReplicated, waitErr)
				continue
			}
			errs[i] = fmt.Errorf("append to %s (written as %s): %w", as[i].Stream, id, ErrNotReplicated)
			continue
		}
		ids[i] = id
	}
}

// appendReply reads the append script's reply v: the id of the entry it
// appended, or that of the one made before under its once-key ({id}),
// which before reports.
func appendReply(v any) (id string, before, ok bool) {
	switch v := v.(type) {
	case string:
		return v, false, true
	case []any:
		if len(v) == 1 {
			id, ok = v[0].(string)
			return id, true, ok
		}
	}
	return "", false, false
}

// Entry is one stream entry read back.
type Entry struct {
	ID    string
	Prev  string // the id of the entry appended before it (field p)
	Head  string
	Tail  string
	Route Route
	TS    int64
}

// Frame is the entry's complete "message" frame.
func (e *Entry) Frame() []byte {
	b := make([]byte, 0, len(e.Head)+len(e.ID)+len(e.Tail))
	b = append(b, e.Head...)
	b = append(b, e.ID...)
	return append(b, e.Tail...)
}

func entriesOf(msgs []redis.XMessage) []Entry {
	out := make([]Entry, 0, len(msgs))
	for _, m := range msgs {
		e := Entry{ID: m.ID}
		e.Prev, _ = m.Values["p"].(string)
		e.Head, _ = m.Values["h"].(string)
		e.Tail, _ = m.Values["t"].(string)
		r, _ := m.Values["g"].(string)
		e.Route = Route(r)
		ts, _ := m.Values["s"].(string)
		e.TS, _ = strconv.ParseInt(ts, 10, 64)
		out = append(out, e)
	}
	return out
}

// Latest reads the newest count entries, oldest first.
func (s *Store) Latest(ctx context.Context, key string, count int64) ([]Entry, error) {
	return s.latest(ctx, key, "+", count)
}

// LatestBefore reads the newest count entries with ids below before,
// oldest first: Latest, continued towards older entries in bounded reads
// (before is the oldest id read so far).
func (s *Store) LatestBefore(ctx context.Context, key string, before ID, count int64) ([]Entry, error) {
	if before.IsZero() {
		return nil, nil // nothing is below 0-0, and Redis refuses "(0-0"
	}
	return s.latest(ctx, key, "("+before.String(), count)
}

func (s *Store) latest(ctx context.Context, key, end string, count int64) ([]Entry, error) {
	msgs, err := s.rdb.XRevRangeN(ctx, key, end, "-", count).Result()
	if err != nil {
		return nil, fmt.Errorf("read newest of %s: %w", key, err)
	}
	for i, j := 0, len(msgs)-1; i < j; i, j = i+1, j-1 {
		msgs[i], msgs[j] = msgs[j], msgs[i]
	}
	return entriesOf(msgs), nil
}

// LastID returns the id of the last message appended to the stream: its
// newest entry or, when the stream is empty or gone, the last-id key that
// outlives it (the predecessor the next append will name); Zero when
// neither exists. A subscriber given this position and resuming from it
// later has missed nothing if the chain continues from it.
func (s *Store) LastID(ctx context.Context, key string) (ID, error) {
	var rev *redis.XMessageSliceCmd
	var last *redis.StringCmd
	_, err := s.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		rev, last = queueLastID(ctx, p, key)
		return nil
	})
	failUnrun(err, rev, last)
	return lastIDOf(key, rev, last)
}

// failUnrun gives cmds the pipeline's error err when none of them has an
// error of its own. go-redis does that when the pipeline's connection
// could not be set up because Redis answered with an error (a wrong
// password: WRONGPASS): it returns that error and leaves every command
// without a reply and without an error, which would read as an empty
// stream (LastID 0-0) or an "unexpected reply". Otherwise err is the
// first command's own error, or the connection's, and every command
// keeps its own: the connection's for those left unanswered, and (on
// the client redisconn.New makes) its reply for one answered before the
// connection failed.
func failUnrun(err error, cmds ...redis.Cmder) {
	if err == nil {
		return
	}
	for _, c := range cmds {
		if c.Err() != nil {
			return
		}
	}
	for _, c := range cmds {
		c.SetErr(err)
	}
}

// queueLastID queues the two reads LastID combines.
func queueLastID(ctx context.Context, p redis.Pipeliner, key string) (*redis.XMessageSliceCmd, *redis.StringCmd) {
	return p.XRevRangeN(ctx, key, "+", "-", 1), p.Get(ctx, keys.Last(key))
}

// lastIDOf is LastID from the replies of queueLastID's reads.
func lastIDOf(key string, rev *redis.XMessageSliceCmd, last *redis.StringCmd) (ID, error) {
	if err := rev.Err(); err != nil {
		return ID{}, fmt.Errorf("read last id of %s: %w", key, err)
	}
	if err := last.Err(); err != nil && !errors.Is(err, redis.Nil) {
		return ID{}, fmt.Errorf("read last id of %s: %w", key, err)
	}
	id := Zero
	if msgs := rev.Val(); len(msgs) > 0 {
		id = MustParseID(msgs[0].ID)
	}
	if l, ok := ParseID(last.Val()); ok && id.Less(l) {
		id = l
	}
	return id, nil
}

// clearSrc: KEYS[1] stream, KEYS[2] its last-id key (keys.Last). Trims
// the stream to nothing and returns how many entries it held. When the
// last-id key is missing (evicted, or a stream last written before the key
// existed), it is also written with the stream's last generated id, for
// twice the stream's remaining TTL as an append would: an emptied stream
// has no last entry to stand in for it, so LastID and Resume would read
// 0-0, and a client at the last message removed would be told it missed
// some. (The append script reads the last generated id itself, for a key
// lost after the removal.) The key is written after the trim: at its
// maxmemory Redis refuses a script's first write that may grow memory but
// not the ones after it, so a removal, which is how an operator frees a
// full Redis, still works then (TestClearOutOfMemory).
const clearSrc = `
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local last, pttl
if redis.call('EXISTS', KEYS[2]) == 0 then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then last = info[i + 1] end
  end
  pttl = redis.call('PTTL', KEYS[1])
end
local n = redis.call('XTRIM', KEYS[1], 'MAXLEN', 0)
if last and last ~= '0-0' then
  if pttl > 0 then
    redis.call('SET', KEYS[2], last, 'PX', 2 * pttl)
  else
    redis.call('SET', KEYS[2], last)
  end
end
return n
`

var clearScript = redis.NewScript(clearSrc)

// Clear removes every entry of the stream at key and returns how many
// it held (0 for a stream that does not exist). It trims the stream to
// nothing (XTRIM MAXLEN 0, atomic with the append script, O(entries))
// rather than deleting the key, so that Redis keeps the stream's last
// generated id: an append in the same millisecond as the last one removed
// still gets a greater id, which a deleted key would not give
// (subscribers at that id would take the new message for one they had).
// The last-id key is kept, or written when missing (clearSrc), so the
// chain goes on: a reader at the last id appended misses nothing; a
// reader behind it finds its position gone and resumes with Continuous
// false, as after trimming.
func (s *Store) Clear(ctx context.Context, key string) (int64, error) {
	// Not sent again after a late reply (NoResend): run twice, the clear
	// would remove what was appended in between.
	n, err := clearScript.Run(ctx, redisconn.NoResend(s.rdb), []string{key, keys.Last(key)}).Int64()
	if err != nil {
		return 0, fmt.Errorf("clear %s: %w", key, err)
	}
	return n, nil
}

// Batch is what Resume read.
type Batch struct {
	// Entries are the entries that follow From, oldest first.
	Entries []Entry
	// Continuous reports that nothing appended after `after` is missing:
	// the entries follow it directly, or nothing was appended after it.
	Continuous bool
	// From is the position the entries follow, which a reader continues
	// from: `after` when Continuous; otherwise the predecessor of the
	// oldest entry left, or, when none is left after `after`, the
	// stream's last id (LastID). An `after` ahead of the stream (a
	// position from another stream, or from a master that failed over)
	// so gives way to the stream's own position instead of hiding every
	// message older than it.
	From ID
}

// Resume reads up to count entries after `after` and whether the stream
// still holds everything appended after `after`. A client resuming, and
// each later batch of its replay, reads with it; so does an egress
// filling a gap in its notifications.
//
// Continuity is decided from the stream itself. Each entry records the id
// of the entry before it (field p, written by the append script), so the
// chain proves it: `after` is still in the stream, or the oldest entry
// after it that names a predecessor names `after` (`after` itself was the last
// entry trimmed), or nothing follows `after` and it is the last id
// appended. A stream that lost data — trimmed past `after`, expired, or
// recreated after Redis restarted without persistence or failed over to a
// replica that lagged — breaks the chain, so the answer is false. See
// docs/protocol.md.
func (s *Store) Resume(ctx context.Context, key string, after ID, count int64) (Batch, error) {
	msgs, err := s.rdb.XRangeN(ctx, key, after.String(), "+", count+1).Result()
	if err != nil {
		return Batch{}, fmt.Errorf("resume %s after %s: %w", key, after, err)
	}
	if len(msgs) == 0 {
		// Nothing at or after `after`: read that again with the last id,
		// in one transaction (the keys share a slot), since an append
		// landing between two separate reads would look like a gap.
		var xr *redis.XMessageSliceCmd
		var rev *redis.XMessageSliceCmd
		var lastKey *redis.StringCmd
		_, err := s.rdb.TxPipelined(ctx, func(p redis.Pipeliner) error {
			xr = p.XRangeN(ctx, key, after.String(), "+", count+1)
			rev, lastKey = queueLastID(ctx, p, key)
			return nil
		})
		failUnrun(err, xr, rev, lastKey)
		if err := xr.Err(); err != nil {
			return Batch{}, fmt.Errorf("resume %s after %s: %w", key, after, err)
		}
		if msgs = xr.Val(); len(msgs) == 0 {
			// Nothing is missing if `after` is the last id appended (the
			// stream emptied by age, or expired while its last-id key
			// lives on), or if nothing was ever appended (Zero, and
			// neither key exists; design.md says when that can also
			// follow a long silence).
			last, err := lastIDOf(key, rev, lastKey)
			if err != nil {
				return Batch{}, err
			}
			return Batch{Continuous: last == after, From: last}, nil
		}
	}
	if MustParseID(msgs[0].ID) == after {
		return Batch{Entries: entriesOf(msgs[1:]), Continuous: true, From: after}, nil
	}
	if len(msgs) > int(count) {
		msgs = msgs[:count]
	}
	b := Batch{Entries: entriesOf(msgs), From: after}
	// The first entry that names its predecessor decides. Those before it
	// name none: another application wrote them under the key prefix (no
	// append names them either, the next names the message before them),
	// and the first entry alone decided, so that a reader who had missed
	// nothing was told it had.
	for _, e := range b.Entries {
		if p, ok := ParseID(e.Prev); ok {
			b.Continuous = p == after
			b.From = p
			break
		}
	}
	return b, nil
}

// Notification is a parsed append announcement.
type Notification struct {
	Prev  ID
	ID    ID
	IDStr string
	TS    int64
	Route Route
	// Frame is the message's frame, a slice of the payload: the egress
	// writes it to its sockets without another copy.
	Frame string
}

// ErrBadNotification is returned for a payload not written by Append.
var ErrBadNotification = errors.New("stream: malformed notification")

// ParseNotification parses "prev\nid\nts\nroute\nframe".
func ParseNotification(payload string) (Notification, error) {
	var n Notification
	var parts [4]string
	rest := payload
	for i := range parts {
		j := strings.IndexByte(rest, '\n')
		if j < 0 {
			return n, ErrBadNotification
		}
		parts[i], rest = rest[:j], rest[j+1:]
	}
	var ok1, ok2 bool
	var err error
	n.Prev, ok1 = ParseID(parts[0])
	n.ID, ok2 = ParseID(parts[1])
	// Append always writes ts: a payload without one (empty, or another
	// field in its place) was not written by it, and its other fields
	// would be misread.
	n.TS, err = strconv.ParseInt(parts[2], 10, 64)
	if !ok1 || !ok2 || err != nil {
		return n, ErrBadNotification
	}
	n.IDStr = parts[1]
	n.Route = Route(parts[3])
	n.Frame = rest
	return n, nil
}

// Decode parses the entry's frame back into its fields.
func (e *Entry) Decode() (Decoded, error) {
	var d Decoded
	err := json.Unmarshal(e.Frame(), &d)
	d.Type = ""
	return d, err
}
