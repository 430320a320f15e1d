package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/stream"
)

// BenchmarkPublish is POST /v1/channels/{ch}/messages through the whole
// handler (routing, auth, decode, the Lua append on a real Redis), with a
// 100-byte data payload, serially and from parallel callers.
func BenchmarkPublish(b *testing.B) {
	rdb, prefix := redistest.Client(b)
	cfg, err := loadConfig(func(k string) string {
		switch k {
		case "ALLOW_ANONYMOUS":
			return "true"
		case "PUBLISH_RATE_PER_USER":
			return "0"
		}
		return ""
	})
	if err != nil {
		b.Fatal(err)
	}
	srv := testServer(b, cfg, slog.New(slog.NewTextHandler(io.Discard, nil)), rdb, keys.Scheme{Prefix: prefix})
	body := []byte(`{"data":{"s":12345,"t":1700000000000000000,"p":"` + strings.Repeat("x", 57) + `"}}`)
	publish := func(b *testing.B) {
		req := httptest.NewRequest("POST", "/v1/channels/bench/messages", bytes.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		w := httptest.NewRecorder()
		srv.ServeHTTP(w, req)
		if w.Code != 202 {
			b.Fatalf("status %d: %s", w.Code, w.Body)
		}
	}
	b.Run("serial", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			publish(b)
		}
	})
	b.Run("parallel", func(b *testing.B) {
		b.ReportAllocs()
		b.SetParallelism(8)
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				publish(b)
			}
		})
	})
}

