// Package redact shows URLs in error messages without the credentials
// they may carry.
package redact

import "net/url"

// URL is u as an error message may quote it: without its password
// (url.URL.Redacted), its query, where a token may be (?token=, a
// gateway's key), or its fragment.
func URL(u *url.URL) string {
	c := *u
	c.RawQuery, c.ForceQuery, c.Fragment, c.RawFragment = "", false, "", ""
	return c.Redacted()
}
