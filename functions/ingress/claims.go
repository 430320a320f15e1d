package main

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// A request with an Idempotency-Key claims the key (a "pending" record)
// before it writes, and frees it when the write fails, so that the
// client's retry runs instead of getting 409. When the failure is Redis
// itself, freeing the key fails too, and a claim that Redis kept (on its
// append-only file, or on a replica it failed over to) would answer every
// retry 409 until it expires (pendingTTL, 15.5 s by default): after a Redis
// restart, every publisher that was in the middle of a call. The releaser
// frees such claims as soon as Redis answers again.

// releaseScript deletes KEYS[1] if it still holds ARGV[1]: a claim is
// freed only by its own request, never another's that claimed the key
// after it expired.
var releaseScript = redis.NewScript(`if redis.call("GET", KEYS[1]) == ARGV[1] then return redis.call("DEL", KEYS[1]) end
return 0`)

// maxReleases bounds the claims waiting to be freed; past it, a claim is
// left to expire.
const maxReleases = 10_000

// releaser frees Idempotency-Key claims, now or, while Redis cannot be
// reached, from a goroutine that runs only while some wait.
type releaser struct {
	rdb     redis.UniversalClient
	timeout time.Duration // of each attempt: REDIS_TIMEOUT
	log     *slog.Logger

	mu sync.Mutex
	// waiting maps each claim to free to when it expires. By key and
	// value, not by key alone: a retry made while Redis is away leaves
	// its own claim of the key here too (in case Redis set it), and it
	// took the place of the first request's, which Redis did set, so
	// that the first was left to answer 409 until it expired.
	waiting map[claim]time.Time
	running bool
	closed  bool
	stop    chan struct{}
	wg      sync.WaitGroup
}

// claim is a claim to free: its key and the value it was set to. Its
// expiry is kept with it (after that, it is not ours to free).
type claim struct {
	key, value string
}

func newReleaser(rdb redis.UniversalClient, timeout time.Duration, log *slog.Logger) *releaser {
	return &releaser{rdb: rdb, timeout: timeout, log: log, waiting: map[claim]time.Time{}, stop: make(chan struct{})}
}

// release frees key if it still holds value. If Redis does not answer, it
// goes on trying in the background until Redis does or until.
func (r *releaser) release(ctx context.Context, key, value string, until time.Time) {
	if _, err := r.free(context.WithoutCancel(ctx), key, value); err == nil {
		return
	}
	r.later(key, value, until)
}

// later frees key if it still holds value, from the background, trying
// until Redis answers or until.
func (r *releaser) later(key, value string, until time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed || len(r.waiting) >= maxReleases {
		return
	}
	r.waiting[claim{key, value}] = until
	if !r.running {
		r.running = true
		r.wg.Add(1)
		go r.loop()
	}
}

// free deletes key if it still holds value, reporting whether it did.
func (r *releaser) free(ctx context.Context, key, value string) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, r.timeout)
	defer cancel()
	n, err := releaseScript.Run(ctx, r.rdb, []string{key}, value).Int()
	return n == 1, err
}

// loop tries the waiting claims, backing off from 50 ms to 1 s while
// Redis fails, and ends once none waits.
func (r *releaser) loop() {
	defer r.wg.Done()
	wait := 50 * time.Millisecond
	t := time.NewTimer(wait)
	defer t.Stop()
	freed := 0
	for {
		select {
		case <-r.stop:
			return
		case <-t.C:
		}
		r.mu.Lock()
		batch := make(map[claim]time.Time, len(r.waiting))
		for c, until := range r.waiting {
			batch[c] = until
		}
		r.mu.Unlock()
		failed := false
		for c, until := range batch {
			if time.Now().Before(until) {
				// A claim that is not there is not counted: a request
				// whose client hung up before its claim was sent leaves
				// its key here too, in case Redis set it.
				ok, err := r.free(context.Background(), c.key, c.value)
				if err != nil {
					failed = true
					break
				}
				if ok {
					freed++
				}
			}
			r.mu.Lock()
			if r.waiting[c] == until {
				delete(r.waiting, c)
			}
			r.mu.Unlock()
		}
		r.mu.Lock()
		if len(r.waiting) == 0 {
			r.running = false
			r.mu.Unlock()
			if freed > 0 {
				r.log.Info("idempotency keys freed", "keys", freed,
					"why", "their requests failed while Redis could not be reached; retries with these keys now run")
			}
			return
		}
		r.mu.Unlock()
		if failed {
			wait = min(2*wait, time.Second)
		}
		t.Reset(wait)
	}
}

// Close stops the background attempts (the claims left expire by
// themselves) and waits for them to end.
func (r *releaser) Close() {
	r.mu.Lock()
	if !r.closed {
		r.closed = true
		close(r.stop)
	}
	r.mu.Unlock()
	r.wg.Wait()
}
