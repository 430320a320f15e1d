package query

import (
	"net/url"
	"strings"
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

// TestMalformedTooManyPairs: Go's parser refuses a query of more pairs
// than its limit (10,000) whole, without a word: every parameter of it,
// well formed or not, reads as absent (?after=x&… as no cursor, so not
// even refused). Such a query's pairs for name are malformed too.
func TestMalformedTooManyPairs(t *testing.T) {
	pad := strings.Repeat("&x=1", 10000)
	for _, tc := range []struct {
		query string
		want  bool
	}{
		{"after=1-2" + pad, true},
		{"after=x" + pad, true},
		{pad + "&af%74er=1", true},
		{"limit=2" + pad, false}, // no pair names after
		{"after=1-2" + pad[:len(pad)-len("&x=1")], false},
	} {
		if got := Malformed(tc.query, "after"); got != tc.want {
			t.Errorf("Malformed(%.20q…, %d pairs) = %v, want %v", tc.query, strings.Count(tc.query, "&")+1, got, tc.want)
		}
		if q, _ := url.ParseQuery(tc.query); tc.want && q.Has("after") {
			t.Errorf("%.20q…: Go's parser kept after=%q, yet called malformed", tc.query, q["after"])
		}
	}
}
