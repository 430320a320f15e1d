package protocol

import (
	"errors"
	"testing"
)

// TestDecodeCodes: each kind of bad frame gets the error code protocol.md
// gives it.
func TestDecodeCodes(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		frame, code string // code "" means valid
	}{
		{`{"type":"subscribe","channel":"a"}`, ""},
		{` {"type":"ping"}`, ""},
		{`not json`, CodeInvalidJSON},
		{``, CodeInvalidJSON},
		{`null`, CodeInvalidJSON},
		{`[1,2]`, CodeInvalidJSON},
		{`"subscribe"`, CodeInvalidJSON},
		{`1`, CodeInvalidJSON},
		{`{"type":"ping"} {}`, CodeInvalidJSON},
		{`{"type":"subscribe","channel":42}`, CodeInvalidFrame},
		{`{"channel":"a"}`, CodeInvalidFrame},
		{`{"type":"ping","ref":{"a":1}}`, CodeInvalidFrame},
	} {
		_, err := Decode([]byte(tc.frame))
		var ef *ErrFrame
		switch {
		case tc.code == "" && err != nil:
			t.Errorf("%s: %v, want valid", tc.frame, err)
		case tc.code != "" && (!errors.As(err, &ef) || ef.Code != tc.code):
			t.Errorf("%s: %v, want code %s", tc.frame, err, tc.code)
		}
	}
}
