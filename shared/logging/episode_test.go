package logging

import (
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/wsrelay/wsrelay/shared/testkit"
)

// TestEpisode: failures interleaved with successes (a partial outage)
// are one episode: one warning when it begins, a reminder with the count
// once Reminder has passed, and one line when it ends, Quiet after the
// last failure.
func TestEpisode(t *testing.T) {
	t.Parallel()
	// On the bubble's clock: on the real one, a test descheduled for Quiet
	// between two of its calls (a loaded machine) saw an episode end
	// where the test had it go on. A millisecond passes between the calls,
	// as some time always does on the real clock: the episode tells a
	// failure after a success by its time.
	synctest.Test(t, func(t *testing.T) {
		log, buf := jsonLog(t, "ingress")
		e := &Episode{Log: log, Msg: "redis unavailable", Then: "503", Back: "redis back", Reminder: 300 * time.Millisecond, Quiet: 100 * time.Millisecond}
		e.OK() // nothing under way: nothing logged
		boom := errors.New("connection refused")
		for i := range 100 {
			e.Fail(boom, "route", "/v1/messages")
			time.Sleep(time.Millisecond)
			if i%2 == 0 {
				e.OK()
				time.Sleep(time.Millisecond)
			}
		}
		if recs := buf.JSONLines(t); len(recs) != 1 || recs[0]["level"] != "WARN" || recs[0]["err"] != "connection refused" || recs[0]["route"] != "/v1/messages" {
			t.Fatalf("100 failures, 50 successes between them: %v, want one warning", recs)
		}
		time.Sleep(350 * time.Millisecond)
		e.Fail(boom)
		if recs := buf.JSONLines(t); len(recs) != 2 || recs[1]["failures"] != float64(101) {
			t.Fatalf("after Reminder: %v, want a reminder counting 101 failures", recs)
		}
		e.OK() // within Quiet of the failure: the end waits for it
		time.Sleep(300 * time.Millisecond)
		recs := buf.JSONLines(t)
		if len(recs) != 3 || recs[2]["msg"] != "redis back" || recs[2]["level"] != "INFO" || recs[2]["failures"] != float64(101) {
			t.Fatalf("after Quiet: %v, want one end line", recs)
		}
		e.OK()
		e.Fail(boom)
		if recs := buf.JSONLines(t); len(recs) != 4 || recs[3]["msg"] != "redis unavailable" {
			t.Fatalf("a new episode: %v", recs)
		}
	})
}

// TestEpisodeAbandon: an episode whose failing work is given up ends at
// once with its Gone line, however recent its last failure; a pending
// end does not log a second line, and the next failure begins a new
// episode. With none under way, Abandon logs nothing.
func TestEpisodeAbandon(t *testing.T) {
	t.Parallel()
	// On the bubble's clock: on the real one, a test descheduled for Quiet
	// between OK and Abandon saw the pending end logged first.
	synctest.Test(t, func(t *testing.T) {
		log, buf := jsonLog(t, "egress")
		e := &Episode{Log: log, Msg: "reads failing", Back: "reads back", Gone: "reads abandoned", Quiet: 100 * time.Millisecond}
		e.Abandon()
		boom := errors.New("WRONGTYPE")
		e.Fail(boom)
		e.Fail(boom)
		e.OK() // an end scheduled Quiet after the last failure
		e.Abandon("then", "nobody listens")
		recs := buf.JSONLines(t)
		if len(recs) != 2 || recs[1]["msg"] != "reads abandoned" || recs[1]["level"] != "INFO" || recs[1]["failures"] != float64(2) || recs[1]["then"] != "nobody listens" {
			t.Fatalf("%v, want the warning and one abandoned line counting 2 failures", recs)
		}
		time.Sleep(200 * time.Millisecond)
		e.Fail(boom)
		if recs := buf.JSONLines(t); len(recs) != 3 || recs[2]["msg"] != "reads failing" || recs[2]["failures"] != nil {
			t.Fatalf("%v, want no end line and a new episode", recs)
		}
	})
}

