// Package registry records live WebSocket connections in Redis: who is
// connected, on which egress instance, subscribed to what.
//
// Each connection has one record key (JSON, with a TTL) and is a member of
// two kinds of sorted sets: its user's and each subscribed channel's,
// scored by the unix-ms time its registration expires. The owning egress
// instance refreshes all of them every TTL/3; when an instance dies, its
// records expire within TTL and its set members are skipped from then on
// and removed, once their score is a TTL past, by a reader or by the next
// connection to join the set (each set also carries a TTL, so a set
// nobody refreshes disappears whole).
//
// Whether a member is live is its record key's to say: Redis expires it,
// by Redis's clock. The scores are written by the egress's clock and read
// by the ingress's, so they only bound how long a dead member is read:
// a reader counts a member until a TTL past its score, and reads the
// newest first, so that clocks apart by less than a TTL hide nobody.
package registry

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
)

// ErrNotFound is returned for a connection that is not registered.
var ErrNotFound = errors.New("registry: no such connection")

// Record is one connection's registration.
type Record struct {
	ID          string    `json:"id"`
	User        string    `json:"user"`
	Instance    string    `json:"instance"`
	Channels    []string  `json:"channels"`
	ConnectedAt time.Time `json:"connected_at"`
}

// fill makes a record read back (perhaps written by an older egress, with
// "channels": null) list its channels as an array.
func (rec *Record) fill() {
	if rec.Channels == nil {
		rec.Channels = []string{}
	}
}

// Registry reads and writes records. It is safe for concurrent use.
type Registry struct {
	rdb  redis.UniversalClient
	keys keys.Scheme
	ttl  time.Duration
	now  func() time.Time // time.Now; another clock in tests
}

// New returns a Registry whose records live ttl unless refreshed.
func New(rdb redis.UniversalClient, ks keys.Scheme, ttl time.Duration) *Registry {
	return &Registry{rdb: rdb, keys: ks, ttl: ttl, now: time.Now}
}

// TTL is how long a record outlives its last refresh.
func (r *Registry) TTL() time.Duration { return r.ttl }

func (r *Registry) expiry() float64 {
	return float64(r.now().Add(r.ttl).UnixMilli())
}

// writeRecord queues the write of rec's record key alone.
func (r *Registry) writeRecord(ctx context.Context, p redis.Pipeliner, rec *Record) error {
	if rec.Channels == nil {
		// [] in the JSON, as the API shows it, never null.
		cp := *rec
		cp.Channels = []string{}
		rec = &cp
	}
	b, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	p.Set(ctx, r.keys.Conn(rec.ID), b, r.ttl)
	return nil
}

// addMember queues rec's membership of the sorted set at key, scored by
// when it expires, and the set's own TTL; with prune, then the removal
// of the set's members a TTL past their expiry (pruneCmd).
func (r *Registry) addMember(ctx context.Context, p redis.Pipeliner, key string, rec *Record, score float64, prune bool) {
	p.ZAdd(ctx, key, redis.Z{Score: score, Member: rec.ID})
	p.PExpire(ctx, key, r.ttl)
	if prune {
		p.ZRemRangeByScore(ctx, key, "-inf", r.cutoff())
	}
}

// pruneCmd names the command that removes dead members from a set as a
// connection joins it. A set that a live connection keeps refreshing
// never expires, and the members of connections that ended without their
// ZREM (their instance killed, SIGKILL or a platform reclaiming it; a
// ZREM that failed) were removed only by a reader of the set, which a
// channel or user nobody lists or sends to never has: on a platform
// whose instances come and go by the thousand a day (SCF), a busy
// channel's set grew by each of them, for good. Removing them as a
// member joins bounds a set by its connections of the last two TTLs
// (dead members only come in by joins, and each join removes those a
// TTL past their expiry), at one command per join, not per refresh.
// Best effort, as a reader's: a handshake's Put (Batcher) does not fail
// by its error alone, and it is on the key of the ZADD before it, whose
// node and fate it shares.
const pruneCmd = "zremrangebyscore"

// cutoff is the score at or below which a member is a TTL past its
// expiry: dead, whatever the clocks of its writer and this process
// (within the grace the package comment gives), and removed.
func (r *Registry) cutoff() string {
	return strconv.FormatInt(r.now().Add(-r.ttl).UnixMilli(), 10)
}

