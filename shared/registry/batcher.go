package registry

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/internal/coalesce"
)

// Batcher coalesces the Puts of concurrent callers into shared
// pipelines: in a reconnect storm, thousands of handshakes each writing
// their connection's record take a few pool connections and a few round
// trips instead of one each (5,000 sockets within 500 ms on 2 vCPU, a
// pipeline each, queued for the pool until half of them had waited out
// REDIS_TIMEOUT, and were closed 1013). It starts no goroutine, as
// stream.Batcher: a caller that finds fewer than maxInFlight pipelines
// running becomes a leader, sends what is pending, and hands leadership
// to the oldest waiting caller if more arrived meanwhile (coalesce.Queue).
// An idle Batcher costs nothing and needs no Close.
// It is safe for concurrent use.
//
// What a Put writes is what Registry.Put writes (the same commands, the
// score as of the call); each caller gets its own result (Put).
type Batcher struct {
	r        *Registry
	timeout  time.Duration
	maxBatch int
	q        *coalesce.Queue[putReq]
}

// putReq is one Put call: its record and score, and its result once
// sent.
type putReq struct {
	rec   *Record
	score float64
	err   error
}

// NewBatcher returns a Batcher writing to r. Each pipeline is bounded by
// timeout (the callers' contexts cannot bound a shared pipeline); at most
// maxInFlight pipelines run at once (below 1: 1), each with at most
// maxBatch records (below 1: 1).
func NewBatcher(r *Registry, timeout time.Duration, maxInFlight, maxBatch int) *Batcher {
	b := &Batcher{r: r, timeout: timeout, maxBatch: max(1, maxBatch)}
	b.q = coalesce.New(maxInFlight, b.take, b.send)
	return b
}

// Put writes rec (creating or replacing it) and its set memberships, as
// Registry.Put does, in a pipeline shared with concurrent Puts. A caller
// whose ctx ends while rec still waits for a pipeline withdraws it and
// gets ctx's error, with ErrNotWritten: nothing was written. Once a
// pipeline has taken rec, Put waits for that pipeline, which the
// Batcher's timeout bounds, and returns the first error among rec's own
// commands (on a Redis Cluster a master that failed does not fail the
// records kept on the others), or the pipeline's when none of its
// commands got one of its own (a hook refused it whole). rec is not used
// once Put has returned.
func (b *Batcher) Put(ctx context.Context, rec *Record) error {
	req := &coalesce.Request[putReq]{V: putReq{rec: rec, score: b.r.expiry()}}
	if err := b.q.Do(ctx, req); err != nil {
		return fmt.Errorf("registry put: waiting for a pipeline: %w: %w", err, ErrNotWritten)
	}
	return req.V.err
}

// ErrNotWritten is in the error of a Put that gave up before a pipeline
// took its record: nothing of it was written, so nothing is to be
// removed either.
var ErrNotWritten = errors.New("nothing written")

// take returns how many of the oldest pending requests the next pipeline
// carries.
func (b *Batcher) take(pending []*coalesce.Request[putReq]) int {
	return min(b.maxBatch, len(pending))
}

// send writes batch in one pipeline and gives each request its error.
func (b *Batcher) send(batch []*coalesce.Request[putReq]) {
	ends := make([]int, len(batch)) // request i's commands end at ends[i]
	ctx, cancel := context.WithTimeout(context.Background(), b.timeout)
	defer cancel()
	cmds, err := b.r.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, req := range batch {
			if werr := b.r.write(ctx, p, req.V.rec, req.V.score, nil, true); werr != nil {
				req.V.err = fmt.Errorf("registry put: %w", werr) // nothing of it queued
			}
			ends[i] = p.Len()
		}
		return nil
	})
	if err == nil {
		return
	}
	// Each request's own commands say whether it was written: go-redis
	// gives every command of a pipeline its own result, and on a cluster
	// splits the pipeline by master, one of which may fail alone. A
	// pipeline failed with no command's error (a hook refused it before
	// sending) fails every request.
	whole := !slices.ContainsFunc(cmds, func(c redis.Cmder) bool { return c.Err() != nil })
	start := 0
	for i, end := range ends {
		if req := &batch[i].V; req.err == nil {
			own := cmds[start:end]
			for j, c := range own {
				if c.Name() == pruneCmd {
					continue // best effort (pruneCmd)
				}
				if cerr := c.Err(); cerr != nil && !answeredBeforeDeadline(own[j:], cerr) {
					req.err = fmt.Errorf("registry put: %w", cerr)
					break
				}
			}
			if req.err == nil && whole {
				req.err = fmt.Errorf("registry put: %w", err)
			}
		}
		start = end
	}
}

// answeredBeforeDeadline reports whether cmds[0], failed with cerr,
// was in fact carried out: go-redis sets the pipeline's own deadline,
// bare, on every command without an error of its own when it runs out
// between its attempts (setCmdsErr after the retry backoff), those a
// master that answered had carried out included (unreachable), so that
// on a cluster with one master hung every Put of the pipeline failed,
// and its socket was refused, though its record was written. A reply
// read leaves its value, which a command never sent does not have: a
// SET's OK, a PEXPIRE's true (its key exists), and for a ZADD (1 or 0,
// whether its member is new) the PEXPIRE of its key that follows it
// (addMember), answered after it on the same connection.
func answeredBeforeDeadline(cmds []redis.Cmder, cerr error) bool {
	if cerr != context.DeadlineExceeded {
		return false
	}
	switch c := cmds[0].(type) {
	case *redis.StatusCmd:
		return c.Val() == "OK"
	case *redis.BoolCmd:
		return c.Val()
	case *redis.IntCmd:
		if len(cmds) > 1 && cmds[1].Name() == "pexpire" && fmt.Sprint(cmds[1].Args()[1]) == fmt.Sprint(c.Args()[1]) {
			next, ok := cmds[1].(*redis.BoolCmd)
			return ok && (next.Err() == nil || next.Err() == context.DeadlineExceeded) && next.Val()
		}
	}
	return false
}
