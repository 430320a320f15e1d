package main

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/gin-gonic/gin"
	"github.com/gin-gonic/gin/render"
	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/stream"
)

// legacyHistory is the history response as handleHistory wrote it before
// it wrote its JSON by hand: each entry decoded into a stream.Decoded
// (undecodable ones left out), the page in a gin.H, rendered by gin's
// PureJSON. It reads the page with the same historyAfter / historyLatest.
func (e *testEnv) legacyHistory(ch, query string) (int, http.Header, []byte) {
	e.t.Helper()
	q, err := url.ParseQuery(strings.TrimPrefix(query, "?"))
	if err != nil {
		e.t.Fatal(err)
	}
	limit := 100
	if v, ok := q["limit"]; ok {
		if limit, err = strconv.Atoi(v[0]); err != nil {
			e.t.Fatal(err)
		}
	}
	key := e.keys.Stream(ch)
	var entries []stream.Entry
	resp := gin.H{}
	after, hasAfter := q.Get("after"), q.Has("after")
	next := after
	if hasAfter {
		id, ok := stream.ParseID(after)
		if !ok {
			e.t.Fatalf("bad cursor %q", after)
		}
		var b stream.Batch
		var p *historyPage
		p, b, err = e.srv.historyAfter(e.t.Context(), key, id, limit)
		if p != nil {
			entries = p.entries
		}
		resp["recovered"] = b.Continuous
		if !b.Continuous && len(entries) == 0 {
			next = b.From.String()
		}
	} else {
		var p *historyPage
		p, err = e.srv.historyLatest(e.t.Context(), key, stream.Zero, false, limit)
		if p != nil {
			entries = p.entries
		}
	}
	if err != nil {
		e.t.Fatal(err)
	}
	msgs := make([]stream.Decoded, 0, len(entries))
	for i := range entries {
		d, err := entries[i].Decode()
		if err != nil {
			continue
		}
		msgs = append(msgs, d)
		next = entries[i].ID
	}
	resp["messages"], resp["next"] = msgs, next
	w := httptest.NewRecorder()
	r := render.PureJSON{Data: resp}
	r.WriteContentType(w)
	if err := r.Render(w); err != nil {
		e.t.Fatal(err)
	}
	return 200, w.Header(), w.Body.Bytes()
}

// xaddRaw appends an entry with the given frame around its id straight to
// channel ch's stream, as no publish would write it, chained to the entry
// before it (prev).
func (e *testEnv) xaddRaw(ch, prev, head, tail string) string {
	e.t.Helper()
	id, err := e.rdb.XAdd(e.t.Context(), &redis.XAddArgs{Stream: e.keys.Stream(ch),
		Values: []string{"p", prev, "h", head, "t", tail, "g", "", "s", "1"}}).Result()
	if err != nil {
		e.t.Fatal(err)
	}
	return id
}

