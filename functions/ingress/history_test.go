package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/auth"
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

// TestQueryRepeated: a query parameter that takes one value, given more
// than once (even with the same value), is refused with the parameter's
// code and a message naming it, instead of the first value being taken.
func TestQueryRepeated(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	for _, tc := range []struct{ path, name, code string }{
		{"/v1/channels/h/messages?limit=2&limit=2", "limit", "invalid_limit"},
		{"/v1/channels/h/messages?limit=2&limit=", "limit", "invalid_limit"},
		{"/v1/channels/h/messages?after=0&after=0", "after", "invalid_cursor"},
		{"/v1/channels/h/messages?after=0&limit=5&after=1-0", "after", "invalid_cursor"},
		{"/v1/channels/h/connections?limit=10&limit=20", "limit", "invalid_limit"},
	} {
		w := e.do("GET", tc.path, "")
		var b struct {
			Error struct{ Code, Message string }
		}
		_ = json.Unmarshal(w.Body.Bytes(), &b)
		if w.Code != 400 || b.Error.Code != tc.code || !strings.Contains(b.Error.Message, tc.name+" must be given once") {
			t.Errorf("%s: %d %s; want 400 %s saying %s must be given once", tc.path, w.Code, w.Body.String(), tc.code, tc.name)
		}
	}
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

// fillLarge appends n messages of about size bytes of data each to
// channel h, straight to the store (a batch request is bounded by
// MAX_BATCH_BYTES), and returns their ids.
func (e *testEnv) fillLarge(n, size int) []string {
	e.t.Helper()
	data := json.RawMessage(`"` + strings.Repeat("x", size-2) + `"`)
	var ids []string
	for len(ids) < n {
		var as []stream.Append
		for range min(50, n-len(ids)) {
			as = append(as, e.srv.channelAppend("h", publishBody{Data: data}, "", time.Now().UnixMilli()))
		}
		got, err := e.srv.store.Append(e.t.Context(), as)
		if err != nil {
			e.t.Fatal(err)
		}
		ids = append(ids, got...)
	}
	return ids
}

func dataBytes(ms []stream.Decoded) int {
	n := 0
	for _, m := range ms {
		n += len(m.Data)
	}
	return n
}

// A history page holds at most historyPageBytes of messages (and at least
// one), however high its limit, and paging with next reads every message
// once, in order.
func TestHistoryPageBudget(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	const size = 60 << 10
	ids := e.fillLarge(120, size)

	// Without after: the newest messages that fit, oldest first.
	r := e.history("?limit=1000")
	got := idsOf(r.Messages)
	if n := len(got); n == 0 || n >= len(ids) || dataBytes(r.Messages) > historyPageBytes+size {
		t.Fatalf("newest page: %d messages, %d bytes of data; want fewer than %d, at most %d bytes", n, dataBytes(r.Messages), len(ids), historyPageBytes+size)
	}
	if want := ids[len(ids)-len(got):]; fmt.Sprint(got) != fmt.Sprint(want) || r.Next != ids[len(ids)-1] {
		t.Fatalf("newest page %v next %s; want the newest %d, %v", got, r.Next, len(got), want)
	}

	// With after: every message once, in order, pages within the budget.
	var paged []string
	cursor := "0"
	for range len(ids) + 1 {
		r := e.history("?limit=1000&after=" + cursor)
		if dataBytes(r.Messages) > historyPageBytes+size {
			t.Fatalf("page after %s: %d messages, %d bytes of data", cursor, len(r.Messages), dataBytes(r.Messages))
		}
		if r.Recovered == nil || !*r.Recovered {
			t.Fatalf("page after %s: recovered %v", cursor, r.Recovered)
		}
		if len(r.Messages) == 0 {
			break
		}
		if len(paged) == 0 && len(r.Messages) >= len(ids) {
			t.Fatalf("first page holds all %d messages", len(r.Messages))
		}
		paged = append(paged, idsOf(r.Messages)...)
		if r.Next != paged[len(paged)-1] {
			t.Fatalf("next %s, want the last id %s", r.Next, paged[len(paged)-1])
		}
		cursor = r.Next
	}
	if fmt.Sprint(paged) != fmt.Sprint(ids) {
		t.Fatalf("paged %d messages, want the %d in order", len(paged), len(ids))
	}

	// Back with before: every message once, pages within the budget.
	if got := e.pageBack("", 1000); fmt.Sprint(got) != fmt.Sprint(ids) {
		t.Fatalf("paged back %d messages, want the %d in order", len(got), len(ids))
	}

	// A message larger than the budget still makes a page of one, with
	// MAX_MESSAGE_BYTES above the budget (one entry per read).
	big := newEnv(t, func(c *Config) { c.MaxMessageBytes, c.MaxBatchBytes = 8<<20, 8<<20 })
	bigIDs := big.fillLarge(3, historyPageBytes+1000)
	for _, q := range []string{"?limit=1000", "?limit=1000&after=" + bigIDs[0], "?limit=1000&before=" + bigIDs[2]} {
		if r := big.history(q); len(r.Messages) != 1 {
			t.Fatalf("%s over messages larger than the budget: %v", q, idsOf(r.Messages))
		}
	}
}

// One history request allocates a bounded amount: not limit ×
// MAX_MESSAGE_BYTES several times over (over 300 MB here before pages had
// a byte budget), nor several copies of a full page (30 MB for this 4 MiB
// one while entries were decoded and the page encoded by gin): about the
// page once, as go-redis reads it from Redis (4.6 MB here), the body
// being written out of those strings.
func TestHistoryMemory(t *testing.T) {
	// Not parallel: TotalAlloc counts every goroutine's allocations.
	e := newEnv(t)
	e.fillLarge(1000, 60<<10)
	for _, q := range []string{"?limit=1000", "?limit=1000&after=0"} {
		req := httptest.NewRequest("GET", "/v1/channels/h/messages"+q, nil)
		// Not a recorder, whose copy of the body is not the handler's.
		w := &discardWriter{h: http.Header{}}
		runtime.GC()
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		e.srv.ServeHTTP(w, req)
		runtime.ReadMemStats(&after)
		alloc := after.TotalAlloc - before.TotalAlloc
		t.Logf("%s: %d bytes of response, %.2f MB allocated (%.2f× the body)", q, w.n, float64(alloc)/1e6, float64(alloc)/float64(w.n))
		if w.code != 200 || w.n < historyPageBytes-(64<<10) || alloc > historyPageBytes*3/2 {
			t.Fatalf("%s: status %d, %d bytes, %.2f MB allocated for one request", q, w.code, w.n, float64(alloc)/1e6)
		}
	}
}

// publishN publishes n small messages to channel h in one batch and
// returns their ids.
func (e *testEnv) publishN(n int) []string {
	e.t.Helper()
	items := make([]string, n)
	for i := range items {
		items[i] = fmt.Sprintf(`{"channel":"h","data":%d}`, i)
	}
	w := e.do("POST", "/v1/messages", `{"messages":[`+strings.Join(items, ",")+`]}`)
	if w.Code != 202 {
		e.t.Fatalf("%d %s", w.Code, w.Body.String())
	}
	var ids []string
	for _, r := range decode[struct{ Results []published }](e.t, w).Results {
		ids = append(ids, r.ID)
	}
	return ids
}

// A later chunk of a page that does not follow on (the stream trimmed
// between two reads) ends the page there; the next page says
// recovered false.
func TestHistoryTrimmedBetweenChunks(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ids := e.publishN(2 * historyChunk)
	// After the page's first read, trim past what it read and a few more.
	cut := historyChunk + 5
	var once sync.Once
	e.rdb.AddHook(afterCommand{name: "xrange", fn: func(ctx context.Context) {
		once.Do(func() {
			if err := e.rdb.XTrimMinID(ctx, e.keys.Stream("h"), ids[cut]).Err(); err != nil {
				t.Error(err)
			}
		})
	}})
	r := e.history("?limit=1000&after=0")
	if fmt.Sprint(idsOf(r.Messages)) != fmt.Sprint(ids[:historyChunk]) || r.Next != ids[historyChunk-1] || r.Recovered == nil || !*r.Recovered {
		t.Fatalf("page: %d messages, next %s, recovered %v; want the first chunk's %d, recovered", len(r.Messages), r.Next, r.Recovered, historyChunk)
	}
	r = e.history("?limit=1000&after=" + r.Next)
	if fmt.Sprint(idsOf(r.Messages)) != fmt.Sprint(ids[cut:]) || r.Recovered == nil || *r.Recovered {
		t.Fatalf("next page: %v recovered %v; want from %s on, not recovered", idsOf(r.Messages), r.Recovered, ids[cut])
	}
}

// Without after, a chunk that does not end where the page begins (entries
// lost between two reads, as a failover to a lagging replica loses them)
// ends the page: it never has a hole.
func TestHistoryNewestHoleBetweenChunks(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ids := e.publishN(2 * historyChunk)
	// The first read gets the newest chunk; then the entry before it goes.
	oldest := len(ids) - historyChunk
	var once sync.Once
	e.rdb.AddHook(afterCommand{name: "xrevrange", fn: func(ctx context.Context) {
		once.Do(func() {
			if err := e.rdb.XDel(ctx, e.keys.Stream("h"), ids[oldest-1]).Err(); err != nil {
				t.Error(err)
			}
		})
	}})
	if r := e.history("?limit=1000"); fmt.Sprint(idsOf(r.Messages)) != fmt.Sprint(ids[oldest:]) {
		t.Fatalf("page %v; want the newest chunk %v", idsOf(r.Messages), ids[oldest:])
	}
}

// afterCommand is a go-redis hook that calls fn after each command named
// name.
type afterCommand struct {
	name string
	fn   func(context.Context)
}

func (h afterCommand) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h afterCommand) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		err := next(ctx, cmd)
		if cmd.Name() == h.name {
			h.fn(ctx)
		}
		return err
	}
}

