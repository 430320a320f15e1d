package main

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"
)

// serveEnv serves e on a loopback port through serve (the timeouts and
// limits of the real process) until the test ends, and returns its
// address.
func serveEnv(t *testing.T, e *testEnv) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = serve(ctx, slog.New(slog.NewTextHandler(io.Discard, nil)), ln, e.srv, time.Second, time.Second)
	}()
	t.Cleanup(func() { cancel(); <-served })
	return ln.Addr().String()
}

// exchange writes head (a request's header block) and body on a new
// connection to addr and returns the first response read back.
func exchange(t *testing.T, addr, head, body string) *http.Response {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(conn, head+"\r\n"+body); err != nil {
		t.Fatal(err)
	}
	res, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("no response: %v", err)
	}
	t.Cleanup(func() { res.Body.Close() })
	return res
}

// expectResponse checks a response read off the wire as expectError does.
func expectResponse(t *testing.T, res *http.Response, status int, code string) {
	t.Helper()
	w := httptest.NewRecorder()
	w.Code = res.StatusCode
	_, _ = io.Copy(w.Body, res.Body)
	expectError(t, w, status, code)
}

// TestBodyOverLimitOnTheWire: a body over the limit is refused with 413
// however it is framed. With a Content-Length over the limit the ingress
// answers before reading it, so a client waiting on Expect: 100-continue
// is told 413 instead of being asked to upload what will be refused
// (RFC 9110 §10.1.1); a chunked body, without a length, is cut at the
// limit. Nothing is written.
func TestBodyOverLimitOnTheWire(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(c *Config) { c.MaxMessageBytes = 100; c.MaxBatchBytes = 200 })
	addr := serveEnv(t, e)
	head := func(path, framing string) string {
		return "POST " + path + " HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + framing + "\r\n"
	}
	for _, tc := range []struct{ path, limit string }{{"/v1/channels/c/messages", "100"}, {"/v1/messages", "200"}} {
		t.Run("expect"+tc.path, func(t *testing.T) {
			over, _ := strconv.Atoi(tc.limit)
			res := exchange(t, addr, head(tc.path, "Content-Length: "+strconv.Itoa(over+1)+"\r\nExpect: 100-continue"), "")
			expectResponse(t, res, 413, "payload_too_large")
		})
		t.Run("chunked"+tc.path, func(t *testing.T) {
			body := `{"messages":[` + strings.Repeat(`{"channel":"c","data":1},`, 10) + `{"channel":"c","data":"` + strings.Repeat("x", 200) + `"}]}`
			chunk := strconv.FormatInt(int64(len(body)), 16) + "\r\n" + body + "\r\n0\r\n\r\n"
			expectResponse(t, exchange(t, addr, head(tc.path, "Transfer-Encoding: chunked"), chunk), 413, "payload_too_large")
		})
	}
	if n := e.xlen("c"); n != 0 {
		t.Fatalf("%d entries written by refused requests", n)
	}
}

// TestRepeatedHeaders: Authorization and Content-Type hold one value
// each (RFC 9110 §5.3). Sent twice, even with one good value, the request
// is refused rather than served with whichever value comes first: the
// ingress does not guess which credential or media type was meant, as
// with a repeated Idempotency-Key or query parameter.
func TestRepeatedHeaders(t *testing.T) {
	t.Parallel()
	e, _ := newSecEnv(t, map[string]string{"API_KEYS": testKeys, "ALLOW_ANONYMOUS": "true"})
	for _, tc := range []struct {
		name, path string
		hdr        [][2]string
		status     int
		code       string
	}{
		{"two credentials", "/v1/channels/c/messages", [][2]string{{"Authorization", "Bearer " + fullKey}, {"Authorization", "Bearer " + chatKey}}, 401, "unauthorized"},
		{"one credential twice", "/v1/channels/c/messages", [][2]string{{"Authorization", "Bearer " + fullKey}, {"Authorization", "Bearer " + fullKey}}, 401, "unauthorized"},
		{"two credentials on a batch", "/v1/messages", [][2]string{{"Authorization", "Bearer " + fullKey}, {"Authorization", "Bearer x"}}, 401, "unauthorized"},
		{"two content types", "/v1/channels/c/messages", [][2]string{{"Content-Type", "application/json"}, {"Content-Type", "text/plain"}}, 415, "unsupported_media_type"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			body := `{"data":1}`
			if tc.path == "/v1/messages" {
				body = `{"messages":[{"channel":"c","data":1}]}`
			}
			req := httptest.NewRequest("POST", tc.path, strings.NewReader(body))
			if tc.code != "unsupported_media_type" {
				req.Header.Set("Content-Type", "application/json")
			}
			for _, h := range tc.hdr {
				req.Header.Add(h[0], h[1])
			}
			w := httptest.NewRecorder()
			e.srv.ServeHTTP(w, req)
			expectError(t, w, tc.status, tc.code)
		})
	}
	if n := e.xlen("c"); n != 0 {
		t.Fatalf("%d entries written by refused requests", n)
	}
}

