package channel

import (
	"strings"
	"testing"
)

func TestValidName(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		s  string
		ok bool
	}{
		{"a", true},
		{"room-1", true},
		{"A.b:c@d_e-f", true},
		{"0", true},
		{strings.Repeat("c", 128), true},
		{strings.Repeat("c", 129), false},
		{"", false},
		{"-a", false},
		{"_a", false},
		{".a", false},
		{":a", false},
		{"@a", false},
		{"a b", false},
		{"a*", false},
		{"a{b}", false},
		{"café", false},
		{"a/b", false},
		{"a\x00", false},
		{"a\n", false},
	} {
		if got := ValidName(tc.s); got != tc.ok {
			t.Errorf("ValidName(%q) = %v", tc.s, got)
		}
	}
}

func TestValidUser(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		s  string
		ok bool
	}{
		{"alice", true},
		{"-leading-dash-ok", true},
		{"u@example.com", true},
		{strings.Repeat("u", 128), true},
		{strings.Repeat("u", 129), false},
		{"", false},
		{"a b", false},
		{"ü", false},
		{"a}", false},
		// A path segment "." or ".." is resolved away by browsers, curl
		// and proxies (/v1/users/../connections is /v1/connections), so
		// such a user could not be addressed on the ingress's routes.
		{".", false},
		{"..", false},
		{"...", true},
		{".a", true},
	} {
		if got := ValidUser(tc.s); got != tc.ok {
			t.Errorf("ValidUser(%q) = %v", tc.s, got)
		}
	}
}

func TestValidEvent(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		s  string
		ok bool
	}{
		{"", true},
		{"chat message", true},
		{"a/b<c>{d}'e'", true},
		{strings.Repeat("e", 64), true},
		{strings.Repeat("e", 65), false},
		{`a"b`, false},
		{`a\b`, false},
		{"a\tb", false},
		{"a\x7f", false},
		{"é", false},
	} {
		if got := ValidEvent(tc.s); got != tc.ok {
			t.Errorf("ValidEvent(%q) = %v", tc.s, got)
		}
	}
}

func TestMatch(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		p, name string
		ok      bool
	}{
		{"*", "anything", true},
		{"*", "", true},
		{"chat:*", "chat:room", true},
		{"chat:*", "chat:", true},
		{"chat:*", "chat", false},
		{"team.a-*", "team.a-1.x:y", true},
		{"team.a-*", "team.b-1", false},
		{"*.log", "a.b.log", true},
		{"*.log", "a.b.logx", false},
		{"a*b*c", "aXXbYYc", true},
		{"a*b*c", "aXXbYY", false},
		{"a**", "a", true},
		{"exact", "exact", true},
		{"exact", "exact1", false},
		{"exact", "exac", false},
		{"a.b", "aXb", false}, // '.' is literal
		{strings.Repeat("*a", 20) + "b", strings.Repeat("a", 100), false},
	} {
		if got := Match(tc.p, tc.name); got != tc.ok {
			t.Errorf("Match(%q, %q) = %v", tc.p, tc.name, got)
		}
	}
}

func TestPatterns(t *testing.T) {
	t.Parallel()
	if !ValidPattern("*") || !ValidPattern("-*") || ValidPattern("") || ValidPattern("a b*") || ValidPattern(strings.Repeat("*", 129)) {
		t.Error("ValidPattern")
	}
	ps, bad := ParsePatterns(" chat:* , ,news.* ")
	if bad != "" || len(ps) != 2 || ps[0] != "chat:*" || ps[1] != "news.*" {
		t.Fatalf("ParsePatterns = %v, %q", ps, bad)
	}
	if !ps.Allows("chat:1") || !ps.Allows("news.x") || ps.Allows("other") || Patterns(nil).Allows("x") {
		t.Error("Allows")
	}
	if _, bad := ParsePatterns("ok,b@d pattern"); bad != "b@d pattern" {
		t.Fatalf("bad pattern reported as %q", bad)
	}
}

// TestNameBytes checks every byte value, first and later in a name, a
// user and a pattern, against the documented sets: [A-Za-z0-9] to start a
// channel name, [A-Za-z0-9_.:@-] after it and in a user id, and those or
// '*' in a pattern. The table tests above pick examples; this pins each
// range's ends.
func TestNameBytes(t *testing.T) {
	t.Parallel()
	alnum := func(c byte) bool {
		return strings.IndexByte("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789", c) >= 0
	}
	name := func(c byte) bool { return alnum(c) || strings.IndexByte("_.:@-", c) >= 0 }
	for i := 0; i < 256; i++ {
		c := byte(i)
		s := string([]byte{c})
		if got := ValidName(s); got != alnum(c) {
			t.Errorf("ValidName(%q) = %v", s, got)
		}
		if got := ValidName("a" + s); got != name(c) {
			t.Errorf("ValidName(%q) = %v", "a"+s, got)
		}
		if got := ValidUser("u" + s); got != name(c) {
			t.Errorf("ValidUser(%q) = %v", "u"+s, got)
		}
		if got := ValidPattern("p" + s); got != (name(c) || c == '*') {
			t.Errorf("ValidPattern(%q) = %v", "p"+s, got)
		}
	}
}
