package delivery

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/wsrelay/wsrelay/shared/client"
	"github.com/wsrelay/wsrelay/shared/stream"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

func id(ms uint64) stream.ID { return stream.ID{MS: ms} }

// published is a channel's log with seq n acknowledged as id 1001+n.
func published(t *testing.T, n int) *Log {
	t.Helper()
	l := NewLog()
	for seq := range n {
		if err := l.Ack(seq, id(uint64(1001+seq)).String()); err != nil {
			t.Fatal(err)
		}
	}
	return l
}

func msg(seq int) event { return event{message: true, id: id(uint64(1001 + seq)), seq: seq} }

func subscribed(ms uint64, recovered bool) event {
	return event{id: id(ms), seq: -1, recovered: recovered}
}

// The checker finds a message lost and one delivered twice, and lets
// through only what a resume said it lost (recovered:false), and a
// closed chain's tail.
func TestCheck(t *testing.T) {
	five := published(t, 5)
	// seq 2 acknowledged below seq 1: two publishes at once.
	crossed := NewLog()
	for seq, ms := range []uint64{1001, 1003, 1002} {
		if err := crossed.Ack(seq, id(ms).String()); err != nil {
			t.Fatal(err)
		}
	}
	withFailure := published(t, 5)
	withFailure.Fail(5, errors.New("timed out"))
	for _, c := range []struct {
		name     string
		log      *Log // five when nil
		events   []event
		closed   bool
		dups     []string // dropped by the client (Handler.OnDuplicate)
		notFull  bool
		want     []string // substrings of the problems, in order
		wantGaps int
	}{
		{name: "whole", events: []event{subscribed(1000, true), msg(0), msg(1), msg(2), msg(3), msg(4)}},
		// The client drops a duplicate before the chain sees it as a
		// message: only its report shows it.
		{name: "duplicate the client dropped",
			events: []event{subscribed(1000, true), msg(0), msg(1), msg(2), msg(3), msg(4)},
			dups:   []string{"message 1002-0 sent again or out of order after 1003-0 (dropped by the client)"},
			want:   []string{"1002-0 sent again or out of order"}},
		{name: "not full: no duplicate the client dropped",
			events: []event{subscribed(1000, true), msg(0), msg(1), msg(2), msg(3), msg(4)}, notFull: true,
			dups: []string{"message 1002-0 sent again or out of order after 1003-0 (dropped by the client)"}},
		{name: "gap and duplicate",
			events: []event{subscribed(1000, true), msg(0), msg(1), msg(3), msg(3), msg(4)},
			want:   []string{"duplicate or out of order", "seq 3 delivered twice", "1 acknowledged messages of 5 owed not delivered, the first seq 2"}},
		{name: "not full: only what is owed",
			events: []event{subscribed(1000, true), msg(0), msg(1), msg(3), msg(3), msg(4)}, notFull: true,
			want: []string{"1 acknowledged messages of 5 owed not delivered, the first seq 2"}},
		{name: "resumed without its gap",
			events: []event{subscribed(1000, true), msg(0), subscribed(1001, true), msg(1), msg(3), msg(4)},
			want:   []string{"1 acknowledged messages of 5 owed not delivered"}},
		{name: "gap reported recovered:false",
			events:   []event{subscribed(1000, true), msg(0), subscribed(1003, false), msg(3), msg(4)},
			wantGaps: 1},
		{name: "recovered:false at a position no publish wrote",
			events: []event{subscribed(1000, true), msg(0), subscribed(1500, false)},
			want:   []string{"recovered:false at position 1500-0, which no publish wrote"}, wantGaps: 1},
		{name: "recovered:false at a position a failed publish may have written",
			log:    withFailure,
			events: []event{subscribed(1000, true), msg(0), subscribed(1500, false)}, wantGaps: 1},
		{name: "recovered:false that goes back",
			events: []event{subscribed(1000, true), msg(0), msg(1), subscribed(1001, false), msg(2), msg(3), msg(4)},
			want:   []string{"recovered:false with position 1001-0, not after the id held 1002-0"}, wantGaps: 1},
		{name: "recovered:true that moves the position",
			events: []event{subscribed(1000, true), msg(0), subscribed(1002, true), msg(2), msg(3), msg(4)},
			want:   []string{"recovered:true moved the position", "1 acknowledged messages of 5 owed"}},
		{name: "tail of an open chain", events: []event{subscribed(1000, true), msg(0), msg(1)},
			want: []string{"3 acknowledged messages of 5 owed not delivered"}},
		{name: "tail of a closed chain", events: []event{subscribed(1000, true), msg(0), msg(1)}, closed: true},
		{name: "a hole in a closed chain", events: []event{subscribed(1000, true), msg(0), msg(2)}, closed: true,
			want: []string{"1 acknowledged messages of 3 owed not delivered"}},
		{name: "never published", events: []event{subscribed(1000, true), msg(0), {message: true, id: id(1500), seq: 9}},
			want: []string{"seq 9, which was never published", "4 acknowledged messages of 5 owed"}},
		{name: "delivered under another id", events: []event{subscribed(1000, true), msg(0), {message: true, id: id(1002), seq: 2}},
			want: []string{"seq 2 delivered as 1002-0, acknowledged as 1003-0", "3 acknowledged messages of 5 owed"}},
		// Channel y's seq 1 under the id channel x gave its own seq 1,
		// in place of x's: only its "ch" tells them apart.
		{name: "a message of another channel",
			events: []event{subscribed(1000, true), msg(0), {message: true, id: id(1002), seq: 1, ch: "y"}, msg(2), msg(3), msg(4)},
			want:   []string{`message 1002-0 (seq 1) of channel "y" delivered on "x"`, "1 acknowledged messages of 5 owed not delivered, the first seq 1"}},
		{name: "an id that is not a stream id",
			events: []event{subscribed(1000, true), msg(0), msg(1), {message: true, id: stream.Max, badID: "x", seq: 2}, msg(2), msg(3), msg(4)},
			want:   []string{`message with id "x" (seq 2), not a stream id`}},
		{name: "never subscribed", want: []string{"never subscribed"}},
		{name: "closed before the server answered", closed: true},
		{name: "a message first", events: []event{msg(0), subscribed(1001, true)},
			want: []string{"no subscribed reply before the first message"}},
		{name: "subscribed without a position", events: []event{subscribed(1000, true), msg(0), {id: stream.Max, seq: -1, recovered: true}, msg(1), msg(2), msg(3), msg(4)},
			want: []string{"subscribed without a position"}},
		{name: "acknowledged ids that do not rise", log: crossed,
			events: []event{subscribed(1000, true), msg(0), {message: true, id: id(1002), seq: 2}, {message: true, id: id(1003), seq: 1}},
			want:   []string{"seq 2 acknowledged as 1002-0, not after 1003-0"}},
		{name: "not full: acknowledged ids that do not rise", log: crossed, notFull: true,
			events: []event{subscribed(1000, true), msg(0), {message: true, id: id(1002), seq: 2}, {message: true, id: id(1003), seq: 1}}},
	} {
		t.Run(c.name, func(t *testing.T) {
			l := c.log
			if l == nil {
				l = five
			}
			ch := &Chain{channel: "x", events: c.events, closed: c.closed, dups: c.dups}
			problems, gaps := ch.Check(l, !c.notFull)
			if len(problems) != len(c.want) {
				t.Fatalf("problems %q, want %d like %q", problems, len(c.want), c.want)
			}
			for i, w := range c.want {
				if !strings.Contains(problems[i], w) {
					t.Errorf("problem %d is %q, want it to say %q", i, problems[i], w)
				}
			}
			if len(gaps) != c.wantGaps {
				t.Errorf("gaps %q, want %d", gaps, c.wantGaps)
			}
		})
	}
}

