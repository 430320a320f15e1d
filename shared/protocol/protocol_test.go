package protocol

import (
	"errors"
	"strings"
	"testing"
)

// decodeAll reads every request of frame: for each, its type, or its
// error code when refused.
func decodeAll(frame string) []string {
	var got []string
	f := NewFrame([]byte(frame))
	for f.More() {
		r, err := f.Next()
		var ef *ErrFrame
		switch {
		case err == nil:
			got = append(got, r.Type+string(r.Ref))
		case errors.As(err, &ef):
			got = append(got, ef.Code+string(r.Ref))
		default:
			got = append(got, "not an ErrFrame: "+err.Error())
		}
	}
	return got
}

// TestDecodeCodes: each kind of bad frame gets the error code protocol.md
// gives it.
func TestDecodeCodes(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		frame, code string // code "" means valid
	}{
		{`{"type":"subscribe","channel":"a"}`, ""},
		{` {"type":"ping"}`, ""},
		{"{\n  \"type\": \"ping\",\n  \"ref\": 1\n}\n", ""},
		{`not json`, CodeInvalidJSON},
		{``, CodeInvalidJSON},
		{" \n", CodeInvalidJSON},
		{`null`, CodeInvalidJSON},
		{`[1,2]`, CodeInvalidJSON},
		{`"subscribe"`, CodeInvalidJSON},
		{`1`, CodeInvalidJSON},
		{`{"type":"ping"`, CodeInvalidJSON},
		{`{"type":"subscribe","channel":42}`, CodeInvalidFrame},
		{`{"channel":"a"}`, CodeInvalidFrame},
		{`{"type":"ping","ref":{"a":1}}`, CodeInvalidFrame},
		{`{"type":"nope"}`, CodeUnknownType},
	} {
		got := decodeAll(tc.frame)
		want := tc.code
		if want == "" {
			want = "subscribe"
			if strings.Contains(tc.frame, "ping") {
				want = "ping"
			}
		}
		if len(got) != 1 || !strings.HasPrefix(got[0], want) {
			t.Errorf("%q: %q, want one %s", tc.frame, got, want)
		}
	}
}

// TestFrameOfSeveral: a frame holds requests one after another, each
// decoded (or refused) as if alone; broken JSON ends the frame.
func TestFrameOfSeveral(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		frame string
		want  []string
	}{
		{`{"type":"ping","ref":1}{"type":"ping","ref":2}`, []string{"ping1", "ping2"}},
		{"{\"type\":\"ping\",\"ref\":1}\n{\"type\":\"subscribe\",\"channel\":\"a\",\"ref\":\"x\"}\n", []string{"ping1", `subscribe"x"`}},
		{" {\"type\":\"ping\"} \r\n\t {\"type\":\"ping\"}  ", []string{"ping", "ping"}},
		// well-formed but invalid: its error, and the frame goes on
		{`{"type":"ping","ref":1} {"type":"nope","ref":2} {"type":"ping","ref":3}`, []string{"ping1", "unknown_type2", "ping3"}},
		{`{"type":"subscribe","channel":42,"ref":1} {"type":"ping","ref":2}`, []string{"invalid_frame1", "ping2"}},
		{`{"type":"ping","ref":{"a":1}} {"type":"ping","ref":2}`, []string{"invalid_frame", "ping2"}},
		{`{"type":"ping"} {}`, []string{"ping", "invalid_frame"}},
		// broken: the rest is dropped
		{`{"type":"ping","ref":1} {"type":"ping",,} {"type":"ping","ref":3}`, []string{"ping1", "invalid_json"}},
		{`{"type":"ping","ref":1} [1] {"type":"ping","ref":3}`, []string{"ping1", "invalid_json"}},
		{`{"type":"ping","ref":1}}`, []string{"ping1", "invalid_json"}},
		{`{"type":"ping","ref":1} null`, []string{"ping1", "invalid_json"}},
		{`{"type":"ping" {"type":"ping"}`, []string{"invalid_json"}},
	} {
		if got := decodeAll(tc.frame); strings.Join(got, " ") != strings.Join(tc.want, " ") {
			t.Errorf("%q: %q, want %q", tc.frame, got, tc.want)
		}
	}
	// The message says what was dropped.
	f := NewFrame([]byte(`{"type":"ping"} {"type":`))
	_, _ = f.Next()
	if _, err := f.Next(); err == nil || !strings.Contains(err.Error(), "request 2") || !strings.Contains(err.Error(), "rest of the frame") {
		t.Errorf("broken second request: %v", err)
	}
	if f.More() {
		t.Error("More after broken JSON")
	}
}

// TestErrorRef: an error carries the request's ref when it is one (a
// string or number of at most 64 bytes), so the client can match it, and
// no ref otherwise, whichever error it is: the server echoes it.
func TestErrorRef(t *testing.T) {
	t.Parallel()
	long := `"` + strings.Repeat("x", 70) + `"`
	for _, tc := range []struct {
		frame string
		want  []string
	}{
		{`{"type":5,"ref":7}`, []string{"invalid_frame7"}},
		{`{"type":"nope","ref":"a"}`, []string{`unknown_type"a"`}},
		{`{"type":5,"ref":{"a":1}}`, []string{"invalid_frame"}},
		{`{"type":5,"ref":[1,2]}`, []string{"invalid_frame"}},
		{`{"type":5,"ref":` + long + `}`, []string{"invalid_frame"}},
		{`{"ref":true,"channel":1}`, []string{"invalid_frame"}},
		{`{"type":"ping","ref":1} {"ref":{"x":1},"type":5}`, []string{"ping1", "invalid_frame"}},
		{`{"type":"nope","ref":{"a":1}}`, []string{"invalid_frame"}},
	} {
		if got := decodeAll(tc.frame); strings.Join(got, " ") != strings.Join(tc.want, " ") {
			t.Errorf("%q: %q, want %q", tc.frame, got, tc.want)
		}
	}
}
