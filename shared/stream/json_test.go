package stream

import (
	"bytes"
	"encoding/json"
	"strconv"
	"strings"
	"testing"
	"unicode/utf8"
)

// historyJSON is what Entry.JSON must equal: the entry Decode()d and
// encoded by encoding/json without HTML escaping (as gin's PureJSON
// wrote history), without the newline; an entry whose bytes are not
// UTF-8, which encoding/json would pass on or replace, is left out.
func historyJSON(t *testing.T, e *Entry) (string, error) {
	if !utf8.ValidString(e.Head + e.ID + e.Tail) {
		return "", ErrNotUTF8
	}
	d, err := e.Decode()
	if err != nil {
		return "", err
	}
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(d); err != nil {
		t.Fatalf("encode %+v: %v", d, err)
	}
	return string(bytes.TrimSuffix(b.Bytes(), []byte("\n"))), nil
}

const testHead = `{"type":"message","channel":"h","id":"`

// entryJSONSeeds are frames as Message.Frame writes them and frames no
// publish writes, each a head, an id and a tail.
var entryJSONSeeds = [][3]string{
	{testHead, "1-0", `","ts":1,"data":{"a":[1,"x y",{"b":null}],"c":"<&>\u2028\" "}}`},
	{testHead, "1-0", `","event":"e v","from":"u","ts":-1,"data":"é😀` + "\u2028" + `"}`},
	{testHead, "1-0", `","ts":1,"data":{ "a" : 1 }}`},
	{testHead, "1-0", `","ts":1,"data":1 }`},
	{testHead, "1-0", `","ts":1,"data":"a\" \\ b"}`},
	{testHead, "1-0", `","ts":1,"data":"a\\" }`},
	{testHead, "1-0", `","ts":1,"data":{"a":1}`},
	{testHead, "1-0", `","ts":007,"data":1}`},
	{testHead, "1-0", `","ts":-0,"data":1}`},
	{testHead, "1-0", `","ts":99999999999999999999,"data":1}`},
	{testHead, "1-0", `","event":"é","ts":1,"data":1}`},
	{testHead, "1-0", `","event":"a\u0041\"","ts":1,"data":1}`},
	{testHead, "1-0", "\",\"event\":\"\xff\",\"ts\":1,\"data\":1}"},
	{testHead, "1-0", "\",\"ts\":1,\"data\":\"\xff\xfe\"}"},
	{testHead, "1-0", `","ts":1}`},
	{testHead, "1-0", `","ts":1,"data":1,"data":2}`},
	{testHead, "1-0", `","ts":1,"data":null}`},
	{testHead, "1-0", `","from":"u","event":"e","ts":1,"data":1}`},
	{testHead, "1-0", `","ts":1,"data":1,"extra":true}`},
	{testHead, "1-0", `","event":"","ts":1,"data":1}`},
	{testHead, "1-0", `","from":"","ts":1,"data":1}`},
	{testHead, "", `","ts":1,"data":1}`},
	{testHead, `1"0`, `","ts":1,"data":1}`},
	{`{"type":"message","target":"user","id":"`, "1-0", `","ts":1,"data":1}`},
	{`{"type":"message","channel":"","id":"`, "1-0", `","ts":1,"data":1}`},
	{`{"type":"message","channel":"a","target":"b","id":"`, "1-0", `","ts":1,"data":1}`},
	{`{"type":"other","channel":"h","id":"`, "1-0", `","ts":1,"data":1}`},
	{`{"channel":"h","id":"`, "1-0", `","ts":1,"data":1}`},
	{`{ "type":"message","channel":"h","id":"`, "1-0", `","ts":1,"data":1}`},
	{testHead, "1-0", `"`},
	{"", "", ""},
	// Numbers encoding/json would not parse back the same, kept as stored.
	{testHead, "1-0", `","ts":1,"data":[1e400,-0,1.0,-0.0e-0,1E+2,123456789012345678901234567890]}`},
	// Strings: \/, a lone or reversed surrogate, U+2028/9 raw and escaped,
	// control characters escaped, DEL raw, invalid and overlong UTF-8, a
	// BOM inside a string and before the data.
	{testHead, "1-0", `","ts":1,"data":"a\/b \ud800 \udc00\ud800 \u2028\u2029 \u0000\u001f"}`},
	{testHead, "1-0", "\",\"ts\":1,\"data\":\"\u2028\u2029\x7f \xc0\xaf \xed\xa0\x80 \xef\xbb\xbf\"}"},
	{testHead, "1-0", "\",\"ts\":1,\"data\":\xef\xbb\xbf1}"},
	{testHead, "1-0", "\",\"ts\":1,\"data\":\"\x00\"}"},
	// A character split across head, id and tail: the frame is UTF-8.
	{"{\"a\":\"\xc3", "\xa9", "\"}"},
	{testHead + "\xf0\x9f", "\x98", "\x80\",\"ts\":1,\"data\":1}"},
	// Keys the validator takes as they are, escaped or repeated.
	{testHead, "1-0", `","ts":1,"data":{"a":1,"a":2,"\u0061":3,"b\/":4}}`},
	// ts forms: +, a fraction, an exponent, the int64 bounds.
	{testHead, "1-0", `","ts":+1,"data":1}`},
	{testHead, "1-0", `","ts":1.0,"data":1}`},
	{testHead, "1-0", `","ts":1e3,"data":1}`},
	{testHead, "1-0", `","ts":-9223372036854775808,"data":1}`},
	{testHead, "1-0", `","ts":9223372036854775807,"data":1}`},
	// A route's target, and names with characters JSON escapes for HTML.
	{`{"type":"message","target":"connection","id":"`, "1-0", `","event":"<&>","from":"a&b","ts":1,"data":"<&>"}`},
	{`{"type":"message","channel":"a<b>&c","id":"`, "1-0", `","ts":1,"data":1}`},
	// Nesting just past what the validator takes, and past what
	// encoding/json takes (left out either way).
	{testHead, "1-0", `","ts":1,"data":` + strings.Repeat("[", maxCompactDepth+1) + strings.Repeat("]", maxCompactDepth+1) + "}"},
	{testHead, "1-0", `","ts":1,"data":` + strings.Repeat(`{"a":`, 10001) + "1" + strings.Repeat("}", 10001) + "}"},
}

