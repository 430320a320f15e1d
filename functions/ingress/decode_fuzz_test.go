package main

import (
	"bytes"
	"encoding/json"
	"testing"
	"unicode/utf8"

	"github.com/wsrelay/wsrelay/shared/channel"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// FuzzDecodeMessage: no body panics the decoder; an accepted one has
// valid JSON data, a valid event and from.
func FuzzDecodeMessage(f *testing.F) {
	for _, s := range []string{
		`{"data":{"text":"hi"},"event":"chat","from":"u1"}`, `{"data":1}`, `{"data":null}`, `{}`, `[]`, ``, `{"data":"x","event":"a\"b"}`,
		`{"data":1,"from":"a b"}`, `{"data":[[{"a":"[\"{"}]]}`, `{"data":1,"event":null,"from":null}`, `{"data":1}{"data":2}`, `  {"data":[1,2,{"a":"\u0000"}]}  `,
	} {
		f.Add([]byte(s), false)
		f.Add([]byte(s), true)
	}
	f.Add([]byte(`{"channel":"chat:1","data":1}`), true)
	f.Add([]byte(`{"channel":null,"data":{ "a" : [ 1, "x y" ] }}`), true)
	f.Fuzz(func(t *testing.T, b []byte, withChannel bool) {
		p, ae := decodeMessage(b, withChannel)
		if ae != nil {
			if ae.Status != 400 || ae.Code == "" {
				t.Fatalf("bad error %+v", ae)
			}
			return
		}
		if !json.Valid(p.Data) || string(p.Data) == "null" || !channel.ValidEvent(p.Event) || (p.From != "" && !channel.ValidUser(p.From)) {
			t.Fatalf("accepted %q as %+v", b, p)
		}
		if testkit.JSONDepth(p.Data) > maxDataDepth {
			t.Fatalf("accepted data %q nested deeper than %d", p.Data, maxDataDepth)
		}
		if withChannel && !channel.ValidName(p.Channel) {
			t.Fatalf("accepted channel %q", p.Channel)
		}
		// Data goes into a one-line frame: compact, whichever path.
		var c bytes.Buffer
		if err := json.Compact(&c, p.Data); err != nil || c.String() != string(p.Data) {
			t.Fatalf("data %q of %q is not compact", p.Data, b)
		}
	})
}

// FuzzDecodeBatch: no body panics; an accepted batch respects the limits.
func FuzzDecodeBatch(f *testing.F) {
	for _, s := range []string{
		`{"messages":[{"channel":"a","data":1},{"channel":"b.c:d","data":{"x":[1]}}]}`, `{"messages":[]}`, `{"messages":{}}`,
		`{"messages":[{"data":1}]}`, `{"messages":null}`, `{"messages":[1]}`, `{`, `{"messages":[{"channel":"a","data":1}],"x":1}`,
		"{\"x\":\"\xff\",\"messages\":[{\"channel\":\"a\",\"data\":1}]}",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		items, err := decodeBatch(b, 3, 128, nil)
		if err != nil {
			return
		}
		if len(items) == 0 || len(items) > 3 {
			t.Fatalf("%d items accepted", len(items))
		}
		if !utf8.Valid(b) {
			t.Fatalf("accepted %q, which is not UTF-8", b)
		}
		for _, it := range items {
			if !channel.ValidName(it.Channel) || !json.Valid(it.Data) {
				t.Fatalf("accepted %+v", it)
			}
		}
	})
}
