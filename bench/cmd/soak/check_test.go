package main

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/wsrelay/wsrelay/bench/harness"
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
