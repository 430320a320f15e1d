package main

import (
	"encoding/json"
	"fmt"
	"net/http/httptest"
	"net/http/httputil"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/gin-gonic/gin"

	"github.com/wsrelay/wsrelay/shared/registry"
	"github.com/wsrelay/wsrelay/shared/stream"
)

func decode[T any](t *testing.T, w *httptest.ResponseRecorder) T {
	t.Helper()
	var v T
	if err := json.Unmarshal(w.Body.Bytes(), &v); err != nil {
		t.Fatalf("status %d: body %q: %v", w.Code, w.Body.String(), err)
	}
	return v
}

type published struct {
	ID      string `json:"id"`
	Channel string `json:"channel"`
}

func TestPublish(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	w := e.do("POST", "/v1/channels/room-1/messages", `{"data": {"text": "hi", "n": [1, 2]}, "event": "chat", "from": "alice"}`)
	if w.Code != 202 {
		t.Fatalf("status %d: %s", w.Code, w.Body.String())
	}
	p := decode[published](t, w)
	if _, ok := stream.ParseID(p.ID); !ok || p.Channel != "room-1" {
		t.Fatalf("response %+v", p)
	}
	es, err := e.srv.store.Latest(t.Context(), e.keys.Stream("room-1"), 10)
	if err != nil || len(es) != 1 {
		t.Fatalf("stream: %v %v", es, err)
	}
	d, err := es[0].Decode()
	if err != nil || d.ID != p.ID || d.Channel != "room-1" || d.Event != "chat" || d.From != "alice" || string(d.Data) != `{"text":"hi","n":[1,2]}` {
		t.Fatalf("entry %+v %v", d, err)
	}
	if ts := time.UnixMilli(d.TS); time.Since(ts) > time.Minute || time.Since(ts) < 0 {
		t.Fatalf("ts %v", ts)
	}
	// Any JSON value but null is data; +json media types are JSON.
	for _, body := range []string{`{"data":0}`, `{"data":""}`, `{"data":false}`, `{"data":[]}`, `{"data":"x","event":null}`} {
		if w := e.do("POST", "/v1/channels/room-1/messages", body, "Content-Type", "application/merge-patch+json; charset=utf-8"); w.Code != 202 {
			t.Errorf("%s: %d %s", body, w.Code, w.Body.String())
		}
	}
	// UTF-8 by any spelling of its name.
	for _, ct := range []string{`application/json; charset="UTF-8"`, "application/json;charset=utf8", "application/json; Charset=Utf-8"} {
		if w := e.do("POST", "/v1/channels/room-1/messages", `{"data":1}`, "Content-Type", ct); w.Code != 202 {
			t.Errorf("%s: %d %s", ct, w.Code, w.Body.String())
		}
	}
}

