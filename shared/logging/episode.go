package logging

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"
)

// Defaults of an Episode's timing.
const (
	// EpisodeReminder is how often an episode that goes on is logged
	// again, with the number of failures since it began.
	EpisodeReminder = 30 * time.Second
	// EpisodeQuiet is how long without a failure it takes for a success
	// to end an episode, so that a partial outage (one cluster master of
	// three down: some calls fail, others succeed) is one episode, not
	// two lines per failure.
	EpisodeQuiet = 5 * time.Second
)

// Episode logs a failure that comes back call after call (Redis out of
// reach, replicas not confirming) once when it begins, again at most
// every Reminder while it lasts, with the number of failures meanwhile,
// and once when it ends (a success, and no failure for Quiet). A
// warning per failure would be a flood: a steady publisher, or a few
// hundred sockets ending, during a 30 s Redis outage wrote one line each,
// which a log service billing by volume (SCF's) charges for and which
// buries every other line. The metrics count each failure. Safe for
// concurrent use; the zero values of Reminder and Quiet mean the defaults.
type Episode struct {
	Log  *slog.Logger
	Msg  string // the warning, while it lasts
	Then string // what happens meanwhile, for the operator
	Back string // the line that ends it
	// Gone is the line that ends it when what kept failing is given up
	// rather than recovered (Abandon); "" means Msg + " (given up)".
	Gone string
	// Error logs Msg at error level instead of warn: for a condition
	// that lasts until an operator acts (Redis out of memory), not one
	// that usually ends by itself.
	Error bool

	Reminder, Quiet time.Duration

	// clock is time.Now, but for tests (nil: time.Now). The times kept
	// as int64 below are on the monotonic clock (mono), not the wall
	// clock's unix ns: a wall clock stepped back (NTP after a VM's
	// resume) postponed an episode's end by the step, its owner taking
	// it as under way meanwhile (Active).
	clock func() time.Time

	active   atomic.Bool  // read without mu by OK, on every success
	lastFail atomic.Int64 // mono of the last failure
	pending  atomic.Bool  // an end is scheduled (OK came within Quiet)
	lastOK   atomic.Int64 // mono of the last OK while an episode was under way
	// okSince is the mono of the first OK since the last failure (0:
	// none yet): the success that ends the episode, which its end line
	// measures to.
	okSince atomic.Int64
	endAt   atomic.Pointer[time.Timer] // the pending end's timer, for Stop

	mu      sync.Mutex
	since   time.Time // when it began
	said    time.Time // when it was last logged
	failed  int64     // failures since it began
	stopped bool      // Stop was called: nothing is logged any more
}

// Fail records one failure, err, and logs it if it begins the episode or
// the last line is Reminder old; attrs say where it happened.
func (e *Episode) Fail(err error, attrs ...any) {
	now := e.now()
	e.lastFail.Store(mono(now))
	e.okSince.Store(0)
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.stopped {
		return
	}
	if !e.active.Load() {
		e.active.Store(true)
		e.since, e.said, e.failed = now, now, 1
		e.Log.Log(context.Background(), e.level(), e.Msg, append(attrs, "err", err.Error(), "then", e.Then)...)
		return
	}
	e.failed++
	if now.Sub(e.said) < or(e.Reminder, EpisodeReminder) {
		return
	}
	e.said = now
	e.Log.Log(context.Background(), e.level(), e.Msg, append(attrs, "err", err.Error(), "failures", e.failed,
		"for", now.Sub(e.since).Round(time.Second).String(), "then", e.Then)...)
}

// OK records a success. It ends the episode under way, with one line,
// once its last failure is Quiet old: at once if it is, else Quiet after
// that failure unless another comes meanwhile. It costs an atomic load
// when no episode is under way.
func (e *Episode) OK() {
	if !e.active.Load() {
		return
	}
	now := mono(e.now())
	e.lastOK.Store(now)
	e.okSince.CompareAndSwap(0, now)
	last := e.lastFail.Load()
	wait := or(e.Quiet, EpisodeQuiet) - time.Duration(now-last)
	if wait <= 0 {
		e.end(last)
		return
	}
	if e.pending.CompareAndSwap(false, true) {
		e.endAt.Store(time.AfterFunc(wait, func() {
			e.pending.Store(false)
			e.end(last)
			// A success that came after a newer failure (or in a new
			// episode, after Abandon) while this end was pending was
			// turned away by the CompareAndSwap: schedule its end now,
			// or the episode would wait for yet another success.
			if e.active.Load() && e.lastOK.Load() > e.lastFail.Load() {
				e.OK()
			}
		}))
	}
}

