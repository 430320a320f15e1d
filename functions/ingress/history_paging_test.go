package main

import (
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/redis/go-redis/v9"
)

// pageAll pages channel h from cursor with limit until an empty page and
// returns every id read and each page's recovered flag.
func (e *testEnv) pageAll(cursor string, limit int) ([]string, []bool) {
	e.t.Helper()
	var ids []string
	var rec []bool
	for range 100000 {
		r := e.history(fmt.Sprintf("?limit=%d&after=%s", limit, cursor))
		if r.Recovered == nil {
			e.t.Fatalf("no recovered after %s", cursor)
		}
		rec = append(rec, *r.Recovered)
		if len(r.Messages) == 0 {
			return ids, rec
		}
		ids = append(ids, idsOf(r.Messages)...)
		if r.Next != ids[len(ids)-1] {
			e.t.Fatalf("next %s, last %s", r.Next, ids[len(ids)-1])
		}
		cursor = r.Next
	}
	e.t.Fatal("no end")
	return nil, nil
}

// TestHistoryPagingEdges: paging with after reads every message once, in
// order, at every limit around the read chunk (1, a chunk and one either
// side, the most), over messages in the same millisecond; after=0 and
// 0-0 start at the first; after the last id is an empty page, recovered,
// with next the cursor back; without after, the newest limit.
func TestHistoryPagingEdges(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) { c.HistorySize = 0 })
	ids := e.publishN(3*historyChunk + 1) // many in the same millisecond
	for _, limit := range []int{1, 2, historyChunk - 1, historyChunk, historyChunk + 1, 1000} {
		got, rec := e.pageAll("0", limit)
		if fmt.Sprint(got) != fmt.Sprint(ids) {
			t.Fatalf("limit %d: paged %d, want %d", limit, len(got), len(ids))
		}
		for i, r := range rec {
			if !r {
				t.Fatalf("limit %d: page %d not recovered", limit, i)
			}
		}
	}
	for _, after := range []string{"0", "0-0"} {
		r := e.history("?limit=1&after=" + after)
		if len(r.Messages) != 1 || r.Messages[0].ID != ids[0] || !*r.Recovered {
			t.Fatalf("after %s: %+v", after, r)
		}
	}
	last := ids[len(ids)-1]
	r := e.history("?after=" + last)
	if len(r.Messages) != 0 || r.Next != last || !*r.Recovered {
		t.Fatalf("after last: %+v", r)
	}
	// Latest with limit 1..: the newest.
	for _, limit := range []int{1, historyChunk, historyChunk + 1, 1000} {
		r := e.history(fmt.Sprintf("?limit=%d", limit))
		want := ids[max(0, len(ids)-limit):]
		if fmt.Sprint(idsOf(r.Messages)) != fmt.Sprint(want) {
			t.Fatalf("latest %d: %d", limit, len(r.Messages))
		}
	}
}

// pageBack pages channel h backwards from before (none: "") with limit
// until an empty page and returns every id read, oldest first.
func (e *testEnv) pageBack(before string, limit int) []string {
	e.t.Helper()
	var pages [][]string
	q := fmt.Sprintf("?limit=%d", limit)
	for range 100000 {
		if before != "" {
			q = fmt.Sprintf("?limit=%d&before=%s", limit, before)
		}
		r := e.history(q)
		if r.Recovered != nil {
			e.t.Fatalf("%s: recovered %v, want none", q, *r.Recovered)
		}
		if len(r.Messages) == 0 {
			if r.Next != "" {
				e.t.Fatalf("%s: empty page with next %q, want none", q, r.Next)
			}
			var ids []string
			for i := len(pages) - 1; i >= 0; i-- {
				ids = append(ids, pages[i]...)
			}
			return ids
		}
		ids := idsOf(r.Messages)
		if len(ids) > limit || r.Next != ids[len(ids)-1] {
			e.t.Fatalf("%s: %d messages, next %s; want at most %d, next the last id %s", q, len(ids), r.Next, limit, ids[len(ids)-1])
		}
		pages = append(pages, ids)
		before = ids[0]
	}
	e.t.Fatal("no end")
	return nil
}

