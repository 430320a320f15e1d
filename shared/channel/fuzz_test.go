package channel

import (
	"regexp"
	"strings"
	"testing"
)

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$`)

// FuzzValidName checks ValidName against the documented expression.
func FuzzValidName(f *testing.F) {
	for _, s := range []string{"chat:1", "a", "", "-a", "a b", "team.a-1@x", strings.Repeat("a", 128), strings.Repeat("a", 129), "é", "a\x00"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if ValidName(s) != nameRE.MatchString(s) {
			t.Fatalf("ValidName(%q) = %v", s, ValidName(s))
		}
		if ValidName(s) && (!ValidUser(s) || !ValidPattern(s) || !Match(s, s)) {
			t.Fatalf("%q: a name must be a user id, a pattern and match itself", s)
		}
	})
}

// FuzzMatch checks Match against a regexp built from the pattern, the
// reference meaning of the glob: '*' is any run, everything else literal.
func FuzzMatch(f *testing.F) {
	for _, s := range [][2]string{{"chat:*", "chat:1"}, {"*", ""}, {"team.a-*", "team.a-b.c"}, {"a*b*c", "aXbYbZc"}, {"**", "x"}, {"a*", "b"}, {"*a*a*a*a*b", strings.Repeat("a", 100)}} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, p, name string) {
		if !ValidPattern(p) || len(p) > 64 || len(name) > 256 {
			return // patterns are validated before use
		}
		parts := strings.Split(p, "*")
		for i := range parts {
			parts[i] = regexp.QuoteMeta(parts[i])
		}
		re := regexp.MustCompile(`^(?s:` + strings.Join(parts, ".*") + `)$`)
		if got, want := Match(p, name), re.MatchString(name); got != want {
			t.Fatalf("Match(%q, %q) = %v, want %v", p, name, got, want)
		}
	})
}
