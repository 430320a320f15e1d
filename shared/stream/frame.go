package stream

import (
	"bytes"
	"encoding/json"
	"errors"
	"strconv"
	"strings"
	"unicode/utf8"
)

// Route says to whom an entry goes. Channel entries have the empty route;
// entries of an instance inbox name their target.
type Route string

// Route kinds, as the first byte of a Route.
const (
	RouteConnection = 'c' // "c:<connection id>": one connection
	RouteUser       = 'u' // "u:<user>": every connection of the user
	RouteDisconnect = 'x' // "x:<connection id>": close that connection
	RouteProbe      = 'p' // "p:": a liveness probe of the egress read path
)

// ToConnection routes a message to one connection.
func ToConnection(id string) Route { return Route("c:" + id) }

// ToUser routes a message to every connection of user.
func ToUser(user string) Route { return Route("u:" + user) }

// Disconnect asks the egress to close connection id.
func Disconnect(id string) Route { return Route("x:" + id) }

// Kind returns the route's kind byte, or 0 for a channel route.
func (r Route) Kind() byte {
	if len(r) < 2 || r[1] != ':' {
		return 0
	}
	return r[0]
}

// Target is the route's connection id or user.
func (r Route) Target() string {
	if r.Kind() == 0 {
		return ""
	}
	return string(r[2:])
}

// Message is what a publisher sends: the fields of a "message" frame other
// than the id, which Redis assigns.
type Message struct {
	Channel string          // empty for targeted messages
	Route   Route           // empty for channel messages
	Event   string          // validated: printable, no quote or backslash
	From    string          // validated user id or empty
	TS      int64           // publish time, unix milliseconds
	Data    json.RawMessage // valid JSON
}

// Frame splits the message's "message" frame around its id, so that the
// frame can be completed inside Redis once the id is known:
// head + id + tail is the complete JSON frame.
//
// The names that go in unescaped are validated by package channel (their
// alphabet needs no JSON escaping), and Data is valid JSON.
func (m *Message) Frame() (head, tail string) {
	var b strings.Builder
	b.Grow(64 + len(m.Channel))
	b.WriteString(`{"type":"message",`)
	switch m.Route.Kind() {
	case RouteConnection:
		b.WriteString(`"target":"connection",`)
	case RouteUser:
		b.WriteString(`"target":"user",`)
	default:
		b.WriteString(`"channel":"`)
		b.WriteString(m.Channel)
		b.WriteString(`",`)
	}
	b.WriteString(`"id":"`)
	head = b.String()

	var t strings.Builder
	t.Grow(48 + len(m.Event) + len(m.From) + len(m.Data))
	t.WriteByte('"')
	if m.Event != "" {
		t.WriteString(`,"event":"`)
		t.WriteString(m.Event)
		t.WriteByte('"')
	}
	if m.From != "" {
		t.WriteString(`,"from":"`)
		t.WriteString(m.From)
		t.WriteByte('"')
	}
	t.WriteString(`,"ts":`)
	var ts [20]byte // written in place: FormatInt allocated the digits
	t.Write(strconv.AppendInt(ts[:0], m.TS, 10))
	t.WriteString(`,"data":`)
	if len(m.Data) == 0 {
		t.WriteString("null")
	} else {
		t.Write(m.Data)
	}
	t.WriteByte('}')
	return head, t.String()
}

// Decoded is a "message" frame read back, for history and tests.
type Decoded struct {
	Type    string          `json:"type,omitempty"`
	Channel string          `json:"channel,omitempty"`
	Target  string          `json:"target,omitempty"`
	ID      string          `json:"id"`
	Event   string          `json:"event,omitempty"`
	From    string          `json:"from,omitempty"`
	TS      int64           `json:"ts"`
	Data    json.RawMessage `json:"data"`
}

// MessageJSON is an entry's message in the form history returns it: its
// Decode()d fields as encoding/json writes them without HTML escaping
// (the frame's fields without type). The JSON is "{" + Head + ID + Tail,
// in pieces so that it can be written out without being copied together.
type MessageJSON struct {
	Head, ID, Tail string
}

