package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/bench/harness"
	"github.com/wsrelay/wsrelay/shared/publisher"
	"github.com/wsrelay/wsrelay/shared/testkit"
	"github.com/wsrelay/wsrelay/shared/testkit/delivery"
)

// checkSoak is a soak whose run is over, on a throwaway redis-server
// (127.0.0.1), for the end's checks alone.
func checkSoak(t *testing.T) *soak {
	t.Helper()
	e := &harness.Env{LogDir: t.TempDir()}
	if err := e.StartRedis(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		e.RDB.Close()
		harness.Kids.Stop(e.Redis)
	})
	cfg, err := parse(nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	s := &soak{cfg: cfg, env: e, logf: t.Logf, logs: map[string]*delivery.Log{}, targets: newTargetedLog(time.Now())}
	s.channels = []string{"soak-0"}
	s.logs["soak-0"] = delivery.NewLog()
	return s
}

func checkRun(t *testing.T, s *soak) *report {
	t.Helper()
	rep := &report{cfg: s.cfg, samples: []sample{{}, {final: true}}}
	s.check(context.Background(), rep)
	for _, l := range rep.checks {
		t.Log("ok  ", l)
	}
	for _, l := range rep.problems {
		t.Log("FAIL", l)
	}
	return rep
}

// A run in which every publish, targeted send and read failed, or that
// published nothing, checked nothing: it must not pass.
func TestCheckFailsAnEmptyRun(t *testing.T) {
	t.Run("every call failed", func(t *testing.T) {
		s := checkSoak(t)
		for seq := range 3 {
			s.logs["soak-0"].Fail(seq, errors.New("publisher: 500 Internal Server Error"))
		}
		s.publishErrors.Store(3)
		s.targetedError.Store(2)
		s.readErrors.Store(2)
		if rep := checkRun(t, s); len(rep.problems) == 0 {
			t.Error("passed a run whose every publish, send and read failed")
		}
	})
	t.Run("nothing published", func(t *testing.T) {
		s := checkSoak(t)
		if rep := checkRun(t, s); len(rep.problems) == 0 {
			t.Error("passed a run that published and delivered nothing")
		}
	})
	t.Run("traffic, no error", func(t *testing.T) {
		s := checkSoak(t)
		s.published.Store(10)
		s.delivered.Store(30)
		s.targetedSent.Store(2)
		s.reads.Store(2)
		if rep := checkRun(t, s); len(rep.problems) > 0 {
			t.Errorf("failed a run with traffic and no error: %v", rep.problems)
		}
	})
}

// A send to a connection answered 404 connection_not_found is allowed
// only for a connection that had ended: one to a live connection is a
// miss like any other.
func TestTargetedNotFoundToALiveConnection(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasPrefix(r.URL.Path, "/v1/connections/") {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusNotFound)
			_, _ = w.Write([]byte(`{"error":{"code":"connection_not_found","message":"no live connection with that id"}}`))
			return
		}
		http.Error(w, "no", http.StatusInternalServerError)
	}))
	defer srv.Close()
	t0 := time.Now()
	s := &soak{cfg: config{targeted: 20}, targets: newTargetedLog(t0), rng: rand.New(rand.NewPCG(1, 2))}
	var err error
	if s.pub, err = publisher.New(publisher.Options{URL: srv.URL, Token: apiKey}); err != nil {
		t.Fatal(err)
	}
	sc := &soakClient{s: s, id: 0, user: "u0", conn: "c0"}
	s.live = map[int]*soakClient{0: sc}
	s.targets.welcome(t0, "u0", "c0") // live throughout
	// Until two sends are answered (the first to the user, the second to
	// c0), where 300 ms were trusted to hold both: a server or test
	// descheduled for 250 ms (a loaded machine) left no send to c0
	// answered, and the test failed saying none was answered 404.
	runUntil(t, s.sendTargeted, func() error {
		if n := s.targetedSent.Load() + s.targetedGone.Load() + s.targetedError.Load(); n < 2 {
			return fmt.Errorf("%d sends answered", n)
		}
		return nil
	})
	if s.targetedGone.Load() == 0 {
		t.Fatal("no send answered 404")
	}
	rep := &report{}
	s.checkTargeted(rep)
	for _, l := range rep.misses {
		t.Log(l)
	}
	if len(rep.problems) == 0 {
		t.Errorf("%d sends to live connection c0 answered 404, and the targeted check passed: %v", s.targetedGone.Load(), rep.checks)
	}
}

// A key left with a TTL far beyond its kind's (a stream past HISTORY_TTL)
// is not a key that expires "by HISTORY_TTL".
func TestCheckKeyTTLs(t *testing.T) {
	s := checkSoak(t)
	s.published.Store(10)
	s.delivered.Store(30)
	s.targetedSent.Store(2)
	s.reads.Store(2)
	ctx := context.Background()
	rdb := s.env.RDB
	if err := rdb.XAdd(ctx, &redis.XAddArgs{Stream: prefix + ":{c:soak-0}:s", Values: []string{"h", "x"}}).Err(); err != nil {
		t.Fatal(err)
	}
	if err := rdb.PExpire(ctx, prefix+":{c:soak-0}:s", s.cfg.historyTTL).Err(); err != nil {
		t.Fatal(err)
	}
	if rep := checkRun(t, s); len(rep.problems) > 0 {
		t.Fatalf("failed a stream left with HISTORY_TTL: %v", rep.problems)
	}
	if err := rdb.PExpire(ctx, prefix+":{c:soak-0}:s", 1000*s.cfg.historyTTL).Err(); err != nil {
		t.Fatal(err)
	}
	if rep := checkRun(t, s); len(rep.problems) == 0 {
		t.Errorf("passed a stream left with a TTL of %s, HISTORY_TTL %s", 1000*s.cfg.historyTTL, s.cfg.historyTTL)
	}
}

// A read answered 404 is answered only when it is a connection's record
// that is gone (connection_not_found); an endpoint the ingress does not
// have (not_found) is a failed read.
func TestReadNotFound(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusNotFound)
		_, _ = w.Write([]byte(`{"error":{"code":"not_found","message":"no such endpoint; see docs/api.md"}}`))
	}))
	defer srv.Close()
	s := &soak{cfg: config{reads: 20}, channels: []string{"soak-0"}, rng: rand.New(rand.NewPCG(1, 2))}
	var err error
	if s.pub, err = publisher.New(publisher.Options{URL: srv.URL, Token: apiKey}); err != nil {
		t.Fatal(err)
	}
	s.live = map[int]*soakClient{0: {s: s, user: "u0", conn: "c0"}}
	// Until a read is answered, where 300 ms were trusted to hold one: a
	// server or test descheduled for 250 ms (a loaded machine) left none
	// answered, and the test failed saying none was counted as failed.
	runUntil(t, s.read, func() error {
		if n := s.reads.Load() + s.readErrors.Load(); n == 0 {
			return errors.New("no read answered")
		}
		return nil
	})
	if s.readErrors.Load() == 0 {
		t.Errorf("%d reads answered 404 not_found, counted as answered, none as failed", s.reads.Load())
	}
}

// runUntil runs loop (sendTargeted, read) until done reports nil, then
// cancels its context and waits for it to return.
func runUntil(t *testing.T, loop func(context.Context), done func() error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	returned := make(chan struct{})
	go func() {
		defer close(returned)
		loop(ctx)
	}()
	testkit.Eventually(t, 10*time.Second, done)
	cancel()
	select {
	case <-returned:
	case <-time.After(15 * time.Second):
		t.Fatal("the loop did not return once its context was cancelled")
	}
}
