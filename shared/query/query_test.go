package query

import (
	"net/url"
	"testing"
)

func TestMalformed(t *testing.T) {
	for _, tc := range []struct {
		query string
		want  bool
	}{
		{"after=1-2", false},
		{"after=1%2D2", false},
		{"", false},
		{"after=1;2", true},
		{"after=%zz", true},
		{"af%74er=%zz", true},       // the name escaped
		{"x=1;after=5", true},       // the old ';' separator
		{"limit=2&after=1;2", true}, // not the first pair
		{"foo=%zz&after=1", false},  // another parameter's pair
		{"afterx=1;2", false},
		{"after", false},
		{"after;", true},
	} {
		if got := Malformed(tc.query, "after"); got != tc.want {
			t.Errorf("Malformed(%q) = %v, want %v", tc.query, got, tc.want)
		}
		// Whatever Malformed reports, Go's parser indeed dropped: a pair
		// it keeps is never called malformed.
		if q, _ := url.ParseQuery(tc.query); tc.want && q.Has("after") {
			t.Errorf("%q: Go's parser kept after=%q, yet called malformed", tc.query, q["after"])
		}
	}
}