// Every documented input error, with nothing written.
func TestPublishErrors(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	big := `{"data":"` + strings.Repeat("x", 64<<10) + `"}`
	for _, tc := range []struct {
		name, path, body string
		hdr              []string
		status           int
		code             string
	}{
		{"not json", "/v1/channels/c/messages", `{"data":`, nil, 400, "invalid_json"},
		{"array body", "/v1/channels/c/messages", `[{"data":1}]`, nil, 400, "invalid_json"},
		{"string body", "/v1/channels/c/messages", `"hi"`, nil, 400, "invalid_json"},
		{"empty body", "/v1/channels/c/messages", ` `, nil, 400, "invalid_json"},
		{"trailing garbage", "/v1/channels/c/messages", `{"data":1} x`, nil, 400, "invalid_json"},
		{"missing data", "/v1/channels/c/messages", `{"event":"e"}`, nil, 400, "missing_data"},
		{"null data", "/v1/channels/c/messages", `{"data":null}`, nil, 400, "missing_data"},
		{"event not a string", "/v1/channels/c/messages", `{"data":1,"event":5}`, nil, 400, "invalid_event"},
		{"event too long", "/v1/channels/c/messages", `{"data":1,"event":"` + strings.Repeat("e", 65) + `"}`, nil, 400, "invalid_event"},
		{"event with quote", "/v1/channels/c/messages", `{"data":1,"event":"a\"b"}`, nil, 400, "invalid_event"},
		{"event with newline", "/v1/channels/c/messages", `{"data":1,"event":"a\nb"}`, nil, 400, "invalid_event"},
		{"from not a string", "/v1/channels/c/messages", `{"data":1,"from":true}`, nil, 400, "invalid_from"},
		{"from with space", "/v1/channels/c/messages", `{"data":1,"from":"a b"}`, nil, 400, "invalid_from"},
		{"channel 129 chars", "/v1/channels/" + strings.Repeat("c", 129) + "/messages", `{"data":1}`, nil, 400, "invalid_channel"},
		{"channel leading dash", "/v1/channels/-c/messages", `{"data":1}`, nil, 400, "invalid_channel"},
		{"channel leading dot", "/v1/channels/.c/messages", `{"data":1}`, nil, 400, "invalid_channel"},
		{"channel unicode", "/v1/channels/caf%C3%A9/messages", `{"data":1}`, nil, 400, "invalid_channel"},
		{"channel with space", "/v1/channels/a%20b/messages", `{"data":1}`, nil, 400, "invalid_channel"},
		{"channel with brace", "/v1/channels/a%7Db/messages", `{"data":1}`, nil, 400, "invalid_channel"},
		{"channel with star", "/v1/channels/a*/messages", `{"data":1}`, nil, 400, "invalid_channel"},
		{"too large", "/v1/channels/c/messages", big, nil, 413, "payload_too_large"},
		{"text/plain", "/v1/channels/c/messages", `{"data":1}`, []string{"Content-Type", "text/plain"}, 415, "unsupported_media_type"},
		{"form", "/v1/channels/c/messages", `{"data":1}`, []string{"Content-Type", "application/x-www-form-urlencoded"}, 415, "unsupported_media_type"},
		{"bad media type", "/v1/channels/c/messages", `{"data":1}`, []string{"Content-Type", "application/"}, 415, "unsupported_media_type"},
		{"+json outside application/", "/v1/channels/c/messages", `{"data":1}`, []string{"Content-Type", "text/plain+json"}, 415, "unsupported_media_type"},
		// application/*+json (docs/api.md) names a subtype before the
		// suffix (RFC 6839): a bare "+json" names none.
		{"+json without a subtype", "/v1/channels/c/messages", `{"data":1}`, []string{"Content-Type", "application/+json"}, 415, "unsupported_media_type"},
		{"charset utf-16", "/v1/channels/c/messages", `{"data":1}`, []string{"Content-Type", `application/json; charset="utf-16"`}, 415, "unsupported_media_type"},
		{"charset latin1", "/v1/channels/c/messages", `{"data":1}`, []string{"Content-Type", "application/json;charset=ISO-8859-1"}, 415, "unsupported_media_type"},
		{"empty charset", "/v1/channels/c/messages", `{"data":1}`, []string{"Content-Type", `application/json; charset=""`}, 415, "unsupported_media_type"},
		{"gzip body", "/v1/channels/c/messages", "\x1f\x8b\x08\x00", []string{"Content-Encoding", "gzip"}, 415, "unsupported_media_type"},
		{"gzip after identity", "/v1/channels/c/messages", "\x1f\x8b\x08\x00", []string{"Content-Encoding", "identity, gzip"}, 415, "unsupported_media_type"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			expectError(t, e.do("POST", tc.path, tc.body, tc.hdr...), tc.status, tc.code)
		})
	}
	// No Content-Type at all.
	req := httptest.NewRequest("POST", "/v1/channels/c/messages", strings.NewReader(`{"data":1}`))
	w := httptest.NewRecorder()
	e.srv.ServeHTTP(w, req)
	expectError(t, w, 415, "unsupported_media_type")

	if n := e.xlen("c"); n != 0 {
		t.Fatalf("%d entries written by rejected requests", n)
	}
	// The largest body that fits is accepted.
	fits := `{"data":"` + strings.Repeat("x", 64<<10-len(`{"data":""}`)) + `"}`
	if w := e.do("POST", "/v1/channels/c/messages", fits); w.Code != 202 {
		t.Fatalf("64 KiB body: %d %s", w.Code, w.Body.String())
	}
	// A channel name of 128 characters is valid.
	if w := e.do("POST", "/v1/channels/"+strings.Repeat("c", 128)+"/messages", `{"data":1}`); w.Code != 202 {
		t.Fatalf("128-char channel: %d %s", w.Code, w.Body.String())
	}
}

type batchResp struct {
	Results []published `json:"results"`
}

