package main

import (
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/wsrelay/wsrelay/shared/auth"
	"github.com/wsrelay/wsrelay/shared/protocol"
)

// TestExpiryAtExp: a connection is expired from its token's exp on, the
// instant itself included, as the verifier refuses a token at its exp
// (RFC 7519 §4.1.4: "on or after which"; docs/security.md: "From exp on
// ... no message is written"). The sweep, the writer and a late refresh
// compared with After, which left the connection open, and written to,
// at exp.
func TestExpiryAtExp(t *testing.T) {
	t.Parallel()
	exp := time.Now().Add(time.Hour).Truncate(time.Second)
	tok := token(t, auth.Claims{Subject: "alice", Expires: exp})
	v, err := auth.NewVerifier(auth.TokenConfig{Secret: testSecret})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.WithClock(func() time.Time { return exp }).Verify(tok); err != auth.ErrTokenExpired {
		t.Fatalf("the verifier at exp: %v, want it expired", err)
	}
	c := &conn{exp: exp}
	if !c.expired(exp) {
		t.Error("a connection is not expired at its token's exp, where the token is refused")
	}
	if c.expired(exp.Add(-time.Nanosecond)) {
		t.Error("a connection is expired before its token's exp")
	}
}

// TestLateRefreshUncounted: a refresh handled once the connection's token
// has expired is refused invalid_token and not counted as a bad request,
// whatever its token holds (docs/security.md, "Expiry and refresh"), and
// the connection closes 4004. A late refresh with a bad token was counted,
// so that after nine bad requests it closed the connection 1008 (too many
// invalid frames, which clients do not reconnect after) instead of 4004
// (fetch a fresh token and reconnect); one with another user's token was
// answered forbidden, and counted too.
func TestLateRefreshUncounted(t *testing.T) {
	t.Parallel()
	for name, refresh := range map[string]func(t *testing.T) string{
		"bad token":  func(*testing.T) string { return "a.b.c" },
		"other user": func(t *testing.T) string { return token(t, auth.Claims{Subject: "bob", Channels: []string{"a"}}) },
		"own expired": func(t *testing.T) string {
			return token(t, auth.Claims{Subject: "alice", Expires: time.Now().Add(-time.Minute)})
		},
	} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			e := startSecEgress(t, map[string]string{"JWT_SECRET": testSecret})
			ws, _, err := e.dial(t, url.Values{"token": {token(t, auth.Claims{Subject: "alice", Channels: []string{"a"}})}}, nil)
			if err != nil {
				t.Fatal(err)
			}
			next(t, ws, protocol.TypeWelcome)
			// Nine bad requests in a row: one more closes 1008.
			for i := 0; i < 9; i++ {
				send(t, ws, map[string]any{"type": "subscribe", "channel": "-bad"})
				if r := next(t, ws, protocol.TypeError); r.Code != protocol.CodeInvalidChannel {
					t.Fatalf("bad subscribe %d: %+v", i, r)
				}
			}
			conns := e.s.hub.snapshotConns()
			if len(conns) != 1 {
				t.Fatalf("%d connections", len(conns))
			}
			conns[0].mu.Lock()
			conns[0].exp = time.Now().Add(-time.Millisecond)
			conns[0].mu.Unlock()
			send(t, ws, map[string]any{"type": "refresh", "token": refresh(t), "ref": 1})
			if r := next(t, ws, protocol.TypeError); r.Code != protocol.CodeInvalidToken || !strings.Contains(r.Message, "connection's token has expired") {
				t.Errorf("late refresh: %+v, want invalid_token saying the connection's token has expired", r)
			}
			if code := closeCode(t, ws, 3*time.Second); code != protocol.CloseTokenExpired {
				t.Fatalf("close %d, want %d", code, protocol.CloseTokenExpired)
			}
		})
	}
}