// Len is the length of the JSON.
func (m *MessageJSON) Len() int { return 1 + len(m.Head) + len(m.ID) + len(m.Tail) }

// AppendTo appends the JSON to b.
func (m *MessageJSON) AppendTo(b []byte) []byte {
	b = append(b, '{')
	b = append(b, m.Head...)
	b = append(b, m.ID...)
	return append(b, m.Tail...)
}

// messageType is how a frame written by Message.Frame begins; the rest of
// its head, its id and its tail are the message's JSON without type.
const messageType = `{"type":"message",`

// JSON returns the entry's message in the form history returns it, the
// error being ErrNotUTF8 for an entry whose stored bytes are not UTF-8,
// and Decode's for one that is not a message frame. History leaves both
// out, as the egress does (Sendable): a JSON text must be UTF-8 (RFC
// 8259), and a client decoding the page strictly would fail on the whole
// page for one such entry.
//
// A frame as Message.Frame writes it already is that JSON, less its type
// field: names that need no escaping, a canonical ts, no empty optional
// field (which Decoded leaves out), compact data (which encoding/json
// would compact). Then the pieces are the stored strings themselves,
// checked but not copied, not decoded, not re-encoded: a history page of
// 4 MiB so costs no copy of its messages. Any other frame (written by
// another version, or by someone else) is decoded and re-encoded, so that
// the result is the same either way.
func (e *Entry) JSON() (MessageJSON, error) {
	if !e.utf8() {
		return MessageJSON{}, ErrNotUTF8
	}
	if head, ok := e.verbatimHead(); ok {
		return MessageJSON{Head: head, ID: e.ID, Tail: e.Tail}, nil
	}
	d, err := e.Decode()
	if err != nil {
		return MessageJSON{}, err
	}
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(d); err != nil {
		return MessageJSON{}, err
	}
	// Encode's JSON is an object (it begins with "{") and a newline.
	return MessageJSON{Head: string(b.Bytes()[1 : b.Len()-1])}, nil
}

// Sendable reports whether the entry's frame is one a client can read: a
// frame as Message.Frame writes it (checked as JSON does, without a
// decode), or else at least a JSON object; UTF-8 either way. An entry
// another release wrote in a format this one does not know (a field
// renamed) is not, nor one with bytes that are not UTF-8 (the ingress
// refuses those, but another writer under the key prefix need not): a
// browser drops a socket that gets such a text frame, and would drop
// it again at each resume that replays the entry.
func (e *Entry) Sendable() bool {
	if !e.utf8() {
		return false
	}
	if _, ok := e.verbatimHead(); ok {
		return true
	}
	return jsonObject(e.Frame())
}

// ErrNotUTF8 is Entry.JSON's error for an entry whose stored bytes are not
// UTF-8: the ingress refuses such messages, but another writer under the
// key prefix need not.
var ErrNotUTF8 = errors.New("stream: entry is not UTF-8")

// utf8 reports whether the entry's frame, its head, id and tail
// together, is UTF-8. Pieces that are each UTF-8 make a frame that is;
// one that is not may still end in the first bytes of a character the
// next piece completes, which only the frame itself tells (a copy, made
// only then).
func (e *Entry) utf8() bool {
	if utf8.ValidString(e.Head) && utf8.ValidString(e.ID) && utf8.ValidString(e.Tail) {
		return true
	}
	return utf8.ValidString(e.Head + e.ID + e.Tail)
}

// Sendable reports of the notification's frame what Entry.Sendable
// reports of an entry's: whether it is a frame as Message.Frame writes
// it, with the notification's id (checked as Entry.JSON does, without
// copying the frame), or else at least a JSON object. It allocates
// nothing for a frame Message.Frame wrote.
func (n *Notification) Sendable() bool {
	f := n.Frame
	if !utf8.ValidString(f) {
		return false
	}
	if i := headEnd(f); i >= 0 {
		if tail, ok := strings.CutPrefix(f[i:], n.IDStr); ok {
			if _, ok := verbatimHead(f[:i], n.IDStr, tail); ok {
				return true
			}
		}
	}
	return jsonObject([]byte(f))
}

