package stream

import (
	"math"
	"strconv"
	"strings"
)

// ID is a Redis stream entry id, <milliseconds>-<sequence>. Message ids
// handed to clients are stream entry ids of the channel's stream.
type ID struct {
	MS, Seq uint64
}

// Zero is the id before every entry ("0-0").
var Zero ID

// Max is the greatest stream id, 18446744073709551615-18446744073709551615.
var Max = ID{MS: math.MaxUint64, Seq: math.MaxUint64}

// ParseID parses "<ms>-<seq>" (or "<ms>", meaning seq 0). It rejects
// anything else, so a parsed id is always safe to pass to Redis.
func ParseID(s string) (ID, bool) {
	if s == "" || len(s) > 41 {
		return ID{}, false
	}
	msPart, seqPart, hasSeq := strings.Cut(s, "-")
	ms, err := strconv.ParseUint(msPart, 10, 64)
	if err != nil || msPart[0] == '+' {
		return ID{}, false
	}
	var seq uint64
	if hasSeq {
		if seqPart == "" || seqPart[0] == '+' {
			return ID{}, false
		}
		seq, err = strconv.ParseUint(seqPart, 10, 64)
		if err != nil {
			return ID{}, false
		}
	}
	return ID{MS: ms, Seq: seq}, true
}

// MustParseID is ParseID for ids that came from Redis.
func MustParseID(s string) ID {
	id, _ := ParseID(s)
	return id
}

// Compare returns -1, 0 or +1 as a is before, equal to or after b.
func (a ID) Compare(b ID) int {
	switch {
	case a.MS < b.MS:
		return -1
	case a.MS > b.MS:
		return 1
	case a.Seq < b.Seq:
		return -1
	case a.Seq > b.Seq:
		return 1
	}
	return 0
}

// Less reports whether a comes before b.
func (a ID) Less(b ID) bool { return a.Compare(b) < 0 }

// IsZero reports whether a is 0-0.
func (a ID) IsZero() bool { return a == ID{} }

func (a ID) String() string {
	return strconv.FormatUint(a.MS, 10) + "-" + strconv.FormatUint(a.Seq, 10)
}
