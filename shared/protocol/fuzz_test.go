package protocol

import (
	"encoding/json"
	"errors"
	"testing"
)

// FuzzDecode: no frame panics the decoder; a refused one carries an
// ErrFrame with a code; an accepted one has a known type and a short ref.
func FuzzDecode(f *testing.F) {
	for _, s := range []string{
		`{"type":"subscribe","channel":"chat:1","ref":1}`, `{"type":"subscribe","channel":"a","after":"1700000000000-0"}`,
		`{"type":"unsubscribe","channel":"a","ref":"x"}`, `{"type":"ping"}`, `{"type":"refresh","token":"a.b.c"}`,
		`{"type":"nope"}`, `{}`, `[]`, `{"type":1}`, `{"type":"ping"} {}`, `{"type":"ping","ref":{"a":1}}`, ``, `null`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := Decode(b)
		if err != nil {
			var ef *ErrFrame
			if !errors.As(err, &ef) || ef.Code == "" {
				t.Fatalf("error %v is not an ErrFrame", err)
			}
			return
		}
		switch r.Type {
		case TypeSubscribe, TypeUnsubscribe, TypePing, TypeRefresh:
		default:
			t.Fatalf("accepted type %q", r.Type)
		}
		if len(r.Ref) > 64 || (len(r.Ref) > 0 && !json.Valid(r.Ref)) {
			t.Fatalf("accepted ref %q", r.Ref)
		}
	})
}
