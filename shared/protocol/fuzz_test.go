package protocol

import (
	"encoding/json"
	"errors"
	"testing"
)

// FuzzDecode: no frame panics the decoder or makes it loop; a refused
// request carries an ErrFrame with a code, and only invalid_json ends the
// frame; an accepted one has a known type and a short ref; a frame of n
// bytes holds at most n/2+1 requests (the shortest is "{}"); an error
// carries no ref but a short string or number.
func FuzzDecode(f *testing.F) {
	for _, s := range []string{
		`{"type":"subscribe","channel":"chat:1","ref":1}`, `{"type":"subscribe","channel":"a","after":"1700000000000-0"}`,
		`{"type":"unsubscribe","channel":"a","ref":"x"}`, `{"type":"ping"}`, `{"type":"refresh","token":"a.b.c"}`,
		`{"type":"nope"}`, `{}`, `[]`, `{"type":1}`, `{"type":"ping"} {}`, `{"type":"ping","ref":{"a":1}}`, ``, `null`,
		"{\"type\":\"ping\",\"ref\":1}\n{\"type\":\"subscribe\",\"channel\":\"a\"}\n", `{"type":"ping"}}`, `{"type":"ping"} {"type":`, `{"type":5,"ref":{"a":1}}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		fr := NewFrame(b)
		n := 0
		for fr.More() {
			if n++; n > len(b)/2+1 {
				t.Fatalf("%d requests in %d bytes", n, len(b))
			}
			r, err := fr.Next()
			if err != nil {
				var ef *ErrFrame
				if !errors.As(err, &ef) || ef.Code == "" {
					t.Fatalf("error %v is not an ErrFrame", err)
				}
				if ef.Code == CodeInvalidJSON && fr.More() {
					t.Fatalf("%v, and More is %v", err, fr.More())
				}
				// The error reply echoes the ref: only a valid one.
				if len(r.Ref) > 64 || (len(r.Ref) > 0 && (!json.Valid(r.Ref) || r.Ref[0] == '{' || r.Ref[0] == '[')) {
					t.Fatalf("%v carries ref %q", err, r.Ref)
				}
				continue
			}
			switch r.Type {
			case TypeSubscribe, TypeUnsubscribe, TypePing, TypeRefresh:
			default:
				t.Fatalf("accepted type %q", r.Type)
			}
			if len(r.Ref) > 64 || (len(r.Ref) > 0 && !json.Valid(r.Ref)) {
				t.Fatalf("accepted ref %q", r.Ref)
			}
		}
	})
}