func (h afterCommand) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

// Near its budget a page reads about as many entries as the budget still
// holds, at the size of the entries last read, rather than a whole chunk.
func TestHistoryPageNext(t *testing.T) {
	t.Parallel()
	entry := func(size int) stream.Entry { return stream.Entry{Head: strings.Repeat("x", size)} }
	p := &historyPage{limit: 1000, chunk: historyChunk}
	if n := p.next(); n != historyChunk {
		t.Fatalf("first read of %d", n)
	}
	const big = 60 << 10
	for range historyChunk {
		p.add(entry(big))
	}
	left := historyPageBytes - historyChunk*big
	if n, want := p.next(), left/big+1; n != want {
		t.Fatalf("after %d entries of %d bytes: read %d, want %d", historyChunk, big, n, want)
	}
	// Small entries after large ones: a chunk again, not a few at a time.
	for range 3 {
		p.add(entry(100))
	}
	if n := p.next(); n != historyChunk {
		t.Fatalf("after small entries: read %d, want %d", n, historyChunk)
	}
	// The limit still bounds it.
	p = &historyPage{limit: 10, chunk: historyChunk}
	if n := p.next(); n != 10 {
		t.Fatalf("limit 10: read %d", n)
	}
}

// historyPage.next and add over pages of random entry sizes (the budget
// hit exactly, entries larger than the budget, reads cut short by the end
// of the stream, limits of 1 and more): every read asks for at least one
// entry and at most a chunk and what the limit leaves; the page never
// passes its limit, holds at least one entry, and passes its budget only
// by being that one entry.
func TestHistoryPageNextEdges(t *testing.T) {
	t.Parallel()
	sizes := []int{1, 7, 100, 60 << 10, historyPageBytes / 4, historyPageBytes / 64, historyPageBytes, historyPageBytes + 1}
	big := strings.Repeat("x", historyPageBytes+1)
	for seed := range 2000 {
		r := seed
		rnd := func(n int) int { r = (r*1103515245 + 12345) & 0x7fffffff; return r % n }
		limit := []int{1, 2, 3, 64, 65, 1000}[rnd(6)]
		chunk := []int{1, 2, historyChunk}[rnd(3)]
		avail := 1 + rnd(2000) // entries in the stream
		p := &historyPage{limit: limit, chunk: chunk}
		reads := 0
		for {
			n := p.next()
			if n < 1 || n > chunk || n > limit-len(p.entries) {
				t.Fatalf("seed %d: read of %d with chunk %d, limit %d, %d entries", seed, n, chunk, limit, len(p.entries))
			}
			got := min(n, avail)
			avail -= got
			if reads++; reads > 10000 {
				t.Fatalf("seed %d: no end", seed)
			}
			for range got {
				size := sizes[rnd(len(sizes))]
				if rnd(3) == 0 { // the budget hit exactly, when it can be
					size = max(1, historyPageBytes-p.bytes)
				}
				if !p.add(stream.Entry{Head: big[:size]}) {
					break
				}
			}
			if p.full || got < n {
				break
			}
		}
		if len(p.entries) == 0 || len(p.entries) > limit || len(p.entries) > 1 && p.bytes > historyPageBytes {
			t.Fatalf("seed %d: %d entries of %d bytes, limit %d", seed, len(p.entries), p.bytes, limit)
		}
	}
}

