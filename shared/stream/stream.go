// Package stream appends messages to Redis streams and reads them back.
//
// Each channel has one stream (keys.Scheme.Stream). An append is one Lua
// script that, atomically on the channel's slot: reads the id of the
// stream's last entry (prev), XADDs the message with a Redis-assigned id,
// trims by count and by age (approximately, so trimming stays O(1)
// amortised and never blocks publishing), refreshes the stream's TTL, and
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
	"strconv"
	"strings"

	"github.com/redis/go-redis/v9"
)

// appendScript: KEYS[1] stream, KEYS[2] notify channel (same slot).
// ARGV: head, tail, route, ts, maxlen, maxage ms, ttl ms.
var appendScript = redis.NewScript(`
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local prev = '0-0'
if last[1] then prev = last[1][1] end
local id
local maxlen = tonumber(ARGV[5])
if maxlen > 0 then
  id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], '*', 'h', ARGV[1], 't', ARGV[2], 'g', ARGV[3], 's', ARGV[4], 'p', prev)
else
  id = redis.call('XADD', KEYS[1], '*', 'h', ARGV[1], 't', ARGV[2], 'g', ARGV[3], 's', ARGV[4], 'p', prev)
end
local maxage = tonumber(ARGV[6])
if maxage > 0 then
  local t = redis.call('TIME')
  local min = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - maxage
  if min > 0 then redis.call('XTRIM', KEYS[1], 'MINID', '~', string.format('%.0f', min)) end
end
local ttl = tonumber(ARGV[7])
if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[7]) end
redis.call('SPUBLISH', KEYS[2], prev .. '\n' .. id .. '\n' .. ARGV[4] .. '\n' .. ARGV[3] .. '\n' .. ARGV[1] .. id .. ARGV[2])
return id
`)

// Limits bound one stream. Zero means no bound of that kind.
type Limits struct {
	MaxLen   int64 // entries kept (approximately: Redis trims whole nodes)
	MaxAgeMS int64 // entries older than this are trimmed on the next append
	TTLMS    int64 // the whole stream expires this long after its last append
}

// Append is one message to append to one stream.
type Append struct {
	Stream string // key
	Notify string // shard channel, same hash tag as Stream
	Msg    Message
	Limits Limits
}

// Store appends to and reads from streams. It is safe for concurrent use.
type Store struct {
	rdb redis.UniversalClient
}

// NewStore returns a Store using rdb.
func NewStore(rdb redis.UniversalClient) *Store { return &Store{rdb: rdb} }

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
// append failing does not fail the others.
func (s *Store) appendEach(ctx context.Context, as []Append) ([]string, []error) {
	cmds := make([]*redis.Cmd, len(as))
	args := make([][]any, len(as))
	run := func(idx []int, load bool) {
		_, _ = s.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
			for _, i := range idx {
				a := &as[i]
				if args[i] == nil {
					head, tail := a.Msg.Frame()
					args[i] = []any{head, tail, string(a.Msg.Route), a.Msg.TS, a.Limits.MaxLen, a.Limits.MaxAgeMS, a.Limits.TTLMS}
				}
				keys := []string{a.Stream, a.Notify}
				if load {
					cmds[i] = appendScript.Eval(ctx, p, keys, args[i]...)
				} else {
					cmds[i] = appendScript.EvalSha(ctx, p, keys, args[i]...)
				}
			}
			return nil
		})
	}
	all := make([]int, len(as))
	for i := range all {
		all[i] = i
	}
	run(all, false)
	// Scripts missing from the script cache did not run: run those again
	// with the script's source. Any other error is final.
	var retry []int
	for i, c := range cmds {
		if c.Err() != nil && redis.HasErrorPrefix(c.Err(), "NOSCRIPT") {
			retry = append(retry, i)
		}
	}
	if len(retry) > 0 {
		run(retry, true)
	}
	ids := make([]string, len(as))
	errs := make([]error, len(as))
	for i, c := range cmds {
		if c.Err() != nil {
			errs[i] = fmt.Errorf("append to %s: %w", as[i].Stream, c.Err())
			continue
		}
		id, ok := c.Val().(string)
		if !ok {
			errs[i] = fmt.Errorf("append to %s: unexpected reply %T", as[i].Stream, c.Val())
			continue
		}
		ids[i] = id
	}
	return ids, errs
}

