package stream

import (
	"math"
	"strconv"
	"strings"
	"testing"
)

func TestParseID(t *testing.T) {
	t.Parallel()
	maxU := strconv.FormatUint(math.MaxUint64, 10)
	for _, tc := range []struct {
		in   string
		want ID
		ok   bool
	}{
		{"0-0", Zero, true},
		{"0", Zero, true},
		{"1700000000000-5", ID{1700000000000, 5}, true},
		{"1700000000000", ID{1700000000000, 0}, true},
		{maxU + "-" + maxU, ID{math.MaxUint64, math.MaxUint64}, true},
		{"", ID{}, false},
		{"-", ID{}, false},
		{"1-", ID{}, false},
		{"-1", ID{}, false},
		{"+1-0", ID{}, false},
		{"1-+0", ID{}, false},
		{"1--1", ID{}, false},
		{"1-2-3", ID{}, false},
		{"a-1", ID{}, false},
		{"1-b", ID{}, false},
		{" 1-1", ID{}, false},
		{"1-1 ", ID{}, false},
		{"1.5-0", ID{}, false},
		{"$", ID{}, false},
		{"*", ID{}, false},
		{"+", ID{}, false},
		{"(1-0", ID{}, false},
		{maxU + "0-0", ID{}, false}, // overflows
		{"0-" + maxU + "0", ID{}, false},
		{"000000000000000000000000000000000000000001-0", ID{}, false}, // too long
	} {
		got, ok := ParseID(tc.in)
		if ok != tc.ok || got != tc.want {
			t.Errorf("ParseID(%q) = %v, %v; want %v, %v", tc.in, got, ok, tc.want, tc.ok)
		}
		if ok {
			// String is the canonical text: the input, with "-0" when it
			// has no sequence; and it parses back to the same id.
			text := tc.in
			if !strings.Contains(text, "-") {
				text += "-0"
			}
			if got.String() != text {
				t.Errorf("ParseID(%q).String() = %q, want %q", tc.in, got.String(), text)
			}
			if back, _ := ParseID(got.String()); back != got {
				t.Errorf("round trip of %v = %v", got, back)
			}
		}
	}
}

func TestIDCompare(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		a, b ID
		want int
	}{
		{Zero, Zero, 0},
		{Zero, ID{0, 1}, -1},
		{ID{1, 0}, ID{0, 99}, 1},
		{ID{5, 3}, ID{5, 3}, 0},
		{ID{5, 3}, ID{5, 4}, -1},
		{ID{5, 4}, ID{5, 3}, 1},
		{ID{4, math.MaxUint64}, ID{5, 0}, -1},
		{ID{math.MaxUint64, 0}, ID{1, math.MaxUint64}, 1},
	} {
		if got := tc.a.Compare(tc.b); got != tc.want {
			t.Errorf("%v.Compare(%v) = %d, want %d", tc.a, tc.b, got, tc.want)
		}
		if got := tc.b.Compare(tc.a); got != -tc.want {
			t.Errorf("%v.Compare(%v) = %d, want %d", tc.b, tc.a, got, -tc.want)
		}
		if tc.a.Less(tc.b) != (tc.want < 0) {
			t.Errorf("%v.Less(%v) wrong", tc.a, tc.b)
		}
	}
	if !Zero.IsZero() || (ID{0, 1}).IsZero() || Zero.String() != "0-0" || (ID{12, 3}).String() != "12-3" {
		t.Error("IsZero/String")
	}
	if MustParseID("junk") != Zero {
		t.Error("MustParseID of junk is not Zero")
	}
}
