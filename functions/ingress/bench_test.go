package main

import (
	"bytes"
	"io"
	"log/slog"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redistest"
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
	srv := NewServer(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)), rdb, keys.Scheme{Prefix: prefix})
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