// Entry.JSON gives what decoding the entry and encoding it gave, for
// every entry, and the stored frame itself (no copy) for frames as
// Message.Frame writes them.
func TestEntryJSON(t *testing.T) {
	t.Parallel()
	check := func(e Entry) {
		t.Helper()
		want, werr := historyJSON(t, &e)
		m, err := e.JSON()
		if (err != nil) != (werr != nil) {
			t.Fatalf("%q %q %q: error %v, want %v", e.Head, e.ID, e.Tail, err, werr)
		}
		if got := string(m.AppendTo(nil)); err == nil && (got != want || m.Len() != len(got)) {
			t.Fatalf("%q %q %q:\n%s (len %d)\nwant\n%s", e.Head, e.ID, e.Tail, got, m.Len(), want)
		}
	}
	for _, s := range entryJSONSeeds {
		check(Entry{Head: s[0], ID: s[1], Tail: s[2]})
	}
	for _, m := range []Message{
		{Channel: "room-1", TS: 7, Data: json.RawMessage(`{"a":[1,2,{"b":"x y"}]}`)},
		{Channel: "a.b:c@d_e", Event: `chat msg/1 <ok> & ' ~`, From: "alice@x", TS: 1700000000000, Data: json.RawMessage(`"s \" \\ \u2028 é"`)},
		{Route: ToConnection("c-1"), Event: "e", TS: 9, Data: json.RawMessage(`[1,2]`)},
		{Route: ToUser("bob"), From: "svc", TS: 10, Data: json.RawMessage(`null`)},
		{Channel: "x", TS: 11},
		{Channel: "x", TS: 0, Data: json.RawMessage(`-1.5e+300`)},
	} {
		head, tail := m.Frame()
		e := Entry{ID: "1700000000000-3", Head: head, Tail: tail}
		check(e)
		j, err := e.JSON()
		if err != nil || j.ID != e.ID || j.Tail != e.Tail || j.Head != head[len(messageType):] {
			t.Errorf("%+v: not the stored frame itself: %+v %v", m, j, err)
		}
	}
}

// FuzzEntryJSON: for any stored entry, Entry.JSON is what decoding and
// encoding it gives.
func FuzzEntryJSON(f *testing.F) {
	for _, s := range entryJSONSeeds {
		f.Add(s[0], s[1], s[2])
	}
	f.Fuzz(func(t *testing.T, head, id, tail string) {
		e := Entry{Head: head, ID: id, Tail: tail}
		want, werr := historyJSON(t, &e)
		m, err := e.JSON()
		if (err != nil) != (werr != nil) {
			t.Fatalf("%q %q %q: error %v, want %v", head, id, tail, err, werr)
		}
		if got := string(m.AppendTo(nil)); err == nil && (got != want || m.Len() != len(got)) {
			t.Fatalf("%q %q %q:\n%s\nwant\n%s", head, id, tail, got, want)
		}
	})
}

