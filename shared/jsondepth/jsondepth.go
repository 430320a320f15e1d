// Package jsondepth bounds how deeply JSON nests arrays and objects. The
// ingress refuses message data nested deeper than its bound, and the
// publisher checks the same before sending: both count with Exceeds, so
// the publisher refuses exactly what the ingress would.
package jsondepth

import "bytes"

// Exceeds reports whether the valid JSON b nests arrays and objects more
// than limit levels deep, as encoding/json counts them: brackets inside
// strings do not count. For input that is not valid JSON the answer is
// unspecified; check validity first (the callers' decoders do).
func Exceeds(b []byte, limit int) bool {
	// Most data has fewer brackets in all than the bound: nothing to scan.
	if bytes.Count(b, []byte{'['})+bytes.Count(b, []byte{'{'}) <= limit {
		return false
	}
	depth, inString := 0, false
	for i := 0; i < len(b); i++ {
		switch c := b[i]; {
		case inString && c == '\\':
			i++ // the escaped byte: a quote does not end the string
		case c == '"':
			inString = !inString
		case inString:
		case c == '[' || c == '{':
			if depth++; depth > limit {
				return true
			}
		case c == ']' || c == '}':
			depth--
		}
	}
	return false
}
