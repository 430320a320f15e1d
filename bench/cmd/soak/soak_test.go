package main

import (
	"bytes"
	"context"
	"encoding/json"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/wsrelay/wsrelay/shared/client"
)

func TestThirds(t *testing.T) {
	var samples []sample
	for i := range 8 {
		samples = append(samples, sample{at: time.Duration(i) * time.Second, keys: int64(10 * i)})
	}
	samples = append(samples, sample{at: 9 * time.Second, keys: 1000, final: true})
	keys := func(s sample) float64 { return float64(s.keys) }
	// From 2 s on: 20 … 70, six samples; thirds of two each.
	first, last, ok := thirds(samples, 2*time.Second, keys)
	if !ok || first != 25 || last != 65 {
		t.Fatalf("thirds = %v, %v, %v; want 25, 65, true", first, last, ok)
	}
	if _, _, ok := thirds(samples, 7*time.Second, keys); ok {
		t.Fatal("one sample after warm-up gave thirds")
	}
}

// A short soak with everything in it: the real functions and Redis,
// client churn, cuts, a rolling restart; it finishes, samples and passes
// its checks, and leaves no goroutine of its own behind.
func TestSoakShort(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the functions for about 40 s")
	}
	leaks := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, leaks) })
	var out, errOut bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	err := run(ctx, []string{
		"-duration", "16s", "-sample", "3s", "-warmup", "3s",
		"-clients", "8", "-channels", "3", "-rate", "12", "-churn", "2s",
		"-restart-every", "7s", "-registry-ttl", "3s", "-max-lifetime", "4s", "-history-ttl", "30s",
	}, &out, &errOut)
	t.Logf("stdout:\n%s\nstderr:\n%s", out.String(), errOut.String())
	if err != nil {
		t.Fatalf("soak: %v", err)
	}
	rows := regexp.MustCompile(`(?m)^ *(end )?(\d+m)?\d+s │ `).FindAllString(out.String(), -1)
	if len(rows) < 5 { // the start, at least 4 during the run, the end
		t.Errorf("%d sample rows, want the start, one every 3 s and the end", len(rows))
	}
	for _, want := range []string{"ok   delivery:", "ok   targeted:", "ok   keys: no registry key left", "first third", "egress-a goroutines"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("no %q in the report", want)
		}
	}
	if !strings.Contains(errOut.String(), "drained in") {
		t.Error("no rolling restart happened")
	}
}