// The history body is byte for byte what it was when gin's PureJSON
// encoded decoded entries: field order, escaping, numbers, unicode,
// optional fields, entries that only a foreign writer could have stored
// (not compact, not ASCII, escaped strings, no data, a target, invalid:
// left out), and the trailing newline.
func TestHistoryBodyUnchanged(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	bodies := []string{
		`{"data":"plain"}`,
		`{"data":"esc \" \\ \/ \b\f\n\r\t \u0001 \u001f \u00e9 \ud83d\ude00 <&> \u2028"}`,
		"{\"data\":\"raw unicode é 😀 \u2028 \u2029 \u007f\"}",
		`{"data":12345678901234567890123}`,
		`{"data":-0.5e-10}`,
		`{"data":0}`,
		`{"data":true,"event":"e"}`,
		`{"data":false,"from":"u1"}`,
		`{"data":"","event":"a<b>&'c","from":"u.2@x:y-z_"}`,
		`{"data":{ "a" : [ 1 , { "b" : null } ] , "c" : "<&>" , "d" : { } , "e" : [ ] }}`,
		`{"data":[1,"two",3.0,{"x":"\u0000"}]}`,
		`{"data":{"html":"<script>alert('&')</script>"},"event":" ~!#$%&'()*+,-./:;<=>?@[]^_{|}"}`,
	}
	for _, b := range bodies {
		if w := e.do("POST", "/v1/channels/h/messages", b); w.Code != 202 {
			t.Fatalf("publish %s: %d %s", b, w.Code, w.Body.String())
		}
	}
	last, err := e.srv.store.LastID(t.Context(), e.keys.Stream("h"))
	if err != nil {
		t.Fatal(err)
	}
	prev := last.String()
	const head = `{"type":"message","channel":"h","id":"`
	for _, f := range [][2]string{
		{head, `","ts":1,"data":{ "a" : 1 }}`},                             // not compact
		{head, `","ts":1,"data":1 }`},                                      // space after data
		{head, `","ts":1,"data":{"a":1}`},                                  // invalid: left out
		{head, `","ts":007,"data":1}`},                                     // invalid number
		{head, `","ts":99999999999999999999,"data":1}`},                    // ts overflows
		{head, `","ts":-5,"data":1}`},                                      // negative ts
		{head, `","event":"é","ts":1,"data":1}`},                           // not ASCII
		{head, `","event":"a\u0041\"","ts":1,"data":1}`},                   // escaped
		{head, "\",\"event\":\"\xff\",\"ts\":1,\"data\":1}"},               // invalid UTF-8
		{head, "\",\"ts\":1,\"data\":\"\xff\xfe\"}"},                       // invalid UTF-8 in data
		{head, `","event":"\u2028","ts":1,"data":1}`},                      // line separator
		{head, `","ts":1}`},                                                // no data
		{head, `","ts":1,"data":1,"data":2}`},                              // data twice
		{head, `","ts":1,"data":null}`},                                    // null
		{head, `","from":"u","event":"e","ts":1,"data":1}`},                // fields out of order
		{head, `","ts":1,"data":1,"extra":true}`},                          // unknown field
		{head, `","event":"","ts":1,"data":1}`},                            // empty event
		{`{"type":"message","target":"user","id":"`, `","ts":1,"data":1}`}, // a target
		{`{"type":"message","channel":"","id":"`, `","ts":1,"data":1}`},    // empty channel
		{`{"type":"other","channel":"h","id":"`, `","ts":1,"data":1}`},     // another type
		{`{"channel":"h","id":"`, `","ts":1,"data":1}`},                    // no type
		{`{ "type":"message","channel":"h","id":"`, `","ts":1,"data":1}`},  // space
		{`{"type":"message","channel":"h","id":"`, `"`},                    // truncated
		{``, ``}, // empty
		{head, `","ts":2,"data":"the last"}`},
	} {
		prev = e.xaddRaw("h", prev, f[0], f[1])
	}
	if w := e.do("POST", "/v1/channels/h/messages", `{"data":{"after":"raw"}}`); w.Code != 202 {
		t.Fatalf("%d %s", w.Code, w.Body.String())
	}
	all := e.history("?after=0&limit=1000").Messages
	if len(all) < len(bodies)+10 {
		t.Fatalf("%d messages", len(all))
	}
	mid := all[len(all)/2].ID

	for _, q := range []string{"", "?limit=1000", "?limit=3", "?limit=1", "?after=0&limit=1000", "?after=0",
		"?after=0-0&limit=7", "?after=" + mid, "?after=" + mid + "&limit=2", "?after=" + all[len(all)-1].ID,
		"?after=99999999999999-0", "?after=" + strings.Split(mid, "-")[0]} {
		for _, ch := range []string{"h", "empty"} {
			w := e.do("GET", "/v1/channels/"+ch+"/messages"+q, "")
			code, hdr, want := e.legacyHistory(ch, q)
			if w.Code != code || w.Header().Get("Content-Type") != hdr.Get("Content-Type") || w.Body.String() != string(want) {
				t.Errorf("%s%s: %d %q\n%s\nwant %d %q\n%s", ch, q, w.Code, w.Header().Get("Content-Type"), w.Body.String(),
					code, hdr.Get("Content-Type"), want)
			}
		}
	}
}