// write queues rec's record and memberships, each key for which keep
// (when not nil) is true; with prune (a connection's first write), each
// set's dead members are removed too (pruneCmd).
func (r *Registry) write(ctx context.Context, p redis.Pipeliner, rec *Record, score float64, keep func(key string) bool, prune bool) error {
	if keep == nil || keep(r.keys.Conn(rec.ID)) {
		if err := r.writeRecord(ctx, p, rec); err != nil {
			return err
		}
	}
	if rec.User != "" {
		if key := r.keys.UserConns(rec.User); keep == nil || keep(key) {
			r.addMember(ctx, p, key, rec, score, prune)
		}
	}
	for _, ch := range rec.Channels {
		if key := r.keys.ChannelConns(ch); keep == nil || keep(key) {
			r.addMember(ctx, p, key, rec, score, prune)
		}
	}
	return nil
}

// Put writes rec (creating or replacing it) and its set memberships, and
// removes the dead members of those sets (pruneCmd).
func (r *Registry) Put(ctx context.Context, rec *Record) error {
	f := r.Refresher()
	f.prune = true
	return f.Write(ctx, []*Record{rec})
}

// Refresh rewrites every record in recs with a fresh TTL, in pipelined
// batches (a Refresher's Write).
func (r *Registry) Refresh(ctx context.Context, recs []*Record) error {
	return r.Refresher().Write(ctx, recs)
}

// Refresher is one refresh of many records, written a batch at a time by
// Write (the records of one Write with the same expiry, as of its
// start). On a Redis Cluster a master that
// failed one of its pipelines (it is down, until its failover is over)
// is not written to again by the same refresh: go-redis retries a
// refused dial for seconds, so that each batch holding one of its keys
// (most of them) would wait that long, and the records on the masters
// that answer, in the later batches, would expire before the refresh
// reached them. Its keys count as failed writes. Not safe for
// concurrent use.
type Refresher struct {
	r  *Registry
	cc *redis.ClusterClient // nil on a single node
	// down holds the masters (by address) that failed a write of this
	// refresh.
	down map[string]error
	// prune: the write is a Put's (pruneCmd).
	prune bool
}

// Refresher starts a refresh.
func (r *Registry) Refresher() *Refresher {
	cc, _ := r.rdb.(*redis.ClusterClient)
	return &Refresher{r: r, cc: cc, down: map[string]error{}}
}

// GoOn reports whether, after Write failed, the writes that follow are
// worth making: on a cluster (a master down leaves the others to write,
// and a master that failed is left out from then on, so that going on
// costs at most one failed pipeline per master), not on a single Redis,
// which, having failed one, has most likely failed them all: each more
// would only wait for it again, for as long as a pipeline may take.
func (f *Refresher) GoOn() bool { return f.cc != nil }

// Write rewrites every record in recs with a fresh TTL, in pipelined
// batches of 256 records. On an error it stops unless GoOn (on a
// cluster, it goes on with the masters that answer), and returns the
// first error.
func (f *Refresher) Write(ctx context.Context, recs []*Record) error {
	const batch = 256
	score := f.r.expiry()
	var first error
	for len(recs) > 0 {
		n := min(batch, len(recs))
		err := f.batch(ctx, recs[:n], score)
		if err != nil {
			if first == nil {
				first = fmt.Errorf("registry refresh: %w", err)
			}
			if !f.GoOn() {
				return first
			}
		}
		recs = recs[n:]
	}
	return first
}

// batch writes recs in one pipeline, their memberships scored score,
// leaving out the keys of masters down (whose error it returns).
func (f *Refresher) batch(ctx context.Context, recs []*Record, score float64) error {
	var keep func(string) bool
	var skipped error
	master := map[string]string{} // on a cluster: each key kept → its master's address
	if f.cc != nil {
		keep = func(key string) bool {
			m, err := f.cc.MasterForKey(ctx, key)
			if err != nil {
				return true // go-redis finds its node, or fails it, itself
			}
			addr := m.Options().Addr
			if err, ok := f.down[addr]; ok {
				if skipped == nil {
					skipped = err
				}
				return false
			}
			master[key] = addr
			return true
		}
	}
	cmds, err := f.r.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		for _, rec := range recs {
			if err := f.r.write(ctx, p, rec, score, keep, f.prune); err != nil {
				return err
			}
		}
		return nil
	})
	for _, c := range cmds {
		if cerr := c.Err(); cerr != nil && unreachable(cerr) {
			if addr := master[fmt.Sprint(c.Args()[1])]; addr != "" && f.down[addr] == nil {
				f.down[addr] = cerr
			}
		}
	}
	if err == nil {
		err = skipped
	}
	return err
}