// TestHistoryBefore: paging back with before reads every message once, in
// order, at every limit around the read chunk, from the newest page (no
// cursor) or from any message; a page holds the newest messages below
// before, oldest first; before the oldest, or 0, is an empty page; a bare
// <ms> means <ms>-0; before with after, repeated, or not an id is 400
// invalid_cursor.
func TestHistoryBefore(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) { c.HistorySize = 0 })
	ids := e.publishN(3*historyChunk + 1) // many in the same millisecond
	for _, limit := range []int{1, 2, historyChunk - 1, historyChunk, historyChunk + 1, 1000} {
		if got := e.pageBack("", limit); fmt.Sprint(got) != fmt.Sprint(ids) {
			t.Fatalf("limit %d: paged back %d, want %d in order", limit, len(got), len(ids))
		}
	}
	if got := e.pageBack(ids[100], 7); fmt.Sprint(got) != fmt.Sprint(ids[:100]) {
		t.Fatalf("paged back from the 101st: %d, want the 100 before it", len(got))
	}
	if r := e.history("?limit=3&before=" + ids[10]); fmt.Sprint(idsOf(r.Messages)) != fmt.Sprint(ids[7:10]) {
		t.Fatalf("3 before the 11th: %v, want %v", idsOf(r.Messages), ids[7:10])
	}
	// A cursor past the newest reads the newest, as no cursor does.
	if r := e.history("?limit=2&before=18446744073709551615-18446744073709551615"); fmt.Sprint(idsOf(r.Messages)) != fmt.Sprint(ids[len(ids)-2:]) {
		t.Fatalf("before the greatest id: %v", idsOf(r.Messages))
	}
	for _, before := range []string{ids[0], "0", "0-0"} {
		if r := e.history("?before=" + before); len(r.Messages) != 0 || r.Next != "" || r.Recovered != nil {
			t.Fatalf("before %s: %+v, want an empty page", before, r)
		}
	}
	ms, _, _ := strings.Cut(ids[0], "-")
	if r := e.history("?before=" + ms); len(r.Messages) != 0 {
		t.Fatalf("before %s (the first's millisecond, -0): %v", ms, idsOf(r.Messages))
	}
	for _, q := range []string{"?before=" + ids[5] + "&after=0", "?after=0&before=" + ids[5], "?before=1-0&before=2-0", "?before=x", "?before=", "?before=1-2-3"} {
		w := e.do("GET", "/v1/channels/h/messages"+q, "")
		expectError(t, w, 400, "invalid_cursor")
	}
}

// TestHistoryPagingConcurrent: pages read while messages are published
// skip and repeat none, and all say recovered.
func TestHistoryPagingConcurrent(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) { c.HistorySize = 0 })
	var wg sync.WaitGroup
	var mu sync.Mutex
	var pub []string
	stop := make(chan struct{})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			items := make([]string, 7)
			for j := range items {
				items[j] = fmt.Sprintf(`{"channel":"h","data":%d}`, j)
			}
			w := e.do("POST", "/v1/messages", `{"messages":[`+strings.Join(items, ",")+`]}`)
			var out struct{ Results []published }
			if err := json.Unmarshal(w.Body.Bytes(), &out); err != nil || w.Code != 202 {
				t.Errorf("publish: %d %s", w.Code, w.Body.String())
				return
			}
			for _, r := range out.Results {
				mu.Lock()
				pub = append(pub, r.ID)
				mu.Unlock()
			}
		}
	}()
	var got []string
	cursor := "0"
	for range 300 {
		r := e.history("?limit=5&after=" + cursor)
		if !*r.Recovered {
			t.Fatal("not recovered")
		}
		got = append(got, idsOf(r.Messages)...)
		cursor = r.Next
	}
	close(stop)
	wg.Wait()
	rest, _ := e.pageAll(cursor, 1000)
	got = append(got, rest...)
	if fmt.Sprint(got) != fmt.Sprint(pub) {
		t.Fatalf("paged %d, published %d", len(got), len(pub))
	}
}