func TestBatch(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	var items []string
	for i := range 6 {
		items = append(items, fmt.Sprintf(`{"channel":"b%d","data":%d,"event":"e%d"}`, i%2, i, i))
	}
	w := e.do("POST", "/v1/messages", `{"messages":[`+strings.Join(items, ",")+`]}`)
	if w.Code != 202 {
		t.Fatalf("%d %s", w.Code, w.Body.String())
	}
	res := decode[batchResp](t, w).Results
	if len(res) != 6 {
		t.Fatalf("results %+v", res)
	}
	for i, r := range res {
		if r.Channel != fmt.Sprintf("b%d", i%2) {
			t.Fatalf("result %d is for %s", i, r.Channel)
		}
	}
	// Per channel, the stream holds the items in request order, with the
	// ids returned.
	for ch := range 2 {
		es, err := e.srv.store.Latest(t.Context(), e.keys.Stream(fmt.Sprintf("b%d", ch)), 10)
		if err != nil || len(es) != 3 {
			t.Fatalf("channel b%d: %v %v", ch, es, err)
		}
		for j, en := range es {
			i := ch + 2*j
			d, _ := en.Decode()
			if en.ID != res[i].ID || string(d.Data) != fmt.Sprint(i) || d.Event != fmt.Sprintf("e%d", i) {
				t.Fatalf("channel b%d entry %d = %+v, want item %d id %s", ch, j, d, i, res[i].ID)
			}
		}
	}
}

func TestBatchErrors(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) { c.MaxMessageBytes = 1024; c.MaxBatchBytes = 4096 })
	item := func(ch string) string { return `{"channel":"` + ch + `","data":1}` }
	good := []string{item("x0"), item("x1"), item("x2")}
	batch := func(items ...string) string { return `{"messages":[` + strings.Join(items, ",") + `]}` }
	idx := func(i int) *int { return &i }
	for _, tc := range []struct {
		name   string
		body   string
		status int
		code   string
		index  *int
	}{
		{"bad channel at 3", batch(append(good, item("-bad"), item("x4"))...), 400, "invalid_channel", idx(3)},
		{"missing channel at 3", batch(append(good, `{"data":1}`)...), 400, "invalid_channel", idx(3)},
		{"channel not a string at 3", batch(append(good, `{"channel":7,"data":1}`)...), 400, "invalid_channel", idx(3)},
		{"missing data at 3", batch(append(good, `{"channel":"x3"}`)...), 400, "missing_data", idx(3)},
		{"bad event at 3", batch(append(good, `{"channel":"x3","data":1,"event":1}`)...), 400, "invalid_event", idx(3)},
		{"not an object at 3", batch(append(good, `[1]`)...), 400, "invalid_json", idx(3)},
		{"item too large at 3", batch(append(good, `{"channel":"x3","data":"`+strings.Repeat("y", 1024)+`"}`)...), 413, "payload_too_large", idx(3)},
		{"body too large", batch(good[0], `{"channel":"x1","data":"`+strings.Repeat("y", 1000)+`"}`, `{"channel":"x2","data":"`+strings.Repeat("y", 1000)+`"}`,
			`{"channel":"x3","data":"`+strings.Repeat("y", 1000)+`"}`, `{"channel":"x4","data":"`+strings.Repeat("y", 1000)+`"}`), 413, "payload_too_large", nil},
		{"empty", `{"messages":[]}`, 400, "invalid_batch", nil},
		{"messages missing", `{}`, 400, "invalid_batch", nil},
		{"messages not an array", `{"messages":{"channel":"x0","data":1}}`, 400, "invalid_batch", nil},
		{"not json", `{"messages":[`, 400, "invalid_json", nil},
		{"array body", `[` + item("x0") + `]`, 400, "invalid_json", nil},
		// Not UTF-8 in an item: that item; outside the items (a field
		// the ingress does not read), the body, as for a single publish.
		{"not UTF-8 at 3", batch(append(good, "{\"channel\":\"x3\",\"data\":\"\xff\"}")...), 400, "invalid_json", idx(3)},
		{"not UTF-8 outside the items", "{\"note\":\"\xff\",\"messages\":[" + strings.Join(good, ",") + "]}", 400, "invalid_json", nil},
		{"not UTF-8 in a field name", "{\"\xfe\":1,\"messages\":[" + strings.Join(good, ",") + "]}", 400, "invalid_json", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := e.do("POST", "/v1/messages", tc.body)
			expectError(t, w, tc.status, tc.code)
			_, index := errorOf(t, w)
			if (index == nil) != (tc.index == nil) || (index != nil && *index != *tc.index) {
				t.Fatalf("index = %v, want %v; body %s", ptrStr(index), ptrStr(tc.index), w.Body.String())
			}
		})
	}
	// All or nothing: no item of any rejected batch was written.
	for i := range 5 {
		if n := e.xlen(fmt.Sprintf("x%d", i)); n != 0 {
			t.Fatalf("channel x%d has %d entries", i, n)
		}
	}
}