// Entry is one stream entry read back.
type Entry struct {
	ID    string
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

// After reads up to count entries with ids greater than after, oldest first.
func (s *Store) After(ctx context.Context, key string, after ID, count int64) ([]Entry, error) {
	msgs, err := s.rdb.XRangeN(ctx, key, "("+after.String(), "+", count).Result()
	if err != nil {
		return nil, fmt.Errorf("read %s after %s: %w", key, after, err)
	}
	return entriesOf(msgs), nil
}

// Latest reads the newest count entries, oldest first.
func (s *Store) Latest(ctx context.Context, key string, count int64) ([]Entry, error) {
	msgs, err := s.rdb.XRevRangeN(ctx, key, "+", "-", count).Result()
	if err != nil {
		return nil, fmt.Errorf("read newest of %s: %w", key, err)
	}
	for i, j := 0, len(msgs)-1; i < j; i, j = i+1, j-1 {
		msgs[i], msgs[j] = msgs[j], msgs[i]
	}
	return entriesOf(msgs), nil
}

// LastID returns the id of the stream's newest entry, or Zero when the
// stream is empty or missing.
func (s *Store) LastID(ctx context.Context, key string) (ID, error) {
	msgs, err := s.rdb.XRevRangeN(ctx, key, "+", "-", 1).Result()
	if err != nil {
		return ID{}, fmt.Errorf("read last id of %s: %w", key, err)
	}
	if len(msgs) == 0 {
		return Zero, nil
	}
	return MustParseID(msgs[0].ID), nil
}

// Resume starts a replay after `after`: it returns the first batch (up to
// count entries with ids greater than after) and whether the stream still
// holds everything published after `after`.
//
// Recovery is decided from the stream itself. Each entry records the id of
// the entry before it (field p, written by the append script), so the
// chain proves continuity: `after` is still in the stream, or the oldest
// entry after it names `after` as its predecessor (`after` itself was the
// last entry trimmed). A stream that lost data — trimmed past `after`,
// expired, or recreated after Redis restarted without persistence or
// failed over to a replica that lagged — breaks the chain, so the answer
// is false. See docs/protocol.md.
func (s *Store) Resume(ctx context.Context, key string, after ID, count int64) ([]Entry, bool, error) {
	msgs, err := s.rdb.XRangeN(ctx, key, after.String(), "+", count+1).Result()
	if err != nil {
		return nil, false, fmt.Errorf("resume %s after %s: %w", key, after, err)
	}
	if len(msgs) == 0 {
		// Nothing at or after `after`: recovered only if `after` is the
		// newest entry, which XRANGE would have returned.
		return nil, false, nil
	}
	if MustParseID(msgs[0].ID) == after {
		return entriesOf(msgs[1:]), true, nil
	}
	prev, _ := msgs[0].Values["p"].(string)
	if len(msgs) > int(count) {
		msgs = msgs[:count]
	}
	p, ok := ParseID(prev)
	return entriesOf(msgs), ok && p == after, nil
}

// Notification is a parsed append announcement.
type Notification struct {
	Prev  ID
	ID    ID
	IDStr string
	TS    int64
	Route Route
	Frame []byte
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
	n.Prev, ok1 = ParseID(parts[0])
	n.ID, ok2 = ParseID(parts[1])
	if !ok1 || !ok2 {
		return n, ErrBadNotification
	}
	n.IDStr = parts[1]
	n.TS, _ = strconv.ParseInt(parts[2], 10, 64)
	n.Route = Route(parts[3])
	n.Frame = []byte(rest)
	return n, nil
}

// Decode parses the entry's frame back into its fields.
func (e *Entry) Decode() (Decoded, error) {
	var d Decoded
	err := json.Unmarshal(e.Frame(), &d)
	d.Type = ""
	return d, err
}