// TestClearHistory: DELETE /v1/channels/{channel}/messages removes the
// channel's messages and says how many; the channel goes on. A reader at
// the last message removed misses nothing; one behind it is told
// recovered false, as after trimming; the next message, even in the same
// millisecond as the last one removed, gets a greater id (the stream's
// last id is kept). Other channels are untouched.
func TestClearHistory(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ids := e.publishN(3)
	if w := e.do("POST", "/v1/channels/other/messages", `{"data":1}`); w.Code != 202 {
		t.Fatalf("publish: %d", w.Code)
	}
	w := e.do("DELETE", "/v1/channels/h/messages", "")
	if w.Code != 200 {
		t.Fatalf("clear: %d %s", w.Code, w.Body.String())
	}
	if out := decode[struct {
		Channel string
		Removed int
	}](t, w); out.Channel != "h" || out.Removed != 3 {
		t.Fatalf("clear: %s", w.Body.String())
	}
	if h := e.history(""); len(h.Messages) != 0 {
		t.Fatalf("history after clear: %v", idsOf(h.Messages))
	}
	if h := e.history("?after=" + ids[2]); !*h.Recovered || len(h.Messages) != 0 {
		t.Fatalf("from the last id removed: %+v", h)
	}
	if h := e.history("?after=" + ids[0]); *h.Recovered || h.Next != ids[2] {
		t.Fatalf("from an id removed: %+v, want recovered false and next %s", h, ids[2])
	}
	// The stream's last id is kept: an id Redis would give a new stream
	// in the same millisecond (ms-0) is refused, so the next message goes
	// after the removed ones.
	last := stream.MustParseID(ids[2])
	if err := e.rdb.XAdd(context.Background(), &redis.XAddArgs{Stream: e.keys.Stream("h"), ID: fmt.Sprintf("%d-0", last.MS), Values: []string{"x", "y"}}).Err(); err == nil {
		t.Fatal("the stream forgot its last id: an id below the removed messages was taken")
	}
	next := e.publishN(1)[0]
	if !last.Less(stream.MustParseID(next)) {
		t.Fatalf("next id %s is not after the last removed %s", next, ids[2])
	}
	if h := e.history("?after=" + ids[2]); !*h.Recovered || len(h.Messages) != 1 || h.Messages[0].ID != next {
		t.Fatalf("from the last id removed, after a new message: %+v", h)
	}
	// Nothing to remove: 0. Another channel's history is untouched.
	w = e.do("DELETE", "/v1/channels/empty/messages", "")
	if w.Code != 200 || !strings.Contains(w.Body.String(), `"removed":0`) {
		t.Fatalf("clear of an empty channel: %d %s", w.Code, w.Body.String())
	}
	if n := e.xlen("other"); n != 1 {
		t.Fatalf("other channel: XLEN %d", n)
	}
	expectError(t, e.do("DELETE", "/v1/channels/.bad/messages", ""), 400, "invalid_channel")
}