// compactJSONSeeds are JSON texts, valid, invalid, compact or not.
var compactJSONSeeds = []string{
	`0`, `-0`, `-1.5e+300`, `1E-2`, `01`, `1.`, `.5`, `-`, `1e`, `+1`, `1 `, ` 1`, `12345678901234567890123`,
	`true`, `false`, `null`, `tru`, `nul`, `truex`, `[true,false,null]`, `[truefalse]`,
	`""`, `"a\"b\\c\/d\b\f\n\r\t\u00e9\uD83D\uDE00"`, `"\u00g0"`, `"\u00"`, `"\x"`, `"a` + "\x01" + `"`, `"a` + "\x1f" + `"`, `"a` + "\x20" + `"`, "\"\xff\xfe\x7f\"", `"a`, `"\`,
	`{}`, `[]`, `{"a":1}`, `{"a":[1,{"b":null}],"c":"<&> \u2028"}`, `{"a" :1}`, `{"a":1 }`, `[1, 2]`, "[1,\n2]", `[1,]`, `[,1]`, `{"a"}`, `{"a":}`, `{1:2}`, `{"a":1,}`,
	`[[[[]]]]`, `[{}]`, `{"a":{}}`, `]`, `}`, `[}`, `{]`, `[1]]`, `[1`, `{"a":1`, ``,
	strings.Repeat("[", maxCompactDepth) + strings.Repeat("]", maxCompactDepth),
	strings.Repeat("[", maxCompactDepth+1) + strings.Repeat("]", maxCompactDepth+1),
}

// checkCompactJSON: compactJSON is true exactly of valid JSON that
// json.Compact leaves as it is, but for nesting deeper than it takes.
func checkCompactJSON(t *testing.T, s string) {
	t.Helper()
	want := json.Valid([]byte(s))
	if want {
		var b bytes.Buffer
		if err := json.Compact(&b, []byte(s)); err != nil {
			t.Fatal(err)
		}
		want = b.String() == s
	}
	deep := strings.Count(s, "[")+strings.Count(s, "{") > maxCompactDepth
	if got := compactJSON(s); got != want && (got || !deep) {
		t.Fatalf("compactJSON(%q) = %v, want %v", s, got, want)
	}
}

func TestCompactJSON(t *testing.T) {
	t.Parallel()
	for _, s := range compactJSONSeeds {
		checkCompactJSON(t, s)
	}
	if compactJSON(strings.Repeat("[", maxCompactDepth+1) + strings.Repeat("]", maxCompactDepth+1)) {
		t.Fatal("nesting deeper than maxCompactDepth taken")
	}
}

func FuzzCompactJSON(f *testing.F) {
	for _, s := range compactJSONSeeds {
		f.Add(s)
	}
	f.Fuzz(checkCompactJSON)
}

// TestEntrySendable: an entry is sent to clients when its frame is one
// Message.Frame writes, or another JSON object; not when a field the
// frame is built from is missing (another release's format).
func TestEntrySendable(t *testing.T) {
	m := Message{Channel: "room", TS: 1700000000000, Data: json.RawMessage(`{"a":1}`)}
	head, tail := m.Frame()
	// An operator's disconnect, as the ingress writes it to an inbox.
	x := Message{Route: Disconnect("c1"), TS: 1700000000000, Data: json.RawMessage("null")}
	xHead, xTail := x.Frame()
	for _, tc := range []struct {
		name string
		e    Entry
		want bool
	}{
		{"as written", Entry{ID: "1-0", Head: head, Tail: tail}, true},
		{"a disconnect", Entry{ID: "1-0", Head: xHead, Tail: xTail, Route: Disconnect("c1")}, true},
		{"another JSON object", Entry{ID: "1-0", Head: `{"type":"message","id":"`, Tail: `","data":[1]}`}, true},
		{"no tail", Entry{ID: "1-0", Head: head}, false},
		{"no head", Entry{ID: "1-0", Tail: tail}, false},
		{"nothing", Entry{ID: "1-0"}, false},
		{"not an object", Entry{ID: "1-0", Head: `"`, Tail: `"`}, false},
		{"not UTF-8 in its data", Entry{ID: "1-0", Head: head, Tail: strings.Replace(tail, `{"a":1}`, "{\"a\":\"\xff\"}", 1)}, false},
		{"not UTF-8 in its head", Entry{ID: "1-0", Head: strings.Replace(head, "room", "r\xc3m", 1), Tail: tail}, false},
		{"not UTF-8, another object", Entry{ID: "1-0", Head: `{"type":"message","id":"`, Tail: "\",\"data\":\"\xed\xa0\x80\"}"}, false},
	} {
		if got := tc.e.Sendable(); got != tc.want {
			t.Errorf("%s: Sendable() = %v, want %v", tc.name, got, tc.want)
		}
	}
}

