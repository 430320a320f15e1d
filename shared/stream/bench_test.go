package stream

import (
	"bytes"
	"context"
	"encoding/json"
	"strconv"
	"strings"
	"testing"

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