// Active reports whether an episode is under way (begun, not ended).
func (e *Episode) Active() bool { return e.active.Load() }

// Stop ends the episode's logging, for a server that stops: its owner
// calls it once the work that calls Fail and OK is done, before its last
// line. An end that is pending (a success came within Quiet of the last
// failure) is logged at once, with Back, rather than from a timer after
// the server's last line or not at all (the process exits first). An
// episode still failing is left as its last line said. Nothing is logged
// once Stop has returned, whatever comes (a handler outliving shutdown's
// wait); the metrics still count it. Safe to call more than once.
func (e *Episode) Stop() {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.stopped = true
	if t := e.endAt.Load(); t != nil {
		t.Stop()
	}
	if !e.active.Load() {
		return
	}
	if e.okSince.Load() != 0 {
		e.closeLocked(e.Back, e.endedAt())
	}
	// Inactive for good: OK returns at once, a timer that fires anyway
	// ends nothing, and Fail begins nothing (stopped).
	e.active.Store(false)
}

// end ends the episode if its last failure is still last, as lasting
// until the first success after it.
func (e *Episode) end(last int64) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if !e.active.Load() || e.lastFail.Load() != last {
		return
	}
	e.closeLocked(e.Back, e.endedAt())
}

// endedAt is the mono of the success that ends the episode, for its
// end line (end, Stop): the first since the last failure, or now when a
// success raced with that failure's reset of okSince (the end was
// scheduled by a success after it anyway). e.mu is held.
func (e *Episode) endedAt() int64 {
	if back := e.okSince.Load(); back >= e.lastFail.Load() {
		return back
	}
	return mono(e.now())
}

// closeLocked ends the episode with one info line, msg, saying how many
// failures it had and how long it lasted: from its first failure to
// until (mono), the success that ended it or the moment it was given
// up; not to its last failure, which would log an outage of one failure
// followed by a minute of nothing as having lasted 0s. attrs go first.
// e.mu is held.
func (e *Episode) closeLocked(msg string, until int64, attrs ...any) {
	e.active.Store(false)
	lasted := time.Duration(until - mono(e.since))
	e.Log.Info(msg, append(attrs, "failures", e.failed, "lasted", lasted.Round(time.Millisecond).String())...)
}

// Abandon ends the episode under way at once, with one line at info
// level (Gone, with the failures and how long it lasted; attrs say what
// was given up), when what kept failing is no longer tried: nothing is
// left to succeed, and without it the episode would stay open, its end
// logged as Back by whatever success came next, and a later failure
// counted in it instead of beginning an episode of its own. Nothing is
// logged when no episode is under way.
func (e *Episode) Abandon(attrs ...any) {
	if !e.active.Load() {
		return
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if !e.active.Load() {
		return
	}
	msg := e.Gone
	if msg == "" {
		msg = e.Msg + " (given up)"
	}
	e.closeLocked(msg, mono(e.now()), attrs...)
}

// now is e.clock's time, or time.Now's.
func (e *Episode) now() time.Time {
	if e.clock != nil {
		return e.clock()
	}
	return time.Now()
}

// epoch is where mono counts from: the process's start, near enough.
var epoch = time.Now()

// mono is t, a reading of time.Now, as ns on the monotonic clock.
func mono(t time.Time) int64 { return int64(t.Sub(epoch)) }

// level is the level of the lines that say the episode goes on.
func (e *Episode) level() slog.Level {
	if e.Error {
		return slog.LevelError
	}
	return slog.LevelWarn
}

func or(d, def time.Duration) time.Duration {
	if d > 0 {
		return d
	}
	return def
}
