package jsondepth

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

	"github.com/wsrelay/wsrelay/shared/testkit"
)

func TestExceeds(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		b     string
		limit int
		want  bool
	}{
		{`1`, 0, false},
		{`[]`, 0, true},
		{`[]`, 1, false},
		{`[[1],[2],{"a":[3]}]`, 3, false},
		{`[[1],[2],{"a":[3]}]`, 2, true},
		{strings.Repeat("[", 64) + strings.Repeat("]", 64), 64, false},
		{strings.Repeat("[", 65) + strings.Repeat("]", 65), 64, true},
		// Brackets in strings, escaped quotes among them, close and open none.
		{`"` + strings.Repeat("[{", 100) + `"`, 3, false},
		{`[` + strings.Repeat(`"\"[",`, 100) + `1]`, 1, false},
		{strings.Repeat(`{"s":"]}\"]","x":`, 3) + "1" + strings.Repeat("}", 3), 2, true},
		{strings.Repeat(`{"s":"]}\"]","x":`, 3) + "1" + strings.Repeat("}", 3), 3, false},
		{`"\\"`, 0, false},
	} {
		if got := Exceeds([]byte(tc.b), tc.limit); got != tc.want {
			t.Errorf("Exceeds(%.40q, %d) = %v, want %v", tc.b, tc.limit, got, tc.want)
		}
	}
}

// FuzzExceeds: Exceeds agrees with encoding/json's reading of the depth.
func FuzzExceeds(f *testing.F) {
	for _, s := range []string{`[[[1]]]`, `{"a":[{"b":"[[["}]}`, `["\"[[[", [[[]]]]`, `"\\"`} {
		f.Add([]byte(s), 2, 3)
	}
	f.Fuzz(func(t *testing.T, b []byte, wrap, limit int) {
		limit = max(0, min(limit, 128))
		wrap = max(0, min(wrap, 2*limit+2))
		b = append(append(bytes.Repeat([]byte("["), wrap), b...), bytes.Repeat([]byte("]"), wrap)...)
		if !json.Valid(b) {
			return
		}
		if got, want := Exceeds(b, limit), testkit.JSONDepth(b) > limit; got != want {
			t.Fatalf("Exceeds(%q, %d) = %v, depth %d", b, limit, got, testkit.JSONDepth(b))
		}
	})
}