// TestDataDepth: data nests at most maxDataDepth arrays and objects
// deep. Deeper data would be stored, then break its readers: a history
// page holds data three levels down, past what common JSON decoders take
// (Go's encoding/json 10,000 levels, which the Go client's History hit
// on every read of the page; Ruby's 100), so that a channel's history
// could not be paged past that message. Brackets in strings do not count.
func TestDataDepth(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	nest := func(n int) string {
		return strings.Repeat(`[{"a":`, n/2) + strings.Repeat("[", n%2) + "1" + strings.Repeat("]", n%2) + strings.Repeat("}]", n/2)
	}
	for _, body := range []string{
		`{"data":` + nest(maxDataDepth) + `}`,
		`{"data":"` + strings.Repeat("[{", 100) + `","event":"e"}`,
		`{"data":[` + strings.Repeat(`"\"[",`, 100) + `1]}`,
		// maxDataDepth deep, with more brackets in all than the bound:
		// the ones in strings (escaped quotes among them) close and open none.
		`{"data":` + strings.Repeat(`{"s":"[{\"[{","x":`, maxDataDepth) + "1" + strings.Repeat("}", maxDataDepth) + `}`,
		// Wide, not deep: 100 arrays side by side are 2 levels.
		`{"data":[` + strings.Repeat(`[1],`, 100) + `{}]}`,
	} {
		if w := e.do("POST", "/v1/channels/deep/messages", body); w.Code != 202 {
			t.Fatalf("%.60s…: %d %s", body, w.Code, w.Body.String())
		}
	}
	for _, depth := range []int{maxDataDepth + 1, 9999} {
		expectError(t, e.do("POST", "/v1/channels/deep/messages", `{"data":`+nest(depth)+`}`), 400, "invalid_json")
		w := e.do("POST", "/v1/messages", `{"messages":[{"channel":"deep","data":1},{"channel":"deep","data":`+nest(depth)+`}]}`)
		expectError(t, w, 400, "invalid_json")
		// 9999 levels are past encoding/json's own bound in a batch: the
		// body as a whole is refused, without an index.
		if _, i := errorOf(t, w); depth <= maxDataDepth+1 && (i == nil || *i != 1) {
			t.Fatalf("index %v, want 1", ptrStr(i))
		}
	}
	// Past encoding/json's 10,000 levels the body is still valid JSON:
	// the error says why it is refused, not that it is malformed.
	for _, path := range []string{"/v1/channels/deep/messages", "/v1/messages"} {
		body := `{"data":` + nest(10001) + `}`
		if path == "/v1/messages" {
			body = `{"messages":[{"channel":"deep","data":` + nest(10001) + `}]}`
		}
		w := e.do("POST", path, body)
		expectError(t, w, 400, "invalid_json")
		if msg := decode[struct{ Error struct{ Message string } }](t, w).Error.Message; !strings.Contains(msg, "10000 levels deep") {
			t.Errorf("%s, 10001 levels: %q, want it to say how deep JSON may nest", path, msg)
		}
	}
	if n := e.xlen("deep"); n != 5 {
		t.Fatalf("%d entries, want the 5 accepted", n)
	}
	w := e.do("GET", "/v1/channels/deep/messages", "")
	if page := decode[struct{ Messages []json.RawMessage }](t, w); len(page.Messages) != 5 {
		t.Fatalf("history: %s", w.Body.String())
	}
}