// TestEpisodeAfterAbandonEnds: a new episode begun while the abandoned
// one's end was still pending ends Quiet after its last failure, on the
// success reported meanwhile, not only at some later success: the
// pending end, which finds its episode gone, must not swallow it.
func TestEpisodeAfterAbandonEnds(t *testing.T) {
	t.Parallel()
	// On the bubble's clock: on the real one, a test descheduled for Quiet
	// after Abandon let the pending end go before the new episode began,
	// and tested nothing. A millisecond passes between the new failure and
	// the success, as some time always does on the real clock: the pending
	// end tells a success after a failure by its time.
	synctest.Test(t, func(t *testing.T) {
		log, buf := jsonLog(t, "egress")
		e := &Episode{Log: log, Msg: "reads failing", Back: "reads back", Gone: "reads abandoned", Quiet: 100 * time.Millisecond}
		boom := errors.New("WRONGTYPE")
		e.Fail(boom)
		e.OK() // an end scheduled Quiet after that failure
		e.Abandon()
		time.Sleep(20 * time.Millisecond)
		e.Fail(boom) // a new episode
		time.Sleep(time.Millisecond)
		e.OK() // its only success
		testkit.Eventually(t, 2*time.Second, func() error {
			recs := buf.JSONLines(t)
			if len(recs) != 4 || recs[3]["msg"] != "reads back" || recs[3]["failures"] != float64(1) {
				return fmt.Errorf("%v, want the new episode ended by its success", recs)
			}
			return nil
		})
	})
}

// TestEpisodeLasted: an episode's end line says how long the outage
// lasted, from its first failure to the success that ended it, not to
// its last failure: a single failure followed by ten seconds of nothing
// and a success was logged as having lasted 0s. A success within Quiet
// of the last failure ends it Quiet later, still measured to itself;
// Abandon measures to when the work was given up.
func TestEpisodeLasted(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		log, buf := jsonLog(t, "ingress")
		e := &Episode{Log: log, Msg: "redis unavailable", Back: "redis back", Gone: "given up", Quiet: 5 * time.Second}
		boom := errors.New("connection refused")
		last := func() map[string]any {
			recs := buf.JSONLines(t)
			return recs[len(recs)-1]
		}

		// One failure, then nothing for 10s: the first success ends it.
		e.Fail(boom)
		time.Sleep(10 * time.Second)
		e.OK()
		if r := last(); r["msg"] != "redis back" || r["lasted"] != "10s" {
			t.Fatalf("ended by a success 10s on: %v, want lasted 10s", r)
		}

		// Failures at 0s and 2s, a success at 3s: the end waits for
		// Quiet after the last failure (7s), and says 3s.
		e.Fail(boom)
		time.Sleep(2 * time.Second)
		e.Fail(boom)
		time.Sleep(time.Second)
		e.OK()
		time.Sleep(2 * time.Second)
		e.OK() // a later success changes nothing
		time.Sleep(10 * time.Second)
		synctest.Wait()
		if r := last(); r["msg"] != "redis back" || r["lasted"] != "3s" || r["failures"] != float64(2) {
			t.Fatalf("ended Quiet after the last failure: %v, want lasted 3s", r)
		}

		// Given up 4s after its only failure.
		e.Fail(boom)
		time.Sleep(4 * time.Second)
		e.Abandon()
		if r := last(); r["msg"] != "given up" || r["lasted"] != "4s" {
			t.Fatalf("abandoned: %v, want lasted 4s", r)
		}
	})
}

