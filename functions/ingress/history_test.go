package main

import (
	"fmt"
	"strings"
	"testing"

	"github.com/wsrelay/wsrelay/shared/stream"
)

type historyResp struct {
	Messages  []stream.Decoded `json:"messages"`
	Next      string           `json:"next"`
	Recovered *bool            `json:"recovered"`
}

func (e *testEnv) history(query string) historyResp {
	e.t.Helper()
	w := e.do("GET", "/v1/channels/h/messages"+query, "")
	if w.Code != 200 {
		e.t.Fatalf("history%s: %d %s", query, w.Code, w.Body.String())
	}
	return decode[historyResp](e.t, w)
}

func idsOf(ms []stream.Decoded) []string {
	out := []string{}
	for _, m := range ms {
		out = append(out, m.ID)
	}
	return out
}

func TestHistory(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	// An empty channel has an empty page, not null.
	if w := e.do("GET", "/v1/channels/h/messages", ""); w.Code != 200 || !strings.Contains(w.Body.String(), `"messages":[]`) {
		t.Fatalf("empty history: %d %s", w.Code, w.Body.String())
	}
	var ids []string
	for i := range 5 {
		w := e.do("POST", "/v1/channels/h/messages", fmt.Sprintf(`{"data":%d,"event":"e","from":"u1"}`, i))
		ids = append(ids, decode[published](t, w).ID)
	}

	// Without after: the newest limit messages, oldest first.
	r := e.history("?limit=2")
	if fmt.Sprint(idsOf(r.Messages)) != fmt.Sprint(ids[3:]) || r.Next != ids[4] {
		t.Fatalf("newest 2: %v next %s; want %v", idsOf(r.Messages), r.Next, ids[3:])
	}
	m := r.Messages[1]
	if m.Channel != "h" || m.Event != "e" || m.From != "u1" || string(m.Data) != "4" || m.TS == 0 || m.Type != "" {
		t.Fatalf("message %+v", m)
	}
	if r := e.history(""); len(r.Messages) != 5 {
		t.Fatalf("default limit: %d messages", len(r.Messages))
	}

	// With after: page forward; next is the cursor of the following page.
	var paged []string
	cursor := "0-0"
	for range 10 {
		r := e.history("?limit=2&after=" + cursor)
		if len(r.Messages) > 2 {
			t.Fatalf("page of %d", len(r.Messages))
		}
		paged = append(paged, idsOf(r.Messages)...)
		if len(r.Messages) == 0 {
			if r.Next != cursor {
				t.Fatalf("empty page next = %s, want the cursor %s back", r.Next, cursor)
			}
			break
		}
		cursor = r.Next
	}
	if fmt.Sprint(paged) != fmt.Sprint(ids) {
		t.Fatalf("paged %v, want %v", paged, ids)
	}
	// after is exclusive; a bare millisecond id means <ms>-0.
	if r := e.history("?after=" + ids[1]); fmt.Sprint(idsOf(r.Messages)) != fmt.Sprint(ids[2:]) {
		t.Fatalf("after %s: %v", ids[1], idsOf(r.Messages))
	}
	if r := e.history("?after=0"); len(r.Messages) != 5 {
		t.Fatalf("after=0: %d", len(r.Messages))
	}
	if r := e.history("?after=" + ids[0]); r.Recovered == nil || !*r.Recovered {
		t.Fatalf("after %s with nothing trimmed: recovered %v", ids[0], r.Recovered)
	}
	if r := e.history("?limit=2"); r.Recovered != nil {
		t.Fatalf("without after: recovered %v, want no field", *r.Recovered)
	}
	// A cursor ahead of the stream (the greatest id among them, from
	// which Redis refuses an exclusive range) has nothing after it, and
	// the next page starts where the stream does.
	const maxID = "18446744073709551615-18446744073709551615"
	for _, ahead := range []string{maxID, "99999999999999-0"} {
		r := e.history("?after=" + ahead)
		if len(r.Messages) != 0 || r.Next != ids[4] || r.Recovered == nil || *r.Recovered {
			t.Fatalf("after %s: %v next %s recovered %v; want none, next %s, recovered false", ahead, idsOf(r.Messages), r.Next, r.Recovered, ids[4])
		}
	}
	// Trimmed past the cursor: the page starts at the oldest message left,
	// and says so.
	if err := e.rdb.XTrimMaxLen(t.Context(), e.keys.Stream("h"), 2).Err(); err != nil {
		t.Fatal(err)
	}
	if r := e.history("?after=" + ids[1]); fmt.Sprint(idsOf(r.Messages)) != fmt.Sprint(ids[3:]) || r.Recovered == nil || *r.Recovered {
		t.Fatalf("after %s, trimmed past it: %v recovered %v; want %v, false", ids[1], idsOf(r.Messages), r.Recovered, ids[3:])
	}

	for _, tc := range []struct{ query, code string }{
		{"?after=abc", "invalid_cursor"},
		{"?after=", "invalid_cursor"},
		{"?after=1-2-3", "invalid_cursor"},
		{"?after=%2B", "invalid_cursor"},
		{"?after=-", "invalid_cursor"},
		{"?limit=0", "invalid_limit"},
		{"?limit=", "invalid_limit"},
		{"?limit=1001", "invalid_limit"},
		{"?limit=x", "invalid_limit"},
		{"?limit=-5", "invalid_limit"},
	} {
		expectError(t, e.do("GET", "/v1/channels/h/messages"+tc.query, ""), 400, tc.code)
	}
	expectError(t, e.do("GET", "/v1/channels/"+strings.Repeat("h", 129)+"/messages", ""), 400, "invalid_channel")
	expectError(t, e.do("GET", "/v1/channels/-h/connections", ""), 400, "invalid_channel")
}

// History gives data as it was stored, as the WebSocket delivers it: not
// with <, > and & escaped.
func TestHistoryDataAsStored(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	if w := e.do("POST", "/v1/channels/h/messages", `{"data":{"a":"<b>&\u00e9</b>"}}`); w.Code != 202 {
		t.Fatalf("%d %s", w.Code, w.Body.String())
	}
	w := e.do("GET", "/v1/channels/h/messages", "")
	if !strings.Contains(w.Body.String(), `"data":{"a":"<b>&\u00e9</b>"}`) {
		t.Fatalf("history %s", w.Body.String())
	}
}

// History keeps about HISTORY_SIZE messages per channel.
func TestHistoryRetention(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) { c.HistorySize = 10 })
	items := make([]string, 300)
	for i := range items {
		items[i] = fmt.Sprintf(`{"channel":"h","data":%d}`, i)
	}
	if w := e.do("POST", "/v1/messages", `{"messages":[`+strings.Join(items, ",")+`]}`); w.Code != 202 {
		t.Fatalf("%d %s", w.Code, w.Body.String())
	}
	// Approximate trimming keeps at least HISTORY_SIZE and at most a
	// radix-tree node (100 entries) more.
	if n := e.xlen("h"); n < 10 || n > 110 {
		t.Fatalf("XLEN = %d with HISTORY_SIZE 10", n)
	}
	if ttl := e.rdb.PTTL(t.Context(), e.keys.Stream("h")).Val(); ttl <= 0 {
		t.Fatalf("stream has no TTL (%v)", ttl)
	}
}
