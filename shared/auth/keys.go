// Package auth verifies the credentials of both functions: API keys with
// optional scopes (ingress) and user tokens, JWTs signed with JWT_SECRET
// (HS256) or a configured public key (RS256/ES256).
//
// Nothing here logs, and no error it returns holds a secret: errors about
// API keys name the key's position in API_KEYS, never the key.
package auth

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"fmt"
	"strings"

	"github.com/wsrelay/wsrelay/shared/channel"
)

// AdminScope is the scope item that grants the admin routes: targeted
// sends, registry reads and disconnects, and, with a channel pattern,
// removing the history of the channels it matches. It starts with '+',
// which no channel pattern can, so it never clashes with a channel name.
const AdminScope = "+admin"

// Key is one configured API key. The secret itself is not kept, only its
// SHA-256.
type Key struct {
	// ID names the key in logs, rate limits and idempotency records:
	// "key:" and the first 12 hex digits of the key's SHA-256.
	ID string
	// Admin allows the admin routes.
	Admin bool
	// AllChannels allows publishing to and reading the history of every
	// channel; otherwise Channels lists the allowed patterns (maybe none).
	AllChannels bool
	Channels    channel.Patterns

	sum [sha256.Size]byte
	// pos is the key's position in API_KEYS; short says it has fewer
	// than MinKeyLen characters (ShortKeys).
	pos   int
	short bool
}

// MinKeyLen is the length below which a key is reported by ShortKeys:
// a key's ID (logs, Redis key names) is an unsalted SHA-256 prefix, from
// which a short or guessable key can be recovered offline.
const MinKeyLen = 32

// ShortKeys returns the positions in API_KEYS of keys shorter than
// MinKeyLen, for a warning at start (never the keys).
func (ks Keys) ShortKeys() []int {
	var out []int
	for _, k := range ks.keys {
		if k.short {
			out = append(out, k.pos)
		}
	}
	return out
}

// MayUseChannel reports whether the key may publish to ch and read its
// history.
func (k *Key) MayUseChannel(ch string) bool {
	return k.AllChannels || k.Channels.Allows(ch)
}

// Keys is the set of API keys from API_KEYS. The zero value holds no key.
type Keys struct {
	keys []Key
}

// Len is the number of keys.
func (ks Keys) Len() int { return len(ks.keys) }

// ValidKey reports whether s can be an API key: 1–256 printable ASCII
// bytes other than space and the separators , = | and '.', so that a key
// is never mistaken for a JWT (which has two dots).
func ValidKey(s string) bool {
	if s == "" || len(s) > 256 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c <= 0x20 || c > 0x7e || c == ',' || c == '=' || c == '|' || c == '.' {
			return false
		}
	}
	return true
}

// ParseKeys parses API_KEYS: comma-separated items, each a key alone (full
// access, admin included) or key=scope|scope|… where each scope is a
// channel pattern (publish and history on matching channels) or +admin.
//
//	API_KEYS=k1,k2=chat:*|news.*,k3=+admin,k4=+admin|chat:*
//
// Errors name the item's position, never the key.
func ParseKeys(s string) (Keys, error) {
	var ks Keys
	seen := map[[sha256.Size]byte]bool{}
	for i, item := range strings.Split(s, ",") {
		item = strings.TrimSpace(item)
		if item == "" {
			continue
		}
		pos := i + 1
		if strings.ContainsAny(item, "\r\n") {
			// A YAML block's lines joined without commas: after a
			// trailing '|', the next line's key would be read as a
			// channel pattern of this key's scope, without a word.
			return Keys{}, fmt.Errorf("API_KEYS item %d: a line break inside an item (items are separated by commas; a line break alone does not separate them)", pos)
		}
		secret, scope, scoped := strings.Cut(item, "=")
		if !ValidKey(secret) {
			return Keys{}, fmt.Errorf("API_KEYS item %d: a key is 1–256 printable ASCII characters without spaces, dots or any of , = |", pos)
		}
		k := Key{sum: sha256.Sum256([]byte(secret)), pos: pos, short: len(secret) < MinKeyLen}
		k.ID = "key:" + hex.EncodeToString(k.sum[:6])
		if seen[k.sum] {
			return Keys{}, fmt.Errorf("API_KEYS item %d: the same key is listed twice", pos)
		}
		seen[k.sum] = true
		if !scoped {
			k.Admin, k.AllChannels = true, true
		} else {
			if strings.TrimSpace(scope) == "" {
				return Keys{}, fmt.Errorf("API_KEYS item %d: empty scope after '='", pos)
			}
			for j, sc := range strings.Split(scope, "|") {
				sc = strings.TrimSpace(sc)
				switch {
				case sc == AdminScope:
					k.Admin = true
				case channel.ValidPattern(sc):
					k.Channels = append(k.Channels, sc)
				default:
					// By position, not quoted: items joined by anything
					// but a comma (a space, a semicolon, a YAML block's
					// newline) put the next keys in this scope.
					return Keys{}, fmt.Errorf("API_KEYS item %d: scope %d is neither %s nor a channel pattern (items are separated by commas)", pos, j+1, AdminScope)
				}
			}
		}
		ks.keys = append(ks.keys, k)
	}
	return ks, nil
}

// Lookup finds the key equal to secret. It compares SHA-256 digests in
// constant time against every key, so neither the answer's timing nor its
// position reveals anything about the keys.
func (ks Keys) Lookup(secret string) (*Key, bool) {
	sum := sha256.Sum256([]byte(secret))
	found := -1
	for i := range ks.keys {
		if subtle.ConstantTimeCompare(sum[:], ks.keys[i].sum[:]) == 1 {
			found = i
		}
	}
	if found < 0 {
		return nil, false
	}
	return &ks.keys[found], true
}