// TestHistoryPagingTrimClear: a page after a cursor trimmed away starts
// at the oldest message left and says recovered false; one after the
// last message trimmed says true; after a removal, a cursor behind the
// last message removed says false, one at it true.
func TestHistoryPagingTrimClear(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) { c.HistorySize = 0 })
	ids := e.publishN(20)
	r := e.history("?limit=5&after=0")
	// Trimmed past the page's end.
	if err := e.rdb.XTrimMinID(t.Context(), e.keys.Stream("h"), ids[8]).Err(); err != nil {
		t.Fatal(err)
	}
	r = e.history("?limit=5&after=" + r.Next)
	if *r.Recovered || idsOf(r.Messages)[0] != ids[8] {
		t.Fatalf("after trim: %+v", r)
	}
	// Trimmed up to the cursor exactly: recovered.
	if err := e.rdb.XTrimMinID(t.Context(), e.keys.Stream("h"), ids[13]).Err(); err != nil {
		t.Fatal(err)
	}
	r = e.history("?limit=5&after=" + ids[12])
	if !*r.Recovered || idsOf(r.Messages)[0] != ids[13] {
		t.Fatalf("after trim at cursor: %+v", r)
	}
	e.do("DELETE", "/v1/channels/h/messages", "")
	more := e.publishN(3)
	r = e.history("?limit=5&after=" + ids[15])
	if *r.Recovered || fmt.Sprint(idsOf(r.Messages)) != fmt.Sprint(more) {
		t.Fatalf("after clear: %+v", r)
	}
	r = e.history("?limit=5&after=" + ids[19])
	if !*r.Recovered || fmt.Sprint(idsOf(r.Messages)) != fmt.Sprint(more) {
		t.Fatalf("after clear from last: %+v", r)
	}
}

// TestQueryMalformed: a value of after or limit that Go's query parser
// drops (a ';' in its pair, or a malformed %-escape) is refused with the
// parameter's code, not read as absent: ?after=1;2 gave the newest page,
// as if no cursor had been given, and ?limit=5; the default limit.
// Another parameter's malformed pair is ignored, as unknown ones are.
func TestQueryMalformed(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.publishN(3)
	for _, tc := range []struct{ query, code string }{
		{"?after=1;2", "invalid_cursor"},
		{"?after=%zz", "invalid_cursor"},
		{"?after=0&limit=2;", "invalid_limit"},
		{"?limit=%zz", "invalid_limit"},
		{"?x=1;after=5", "invalid_cursor"},
		{"?%61fter=1%zz", "invalid_cursor"},
		{"?before=1;2", "invalid_cursor"},
		{"?before=%zz", "invalid_cursor"},
		{"?b%65fore=1%zz", "invalid_cursor"},
	} {
		expectError(t, e.do("GET", "/v1/channels/h/messages"+tc.query, ""), 400, tc.code)
	}
	expectError(t, e.do("GET", "/v1/channels/h/connections?limit=5;", ""), 400, "invalid_limit")
	if r := e.history("?foo=%zz&limit=2"); len(r.Messages) != 2 {
		t.Fatalf("malformed unknown parameter: %d messages", len(r.Messages))
	}
}

// TestQueryTooManyPairs: Go's query parser refuses a query of more than
// 10,000 pairs whole, so that every parameter of it read as absent: a
// page after a cursor answered as the newest page (no recovered), a
// limit out of range or repeated taken for the default. Such a query's
// parameters are refused with their codes, as malformed ones are.
func TestQueryTooManyPairs(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.publishN(3)
	pad := strings.Repeat("&x", 10000)
	for _, tc := range []struct{ query, code string }{
		{"?after=0&limit=1" + pad, "invalid_limit"},
		{"?after=0" + pad, "invalid_cursor"},
		{"?before=1" + pad, "invalid_cursor"},
		{"?limit=0" + pad, "invalid_limit"},
		{"?limit=1&limit=2" + pad, "invalid_limit"},
	} {
		expectError(t, e.do("GET", "/v1/channels/h/messages"+tc.query, ""), 400, tc.code)
	}
	expectError(t, e.do("GET", "/v1/channels/h/connections?limit=5"+pad, ""), 400, "invalid_limit")
	// Parameters an endpoint does not read are ignored, however many.
	if r := e.history("?limit=2" + pad[:len(pad)-2]); len(r.Messages) != 2 {
		t.Fatalf("10,000 pairs: %d messages, want 2", len(r.Messages))
	}
	if r := e.history("?" + pad); len(r.Messages) != 3 {
		t.Fatalf("10,000 unread pairs: %d messages, want 3", len(r.Messages))
	}
}