// TestBatchItemAtMessageLimit: MAX_MESSAGE_BYTES bounds each batch item as
// it bounds a single publish's body: an item of exactly MAX_MESSAGE_BYTES
// is taken, and only one over it is 413 payload_too_large with its index
// (docs/api.md, Errors: "a batch item over it"; Configuration: "each
// batch item"). The two limits must agree, or a message that can be
// published alone could not be sent in a batch.
func TestBatchItemAtMessageLimit(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) { c.MaxMessageBytes = 1024; c.MaxBatchBytes = 4096 })
	// An item of n bytes: {"channel":"at","data":"yyy…"}.
	item := func(n int) string {
		const frame = `{"channel":"at","data":""}`
		return `{"channel":"at","data":"` + strings.Repeat("y", n-len(frame)) + `"}`
	}
	if got := len(item(1024)); got != 1024 {
		t.Fatalf("item is %d bytes, want 1024", got)
	}
	w := e.do("POST", "/v1/messages", `{"messages":[`+item(1024)+`]}`)
	if w.Code != 202 {
		t.Fatalf("an item of exactly MAX_MESSAGE_BYTES: %d %s, want 202", w.Code, w.Body.String())
	}
	w = e.do("POST", "/v1/messages", `{"messages":[`+item(40)+`,`+item(1025)+`]}`)
	expectError(t, w, 413, "payload_too_large")
	if _, index := errorOf(t, w); index == nil || *index != 1 {
		t.Fatalf("index = %v, want 1; body %s", ptrStr(index), w.Body.String())
	}
	if n := e.xlen("at"); n != 1 {
		t.Fatalf("channel has %d entries, want 1 (the batch at the limit only)", n)
	}
}

func ptrStr(p *int) string {
	if p == nil {
		return "none"
	}
	return fmt.Sprint(*p)
}

// 1000 items is the limit; 1001 is refused whole.
func TestBatchItemLimit(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	items := make([]string, 1001)
	for i := range items {
		items[i] = `{"channel":"many","data":1}`
	}
	expectError(t, e.do("POST", "/v1/messages", `{"messages":[`+strings.Join(items, ",")+`]}`), 400, "invalid_batch")
	if n := e.xlen("many"); n != 0 {
		t.Fatalf("%d written", n)
	}
	w := e.do("POST", "/v1/messages", `{"messages":[`+strings.Join(items[:1000], ",")+`]}`)
	if w.Code != 202 || len(decode[batchResp](t, w).Results) != 1000 {
		t.Fatalf("1000 items: %d", w.Code)
	}
	if n := e.xlen("many"); n != 1000 {
		t.Fatalf("XLEN = %d, want 1000", n)
	}
}

func (e *testEnv) register(id, user, instance string, channels ...string) {
	e.t.Helper()
	err := e.srv.reg.Put(e.t.Context(), &registry.Record{ID: id, User: user, Instance: instance, Channels: channels, ConnectedAt: time.Now().UTC()})
	if err != nil {
		e.t.Fatal(err)
	}
}

func (e *testEnv) inbox(instance string) []stream.Entry {
	e.t.Helper()
	es, err := e.srv.store.Latest(e.t.Context(), e.keys.Inbox(instance), 100)
	if err != nil {
		e.t.Fatal(err)
	}
	return es
}

func TestSendToConnection(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.register("conn-1", "alice", "inst-a", "room")

	w := e.do("POST", "/v1/connections/conn-1/messages", `{"data":{"x":1},"event":"dm"}`)
	if w.Code != 202 {
		t.Fatalf("%d %s", w.Code, w.Body.String())
	}
	resp := decode[struct{ ID, Connection string }](t, w)
	es := e.inbox("inst-a")
	if len(es) != 1 || es[0].ID != resp.ID || resp.Connection != "conn-1" || es[0].Route != stream.ToConnection("conn-1") {
		t.Fatalf("response %+v, inbox %+v", resp, es)
	}
	d, _ := es[0].Decode()
	if d.Target != "connection" || d.Channel != "" || d.Event != "dm" || string(d.Data) != `{"x":1}` {
		t.Fatalf("frame %+v", d)
	}

	for _, tc := range []struct {
		name, path, body string
		status           int
		code             string
	}{
		{"unknown connection", "/v1/connections/nobody/messages", `{"data":1}`, 404, "connection_not_found"},
		{"invalid connection id", "/v1/connections/a%20b/messages", `{"data":1}`, 404, "connection_not_found"},
		{"missing data", "/v1/connections/conn-1/messages", `{}`, 400, "missing_data"},
		{"not json", "/v1/connections/conn-1/messages", `nope`, 400, "invalid_json"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			expectError(t, e.do("POST", tc.path, tc.body), tc.status, tc.code)
		})
	}
	if n := len(e.inbox("inst-a")); n != 1 {
		t.Fatalf("inbox has %d entries after rejected sends", n)
	}
}