// TestClearHistoryNeedsAdmin: removing history takes the admin scope and
// the channel; a user token never may.
func TestClearHistoryNeedsAdmin(t *testing.T) {
	t.Parallel()
	keys := testKeys + ",chat-admin-0123456789=" + auth.AdminScope + "|chat:*"
	e, logs := newSecEnv(t, map[string]string{"API_KEYS": keys, "JWT_SECRET": testSecret})
	tok := userToken(t, auth.Claims{Subject: "ada", Channels: []string{"chat:*"}, Publish: []string{"chat:*"}})
	for _, tc := range []struct {
		cred, ch string
		status   int
	}{
		{chatKey, "chat:1", 403},  // the channel, not the admin scope
		{adminKey, "chat:1", 403}, // the admin scope, not the channel
		{tok, "chat:1", 403},
		{"", "chat:1", 401},
		{"chat-admin-0123456789", "news.1", 403},
		{"chat-admin-0123456789", "chat:1", 200},
		{fullKey, "news.1", 200},
	} {
		var hdr []string
		if tc.cred != "" {
			hdr = bearer(tc.cred)
		}
		w := e.do("DELETE", "/v1/channels/"+tc.ch+"/messages", "", hdr...)
		if w.Code != tc.status {
			t.Errorf("%.8s… on %s: %d %s, want %d", tc.cred, tc.ch, w.Code, w.Body.String(), tc.status)
		}
	}
	if !strings.Contains(logs.String(), `"msg":"history removed"`) || strings.Contains(logs.String(), fullKey) {
		t.Errorf("the removal is not logged, or the log names a key: %s", logs.String())
	}
}

// TestHistoryWrongType: a channel whose stream key holds another type
// (an operator's SET, a key prefix shared with another application) is a
// fault no retry mends: 500 internal, not 503 unavailable with
// Retry-After, which sent clients retrying and logged a Redis outage
// while Redis answered.
func TestHistoryWrongType(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	if err := e.rdb.Set(t.Context(), e.keys.Stream("w"), "x", 0).Err(); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ method, query string }{
		{"GET", ""}, {"GET", "?after=0"}, {"DELETE", ""}, {"POST", ""},
	} {
		w := e.do(tc.method, "/v1/channels/w/messages"+tc.query, `{"data":1}`)
		if w.Header().Get("Retry-After") != "" {
			t.Errorf("%s%s: Retry-After %q", tc.method, tc.query, w.Header().Get("Retry-After"))
		}
		expectError(t, w, 500, "internal")
	}
}