// checkNotificationSendable: a notification's frame is sendable exactly
// when the entry it announces is (Entry.Sendable): the same check, on
// the frame the notification carries. The notification's id is the
// entry's, or another when the entry's is none (the frame then holds an
// id that is not the notification's).
func checkNotificationSendable(t *testing.T, head, id, tail string) {
	t.Helper()
	nid := id
	if _, ok := ParseID(id); !ok {
		nid = "1-0"
	}
	n, err := ParseNotification("0-0\n" + nid + "\n1\n\n" + head + id + tail)
	if err != nil {
		t.Fatalf("%q %q %q: %v", head, id, tail, err)
	}
	e := Entry{ID: id, Head: head, Tail: tail}
	if got, want := n.Sendable(), e.Sendable(); got != want {
		t.Fatalf("%q %q %q: Notification.Sendable() = %v, Entry.Sendable() = %v", head, id, tail, got, want)
	}
}

// TestNotificationSendable: what the live path sends is what a catch-up
// reading the same entry from the stream would send; and the check of a
// frame as Message.Frame writes it allocates nothing (not parallel:
// AllocsPerRun).
func TestNotificationSendable(t *testing.T) {
	m := Message{Channel: "room", Event: "say", From: "u1", TS: 1700000000000, Data: json.RawMessage(`{"a":1}`)}
	head, tail := m.Frame()
	x := Message{Route: Disconnect("c1"), TS: 1700000000000, Data: json.RawMessage("null")}
	xHead, xTail := x.Frame()
	for _, s := range append(entryJSONSeeds,
		[3]string{head, "1700000000000-1", tail},
		[3]string{xHead, "1-0", xTail},
		[3]string{"", "1-0", ""},
		[3]string{"hello", "1-0", ""},
		[3]string{head, "1-0", ""},
		[3]string{"", "1-0", tail},
		[3]string{`"`, "1-0", `"`},
		[3]string{`{"type":"message","id":"`, "1-0", `","data":[1]}`},
		[3]string{`{"type":"message","channel":"room","id":"`, "1-0", `","ts":1,"data":{"id":"1-0"}}`},
		[3]string{`{"type":"message","channel":"room","id":"`, "1-0", `","id":"1-0","ts":1,"data":1}`},
		[3]string{head, "1-0", strings.Replace(tail, `{"a":1}`, "\"\xff\"", 1)},
		[3]string{`{"type":"message","id":"`, "1-0", "\",\"data\":\"\xed\xa0\x80\"}"},
	) {
		checkNotificationSendable(t, s[0], s[1], s[2])
	}
	n, err := ParseNotification("1700000000000-0\n1700000000000-1\n1700000000000\n\n" + head + "1700000000000-1" + tail)
	if err != nil || !n.Sendable() {
		t.Fatalf("a frame as Message.Frame writes it: Sendable() false (%v)", err)
	}
	if a := testing.AllocsPerRun(100, func() { n.Sendable() }); a != 0 {
		t.Fatalf("Sendable allocates %.1f objects for a frame as Message.Frame writes it", a)
	}
	if i := headEnd(n.Frame); i != len(head) {
		t.Fatalf("headEnd = %d, want %d", i, len(head))
	}
	if _, ok := verbatimHead(head, n.IDStr, tail); !ok {
		t.Fatal("the frame is not taken as Message.Frame's: the check fell back to json.Valid")
	}
}

// FuzzNotificationSendable: for any frame, the notification's check
// agrees with the entry's.
func FuzzNotificationSendable(f *testing.F) {
	for _, s := range entryJSONSeeds {
		f.Add(s[0], s[1], s[2])
	}
	f.Fuzz(checkNotificationSendable)
}

// canonicalIntSeeds are ts values, canonical or not.
var canonicalIntSeeds = []string{
	"0", "-0", "00", "01", "-01", "1", "-1", "+1", "", "-", "--1", "1-", " 1", "1 ", "1_0", "0x1", "1e3", "1.0",
	"1700000000000", "-1700000000000", "123456789012345678", "1234567890123456789", "12345678901234567890",
	"9223372036854775807", "9223372036854775808", "9223372036854775817", "9999999999999999999",
	"-9223372036854775808", "-9223372036854775809", "-9223372036854775818", "-9999999999999999999",
	"-1234567890123456789", "٣", "1\x00",
}

// checkCanonicalInt: canonicalInt is true exactly of what FormatInt
// writes of the int64 ParseInt reads from it.
func checkCanonicalInt(t *testing.T, s string) {
	t.Helper()
	n, err := strconv.ParseInt(s, 10, 64)
	want := err == nil && strconv.FormatInt(n, 10) == s
	if got := canonicalInt(s); got != want {
		t.Fatalf("canonicalInt(%q) = %v, want %v", s, got, want)
	}
}

func TestCanonicalInt(t *testing.T) {
	t.Parallel()
	for _, s := range canonicalIntSeeds {
		checkCanonicalInt(t, s)
	}
}

func FuzzCanonicalInt(f *testing.F) {
	for _, s := range canonicalIntSeeds {
		f.Add(s)
	}
	f.Fuzz(checkCanonicalInt)
}
