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
	v, _ := NewVerifier(TokenConfig{Secret: secret})
	f.Fuzz(func(t *testing.T, tok string) {
		c, err := v.Verify(tok)
		if err == nil && (c.Subject == "" || c.Expires.IsZero()) {
			t.Fatalf("accepted %q without sub or exp", tok)
		}
	})
}

// FuzzParseKeys: no input panics, a parsed key is found by its secret,
// and no error message repeats a key (errors name the item's position,
// never the key). Checked without guessing where a key could appear by
// chance in an error's fixed text (an item "API_KEYS" listed twice): the
// same input with the case of every key's letters swapped, which keeps
// which keys are valid and which are equal, fails with the same message.
func FuzzParseKeys(f *testing.F) {
	for _, s := range []string{"k1,k2=chat:*|news.*,k3=+admin", "a.b", "k=", "=x", ",,,", "k=+admin|*", "Secret-Key.1", "dup,dup"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		ks, err := ParseKeys(s)
		if err != nil {
			if _, err2 := ParseKeys(swapKeyCase(s)); err2 == nil || err2.Error() != err.Error() {
				t.Fatalf("ParseKeys(%q): %v; with the keys' letters in the other case: %v", s, err, err2)
			}
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

// swapKeyCase swaps the case of the ASCII letters in the key of every
// API_KEYS item (the text before its first '='), leaving scopes as they
// are.
func swapKeyCase(s string) string {
	items := strings.Split(s, ",")
	for i, item := range items {
		key, scope, scoped := strings.Cut(item, "=")
		b := []byte(key)
		for j, c := range b {
			switch {
			case 'a' <= c && c <= 'z':
				b[j] = c - 'a' + 'A'
			case 'A' <= c && c <= 'Z':
				b[j] = c - 'A' + 'a'
			}
		}
		items[i] = string(b)
		if scoped {
			items[i] += "=" + scope
		}
	}
	return strings.Join(items, ",")
}