func TestSendToUser(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	w := e.do("POST", "/v1/users/ghost/messages", `{"data":1}`)
	if w.Code != 202 {
		t.Fatalf("%d %s", w.Code, w.Body.String())
	}
	if r := decode[struct {
		User        string
		Connections int
	}](t, w); r.User != "ghost" || r.Connections != 0 {
		t.Fatalf("user without connections: %+v", r)
	}

	e.register("c1", "bob", "inst-a")
	e.register("c2", "bob", "inst-a")
	e.register("c3", "bob", "inst-b")
	e.register("c4", "carol", "inst-c")
	w = e.do("POST", "/v1/users/bob/messages", `{"data":"hey","event":"note"}`)
	if r := decode[struct{ Connections int }](t, w); w.Code != 202 || r.Connections != 3 {
		t.Fatalf("%d %s", w.Code, w.Body.String())
	}
	// One entry per instance holding a connection of the user.
	for inst, want := range map[string]int{"inst-a": 1, "inst-b": 1, "inst-c": 0} {
		es := e.inbox(inst)
		if len(es) != want {
			t.Fatalf("inbox %s has %d entries, want %d", inst, len(es), want)
		}
		if want == 1 {
			d, _ := es[0].Decode()
			if es[0].Route != stream.ToUser("bob") || d.Target != "user" || d.Event != "note" || string(d.Data) != `"hey"` {
				t.Fatalf("inbox %s entry %+v", inst, d)
			}
		}
	}
	expectError(t, e.do("POST", "/v1/users/a%20b/messages", `{"data":1}`), 400, "invalid_user")
	expectError(t, e.do("POST", "/v1/users/bob/messages", `{"data":null}`), 400, "missing_data")
}

func TestRegistryReads(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.register("c1", "alice", "inst-a", "lobby", "room")
	e.register("c2", "", "inst-b", "lobby")

	w := e.do("GET", "/v1/connections/c1", "")
	rec := decode[registry.Record](t, w)
	if w.Code != 200 || rec.ID != "c1" || rec.User != "alice" || rec.Instance != "inst-a" || len(rec.Channels) != 2 || rec.ConnectedAt.IsZero() {
		t.Fatalf("%d %s", w.Code, w.Body.String())
	}
	expectError(t, e.do("GET", "/v1/connections/nobody", ""), 404, "connection_not_found")
	expectError(t, e.do("GET", "/v1/connections/a%20b", ""), 404, "connection_not_found")

	type list struct{ Connections []registry.Record }
	for _, tc := range []struct {
		path string
		want int
	}{
		{"/v1/channels/lobby/connections", 2},
		{"/v1/channels/room/connections", 1},
		{"/v1/channels/empty/connections", 0},
		{"/v1/channels/lobby/connections?limit=1", 1},
	} {
		w := e.do("GET", tc.path, "")
		l := decode[list](t, w)
		if w.Code != 200 || len(l.Connections) != tc.want || !strings.Contains(w.Body.String(), `"connections":[`) {
			t.Errorf("%s: %d %s", tc.path, w.Code, w.Body.String())
		}
	}
	for _, q := range []string{"0", "-1", "x", "10001"} {
		expectError(t, e.do("GET", "/v1/channels/lobby/connections?limit="+q, ""), 400, "invalid_limit")
	}
	expectError(t, e.do("GET", "/v1/channels/-x/connections", ""), 400, "invalid_channel")
}

// The 202 reply written without encoding/json is the JSON encoding/json
// would write, for every character a channel name may hold.
func TestPublishResultJSON(t *testing.T) {
	for _, ch := range []string{"a", "room-1", "A_b.c:d@e-f9", strings.Repeat("z", 128)} {
		r := publishResult{ID: "1700000000000-42", Channel: ch}
		want, _ := json.Marshal(r)
		if got := r.appendJSON(nil); string(got) != string(want) {
			t.Errorf("appendJSON = %s, want %s", got, want)
		}
	}
}