// A body many times the write buffer, with messages larger than the
// buffer among small ones and among frames rendered by decoding (not
// compact), is still byte for byte the legacy body: nothing reordered,
// lost or doubled where the buffer fills and is written.
func TestHistoryBodyUnchangedLarge(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	prev := ""
	for i := range 60 {
		var data string
		switch i % 6 {
		case 0: // larger than the buffer on its own
			data = `"` + strings.Repeat("é<&>\u2028", (historyWriteBuffer+5000)/9) + `"`
		case 3: // not compact: rendered by decoding and encoding
			data = `{ "n" : ` + strconv.Itoa(i) + ` , "s" : "` + strings.Repeat("y", 3000) + `" }`
		default:
			data = `{"n":` + strconv.Itoa(i) + `,"s":"` + strings.Repeat("z\\\"", 200*i) + `"}`
		}
		if i%6 == 3 {
			prev = e.xaddRaw("h", prev, `{"type":"message","channel":"h","id":"`, `","event":"e","ts":`+strconv.Itoa(i)+`,"data":`+data+`}`)
			continue
		}
		w := e.do("POST", "/v1/channels/h/messages", `{"data":`+data+`,"event":"e`+strconv.Itoa(i)+`"}`)
		if w.Code != 202 {
			t.Fatalf("publish %d: %d %s", i, w.Code, w.Body.String())
		}
		prev = decode[publishResult](t, w).ID
	}
	all := e.history("?after=0&limit=1000").Messages
	if len(all) != 60 {
		t.Fatalf("%d messages, want 60", len(all))
	}
	for _, q := range []string{"?limit=1000", "?after=0&limit=1000", "?limit=7", "?after=" + all[10].ID + "&limit=31"} {
		w := e.do("GET", "/v1/channels/h/messages"+q, "")
		_, _, want := e.legacyHistory("h", q)
		if len(want) < 4*historyWriteBuffer && q == "?limit=1000" {
			t.Fatalf("%s: a body of %d bytes, want several times the buffer", q, len(want))
		}
		if w.Code != 200 || w.Body.String() != string(want) {
			t.Errorf("%s: %d, %d bytes, want %d bytes; they differ from byte %d", q, w.Code, w.Body.Len(), len(want), firstDiff(w.Body.String(), string(want)))
		}
	}
}

func firstDiff(a, b string) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// An entry whose stored bytes are not UTF-8 (another writer under the key
// prefix: the ingress refuses such messages) is left out of a history
// page, in its data or in its event, as the egress leaves it out of what
// it sends: a JSON text must be UTF-8 (RFC 8259), and a client that
// decodes the page strictly would fail on the whole page.
func TestHistoryLeavesOutNotUTF8(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	if w := e.do("POST", "/v1/channels/h/messages", `{"data":"first"}`); w.Code != 202 {
		t.Fatalf("publish: %d %s", w.Code, w.Body.String())
	}
	last, err := e.srv.store.LastID(t.Context(), e.keys.Stream("h"))
	if err != nil {
		t.Fatal(err)
	}
	const head = `{"type":"message","channel":"h","id":"`
	prev := e.xaddRaw("h", last.String(), head, "\",\"ts\":1,\"data\":\"\xff\xfe\"}")
	e.xaddRaw("h", prev, head, "\",\"event\":\"\xc0\xaf\",\"ts\":1,\"data\":1}")
	if w := e.do("POST", "/v1/channels/h/messages", `{"data":"last"}`); w.Code != 202 {
		t.Fatalf("publish: %d %s", w.Code, w.Body.String())
	}
	for _, q := range []string{"?after=0", "", "?before=99999999999999-0"} {
		w := e.do("GET", "/v1/channels/h/messages"+q, "")
		if w.Code != 200 || !utf8.Valid(w.Body.Bytes()) {
			t.Fatalf("history%s: %d, UTF-8 %v: %q", q, w.Code, utf8.Valid(w.Body.Bytes()), w.Body.String())
		}
		var r historyResp
		if err := json.Unmarshal(w.Body.Bytes(), &r); err != nil {
			t.Fatal(err)
		}
		var data []string
		for _, m := range r.Messages {
			data = append(data, string(m.Data))
		}
		if got := strings.Join(data, " "); got != `"first" "last"` {
			t.Errorf("history%s: data %s, want \"first\" \"last\"", q, got)
		}
	}
}
