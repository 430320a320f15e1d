// Package query reads URL query parameters strictly. Go's parser
// (url.ParseQuery, and so http.Request.URL.Query and gin's GetQuery) drops
// a pair that holds a ';' or a malformed %-escape without a word, so that
// a parameter sent that way reads as absent: ?after=1;2 as no cursor at
// all, ?channels=a;b as no subscription; and past its limit of pairs
// (10,000) it drops them all. The functions refuse such a parameter
// instead, with its own error code.
package query

import (
	"net/url"
	"strings"
)

// Malformed reports whether rawQuery has a pair for name that Go's query
// parser drops: one with a ';' (which once separated pairs too) or a
// malformed %-escape, any ';'-separated part of which names name, or any
// pair naming name in a query of more pairs than the parser takes. A
// malformed pair of another parameter does not count.
func Malformed(rawQuery, name string) bool {
	all := tooManyPairs(rawQuery)
	for rawQuery != "" {
		var pair string
		pair, rawQuery, _ = strings.Cut(rawQuery, "&")
		if !all {
			if !strings.ContainsAny(pair, ";%") {
				continue
			}
			if _, err := url.ParseQuery(pair); err == nil {
				continue
			}
		}
		for _, part := range strings.Split(pair, ";") {
			k, _, _ := strings.Cut(part, "=")
			if u, err := url.QueryUnescape(k); err == nil {
				k = u
			}
			if k == name {
				return true
			}
		}
	}
	return false
}

// tooManyPairs reports whether Go's query parser refuses rawQuery whole:
// it counts the pairs ('&'s) before reading any, and past its limit
// (10,000, or GODEBUG urlmaxqueryparams) returns none of them. Asked of
// the same number of empty pairs, which it reads without error, so that
// the answer is the parser's own, whatever the limit.
func tooManyPairs(rawQuery string) bool {
	_, err := url.ParseQuery(strings.Repeat("&", strings.Count(rawQuery, "&")))
	return err != nil
}