// The targeted check on constructed timelines: u1 has connection c1 from
// 0 s, u2 has c2 from 0 s; a send starts at 10 s and is acknowledged
// 10 ms later; what each case adds decides what the check says.
func TestTargetedCheck(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	at := func(d time.Duration) time.Time { return t0.Add(d) }
	start, acked := at(10*time.Second), at(10*time.Second+10*time.Millisecond)
	toConn := targetedSend{n: 1, user: "u1", conn: "c1", start: start, acked: acked}
	toUser := targetedSend{n: 2, toUser: true, user: "u1", conn: "c1", start: start, acked: acked, connections: 1}
	got := func(n int, user, conn, target string, d time.Duration) receipt {
		return receipt{n: n, user: user, conn: conn, target: target, at: at(d)}
	}
	for _, tc := range []struct {
		name  string
		send  targetedSend
		setup func(l *targetedLog)
		want  []verdictKind // none: received by its target, once
	}{
		{"connection, received", toConn, func(l *targetedLog) {
			l.got(got(1, "u1", "c1", "connection", 10020*time.Millisecond))
		}, nil},
		{"user, received", toUser, func(l *targetedLog) {
			l.got(got(2, "u1", "c1", "user", 10020*time.Millisecond))
		}, nil},
		{"user, received by a connection opened after the send (a catch-up)", toUser, func(l *targetedLog) {
			l.end(at(9*time.Second), "c1", "lost")
			l.welcome(at(11*time.Second), "u1", "c1b")
			l.got(got(2, "u1", "c1b", "user", 11020*time.Millisecond))
		}, nil},
		{"connection, closing at the send", toConn, func(l *targetedLog) {
			l.closing(at(10005*time.Millisecond), "c1", "resume")
			l.end(at(10007*time.Millisecond), "c1", "closed by the client")
		}, []verdictKind{missAllowed}},
		{"connection, cut 4001 just after the acknowledgement", toConn, func(l *targetedLog) {
			l.end(at(11*time.Second), "c1", "server close 4001")
		}, []verdictKind{missAllowed}},
		{"connection, ended just before the send (its record not removed yet)", toConn, func(l *targetedLog) {
			l.end(at(8500*time.Millisecond), "c1", "server close 1001")
		}, []verdictKind{missAllowed}},
		{"user, its one connection closing at the send", toUser, func(l *targetedLog) {
			l.closing(at(10001*time.Millisecond), "c1", "leave")
		}, []verdictKind{missAllowed}},
		{"user, no connection at the send", targetedSend{n: 2, toUser: true, user: "u1", start: start, acked: acked}, func(l *targetedLog) {
			l.end(at(5*time.Second), "c1", "lost")
			l.welcome(at(15*time.Second), "u1", "c1b")
		}, []verdictKind{missAllowed}},
		{"connection, live throughout", toConn, nil, []verdictKind{missUnexplained}},
		{"connection, ended long after the send", toConn, func(l *targetedLog) {
			l.end(at(13*time.Second), "c1", "server close 4001")
		}, []verdictKind{missUnexplained}},
		{"connection, ended long before the send", toConn, func(l *targetedLog) {
			l.end(at(7*time.Second), "c1", "lost")
		}, []verdictKind{missUnexplained}},
		{"user, one of two live connections missed", toUser, func(l *targetedLog) {
			l.welcome(at(time.Second), "u1", "c1b")
			l.got(got(2, "u1", "c1b", "user", 10020*time.Millisecond))
		}, []verdictKind{missUnexplained}},
		{"user, the ingress found none while one was live", targetedSend{n: 2, toUser: true, user: "u1", start: start, acked: acked}, nil,
			[]verdictKind{missUnexplained}},
		{"connection, answered 404 after it ended", targetedSend{n: 1, user: "u1", conn: "c1", start: start, acked: acked, gone: true}, func(l *targetedLog) {
			l.end(at(4*time.Second), "c1", "server close 4001")
		}, nil},
		{"connection, answered 404 while live", targetedSend{n: 1, user: "u1", conn: "c1", start: start, acked: acked, gone: true}, nil,
			[]verdictKind{missUnexplained}},
		{"connection, answered 404, ended long after", targetedSend{n: 1, user: "u1", conn: "c1", start: start, acked: acked, gone: true}, func(l *targetedLog) {
			l.end(at(13*time.Second), "c1", "server close 4001")
		}, []verdictKind{missUnexplained}},
		{"connection, received twice", toConn, func(l *targetedLog) {
			l.got(got(1, "u1", "c1", "connection", 10020*time.Millisecond))
			l.got(got(1, "u1", "c1", "connection", 10030*time.Millisecond))
		}, []verdictKind{duplicate}},
		{"connection, received by the user's next connection", toConn, func(l *targetedLog) {
			l.end(at(10005*time.Millisecond), "c1", "server close 4001")
			l.welcome(at(10100*time.Millisecond), "u1", "c1b")
			l.got(got(1, "u1", "c1b", "connection", 10200*time.Millisecond))
		}, []verdictKind{missAllowed, misrouted}},
		{"user, received by another user's connection", toUser, func(l *targetedLog) {
			l.got(got(2, "u1", "c1", "user", 10020*time.Millisecond))
			l.got(got(2, "u2", "c2", "user", 10020*time.Millisecond))
		}, []verdictKind{misrouted}},
		{"user, delivered as a send to a connection", toUser, func(l *targetedLog) {
			l.got(got(2, "u1", "c1", "connection", 10020*time.Millisecond))
		}, []verdictKind{misrouted}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := newTargetedLog(t0)
			l.welcome(t0, "u1", "c1")
			l.welcome(t0, "u2", "c2")
			l.sent(tc.send)
			if tc.setup != nil {
				tc.setup(l)
			}
			_, verdicts := l.check(targetedWindow)
			var kinds []verdictKind
			for _, v := range verdicts {
				kinds = append(kinds, v.kind)
				t.Log(l.line(v))
			}
			if !slices.Equal(kinds, tc.want) {
				t.Errorf("verdicts %v, want %v", kinds, tc.want)
			}
		})
	}
}

// A receipt whose data has no number is a failure of its own; one of a
// send that was not acknowledged (an error, the end of the run) is not
// checked.
func TestTargetedCheckReceipts(t *testing.T) {
	t0 := time.Now()
	l := newTargetedLog(t0)
	l.welcome(t0, "u1", "c1")
	l.gotMessage(t0.Add(time.Second), "u1", "c1", client.Message{Target: "user", Data: json.RawMessage(`{"seq":3}`)})
	l.gotMessage(t0.Add(time.Second), "u1", "c1", client.Message{Target: "user", Data: json.RawMessage(`{"n":7}`)})
	received, verdicts := l.check(targetedWindow)
	if received != 0 || len(verdicts) != 1 || verdicts[0].kind != unreadable {
		t.Fatalf("received %d, verdicts %+v; want 0 and one unreadable", received, verdicts)
	}
}
