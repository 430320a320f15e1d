package redistest

import (
	"context"
	"errors"
	"net"
	"os"
	"sync"
	"sync/atomic"

	"github.com/redis/go-redis/v9"
)

// Hold is a go-redis hook (Client.AddHook) that holds the first pipeline
// match accepts: Redis has run its commands, so their effects are visible
// to everyone, but the caller hears back only after Release. Tests use it
// to open, on purpose, the window between a write and its reply. match
// sees every pipeline, so it can also record them.
type Hold struct {
	before  bool // hold before Redis runs the pipeline (NewHoldBefore)
	match   func(cmds []redis.Cmder) bool
	hit     chan struct{}
	release chan struct{}
	taken   sync.Once
	freed   sync.Once
}

// NewHold returns a Hold for the first pipeline match accepts.
func NewHold(match func(cmds []redis.Cmder) bool) *Hold {
	return &Hold{match: match, hit: make(chan struct{}), release: make(chan struct{})}
}

// NewHoldBefore returns a Hold that holds the first pipeline match accepts
// before it reaches Redis: tests use it to let other writes land between
// a caller's decision and its write.
func NewHoldBefore(match func(cmds []redis.Cmder) bool) *Hold {
	h := NewHold(match)
	h.before = true
	return h
}

// Hit is closed once the held pipeline has run in Redis (NewHold), or is
// about to be sent (NewHoldBefore).
func (h *Hold) Hit() <-chan struct{} { return h.hit }

// Release lets the held pipeline return (and any later one through). It
// may be called more than once, and before the hold is hit.
func (h *Hold) Release() { h.freed.Do(func() { close(h.release) }) }

func (h *Hold) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h *Hold) ProcessHook(next redis.ProcessHook) redis.ProcessHook { return next }

func (h *Hold) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		if h.before {
			h.hold(cmds)
			return next(ctx, cmds)
		}
		err := next(ctx, cmds)
		h.hold(cmds)
		return err
	}
}

func (h *Hold) hold(cmds []redis.Cmder) {
	if h.match(cmds) {
		held := false
		h.taken.Do(func() { held = true })
		if held {
			close(h.hit)
			<-h.release
		}
	}
}

// Gate is a go-redis hook (Client.AddHook) that holds every pipeline
// match accepts, before it reaches Redis, until Open: Redis slow to
// answer, or a pool busy, for as long as a test needs, while it counts
// what queued meanwhile. match sees every pipeline, so it can also count
// their commands. Unlike Hold, which holds one pipeline, a Gate holds all
// of them, and lets them all through at once.
type Gate struct {
	match              func(cmds []redis.Cmder) bool
	open               chan struct{}
	opened             sync.Once
	all, running, most atomic.Int64
}

// NewGate returns a closed Gate for the pipelines match accepts.
func NewGate(match func(cmds []redis.Cmder) bool) *Gate {
	return &Gate{match: match, open: make(chan struct{})}
}

// Open lets every held pipeline, and every later one, through. It may be
// called more than once.
func (g *Gate) Open() { g.opened.Do(func() { close(g.open) }) }

// All is how many pipelines match has accepted; Running, how many of
// them are in the hook now (held, or on their way to Redis once open);
// Most, the most that were at once.
func (g *Gate) All() int64     { return g.all.Load() }
func (g *Gate) Running() int64 { return g.running.Load() }
func (g *Gate) Most() int64    { return g.most.Load() }

func (g *Gate) DialHook(next redis.DialHook) redis.DialHook { return next }

func (g *Gate) ProcessHook(next redis.ProcessHook) redis.ProcessHook { return next }

func (g *Gate) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		if !g.match(cmds) {
			return next(ctx, cmds)
		}
		g.all.Add(1)
		n := g.running.Add(1)
		defer g.running.Add(-1)
		for m := g.most.Load(); n > m && !g.most.CompareAndSwap(m, n); m = g.most.Load() {
		}
		<-g.open
		return next(ctx, cmds)
	}
}

// ErrFailed is the error Fail gives the commands it fails: a timeout, as
// a Redis gone away or partitioned gives.
var ErrFailed = errors.New("i/o timeout (redistest.Fail)")

// Fail is a go-redis hook (Client.AddHook) that fails, with ErrFailed,
// the single commands Cmd accepts and the pipelines Pipeline accepts
// (every command of the pipeline): without sending them, or, with Sent,
// after Redis has run them, as a reply lost with its connection. A nil
// func accepts nothing. The funcs may switch the failure on and off, or
// count it.
type Fail struct {
	Cmd      func(cmd redis.Cmder) bool
	Pipeline func(cmds []redis.Cmder) bool
	Sent     bool
	Err      error // the error given; nil: ErrFailed
}

// ErrReadTimeout is the error go-redis gives a command whose reply did
// not come within its ReadTimeout, as Fail's Err: go-redis's own retries
// (a cluster client's loop) take it for one.
var ErrReadTimeout error = &net.OpError{Op: "read", Net: "tcp", Err: os.ErrDeadlineExceeded}

func (f Fail) err() error {
	if f.Err != nil {
		return f.Err
	}
	return ErrFailed
}

func (f Fail) DialHook(next redis.DialHook) redis.DialHook { return next }

func (f Fail) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if f.Cmd == nil || !f.Cmd(cmd) {
			return next(ctx, cmd)
		}
		if f.Sent {
			_ = next(ctx, cmd)
		}
		cmd.SetErr(f.err())
		return f.err()
	}
}

func (f Fail) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		if f.Pipeline == nil || !f.Pipeline(cmds) {
			return next(ctx, cmds)
		}
		if f.Sent {
			_ = next(ctx, cmds)
		}
		for _, c := range cmds {
			c.SetErr(f.err())
		}
		return f.err()
	}
}

// LateReplies makes the next command named name (after each arm) that a
// node of cc runs get its reply too late, as go-redis reports one
// (ErrReadTimeout): Redis runs it, its caller hears the timeout. Call it
// before cc sends anything: it hooks the node clients cc makes from then
// on (ClusterClient.OnNewNode).
func LateReplies(cc *redis.ClusterClient, name string) (arm func(), armed func() bool) {
	var on atomic.Bool
	cc.OnNewNode(func(n *redis.Client) {
		n.AddHook(Fail{Sent: true, Err: ErrReadTimeout,
			Cmd: func(cmd redis.Cmder) bool { return cmd.Name() == name && on.CompareAndSwap(true, false) }})
	})
	return func() { on.Store(true) }, on.Load
}