// unreachable reports whether err, a command's, says that its node could
// not be reached or did not answer (not a reply of Redis, nor a caller
// that gave up). Not the batch's own deadline, bare: go-redis sets it on
// every command of the pipeline without an error of its own when the
// deadline runs out between its attempts (setCmdsErr after the retry
// backoff), those a master that answered had carried out included, so
// that it names no node; a master that hung keeps its own i/o timeout.
func unreachable(err error) bool {
	var re redis.Error
	return !errors.As(err, &re) && !errors.Is(err, context.Canceled) && err != context.DeadlineExceeded
}

// JoinChannel adds rec's membership of channel and rewrites its record,
// whose Channels the caller has already updated. Its other memberships
// are left to the next Refresh, so that a connection subscribing to n
// channels costs O(n) commands, not O(n²).
func (r *Registry) JoinChannel(ctx context.Context, rec *Record, channel string) error {
	// The record first: a reader skips a member whose record does not
	// list the channel (Channel).
	_, err := r.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		if err := r.writeRecord(ctx, p, rec); err != nil {
			return err
		}
		r.addMember(ctx, p, r.keys.ChannelConns(channel), rec, r.expiry(), true)
		return nil
	})
	if err != nil {
		return fmt.Errorf("registry join %s: %w", channel, err)
	}
	return nil
}

// LeaveChannel removes rec's membership of channel and rewrites its
// record, whose Channels the caller has already updated.
func (r *Registry) LeaveChannel(ctx context.Context, rec *Record, channel string) error {
	_, err := r.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		p.ZRem(ctx, r.keys.ChannelConns(channel), rec.ID)
		return r.writeRecord(ctx, p, rec)
	})
	if err != nil {
		return fmt.Errorf("registry leave %s: %w", channel, err)
	}
	return nil
}

// Remove deletes rec and its memberships.
func (r *Registry) Remove(ctx context.Context, rec *Record) error {
	_, err := r.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		p.Del(ctx, r.keys.Conn(rec.ID))
		if rec.User != "" {
			p.ZRem(ctx, r.keys.UserConns(rec.User), rec.ID)
		}
		for _, ch := range rec.Channels {
			p.ZRem(ctx, r.keys.ChannelConns(ch), rec.ID)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("registry remove %s: %w", rec.ID, err)
	}
	return nil
}

// Check makes one registry write for an instance that has no record to
// write: a key of its own that lives a second, written as a record is
// (refused the same way by a Redis out of memory), so that an outage of
// registry writes can be seen to end when no connection is left to
// refresh.
func (r *Registry) Check(ctx context.Context, instance string) error {
	if err := r.rdb.Set(ctx, r.keys.RegistryCheck(instance), "1", time.Second).Err(); err != nil {
		return fmt.Errorf("registry check: %w", err)
	}
	return nil
}

// Get returns the live record of connection id, or ErrNotFound.
func (r *Registry) Get(ctx context.Context, id string) (*Record, error) {
	b, err := r.rdb.Get(ctx, r.keys.Conn(id)).Bytes()
	if errors.Is(err, redis.Nil) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("registry get: %w", err)
	}
	rec, err := decodeRecord(b)
	if err != nil {
		return nil, fmt.Errorf("registry get %s: %w", id, err)
	}
	return rec, nil
}

// ErrCorruptRecord is a connection record that no egress wrote: not
// JSON, or without the connection's id or instance (an operator's write,
// another application under the key prefix). Redis will return it again
// until it expires or is deleted, so it is not an outage. The reads of a
// user's or a channel's connections leave such records out.
var ErrCorruptRecord = errors.New("registry: corrupt connection record")

// decodeRecord decodes a record read back, or returns ErrCorruptRecord.
func decodeRecord(b []byte) (*Record, error) {
	var rec Record
	if err := json.Unmarshal(b, &rec); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrCorruptRecord, err)
	}
	if rec.ID == "" || rec.Instance == "" {
		return nil, fmt.Errorf("%w: no id or instance", ErrCorruptRecord)
	}
	rec.fill()
	return &rec, nil
}

// memberScan bounds the members one read examines: at most
// memberScan × limit, and never fewer than minMemberScan. A read that
// skips members (their record is gone, or keep refuses it) reads on
// after them until it has limit records or the set has no more, so that
// stale members do not hide live ones behind them (a user read with
// limit 1 would say "none"), and a set full of them costs at most that
// many record reads. Skipped members sort ahead of live ones only for a
// while: one whose Remove lost its ZREM (on a cluster its DEL and ZREM
// go to different nodes) until the live ones' next refresh, one of a
// dead instance whose clock was ahead until it is a TTL past its score.
const (
	memberScan    = 4
	minMemberScan = 1000
)

