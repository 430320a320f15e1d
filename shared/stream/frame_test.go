package stream

import (
	"encoding/json"
	"testing"
)

// Frame's two halves around an id make valid JSON with the message's
// fields, for every route kind.
func TestFrame(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		msg  Message
		want Decoded
	}{
		{"channel", Message{Channel: "room-1", TS: 7, Data: json.RawMessage(`{"a":1}`)},
			Decoded{Type: "message", Channel: "room-1", TS: 7, Data: json.RawMessage(`{"a":1}`)}},
		{"channel with event and from", Message{Channel: "a.b:c@d_e", Event: "chat msg/1 <ok>", From: "alice@x", TS: 8, Data: json.RawMessage(`"s"`)},
			Decoded{Type: "message", Channel: "a.b:c@d_e", Event: "chat msg/1 <ok>", From: "alice@x", TS: 8, Data: json.RawMessage(`"s"`)}},
		{"connection", Message{Route: ToConnection("c-1"), Event: "e", TS: 9, Data: json.RawMessage(`[1,2]`)},
			Decoded{Type: "message", Target: "connection", Event: "e", TS: 9, Data: json.RawMessage(`[1,2]`)}},
		{"user with from", Message{Route: ToUser("bob"), From: "svc", TS: 10, Data: json.RawMessage(`null`)},
			Decoded{Type: "message", Target: "user", From: "svc", TS: 10, Data: json.RawMessage(`null`)}},
		{"no data", Message{Channel: "x", TS: 11},
			Decoded{Type: "message", Channel: "x", TS: 11, Data: json.RawMessage(`null`)}},
		{"unicode data", Message{Channel: "x", TS: 12, Data: json.RawMessage(`"héllo \u2028 ✓"`)},
			Decoded{Type: "message", Channel: "x", TS: 12, Data: json.RawMessage(`"héllo \u2028 ✓"`)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			head, tail := tc.msg.Frame()
			frame := head + "1700000000000-3" + tail
			if !json.Valid([]byte(frame)) {
				t.Fatalf("frame is not JSON: %s", frame)
			}
			var got Decoded
			if err := json.Unmarshal([]byte(frame), &got); err != nil {
				t.Fatal(err)
			}
			tc.want.ID = "1700000000000-3"
			if gj, wj := mustJSON(t, got), mustJSON(t, tc.want); gj != wj {
				t.Fatalf("frame %s\ndecoded %s\nwant    %s", frame, gj, wj)
			}
			// The same frame read back as an Entry decodes the same, minus type.
			e := Entry{ID: "1700000000000-3", Head: head, Tail: tail}
			d, err := e.Decode()
			if err != nil || d.Type != "" || d.ID != e.ID {
				t.Fatalf("Entry.Decode = %+v, %v", d, err)
			}
		})
	}
}

func TestRoute(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		r      Route
		kind   byte
		target string
	}{
		{"", 0, ""},
		{ToConnection("c1"), RouteConnection, "c1"},
		{ToUser("u:1"), RouteUser, "u:1"},
		{Disconnect("c2"), RouteDisconnect, "c2"},
		{"p:", RouteProbe, ""},
		{"c", 0, ""},
		{"ab:x", 0, ""},
	} {
		if tc.r.Kind() != tc.kind || tc.r.Target() != tc.target {
			t.Errorf("Route(%q): kind %q target %q; want %q %q", tc.r, tc.r.Kind(), tc.r.Target(), tc.kind, tc.target)
		}
	}
}

func mustJSON(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
