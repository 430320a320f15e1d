package main

import (
	"context"
	"errors"
	"io"
	"net/url"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/auth"
	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/protocol"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/registry"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// TestLapsedRegistrationClosed: an instance that did not run for longer
// than REGISTRY_TTL allows (frozen by its platform, SIGSTOP) finds, at
// its next refresh, connections whose records Redis let expire. Sends to
// them and their users, and disconnects, found nobody meanwhile: it
// closes them 1013 (reconnect and resume) rather than writing the
// records back, and keeps the others.
func TestLapsedRegistrationClosed(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	var logs testkit.SyncBuffer
	// A TTL long enough that no scheduled refresh (every 20 s) runs
	// during the test: the one it makes is the only one.
	e := startEgressLogging(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true", "REGISTRY_TTL": "60s"}, &logs)
	<-e.s.hub.inbox.ready
	frozenWS, frozen := e.dialConn(t, url.Values{"user": {"alice"}})
	_, live := e.dialConn(t, url.Values{"user": {"bob"}})
	_, cut := e.dialConn(t, url.Values{"user": {"carol"}})
	// alice's record was last written 61 s ago, and has expired: the
	// process did not run for 50 s of it (as the sweep would have found).
	frozen.regTry.Store(e.s.clock() - int64(61*time.Second))
	e.s.stalled.Add(int64(50 * time.Second))
	// carol's too, but the process ran all along: Redis was out of reach
	// (an outage holds up the refreshes, not the sweep). Not a lapse: the
	// refresh writes her record back.
	cut.regTry.Store(e.s.clock() - int64(61*time.Second))
	cut.regStalled.Store(e.s.stalled.Load())
	if err := rdb.Del(t.Context(), ks.Conn(cut.id)).Err(); err != nil {
		t.Fatal(err)
	}
	if err := rdb.Del(t.Context(), ks.Conn(frozen.id)).Err(); err != nil {
		t.Fatal(err)
	}
	if err := e.s.refreshRegistry(t.Context()); err != nil {
		t.Fatal(err)
	}
	if code := closeCode(t, frozenWS, 5*time.Second); code != protocol.CloseTryAgainLater {
		t.Fatalf("lapsed connection closed %d, want %d", code, protocol.CloseTryAgainLater)
	}
	testkit.Eventually(t, 5*time.Second, func() error {
		if _, err := e.s.reg.Get(t.Context(), frozen.id); !errors.Is(err, registry.ErrNotFound) {
			return errors.New("the lapsed connection's record was written back")
		}
		if err := rdb.ZScore(t.Context(), ks.UserConns("alice"), frozen.id).Err(); !errors.Is(err, redis.Nil) {
			return errors.New("the lapsed connection is still in its user's set")
		}
		return nil
	})
	for _, c := range []*conn{live, cut} {
		if _, err := e.s.reg.Get(t.Context(), c.id); err != nil {
			t.Fatalf("%s's record: %v", c.user, err)
		}
		if c.closeStarted.Load() {
			t.Fatalf("%s's connection was closed", c.user)
		}
	}
	l := logs.Lines(t, "registry records lapsed, closing their connections")
	if len(l) != 1 || l[0]["level"] != "WARN" || l[0]["connections"] != 1.0 {
		t.Fatalf("log lines %v, want one WARN for 1 connection", l)
	}
}

// TestLapsedExpiredTokenClosed4004: a connection whose registration
// lapsed and whose token expired while the instance did not run is closed
// 4004, as the sweep closes it (sweepConns), not 1013: after a 1013 the
// client dials with its expired token and is refused 401 first, and the
// JS client without getToken, which stops at a 4004, retries it for good.
// On thaw the refresh may look before the sweep does.
func TestLapsedExpiredTokenClosed4004(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	e := startEgressLogging(t, rdb, prefix, map[string]string{"JWT_SECRET": testSecret, "REGISTRY_TTL": "60s"}, io.Discard)
	<-e.s.hub.inbox.ready
	ws, c := e.dialConn(t, url.Values{"token": {token(t, auth.Claims{Subject: "alice", Channels: []string{"a"}})}})
	c.regTry.Store(e.s.clock() - int64(61*time.Second))
	e.s.stalled.Add(int64(50 * time.Second))
	// Expired now; the refresh runs before the sweep's next tick (a
	// second away, at most a few microseconds of it taken here).
	c.mu.Lock()
	c.exp = time.Now().Add(-time.Millisecond)
	c.mu.Unlock()
	if err := e.s.refreshRegistry(t.Context()); err != nil {
		t.Fatal(err)
	}
	if code := closeCode(t, ws, 5*time.Second); code != protocol.CloseTokenExpired {
		t.Fatalf("lapsed connection with an expired token closed %d, want %d", code, protocol.CloseTokenExpired)
	}
}

// TestFailedRefreshIsTried: a refresh Redis fails stops at the failing
// batch, and the records of the connections after it count as tried all
// the same: after a Redis outage longer than REGISTRY_TTL the instance
// writes its records back and closes nothing (closeLapsed is for an
// instance that did not run).
func TestFailedRefreshIsTried(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	e := startEgressTuned(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true", "REGISTRY_TTL": "60s"}, io.Discard, func(s *Server) {
		s.refreshBatch = 1
	})
	<-e.s.hub.inbox.ready
	var conns []*conn
	for _, user := range []string{"a", "b", "c"} {
		_, c := e.dialConn(t, url.Values{"user": {user}})
		conns = append(conns, c)
	}
	// Last tried 50 s ago: not lapsed yet.
	before := e.s.clock()
	for _, c := range conns {
		c.regTry.Store(before - int64(50*time.Second))
	}
	failed, cancel := context.WithCancel(t.Context())
	cancel()
	if err := e.s.refreshRegistry(failed); err == nil {
		t.Fatal("a refresh with a cancelled context succeeded")
	}
	for _, c := range conns {
		if c.regTry.Load() < before {
			t.Fatalf("connection %s: a failed refresh did not count as tried", c.id)
		}
		if c.closeStarted.Load() {
			t.Fatalf("connection %s closed by a failed refresh", c.id)
		}
	}
}

// TestLapseCountsPendingStall: when the process runs again, the refresh
// may look at its connections before the sweep has counted the stall;
// it counts it all the same (pendingStall), or the records would be
// written back as if Redis had been out of reach.
func TestLapseCountsPendingStall(t *testing.T) {
	t.Parallel()
	s := &Server{cfg: Config{PingInterval: time.Second, RegistryTTL: 3 * time.Second}, epoch: time.Now().Add(-time.Minute)}
	c := &conn{}
	c.listed.Store(true)
	now := s.clock()
	c.regTry.Store(now - int64(4*time.Second))
	s.sweptAt.Store(now - int64(100*time.Millisecond)) // the sweep runs every 500 ms
	if s.lapsed(c, now) {
		t.Fatal("lapsed while the process ran (Redis out of reach)")
	}
	s.sweptAt.Store(now - int64(3500*time.Millisecond))
	if !s.lapsed(c, now) {
		t.Fatal("not lapsed after a 3 s stall the sweep has not counted yet")
	}
}
