// Package query reads URL query parameters strictly. Go's parser
// (url.ParseQuery, and so http.Request.URL.Query and gin's GetQuery) drops
// a pair that holds a ';' or a malformed %-escape without a word, so that
// a parameter sent that way reads as absent: ?after=1;2 as no cursor at
// all, ?channels=a;b as no subscription. The functions refuse such a
// parameter instead, with its own error code.
package query

import (
	"net/url"
	"strings"
)

// Malformed reports whether rawQuery has a pair for name that Go's query
// parser drops: one with a ';' (which once separated pairs too) or a
// malformed %-escape, any ';'-separated part of which names name. A
// malformed pair of another parameter does not count.
func Malformed(rawQuery, name string) bool {
	for rawQuery != "" {
		var pair string
		pair, rawQuery, _ = strings.Cut(rawQuery, "&")
		if !strings.ContainsAny(pair, ";%") {
			continue
		}
		if _, err := url.ParseQuery(pair); err == nil {
			continue
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