// TestNetHTTPAnswers: the answers net/http gives itself, before a
// request reaches the ingress, are the ones docs/api.md ("Errors") lists,
// and nothing is written.
func TestNetHTTPAnswers(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	addr := serveEnv(t, e)
	post := "POST /v1/channels/c/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10\r\n"
	for _, tc := range []struct {
		head   string
		status int
	}{
		{post + "Expect: something-else\r\n", 417},
		{strings.Replace(post, "HTTP/1.1", "HTTP/2.0", 1), 505},
		{strings.Replace(post, "Host: x\r\n", "", 1), 400},
		{post + "Content-Length: 11\r\n", 400},
		{strings.Replace(post, "Content-Length: 10", "Transfer-Encoding: gzip", 1), 501},
		// The server-wide form of OPTIONS (RFC 9110 §9.3.7), with an
		// empty body: no path, so no route, CORS or credential.
		{"OPTIONS * HTTP/1.1\r\nHost: x\r\n", 200},
	} {
		if res := exchange(t, addr, tc.head, `{"data":1}`); res.StatusCode != tc.status {
			t.Errorf("%q: %d, want %d", tc.head, res.StatusCode, tc.status)
		}
	}
	if n := e.xlen("c"); n != 0 {
		t.Fatalf("%d entries written", n)
	}
}

// TestBodyCutShort: a body that breaks off (the client shuts down its
// sending side before the Content-Length it promised, or before the
// chunked body's last chunk) is 400 invalid_body and writes nothing, even
// when the bytes that did arrive are a whole, valid message: only a body
// that ended as framed is published.
func TestBodyCutShort(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	addr := serveEnv(t, e)
	for _, tc := range []struct{ name, path, body string }{
		{"publish", "/v1/channels/cut/messages", `{"data":1}`},
		{"batch", "/v1/messages", `{"messages":[{"channel":"cut","data":1}]}`},
	} {
		for _, framing := range []string{"length", "chunked"} {
			for _, key := range []string{"", "cut-" + tc.name + "-" + framing} {
				t.Run(tc.name+"/"+framing+"/key="+key, func(t *testing.T) {
					head := "POST " + tc.path + " HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
					if key != "" {
						head += "Idempotency-Key: " + key + "\r\n"
					}
					body := tc.body
					if framing == "length" {
						head += "Content-Length: " + strconv.Itoa(len(body)+10) + "\r\n"
					} else {
						head += "Transfer-Encoding: chunked\r\n"
						body = strconv.FormatInt(int64(len(body)), 16) + "\r\n" + body + "\r\n" // no last chunk
					}
					conn, err := net.Dial("tcp", addr)
					if err != nil {
						t.Fatal(err)
					}
					defer conn.Close()
					_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
					if _, err := io.WriteString(conn, head+"\r\n"+body); err != nil {
						t.Fatal(err)
					}
					if err := conn.(*net.TCPConn).CloseWrite(); err != nil {
						t.Fatal(err)
					}
					res, err := http.ReadResponse(bufio.NewReader(conn), nil)
					if err != nil {
						t.Fatalf("no response: %v", err)
					}
					defer res.Body.Close()
					expectResponse(t, res, 400, "invalid_body")
				})
			}
		}
	}
	if n := e.xlen("cut"); n != 0 {
		t.Fatalf("%d entries written by bodies cut short", n)
	}
	// The keys were not used: the whole request runs.
	if w := e.do("POST", "/v1/channels/cut/messages", `{"data":1}`, "Idempotency-Key", "cut-publish-length"); w.Code != 202 || w.Header().Get("Idempotent-Replayed") != "" {
		t.Fatalf("the key of a request cut short: %d %s %v", w.Code, w.Body, w.Header())
	}
}

// TestByteOrderMark: a body that begins with a UTF-8 byte order mark is
// refused on every route that takes a message (docs/api.md: 400
// invalid_json), with a message that names the mark rather than saying
// that a body which looks like an object must be one, and nothing is
// written.
func TestByteOrderMark(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	const bom = "\xef\xbb\xbf"
	for path, body := range map[string]string{
		"/v1/channels/bom/messages":        `{"data":1}`,
		"/v1/messages":                     `{"messages":[{"channel":"bom","data":1}]}`,
		"/v1/connections/no-such/messages": `{"data":1}`,
		"/v1/users/alice/messages":         `{"data":1}`,
	} {
		for _, b := range []string{bom + body, " \n" + bom + body} {
			w := e.do("POST", path, b)
			expectError(t, w, 400, "invalid_json")
			if msg := decode[struct{ Error struct{ Message string } }](t, w).Error.Message; !strings.Contains(msg, "byte order mark") {
				t.Errorf("POST %s with a BOM: %q, want it to name the byte order mark", path, msg)
			}
		}
	}
	if n := e.xlen("bom"); n != 0 {
		t.Fatalf("%d entries written", n)
	}
}
