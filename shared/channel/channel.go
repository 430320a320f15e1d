// Package channel validates the names that reach Redis keys and matches
// channel patterns.
//
// Every name that becomes part of a Redis key (channel, user, connection id)
// is checked here first, so no outside input reaches Redis unvalidated.
package channel

import "strings"

// MaxNameLen is the longest channel name.
const MaxNameLen = 128

// ValidName reports whether s is a channel name:
// ^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$.
func ValidName(s string) bool {
	if len(s) == 0 || len(s) > MaxNameLen || !alnum(s[0]) {
		return false
	}
	for i := 1; i < len(s); i++ {
		if !nameByte(s[i]) {
			return false
		}
	}
	return true
}

// UserRule says what ValidUser accepts, for error messages.
const UserRule = `1–128 characters [A-Za-z0-9_.:@-], not "." or ".."`

// ValidUser reports whether s is a usable user id (or connection or
// instance id): 1–128 bytes of the channel alphabet (letters, digits,
// _ . : @ -), but not "." or "..": as a path segment
// (/v1/users/{user}/…) those are resolved away by browsers, curl and
// proxies, so such a user could not be addressed. The empty user
// (anonymous) is handled by callers.
func ValidUser(s string) bool {
	if len(s) == 0 || len(s) > MaxNameLen || s == "." || s == ".." {
		return false
	}
	for i := 0; i < len(s); i++ {
		if !nameByte(s[i]) {
			return false
		}
	}
	return true
}

// ValidEvent reports whether s is a usable event name: at most 64 bytes of
// printable ASCII without quotes or backslashes. The empty event is allowed.
func ValidEvent(s string) bool {
	if len(s) > 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < 0x20 || c > 0x7e || c == '"' || c == '\\' {
			return false
		}
	}
	return true
}

func alnum(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
}

func nameByte(c byte) bool {
	return alnum(c) || c == '_' || c == '.' || c == ':' || c == '@' || c == '-'
}

// ValidPattern reports whether p is a channel pattern: a channel name in
// which '*' may also appear anywhere (including first), or "*" alone.
func ValidPattern(p string) bool {
	if p == "" || len(p) > MaxNameLen {
		return false
	}
	for i := 0; i < len(p); i++ {
		if p[i] != '*' && !nameByte(p[i]) {
			return false
		}
	}
	return true
}

// Match reports whether name matches the glob pattern p, where '*' matches
// any run of characters (including none, and across '.' and ':'). Every
// other byte matches itself. It runs in O(len(p)·len(name)) at worst.
func Match(p, name string) bool {
	// Iterative glob with single backtrack point: linear for practical
	// patterns, never exponential.
	pi, ni := 0, 0
	star, mark := -1, 0
	for ni < len(name) {
		switch {
		case pi < len(p) && p[pi] == '*':
			star, mark = pi, ni
			pi++
		case pi < len(p) && p[pi] == name[ni]:
			pi++
			ni++
		case star >= 0:
			pi = star + 1
			mark++
			ni = mark
		default:
			return false
		}
	}
	for pi < len(p) && p[pi] == '*' {
		pi++
	}
	return pi == len(p)
}

// Patterns is a list of channel patterns.
type Patterns []string

// ParsePatterns splits a comma-separated list, trimming spaces and dropping
// empty items. It returns the first invalid pattern as an error value.
func ParsePatterns(s string) (Patterns, string) {
	var out Patterns
	for _, p := range strings.Split(s, ",") {
		p = strings.TrimSpace(p)
		if p == "" {
			continue
		}
		if !ValidPattern(p) {
			return nil, p
		}
		out = append(out, p)
	}
	return out, ""
}

// Allows reports whether any pattern matches name.
func (ps Patterns) Allows(name string) bool {
	for _, p := range ps {
		if Match(p, name) {
			return true
		}
	}
	return false
}