// An acknowledgement whose id is not a stream id is refused, not
// recorded.
func TestLogAck(t *testing.T) {
	l := NewLog()
	if err := l.Ack(0, "nope"); err == nil || !strings.Contains(err.Error(), `publish 0 acknowledged with id "nope", not a stream id`) {
		t.Fatalf("Ack of a bad id: %v", err)
	}
	l.Fail(1, errors.New("timed out"))
	if l.Acked() != 0 || len(l.Failed()) != 1 {
		t.Fatalf("acked %d, failed %v", l.Acked(), l.Failed())
	}
}

// TestChainSeesDroppedDuplicates: through a real client, a message the
// server sends twice, or out of order, never reaches the chain as a
// message (the client drops it), yet the chain's Check reports it.
func TestChainSeesDroppedDuplicates(t *testing.T) {
	var wg sync.WaitGroup
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		wg.Add(1)
		defer wg.Done()
		ws, err := (&websocket.Upgrader{}).Upgrade(w, r, nil)
		if err != nil {
			return
		}
		defer ws.Close()
		send := func(f string) { _ = ws.WriteMessage(websocket.TextMessage, []byte(f)) }
		send(`{"type":"welcome","connection_id":"c1","instance":"i"}`)
		var sub struct{ Ref json.RawMessage }
		_ = ws.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, b, err := ws.ReadMessage(); err != nil || json.Unmarshal(b, &sub) != nil {
			return
		}
		send(`{"type":"subscribed","channel":"a","position":"1000-0","ref":` + string(sub.Ref) + `}`)
		for i, ms := range []int{1001, 1002, 1002, 1001} {
			send(fmt.Sprintf(`{"type":"message","channel":"a","id":"%d-0","ts":1,"data":{"seq":%d}}`, ms, min(i, 1)))
		}
		_, _, _ = ws.ReadMessage() // until the client closes
	}))
	t.Cleanup(func() { srv.CloseClientConnections(); srv.Close(); wg.Wait() })
	cl, err := client.Dial(client.Options{URL: "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws"})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ch := NewChain("a", nil)
	if _, err := ch.Subscribe(cl, ""); err != nil {
		t.Fatal(err)
	}
	l := published(t, 2)
	var problems []string
	testkit.Eventually(t, 5*time.Second, func() error {
		problems, _ = ch.Check(l, true)
		if len(problems) != 2 {
			return fmt.Errorf("problems %q, want the two dropped messages", problems)
		}
		return nil
	})
	if ch.Messages() != 2 || !strings.Contains(problems[0], "1002-0 sent again") || !strings.Contains(problems[1], "1001-0 sent again") {
		t.Fatalf("%d messages, problems %q", ch.Messages(), problems)
	}
}

// A message's "ch" names the channel it was published to: another
// channel's is kept for Check, the chain's own or none is not.
func TestChainReadsCh(t *testing.T) {
	ch := NewChain("a", nil)
	for _, data := range []string{`{"seq":0,"ch":"b"}`, `{"seq":1,"ch":"a"}`, `{"seq":2}`} {
		ch.onMessage(client.Message{Channel: "a", ID: "1001-0", Data: json.RawMessage(data)})
	}
	var got []string
	for _, ev := range ch.events {
		got = append(got, ev.ch)
	}
	if want := []string{"b", "", ""}; !slices.Equal(got, want) {
		t.Fatalf("ch %q, want %q", got, want)
	}
}