// members returns the live records of the set at key for which keep (if
// not nil) is true, at most limit, newest first, and drops members a TTL
// past their expiry.
//
// A member is live while its record is (Redis expires the record). Its
// score, written by its egress's clock, is compared with this process's
// with a TTL's grace: an egress whose clock is behind, or a reader whose
// clock is ahead, by less than that neither hides a live connection nor
// removes it from the set. A dead member costs one record read per
// reader for at most that TTL more, and only when the live members do
// not fill limit first: the most recently refreshed come first.
//
// A member whose record is gone is skipped, not removed: on a cluster
// the record and the set are on different nodes, and a Put's or
// Refresh's ZADD may land before its SET, so "no record" can mean "not
// written yet"; removing it would hide a live connection from targeted
// sends until its next refresh.
func (r *Registry) members(ctx context.Context, key string, limit int64, keep func(*Record) bool) ([]*Record, error) {
	cutoff := r.cutoff()
	out := []*Record{}
	// Each read is of the set's first upto members as it is then, not
	// of the ones after an offset into it as it was at the read before:
	// between two reads a member may be refreshed to the front, or one
	// already read removed (its connection closed, or left the
	// channel), and a read at an offset then passed over a member live
	// throughout, which a list of fewer than limit must hold (a list of
	// stale, l1, l2 with limit 2, l2 refreshed between the reads, said
	// [l1]). seen holds every member examined: each is read once.
	seen := map[string]bool{}
	budget := max(memberScan*limit, minMemberScan)
	upto := limit // enough when nothing is skipped
	for first := true; int64(len(out)) < limit && budget > 0; first = false {
		all, err := r.rdb.ZRevRangeByScore(ctx, key, &redis.ZRangeBy{Min: "(" + cutoff, Max: "+inf", Count: upto}).Result()
		if err != nil {
			return nil, fmt.Errorf("registry members: %w", err)
		}
		if first {
			r.rdb.ZRemRangeByScore(ctx, key, "-inf", cutoff) // best effort cleanup
		}
		ids := make([]string, 0, len(all))
		for _, id := range all {
			if !seen[id] && int64(len(ids)) < budget {
				seen[id] = true
				ids = append(ids, id)
			}
		}
		budget -= int64(len(ids))
		recs, err := r.records(ctx, ids)
		if err != nil {
			return nil, err
		}
		added := 0
		for _, rec := range recs {
			if int64(len(out)) < limit && (keep == nil || keep(rec)) {
				out = append(out, rec)
				added++
			}
		}
		if int64(len(all)) < upto {
			break // the set has no more
		}
		// Members were skipped, and as many again may follow: read
		// what is missing, or twice as many as were skipped, so that a
		// run of skipped members costs a few round trips, not one each.
		skipped := int64(len(ids) - added)
		upto += max(limit-int64(len(out)), 2*skipped)
	}
	return out, nil
}

// records reads the records of ids, skipping those that are gone.
func (r *Registry) records(ctx context.Context, ids []string) ([]*Record, error) {
	if len(ids) == 0 {
		return nil, nil
	}
	cmds := make([]*redis.StringCmd, len(ids))
	_, err := r.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, id := range ids {
			cmds[i] = p.Get(ctx, r.keys.Conn(id))
		}
		return nil
	})
	if err != nil && !errors.Is(err, redis.Nil) {
		return nil, fmt.Errorf("registry members: %w", err)
	}
	out := make([]*Record, 0, len(ids))
	for _, c := range cmds {
		b, err := c.Bytes()
		if errors.Is(err, redis.Nil) {
			continue // expired between the two reads
		}
		if err != nil {
			// Not a missing record but one that could not be read (on
			// a cluster, its node is down; the pipeline's own error is
			// only its first command's, which may be a redis.Nil):
			// leaving it out would have a send to the user accepted,
			// and never delivered to that connection.
			return nil, fmt.Errorf("registry members: %w", err)
		}
		if rec, err := decodeRecord(b); err == nil {
			out = append(out, rec)
		}
	}
	return out, nil
}

// Channel returns up to limit live connections subscribed to channel.
//
// A member whose record no longer lists the channel is not one: its
// LeaveChannel rewrote the record, and its ZREM failed (on a cluster the
// two are on different nodes). It stays in the set until it expires.
func (r *Registry) Channel(ctx context.Context, channel string, limit int64) ([]*Record, error) {
	return r.members(ctx, r.keys.ChannelConns(channel), limit, func(rec *Record) bool {
		return slices.Contains(rec.Channels, channel)
	})
}

// User returns up to limit live connections of user.
func (r *Registry) User(ctx context.Context, user string, limit int64) ([]*Record, error) {
	return r.members(ctx, r.keys.UserConns(user), limit, nil)
}