// BenchmarkDecodeMessage is the publish body's parsing and validation
// alone, for a compact body and one with whitespace to remove.
func BenchmarkDecodeMessage(b *testing.B) {
	for name, body := range map[string][]byte{
		"compact": []byte(`{"data":{"s":12345,"t":1700000000000000000,"p":"` + strings.Repeat("x", 57) + `"},"event":"tick"}`),
		"spaced":  []byte(`{"data": {"s": 12345, "t": 1700000000000000000, "p": "` + strings.Repeat("x", 57) + `"}, "event": "tick"}`),
	} {
		b.Run(name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := decodeMessage(body, false); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// discardWriter is an http.ResponseWriter that keeps only the status and
// the body's length, so that a measurement counts what the handler
// allocates and not a recorder's copy of the body.
type discardWriter struct {
	h    http.Header
	code int
	n    int
}

func (w *discardWriter) Header() http.Header { return w.h }

func (w *discardWriter) WriteHeader(code int) {
	if w.code == 0 {
		w.code = code
	}
}

func (w *discardWriter) Write(p []byte) (int, error) {
	w.WriteHeader(200)
	w.n += len(p)
	return len(p), nil
}

// WriteString, as http.ResponseWriter's has, so that io.WriteString does
// not copy s.
func (w *discardWriter) WriteString(s string) (int, error) {
	w.WriteHeader(200)
	w.n += len(s)
	return len(s), nil
}

func (w *discardWriter) reset() {
	clear(w.h)
	w.code, w.n = 0, 0
}

// BenchmarkHistory is GET /v1/channels/{ch}/messages through the whole
// handler on a real Redis: a common page (50 messages of 100 bytes of
// data) and a full one (the 4 MiB budget, of 60 KiB messages), newest
// first (no after) and from after=0. B/op is per request; page-B is the
// body's size.
func BenchmarkHistory(b *testing.B) {
	rdb, prefix := redistest.Client(b)
	cfg, err := loadConfig(func(k string) string { return map[string]string{"ALLOW_ANONYMOUS": "true"}[k] })
	if err != nil {
		b.Fatal(err)
	}
	srv := testServer(b, cfg, slog.New(slog.NewTextHandler(io.Discard, nil)), rdb, keys.Scheme{Prefix: prefix})
	fill := func(ch string, n, size int) {
		data := json.RawMessage(`{"s":12345,"p":"` + strings.Repeat("x", size-16) + `"}`)
		for done := 0; done < n; {
			var as []stream.Append
			for range min(50, n-done) {
				as = append(as, srv.channelAppend(ch, publishBody{Data: data, Event: "tick"}, "u1", 1700000000000))
			}
			if _, err := srv.store.Append(context.Background(), as); err != nil {
				b.Fatal(err)
			}
			done += len(as)
		}
	}
	fill("small", 50, 100)
	fill("full", 120, 60<<10)
	for _, bc := range []struct{ name, path string }{
		{"small50", "/v1/channels/small/messages?limit=50"},
		{"small50-after", "/v1/channels/small/messages?limit=50&after=0"},
		{"full4MiB", "/v1/channels/full/messages?limit=1000"},
		{"full4MiB-after", "/v1/channels/full/messages?limit=1000&after=0"},
	} {
		b.Run(bc.name, func(b *testing.B) {
			req := httptest.NewRequest("GET", bc.path, nil)
			w := &discardWriter{h: http.Header{}}
			b.ReportAllocs()
			for b.Loop() {
				w.reset()
				srv.ServeHTTP(w, req)
				if w.code != 200 {
					b.Fatalf("status %d", w.code)
				}
			}
			b.ReportMetric(float64(w.n), "page-B")
		})
	}
}

// BenchmarkPublishHTTP is BenchmarkPublish through net/http's server on a
// loopback keep-alive connection, so that allocs/op also counts what the
// server allocates per request (reading and parsing it, the response
// writer). The client writes a prepared request and reads the reply with
// a reader of its own that allocates nothing, so nearly every allocation
// counted is the server's. Each parallel caller has its own connection.
func BenchmarkPublishHTTP(b *testing.B) {
	rdb, prefix := redistest.Client(b)
	cfg, err := loadConfig(func(k string) string {
		return map[string]string{"ALLOW_ANONYMOUS": "true", "PUBLISH_RATE_PER_USER": "0"}[k]
	})
	if err != nil {
		b.Fatal(err)
	}
	srv := testServer(b, cfg, slog.New(slog.NewTextHandler(io.Discard, nil)), rdb, keys.Scheme{Prefix: prefix})
	hs := httptest.NewServer(srv)
	b.Cleanup(hs.Close)
	body := `{"data":{"s":12345,"t":1700000000000000000,"p":"` + strings.Repeat("x", 57) + `"}}`
	req := []byte("POST /v1/channels/bench/messages HTTP/1.1\r\nHost: " + hs.Listener.Addr().String() +
		"\r\nContent-Type: application/json\r\nContent-Length: " + strconv.Itoa(len(body)) + "\r\n\r\n" + body)
	// publish sends one request on conn and reads its 202 reply.
	publish := func(conn net.Conn, r *bufio.Reader) error {
		if _, err := conn.Write(req); err != nil {
			return err
		}
		n := -1
		for first := true; ; first = false {
			line, err := r.ReadSlice('\n')
			if err != nil {
				return err
			}
			if first && !bytes.HasPrefix(line, []byte("HTTP/1.1 202 ")) {
				return fmt.Errorf("status line %q", line)
			}
			if v, ok := bytes.CutPrefix(line, []byte("Content-Length: ")); ok {
				n, _ = strconv.Atoi(string(bytes.TrimSpace(v)))
			}
			if len(line) == 2 { // the blank line ending the header
				break
			}
		}
		if n < 0 {
			return errors.New("no Content-Length")
		}
		_, err := r.Discard(n)
		return err
	}
	dial := func(b *testing.B) (net.Conn, *bufio.Reader, error) {
		conn, err := net.Dial("tcp", hs.Listener.Addr().String())
		if err != nil {
			return nil, nil, err
		}
		b.Cleanup(func() { conn.Close() })
		return conn, bufio.NewReader(conn), nil
	}
	b.Run("serial", func(b *testing.B) {
		conn, r, err := dial(b)
		if err != nil {
			b.Fatal(err)
		}
		b.ReportAllocs()
		for b.Loop() {
			if err := publish(conn, r); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("parallel", func(b *testing.B) {
		b.ReportAllocs()
		b.SetParallelism(8)
		b.RunParallel(func(pb *testing.PB) {
			conn, r, err := dial(b)
			if err != nil {
				b.Error(err)
				return
			}
			for pb.Next() {
				if err := publish(conn, r); err != nil {
					b.Error(err)
					return
				}
			}
		})
	})
}

// BenchmarkPublishRateScope is BenchmarkPublish with a per-IP publish
// rate limit that never refuses, its buckets in the process (instance)
// or in Redis (global): what PUBLISH_RATE_SCOPE=global adds to a publish
// (one more Redis round trip).
func BenchmarkPublishRateScope(b *testing.B) {
	for _, scope := range []string{"instance", "global"} {
		b.Run(scope, func(b *testing.B) {
			rdb, prefix := redistest.Client(b)
			env := map[string]string{"ALLOW_ANONYMOUS": "true", "PUBLISH_RATE_PER_USER": "0",
				"PUBLISH_RATE_PER_IP": "1000000", "PUBLISH_RATE_SCOPE": scope}
			cfg, err := loadConfig(func(k string) string { return env[k] })
			if err != nil {
				b.Fatal(err)
			}
			srv := testServer(b, cfg, slog.New(slog.NewTextHandler(io.Discard, nil)), rdb, keys.Scheme{Prefix: prefix})
			body := []byte(`{"data":{"s":12345,"t":1700000000000000000,"p":"` + strings.Repeat("x", 57) + `"}}`)
			b.ReportAllocs()
			b.SetParallelism(8)
			var n atomic.Int64
			b.RunParallel(func(pb *testing.PB) {
				// Callers of their own, as publishers from many addresses.
				addr := fmt.Sprintf("192.0.2.%d:1000", n.Add(1)%250)
				for pb.Next() {
					req := httptest.NewRequest("POST", "/v1/channels/bench/messages", bytes.NewReader(body))
					req.Header.Set("Content-Type", "application/json")
					req.RemoteAddr = addr
					w := httptest.NewRecorder()
					srv.ServeHTTP(w, req)
					if w.Code != 202 {
						b.Fatalf("status %d: %s", w.Code, w.Body)
					}
				}
			})
		})
	}
}
