package stream

import (
	"bytes"
	"context"
	"encoding/json"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redistest"
)

var benchData = json.RawMessage(`{"s":12345,"t":1700000000000000000,"p":"` + strings.Repeat("x", 57) + `"}`)

// BenchmarkMessageFrame is the frame encoding each publish does once.
func BenchmarkMessageFrame(b *testing.B) {
	m := Message{Channel: "chat.room-42", Event: "say", TS: 1700000000000, Data: benchData}
	b.ReportAllocs()
	for b.Loop() {
		h, t := m.Frame()
		if len(h)+len(t) == 0 {
			b.Fatal("empty frame")
		}
	}
}

// BenchmarkParseNotification is the egress's decode of one Pub/Sub
// notification.
func BenchmarkParseNotification(b *testing.B) {
	m := Message{Channel: "chat.room-42", TS: 1700000000000, Data: benchData}
	h, t := m.Frame()
	payload := "1700000000000-0\n1700000000001-0\n1700000000000\n\n" + h + "1700000000001-0" + t
	b.ReportAllocs()
	b.SetBytes(int64(len(payload)))
	for b.Loop() {
		if _, err := ParseNotification(payload); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkNotificationSendable is the egress's check of a notification's
// frame before it fans it out: a frame as Message.Frame writes it
// ("verbatim"), and one it does not (its data not compact), which
// json.Valid checks.
func BenchmarkNotificationSendable(b *testing.B) {
	m := Message{Channel: "chat.room-42", TS: 1700000000000, Data: benchData}
	h, t := m.Frame()
	for _, c := range []struct{ name, tail string }{
		{"verbatim", t},
		{"json", strings.Replace(t, `,"p"`, `, "p"`, 1)},
	} {
		b.Run(c.name, func(b *testing.B) {
			n, err := ParseNotification("1700000000000-0\n1700000000001-0\n1700000000000\n\n" + h + "1700000000001-0" + c.tail)
			if err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			b.SetBytes(int64(len(n.Frame)))
			for b.Loop() {
				if !n.Sendable() {
					b.Fatal("not sendable")
				}
			}
		})
	}
}

// BenchmarkEntryFrame rebuilds a frame read back from a stream (replay).
func BenchmarkEntryFrame(b *testing.B) {
	m := Message{Channel: "chat.room-42", TS: 1700000000000, Data: benchData}
	h, t := m.Frame()
	e := Entry{ID: "1700000000001-0", Head: h, Tail: t}
	b.ReportAllocs()
	for b.Loop() {
		if len(e.Frame()) == 0 {
			b.Fatal("empty")
		}
	}
}

// BenchmarkEntryJSON is one history message's JSON from its entry: as
// Entry.JSON checks the stored frame ("stored"), and as the entry was
// decoded and encoded before ("decoded", what Entry.JSON still does for
// a frame it cannot take as it is), for the 100-byte data of the other
// benchmarks and for 60 KiB of it.
func BenchmarkEntryJSON(b *testing.B) {
	for _, size := range []struct {
		name string
		data json.RawMessage
	}{
		{"100B", benchData},
		{"60KiB", json.RawMessage(`{"s":12345,"p":"` + strings.Repeat("x", 60<<10) + `"}`)},
	} {
		m := Message{Channel: "chat.room-42", Event: "say", From: "u1", TS: 1700000000000, Data: size.data}
		h, t := m.Frame()
		e := Entry{ID: "1700000000001-0", Head: h, Tail: t}
		b.Run(size.name+"/stored", func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(size.data)))
			for b.Loop() {
				if j, err := e.JSON(); err != nil || j.Tail != t {
					b.Fatal("not the stored frame", err)
				}
			}
		})
		b.Run(size.name+"/decoded", func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(size.data)))
			var buf bytes.Buffer
			for b.Loop() {
				d, err := e.Decode()
				if err != nil {
					b.Fatal(err)
				}
				buf.Reset()
				enc := json.NewEncoder(&buf)
				enc.SetEscapeHTML(false)
				if err := enc.Encode(d); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkAppend is one publish's round trip to Redis (the Lua script),
// one append per call and in pipelines of 16; "age=1s" appends to streams
// whose entries turn too old a second after they are written, so that
// every second's first append trims the second before it (by age alone,
// no count limit).
func BenchmarkAppend(b *testing.B) {
	rdb, prefix := redistest.Client(b)
	ks := keys.Scheme{Prefix: prefix}
	s := NewStore(rdb)
	ctx := context.Background()
	for _, bc := range []struct {
		name string
		n    int
		lim  Limits
	}{
		{"batch=1", 1, Limits{MaxLen: 1000, MaxAgeMS: 86400000, TTLMS: 86400000}},
		{"batch=16", 16, Limits{MaxLen: 1000, MaxAgeMS: 86400000, TTLMS: 86400000}},
		{"batch=16,age=1s", 16, Limits{MaxAgeMS: 1000, TTLMS: 86400000}},
	} {
		n := bc.n
		b.Run(bc.name, func(b *testing.B) {
			as := make([]Append, n)
			for i := range as {
				ch := "bench" + strconv.Itoa(i) + bc.name
				as[i] = Append{Stream: ks.Stream(ch), Notify: ks.Notify(ch), Limits: bc.lim,
					Msg: Message{Channel: ch, TS: 1700000000000, Data: benchData}}
			}
			b.ReportAllocs()
			for b.Loop() {
				if _, err := s.Append(ctx, as); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/append")
		})
	}
}

// BenchmarkBatcher is one publish's append through the Batcher the
// ingress uses (4 pipelines at once, 256 appends each): serially, a
// pipeline per append, and from 8 callers per CPU, whose appends share
// pipelines. It measures the leader handoff and request pooling on top of
// BenchmarkAppend's round trip. A pipeline's own allocations are shared
// by its appends, so allocs/op in parallel moves with appends/pipeline,
// which timing decides.
func BenchmarkBatcher(b *testing.B) {
	rdb, prefix := redistest.Client(b)
	pipelines := &pipelineCount{}
	rdb.AddHook(pipelines)
	ks := keys.Scheme{Prefix: prefix}
	bt := NewBatcher(NewStore(rdb), 5*time.Second, 4, 256)
	ctx := context.Background()
	as := []Append{{Stream: ks.Stream("bench"), Notify: ks.Notify("bench"),
		Limits: Limits{MaxLen: 1000, MaxAgeMS: 86400000, TTLMS: 86400000},
		Msg:    Message{Channel: "bench", TS: 1700000000000, Data: benchData}}}
	b.Run("serial", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := bt.Append(ctx, as); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("parallel", func(b *testing.B) {
		b.ReportAllocs()
		b.SetParallelism(8)
		start := pipelines.n.Load()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if _, err := bt.Append(ctx, as); err != nil {
					b.Error(err)
					return
				}
			}
		})
		b.ReportMetric(float64(b.N)/float64(pipelines.n.Load()-start), "appends/pipeline")
	})
}

// pipelineCount counts the pipelines its client sends.
type pipelineCount struct{ n atomic.Int64 }

func (h *pipelineCount) DialHook(next redis.DialHook) redis.DialHook          { return next }
func (h *pipelineCount) ProcessHook(next redis.ProcessHook) redis.ProcessHook { return next }
func (h *pipelineCount) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		h.n.Add(1)
		return next(ctx, cmds)
	}
}

// BenchmarkResume reads and decodes a batch of 100 stream entries, as a
// replay and a catch-up do.
func BenchmarkResume(b *testing.B) {
	rdb, prefix := redistest.Client(b)
	ks := keys.Scheme{Prefix: prefix}
	s := NewStore(rdb)
	ctx := context.Background()
	a := Append{Stream: ks.Stream("hist"), Notify: ks.Notify("hist"), Msg: Message{Channel: "hist", TS: 1700000000000, Data: benchData}}
	as := make([]Append, 100)
	for i := range as {
		as[i] = a
	}
	if _, err := s.Append(ctx, as); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		r, err := s.Resume(ctx, a.Stream, Zero, 100)
		if err != nil || len(r.Entries) != 100 || !r.Continuous {
			b.Fatal(len(r.Entries), r.Continuous, err)
		}
	}
}