// TestEpisodeStop: a server that stops stops its episodes before its
// last line. An end pending at Stop (a success within Quiet of the last
// failure) is logged at once, measured to that success, not from a timer
// after the server's last line; an episode still failing is left as its
// last line said. After Stop nothing is logged: not the pending end, not
// a failure, success or Abandon that comes later. Stop twice is Stop.
func TestEpisodeStop(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		boom := errors.New("connection refused")
		for _, tc := range []struct {
			name  string
			steps func(e *Episode)
			want  []string // the lines logged, in order
		}{
			{"end pending", func(e *Episode) { e.Fail(boom); time.Sleep(time.Second); e.OK() }, []string{"redis unavailable", "redis back"}},
			{"still failing", func(e *Episode) { e.Fail(boom); e.OK(); time.Sleep(time.Second); e.Fail(boom) }, []string{"redis unavailable"}},
			{"none under way", func(e *Episode) {}, nil},
		} {
			log, buf := jsonLog(t, "egress")
			e := &Episode{Log: log, Msg: "redis unavailable", Back: "redis back", Quiet: 5 * time.Second}
			tc.steps(e)
			time.Sleep(time.Second)
			e.Stop()
			if got := msgs(t, buf); !slices.Equal(got, tc.want) {
				t.Fatalf("%s: at Stop %q, want %q", tc.name, got, tc.want)
			}
			if tc.name == "end pending" {
				if r := buf.JSONLines(t)[1]; r["lasted"] != "1s" {
					t.Errorf("%s: %v, want lasted 1s (to the success)", tc.name, r)
				}
			}
			e.Stop()
			e.Fail(boom)
			e.OK()
			time.Sleep(time.Minute) // past any end or reminder
			e.Fail(boom)
			e.OK()
			e.Abandon()
			synctest.Wait()
			if got := msgs(t, buf); !slices.Equal(got, tc.want) {
				t.Fatalf("%s: after Stop %q, want %q", tc.name, got, tc.want)
			}
		}
	})
}

// msgs is the msg of each line in buf.
func msgs(t *testing.T, buf *testkit.SyncBuffer) []string {
	t.Helper()
	var out []string
	for _, r := range buf.JSONLines(t) {
		out = append(out, r["msg"].(string))
	}
	return out
}

// TestEpisodeWallClockStep: an episode's Quiet is measured by the time the
// process ran, not by its wall clock. A clock stepped back (NTP after a
// VM's resume) postponed the end by the step: a success Quiet after the
// last failure left the episode under way for an hour, its owner taking
// Redis as still failing (Active) and the end line unwritten. One stepped
// forward ended it at the first success after a failure a moment old,
// splitting a partial outage into an episode per failure.
func TestEpisodeWallClockStep(t *testing.T) {
	t.Parallel()
	log, buf := jsonLog(t, "ingress")
	var step atomic.Int64
	const quiet = 100 * time.Millisecond
	e := &Episode{Log: log, Msg: "redis unavailable", Back: "redis back", Quiet: quiet,
		clock: func() time.Time { return testkit.WallStep(time.Now(), time.Duration(step.Load())) }}
	defer e.Stop()
	boom := errors.New("connection refused")

	e.Fail(boom)
	step.Store(int64(time.Hour)) // forward
	e.OK()                       // a moment after the failure: not the end yet
	if !e.Active() || len(buf.Lines(t, "redis back")) != 0 {
		t.Fatalf("ended by a success a moment after the failure, the wall clock stepped an hour forward:\n%s", buf.String())
	}
	testkit.Eventually(t, 5*time.Second, func() error {
		if e.Active() {
			return fmt.Errorf("not ended Quiet after the last failure")
		}
		return nil
	})

	e.Fail(boom)
	step.Store(int64(-time.Hour)) // an hour back from the failure
	time.Sleep(quiet + 50*time.Millisecond)
	e.OK() // Quiet after the failure: the end
	if e.Active() {
		t.Fatalf("a success Quiet after the last failure did not end the episode, the wall clock stepped back:\n%s", buf.String())
	}
	for _, l := range buf.Lines(t, "redis back") {
		if d, err := time.ParseDuration(fmt.Sprint(l["lasted"])); err != nil || d < 0 || d > time.Minute {
			t.Errorf("lasted %v: %s", l["lasted"], buf.String())
		}
	}
}

// jsonLog is an info-level JSON logger of function and the buffer it
// writes to.
func jsonLog(t *testing.T, function string) (*slog.Logger, *testkit.SyncBuffer) {
	t.Helper()
	buf := &testkit.SyncBuffer{}
	log, err := New(Config{Format: "json", Level: "info"}, buf, function)
	if err != nil {
		t.Fatal(err)
	}
	return log, buf
}