// TestHistoryUndecodableNotEmpty: entries no message can be made of
// (another release's format) are left out of a page without counting
// toward its limit, so that a page is empty only when no message
// follows: paging with after, or back with before, until an empty page
// reads every message, and the newest page holds the newest message,
// whatever the limit and however many such entries lie between (more
// than a read's chunk). They were counted: a page of them was empty, and
// a reader stopped there.
func TestHistoryUndecodableNotEmpty(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) { c.HistorySize = 0 })
	junk := func(prev string, n int) string {
		for range n {
			prev = e.xaddRaw("h", prev, `{"type":"message","channel":"h","id":"`, `"`)
		}
		return prev
	}
	a := e.publishN(1)[0]
	junk(a, 2*historyChunk+3)
	c := e.publishN(1)[0]
	want := fmt.Sprint([]string{a, c})
	for _, limit := range []int{1, 2, 1000} {
		if got, _ := e.pageAll("0", limit); fmt.Sprint(got) != want {
			t.Errorf("limit %d: paged %v, want %v", limit, got, want)
		}
		if got := e.pageBack("", limit); fmt.Sprint(got) != want {
			t.Errorf("limit %d: paged back %v, want %v", limit, got, want)
		}
	}
	if r := e.history("?limit=1&after=" + a); fmt.Sprint(idsOf(r.Messages)) != fmt.Sprint([]string{c}) || !*r.Recovered {
		t.Errorf("after %s: %v recovered %v, want [%s] true", a, idsOf(r.Messages), *r.Recovered, c)
	}
	if r := e.history("?limit=1&before=" + c); fmt.Sprint(idsOf(r.Messages)) != fmt.Sprint([]string{a}) {
		t.Errorf("before %s: %v, want [%s]", c, idsOf(r.Messages), a)
	}
	last := junk(c, 3)
	if r := e.history("?limit=1"); fmt.Sprint(idsOf(r.Messages)) != fmt.Sprint([]string{c}) {
		t.Errorf("newest, behind undecodable entries: %v, want [%s]", idsOf(r.Messages), c)
	}
	// Past the last message, an empty page: the cursor back; trimmed past
	// the cursor, the channel's last id.
	if r := e.history("?after=" + c); len(r.Messages) != 0 || r.Next != c || !*r.Recovered {
		t.Errorf("after the last message: %v next %s recovered %v, want none, %s, true", idsOf(r.Messages), r.Next, *r.Recovered, c)
	}
	if err := e.rdb.XTrimMaxLen(t.Context(), e.keys.Stream("h"), 2).Err(); err != nil {
		t.Fatal(err)
	}
	if r := e.history("?after=" + c); len(r.Messages) != 0 || r.Next != last || *r.Recovered {
		t.Errorf("after %s, trimmed past it: %v next %s recovered %v, want none, the last id %s, false", c, idsOf(r.Messages), r.Next, *r.Recovered, last)
	}
}

// TestHistoryForeignEntries: entries another application wrote under the
// key prefix (no predecessor field, and skipped by the chain: the next
// message names the message before them) are left out of a page, and
// never taken for a hole between two reads. They were: the newest page
// of ?limit=1 behind such an entry was empty although messages were
// retained, and paging back stopped there, or at the first read that
// began at one.
func TestHistoryForeignEntries(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) { c.HistorySize = 0 })
	foreign := func(n int) {
		for range n {
			if err := e.rdb.XAdd(t.Context(), &redis.XAddArgs{Stream: e.keys.Stream("h"), Values: []string{"x", "y"}}).Err(); err != nil {
				t.Fatal(err)
			}
		}
	}
	ids := e.publishN(2)
	foreign(historyChunk + 1)
	ids = append(ids, e.publishN(historyChunk)...)
	foreign(1)
	ids = append(ids, e.publishN(2)...)
	foreign(2)
	for _, limit := range []int{1, 2, historyChunk, historyChunk + 3, 1000} {
		if r := e.history(fmt.Sprintf("?limit=%d", limit)); len(r.Messages) == 0 || r.Messages[len(r.Messages)-1].ID != ids[len(ids)-1] {
			t.Errorf("limit %d: newest page %v, want it to end with %s", limit, idsOf(r.Messages), ids[len(ids)-1])
		}
		if got := e.pageBack("", limit); fmt.Sprint(got) != fmt.Sprint(ids) {
			t.Errorf("limit %d: paged back %d messages, want %d", limit, len(got), len(ids))
		}
		if got, _ := e.pageAll("0", limit); fmt.Sprint(got) != fmt.Sprint(ids) {
			t.Errorf("limit %d: paged %d messages, want %d", limit, len(got), len(ids))
		}
	}
	// Every message in one page, as the limit allows.
	if r := e.history("?limit=1000"); len(r.Messages) != len(ids) {
		t.Errorf("limit 1000: %d messages, want all %d", len(r.Messages), len(ids))
	}
}