// headEnd returns the length of the head a frame as Message.Frame writes
// it begins with (`"channel":"<name>",` or `"target":"<kind>",` after the
// type, then `"id":"`), or -1 when f does not begin so. The name has no
// quote: it ends at the first. verbatimHead checks the rest.
func headEnd(f string) int {
	rest, ok := strings.CutPrefix(f, messageType)
	if !ok {
		return -1
	}
	for _, field := range []string{`"channel":"`, `"target":"`} {
		if r, ok := strings.CutPrefix(rest, field); ok {
			i := strings.IndexByte(r, '"')
			if i < 0 || !strings.HasPrefix(r[i:], `",`+idField) {
				return -1
			}
			return len(f) - len(r) + i + len(`",`+idField)
		}
	}
	return -1
}

// idField is how a head written by Message.Frame ends.
const idField = `"id":"`

// jsonObject reports whether f is a JSON object.
func jsonObject(f []byte) bool {
	return len(f) > 0 && f[0] == '{' && json.Valid(f)
}

// verbatimHead returns the entry's head without its type field when the
// entry's frame is its message's JSON (see JSON).
func (e *Entry) verbatimHead() (string, bool) { return verbatimHead(e.Head, e.ID, e.Tail) }

// verbatimHead returns head without its type field when head + id + tail
// is a frame as Message.Frame writes it, and so its message's JSON.
func verbatimHead(head, id, tail string) (string, bool) {
	head, ok := strings.CutPrefix(head, messageType)
	if !ok || !PlainString(id) {
		return "", false
	}
	// `"channel":"<name>",` or `"target":"<kind>",`, then `"id":"`.
	rest, ok := strings.CutSuffix(head, idField)
	if !ok {
		return "", false
	}
	if r, ok := strings.CutPrefix(rest, `"channel":"`); ok {
		rest = r
	} else if r, ok := strings.CutPrefix(rest, `"target":"`); ok {
		rest = r
	} else {
		return "", false
	}
	if name, ok := strings.CutSuffix(rest, `",`); !ok || name == "" || !PlainString(name) {
		return "", false
	}
	// `"`, then `,"event":"<event>"` and `,"from":"<user>"` if any, then
	// `,"ts":<ts>,"data":<data>}`.
	t, ok := strings.CutPrefix(tail, `"`)
	if !ok {
		return "", false
	}
	for _, field := range []string{`,"event":"`, `,"from":"`} {
		if r, ok := strings.CutPrefix(t, field); ok {
			v, r, ok := strings.Cut(r, `"`)
			if !ok || v == "" || !PlainString(v) {
				return "", false
			}
			t = r
		}
	}
	t, ok = strings.CutPrefix(t, `,"ts":`)
	if !ok {
		return "", false
	}
	ts, t, ok := strings.Cut(t, `,"data":`)
	if !ok || !canonicalInt(ts) {
		return "", false
	}
	data, ok := strings.CutSuffix(t, "}")
	if !ok || !compactJSON(data) {
		return "", false
	}
	return head, true
}

// PlainString reports whether s goes into a JSON string, and comes out of
// one, as itself: printable ASCII without quote or backslash, as the
// names package channel validates are.
func PlainString(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c > 0x7e || c == '"' || c == '\\' {
			return false
		}
	}
	return true
}

// canonicalInt reports whether s is an int64 as strconv.FormatInt writes
// it (so as encoding/json would write it back): an optional minus, then
// digits without a leading zero (or "0" alone), within int64's range.
// Checked as it reads, without parsing and writing the number back,
// which took as long as checking a message's data.
func canonicalInt(s string) bool {
	digits := strings.TrimPrefix(s, "-")
	switch {
	case digits == "":
		return false
	case digits[0] == '0':
		return s == "0"
	case len(digits) > len(maxInt64):
		return false
	}
	for i := 0; i < len(digits); i++ {
		if c := digits[i]; c < '0' || c > '9' {
			return false
		}
	}
	if len(digits) < len(maxInt64) {
		return true
	}
	if len(digits) < len(s) {
		return digits <= minInt64Digits
	}
	return digits <= maxInt64
}

// int64's bounds, in digits.
const (
	maxInt64       = "9223372036854775807"
	minInt64Digits = "9223372036854775808"
)

