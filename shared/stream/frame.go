package stream

import (
	"encoding/json"
	"strconv"
	"strings"
)

// Route says to whom an entry goes. Channel entries have the empty route;
// entries of an instance inbox name their target.
type Route string

// Route kinds, as the first byte of a Route.
const (
	RouteConnection = 'c' // "c:<connection id>": one connection
	RouteUser       = 'u' // "u:<user>": every connection of the user
	RouteDisconnect = 'x' // "x:<connection id>": close that connection
	RouteProbe      = 'p' // "p:": a liveness probe of the egress read path
)

// ToConnection routes a message to one connection.
func ToConnection(id string) Route { return Route("c:" + id) }

// ToUser routes a message to every connection of user.
func ToUser(user string) Route { return Route("u:" + user) }

// Disconnect asks the egress to close connection id.
func Disconnect(id string) Route { return Route("x:" + id) }

// Kind returns the route's kind byte, or 0 for a channel route.
func (r Route) Kind() byte {
	if len(r) < 2 || r[1] != ':' {
		return 0
	}
	return r[0]
}

// Target is the route's connection id or user.
func (r Route) Target() string {
	if r.Kind() == 0 {
		return ""
	}
	return string(r[2:])
}

// Message is what a publisher sends: the fields of a "message" frame other
// than the id, which Redis assigns.
type Message struct {
	Channel string          // empty for targeted messages
	Route   Route           // empty for channel messages
	Event   string          // validated: printable, no quote or backslash
	From    string          // validated user id or empty
	TS      int64           // publish time, unix milliseconds
	Data    json.RawMessage // valid JSON
}

// Frame splits the message's "message" frame around its id, so that the
// frame can be completed inside Redis once the id is known:
// head + id + tail is the complete JSON frame.
//
// The names that go in unescaped are validated by package channel (their
// alphabet needs no JSON escaping), and Data is valid JSON.
func (m *Message) Frame() (head, tail string) {
	var b strings.Builder
	b.Grow(64 + len(m.Channel))
	b.WriteString(`{"type":"message",`)
	switch m.Route.Kind() {
	case RouteConnection:
		b.WriteString(`"target":"connection",`)
	case RouteUser:
		b.WriteString(`"target":"user",`)
	default:
		b.WriteString(`"channel":"`)
		b.WriteString(m.Channel)
		b.WriteString(`",`)
	}
	b.WriteString(`"id":"`)
	head = b.String()

	var t strings.Builder
	t.Grow(48 + len(m.Event) + len(m.From) + len(m.Data))
	t.WriteByte('"')
	if m.Event != "" {
		t.WriteString(`,"event":"`)
		t.WriteString(m.Event)
		t.WriteByte('"')
	}
	if m.From != "" {
		t.WriteString(`,"from":"`)
		t.WriteString(m.From)
		t.WriteByte('"')
	}
	t.WriteString(`,"ts":`)
	t.WriteString(strconv.FormatInt(m.TS, 10))
	t.WriteString(`,"data":`)
	if len(m.Data) == 0 {
		t.WriteString("null")
	} else {
		t.Write(m.Data)
	}
	t.WriteByte('}')
	return head, t.String()
}

// Decoded is a "message" frame read back, for history and tests.
type Decoded struct {
	Type    string          `json:"type,omitempty"`
	Channel string          `json:"channel,omitempty"`
	Target  string          `json:"target,omitempty"`
	ID      string          `json:"id"`
	Event   string          `json:"event,omitempty"`
	From    string          `json:"from,omitempty"`
	TS      int64           `json:"ts"`
	Data    json.RawMessage `json:"data"`
}
