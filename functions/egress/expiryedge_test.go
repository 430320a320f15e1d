package main

import (
	"testing"
	"time"

	"github.com/wsrelay/wsrelay/shared/auth"
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