// compactJSON reports whether s is valid JSON that json.Compact leaves as
// it is: no whitespace outside its strings. (encoding/json compacts a
// json.RawMessage it encodes, without HTML escaping; it changes nothing
// else.) It may say false of such JSON, never true of other input: it
// refuses nesting deeper than maxCompactDepth, and then JSON decodes and
// re-encodes the entry. It is json.Valid's grammar (RFC 8259, any byte
// but a control character, quote or backslash as itself in a string,
// UTF-8 or not), in one pass that runs through a string's bytes several
// times faster than json.Valid's scanner, for a page's data is mostly
// strings.
func compactJSON(s string) bool {
	var stack [maxCompactDepth]byte // the open containers: '{' or '['
	depth := 0
	i := 0
	for {
		// A value.
		if i >= len(s) {
			return false
		}
		switch c := s[i]; {
		case c == '{' || c == '[':
			if depth == len(stack) {
				return false
			}
			stack[depth] = c
			depth++
			i++
			if i < len(s) && s[i] == c+2 { // '}' or ']': empty
				depth--
				i++
				break
			}
			if c == '{' {
				if i = objectKey(s, i); i < 0 {
					return false
				}
			}
			continue
		case c == '"':
			if i = stringEnd(s, i); i < 0 {
				return false
			}
		case c == '-' || c >= '0' && c <= '9':
			if i = numberEnd(s, i); i < 0 {
				return false
			}
		case strings.HasPrefix(s[i:], "true") || strings.HasPrefix(s[i:], "null"):
			i += 4
		case strings.HasPrefix(s[i:], "false"):
			i += 5
		default:
			return false
		}
		// After a value: a comma and the next, or the ends of containers.
		for {
			if depth == 0 {
				return i == len(s)
			}
			if i >= len(s) {
				return false
			}
			top := stack[depth-1]
			if s[i] == top+2 {
				depth--
				i++
				continue
			}
			if s[i] != ',' {
				return false
			}
			i++
			if top == '{' {
				if i = objectKey(s, i); i < 0 {
					return false
				}
			}
			break
		}
	}
}

// maxCompactDepth is the deepest nesting compactJSON takes.
const maxCompactDepth = 64

// objectKey returns the index after the key and colon at s[i:], or -1.
func objectKey(s string, i int) int {
	if i >= len(s) || s[i] != '"' {
		return -1
	}
	if i = stringEnd(s, i); i < 0 || i >= len(s) || s[i] != ':' {
		return -1
	}
	return i + 1
}

// stringEnd returns the index after the JSON string at s[i:] (s[i] is its
// quote), or -1.
func stringEnd(s string, i int) int {
	for i++; i < len(s); i++ {
		switch c := s[i]; {
		case c == '"':
			return i + 1
		case c == '\\':
			i++
			if i >= len(s) {
				return -1
			}
			switch s[i] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
			case 'u':
				if i+4 >= len(s) {
					return -1
				}
				for _, h := range []byte(s[i+1 : i+5]) {
					if !(h >= '0' && h <= '9' || h >= 'a' && h <= 'f' || h >= 'A' && h <= 'F') {
						return -1
					}
				}
				i += 4
			default:
				return -1
			}
		case c < 0x20:
			return -1
		}
	}
	return -1
}

// numberEnd returns the index after the JSON number at s[i:], or -1.
func numberEnd(s string, i int) int {
	digits := func(i int) int { // at least one digit
		j := i
		for j < len(s) && s[j] >= '0' && s[j] <= '9' {
			j++
		}
		if j == i {
			return -1
		}
		return j
	}
	if s[i] == '-' {
		i++
	}
	switch {
	case i < len(s) && s[i] == '0':
		i++
	default:
		if i = digits(i); i < 0 {
			return -1
		}
	}
	if i < len(s) && s[i] == '.' {
		if i = digits(i + 1); i < 0 {
			return -1
		}
	}
	if i < len(s) && (s[i] == 'e' || s[i] == 'E') {
		i++
		if i < len(s) && (s[i] == '+' || s[i] == '-') {
			i++
		}
		if i = digits(i); i < 0 {
			return -1
		}
	}
	return i
}