// writeJSON answers as gin's c.Data(status, jsonContentType, b), which it
// replaces: the same status, headers and body, through net/http's server
// (which adds Date, left out) as through a recorder, with or without a
// Content-Type set before.
func TestWriteJSONAsGinData(t *testing.T) {
	body := publishResult{ID: "1700000000000-0", Channel: "room"}.appendJSON(nil)
	for _, preset := range []string{"", "application/problem+json"} {
		answer := func(ours bool) func(*gin.Context) {
			return func(c *gin.Context) {
				if preset != "" {
					c.Header("Content-Type", preset)
				}
				c.Header("Idempotent-Replayed", "true")
				if ours {
					writeJSON(c, 202, body)
				} else {
					c.Data(202, jsonContentType, body)
				}
			}
		}
		r := gin.New()
		r.POST("/gin", answer(false))
		r.POST("/ours", answer(true))
		hs := httptest.NewServer(r)
		var replies []string
		for _, path := range []string{"/gin", "/ours"} {
			w := httptest.NewRecorder()
			r.ServeHTTP(w, httptest.NewRequest("POST", path, nil))
			res, err := hs.Client().Post(hs.URL+path, "", nil)
			if err != nil {
				t.Fatal(err)
			}
			wire, err := httputil.DumpResponse(res, true)
			res.Body.Close()
			if err != nil {
				t.Fatal(err)
			}
			wire = regexp.MustCompile(`(?m)^Date: .*\r\n`).ReplaceAll(wire, nil)
			replies = append(replies, fmt.Sprintf("%d %v %q\n%s", w.Code, w.Header(), w.Body.String(), wire))
		}
		hs.Close()
		if replies[0] != replies[1] {
			t.Errorf("Content-Type %q set before:\ngin:  %s\nours: %s", preset, replies[0], replies[1])
		}
	}
}

// TestChannelConnectionsStale: GET /v1/channels/{channel}/connections
// lists the live connection behind a stale member (its record gone, its
// score live) even at limit=1, and not a connection whose record says it
// left the channel (its LeaveChannel's ZREM failed).
func TestChannelConnectionsStale(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := t.Context()
	reg := registry.New(e.rdb, e.keys, 30*time.Second)
	for _, rec := range []*registry.Record{
		{ID: "stale", Instance: "i", Channels: []string{"room"}},
		{ID: "live", Instance: "i", Channels: []string{"room"}},
		{ID: "left", Instance: "i", Channels: []string{"room"}},
	} {
		if err := reg.Put(ctx, rec); err != nil {
			t.Fatal(err)
		}
		time.Sleep(2 * time.Millisecond) // scored in this order
	}
	e.rdb.Del(ctx, e.keys.Conn("stale"))
	e.rdb.Set(ctx, e.keys.Conn("left"), `{"id":"left","instance":"i","channels":[]}`, 30*time.Second)
	for _, q := range []string{"?limit=1", "?limit=2", ""} {
		w := e.do("GET", "/v1/channels/room/connections"+q, "")
		got := decode[struct{ Connections []registry.Record }](t, w)
		if w.Code != 200 || len(got.Connections) != 1 || got.Connections[0].ID != "live" {
			t.Errorf("%s: %d %s, want [live]", q, w.Code, w.Body)
		}
	}
}

// TestBatchPartlyWrittenOn500: a batch item whose channel's stream key
// holds another type (another application under the prefix) fails with
// 500 internal, which no retry mends, and the batch's other items are
// written all the same: each item is its own append (docs/api.md says
// so). A retry with the same Idempotency-Key fails the same way and
// writes none of them twice.
func TestBatchPartlyWrittenOn500(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	if err := e.rdb.Set(t.Context(), e.keys.Stream("wt-b"), "not a stream", 0).Err(); err != nil {
		t.Fatal(err)
	}
	const body = `{"messages":[{"channel":"wt-a","data":1},{"channel":"wt-b","data":2},{"channel":"wt-c","data":3}]}`
	for range 2 {
		expectError(t, e.do("POST", "/v1/messages", body, "Idempotency-Key", "wt"), 500, "internal")
		if a, c := e.xlen("wt-a"), e.xlen("wt-c"); a != 1 || c != 1 {
			t.Fatalf("wt-a holds %d, wt-c %d: want each item of the other channels written once", a, c)
		}
	}
}
