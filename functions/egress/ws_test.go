package main

import (
	"bytes"
	"io"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/wsrelay/wsrelay/shared/auth"
	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/protocol"
	"github.com/wsrelay/wsrelay/shared/redistest"
)

// TestSCFStatus: each way a connection ends gets the status SCF reports
// for the invocation (docs/protocol.md), and the egress's own timeout
// closes are named for their metric.
func TestSCFStatus(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		code     int
		byServer bool
		status   int
		timeout  string
	}{
		{1000, true, 200, ""},
		{1000, false, 200, ""},
		{1011, true, 200, ""},
		{1010, false, 200, ""},
		{1001, true, 439, ""},     // drain
		{4000, true, 439, "idle"}, // IDLE_TIMEOUT closes before SCF's own cut (455)
		{4001, true, 439, "lifetime"},
		{4002, true, 439, ""},
		{1006, true, 439, ""},  // missed pong, failed write
		{4000, false, 456, ""}, // the client's own 4000 is not our timeout
		{1001, false, 456, ""},
		{1006, false, 456, ""}, // lost, or SCF cut it
	} {
		if got := scfStatus(tc.code, tc.byServer); got != tc.status {
			t.Errorf("scfStatus(%d, by server %v) = %d, want %d", tc.code, tc.byServer, got, tc.status)
		}
		if got := timeoutClose(tc.code, tc.byServer); got != tc.timeout {
			t.Errorf("timeoutClose(%d, by server %v) = %q, want %q", tc.code, tc.byServer, got, tc.timeout)
		}
	}
}

// TestChannelsRepeated: ?channels=a&channels=b,c (what URLSearchParams.append
// writes for a list) is the list a,b,c, with the checks and limits of one
// parameter; before, every channels parameter after the first was ignored.
func TestChannelsRepeated(t *testing.T) {
	t.Parallel()
	t.Run("subscribed to every list", func(t *testing.T) {
		t.Parallel()
		rdb, prefix := redistest.Client(t)
		ks := keys.Scheme{Prefix: prefix}
		e := startEgressOn(t, rdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"})
		ws, _, err := e.dial(t, url.Values{"channels": {"a", "b,c"}}, nil)
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for range 3 {
			got = append(got, next(t, ws, protocol.TypeSubscribed).Channel)
		}
		if strings.Join(got, ",") != "a,b,c" {
			t.Fatalf("subscribed to %v, want a, b, c in order", got)
		}
		for i, ch := range []string{"a", "b", "c"} {
			appendTo(t, rdb, ks, ch, ks.Notify(ch), i)
			if d := nextData(t, ws); d != strconv.Itoa(i) {
				t.Fatalf("from %s: message %s, want %d", ch, d, i)
			}
		}
	})
	// The merged list is checked as one list: one bad name in any of them
	// refuses the upgrade, a name twice is answered as twice in one list,
	// and more names than MAX_SUBSCRIPTIONS refuse it as in one list.
	t.Run("checked as one list", func(t *testing.T) {
		t.Parallel()
		e := startSecEgress(t, map[string]string{"ALLOW_ANONYMOUS": "true", "MAX_SUBSCRIPTIONS": "2"})
		for _, tc := range []struct {
			q    url.Values
			code string
		}{
			{url.Values{"channels": {"a", "-b"}}, protocol.CodeInvalidChannel},
			{url.Values{"channels": {"a", ""}}, protocol.CodeInvalidChannel},
			{url.Values{"channels": {"a,b,c"}}, protocol.CodeTooManySubs},
			{url.Values{"channels": {"a,b", "c"}}, protocol.CodeTooManySubs},
			{url.Values{"channels": {"a", "b", "c"}}, protocol.CodeTooManySubs},
			{url.Values{"channels": {"a", "a", "a"}}, protocol.CodeTooManySubs},
		} {
			_, resp, err := e.dial(t, tc.q, nil)
			if err == nil || resp == nil || resp.StatusCode != 400 {
				t.Errorf("%s: %v %v, want 400", tc.q.Encode(), err, resp)
				continue
			}
			if b, _ := io.ReadAll(resp.Body); !strings.Contains(string(b), `"`+tc.code+`"`) {
				t.Errorf("%s: body %s, want %s", tc.q.Encode(), b, tc.code)
			}
		}
		for _, tc := range []struct {
			q    url.Values
			want []string // the code answering each name, "" for subscribed
		}{
			{url.Values{"channels": {"a,b"}}, []string{"", ""}},
			{url.Values{"channels": {"a", "b"}}, []string{"", ""}},
			{url.Values{"channels": {"a,a"}}, []string{"", protocol.CodeAlreadySubscribed}},
			{url.Values{"channels": {"a", "a"}}, []string{"", protocol.CodeAlreadySubscribed}},
		} {
			ws, _, err := e.dial(t, tc.q, nil)
			if err != nil {
				t.Fatalf("%s: %v", tc.q.Encode(), err)
			}
			next(t, ws, protocol.TypeWelcome)
			for i, code := range tc.want {
				var r protocol.Reply
				_ = ws.SetReadDeadline(time.Now().Add(time.Second))
				if err := ws.ReadJSON(&r); err != nil {
					t.Errorf("%s: name %d: %v", tc.q.Encode(), i, err)
					break
				}
				if r.Code != code || code == "" && r.Type != protocol.TypeSubscribed {
					t.Errorf("%s: name %d answered %+v, want code %q", tc.q.Encode(), i, r, code)
					break
				}
			}
			ws.Close()
		}
	})
}

// TestQueryRepeatedScalar: a parameter that takes one value, given twice,
// refuses the upgrade with 400 and the parameter's code, instead of the
// first value being taken.
func TestQueryRepeatedScalar(t *testing.T) {
	t.Parallel()
	e := startSecEgress(t, map[string]string{"ALLOW_ANONYMOUS": "true", "JWT_SECRET": testSecret})
	good := token(t, auth.Claims{Subject: "alice", Channels: []string{"*"}})
	for _, tc := range []struct {
		q    url.Values
		code string
	}{
		{url.Values{"token": {good, good}}, "invalid_token"},
		{url.Values{"token": {good, ""}}, "invalid_token"},
		{url.Values{"user": {"dev", "ops"}}, "invalid_user"},
	} {
		_, resp, err := e.dial(t, tc.q, nil)
		if err == nil || resp == nil || resp.StatusCode != 400 {
			t.Errorf("%s: %v %v, want 400", tc.q.Encode(), err, resp)
			continue
		}
		b, _ := io.ReadAll(resp.Body)
		name := strings.SplitN(tc.q.Encode(), "=", 2)[0]
		if !strings.Contains(string(b), `"`+tc.code+`"`) || !strings.Contains(string(b), name+" must be given once") {
			t.Errorf("%s: body %s, want code %s naming %s", tc.q.Encode(), b, tc.code, name)
		}
	}
}

// TestQueryMalformed: a parameter whose pair Go's query parser drops (a
// ';' or a bad %-escape) is refused with its code, not read as absent:
// ?channels=a;b gave a socket with no subscription, ?user=a;b an
// anonymous one without its user.
func TestQueryMalformed(t *testing.T) {
	t.Parallel()
	e := startSecEgress(t, map[string]string{"ALLOW_ANONYMOUS": "true", "JWT_SECRET": testSecret})
	good := token(t, auth.Claims{Subject: "alice", Channels: []string{"*"}})
	for _, tc := range []struct{ query, code string }{
		{"channels=a;b", protocol.CodeInvalidChannel},
		{"channels=a%zz", protocol.CodeInvalidChannel},
		{"user=dev;ops", "invalid_user"},
		{"user=%zz", "invalid_user"},
		{"token=" + good + ";x", "invalid_token"},
	} {
		d := websocket.Dialer{HandshakeTimeout: 5 * time.Second}
		ws, resp, err := d.Dial("ws"+strings.TrimPrefix(e.srv.URL, "http")+"/ws?"+tc.query, nil)
		if ws != nil {
			ws.Close()
		}
		if err == nil || resp == nil || resp.StatusCode != 400 {
			t.Errorf("%s: %v %v, want 400", tc.query, err, resp)
			continue
		}
		if b, _ := io.ReadAll(resp.Body); !strings.Contains(string(b), `"`+tc.code+`"`) || !strings.Contains(string(b), "malformed") {
			t.Errorf("%s: body %s, want code %s", tc.query, b, tc.code)
		}
	}
	// Another parameter's malformed pair is ignored, as unknown ones are.
	d := websocket.Dialer{HandshakeTimeout: 5 * time.Second}
	ws, _, err := d.Dial("ws"+strings.TrimPrefix(e.srv.URL, "http")+"/ws?foo=%zz&channels=a", nil)
	if err != nil {
		t.Fatalf("?foo=%%zz&channels=a: %v", err)
	}
	defer ws.Close()
	if got := next(t, ws, protocol.TypeSubscribed).Channel; got != "a" {
		t.Fatalf("subscribed to %q, want a", got)
	}
}

// TestChannelsLongList: every name of a long ?channels list is answered
// (subscribed, or already_subscribed for a name given again) to a
// client that reads them. The replies were queued all at once, without
// MAX_FRAMES_PER_SECOND to space them out as it does a frame's requests,
// and a list longer than SEND_QUEUE overflowed the queue: the socket was
// closed 4002 (slow consumer) however fast the client read, and its
// client, resuming, was closed again on every connect.
func TestChannelsLongList(t *testing.T) {
	t.Parallel()
	e := startSecEgress(t, map[string]string{"ALLOW_ANONYMOUS": "true", "MAX_SUBSCRIPTIONS": "200", "SEND_QUEUE": "16", "MAX_FRAMES_PER_SECOND": "0"})
	names := slices.Repeat(channelNames(100), 2)
	ws, _, err := e.dial(t, url.Values{"channels": {strings.Join(names, ",")}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	next(t, ws, protocol.TypeWelcome)
	for i, ch := range names {
		var r protocol.Reply
		_ = ws.SetReadDeadline(time.Now().Add(5 * time.Second))
		if err := ws.ReadJSON(&r); err != nil {
			t.Fatalf("reply %d of %d: %v", i+1, len(names), err)
		}
		want := protocol.TypeSubscribed
		if i >= 100 {
			want = protocol.TypeError
		}
		if r.Type != want || (i >= 100 && r.Code != protocol.CodeAlreadySubscribed) || (i < 100 && r.Channel != ch) {
			t.Fatalf("reply %d: %+v, want %s", i+1, r, want)
		}
	}
	send(t, ws, map[string]any{"type": "ping", "ref": 1})
	next(t, ws, protocol.TypePong)
}

// TestPingsThrottled: a client's WebSocket pings count against
// MAX_FRAMES_PER_SECOND, one token each, as requests do: answered later
// when over it, not refused. A flood of them kept a core busy writing
// pongs.
func TestPingsThrottled(t *testing.T) {
	t.Parallel()
	e := startSecEgress(t, map[string]string{"ALLOW_ANONYMOUS": "true", "MAX_FRAMES_PER_SECOND": "20"})
	ws, _, err := e.dial(t, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	next(t, ws, protocol.TypeWelcome)
	pongs := make(chan struct{}, 60)
	ws.SetPongHandler(func(string) error { pongs <- struct{}{}; return nil })
	go func() { _, _, _ = ws.ReadMessage() }() // runs the pong handler
	// One at a time: a pong not yet sent is replaced by the next one's.
	start := time.Now()
	for i := range 60 {
		if err := ws.WriteControl(websocket.PingMessage, []byte("p"), time.Now().Add(time.Second)); err != nil {
			t.Fatal(err)
		}
		select {
		case <-pongs:
		case <-time.After(5 * time.Second):
			t.Fatalf("pong %d of 60 missing", i+1)
		}
	}
	// A burst of 20, then 20 a second: 40 more take 2 s.
	if d := time.Since(start); d < 1500*time.Millisecond {
		t.Fatalf("60 pings answered in %v, want about 2 s at MAX_FRAMES_PER_SECOND 20", d)
	}
}

// TestChannelsListThrottled: each name of ?channels is a subscribe, and
// counts against MAX_FRAMES_PER_SECOND as a frame's subscribes do. They
// were answered all at once, so a URL (up to 1 MiB) of names bypassed the
// limit: half a million error frames, some 40 MB of traffic, for one
// request.
func TestChannelsListThrottled(t *testing.T) {
	t.Parallel()
	e := startSecEgress(t, map[string]string{"ALLOW_ANONYMOUS": "true", "MAX_SUBSCRIPTIONS": "60", "MAX_FRAMES_PER_SECOND": "20"})
	ws, _, err := e.dial(t, url.Values{"channels": {strings.Repeat("a,", 59) + "a"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	next(t, ws, protocol.TypeWelcome)
	start := time.Now()
	next(t, ws, protocol.TypeSubscribed)
	for i := 1; i < 60; i++ {
		if r := next(t, ws, protocol.TypeError); r.Code != protocol.CodeAlreadySubscribed {
			t.Fatalf("reply %d: %+v", i+1, r)
		}
	}
	// A burst of 20, then 20 a second: 40 more take 2 s.
	if d := time.Since(start); d < 1500*time.Millisecond {
		t.Fatalf("60 names answered in %v, want about 2 s at MAX_FRAMES_PER_SECOND 20", d)
	}
}

// TestUnaskedPongsThrottled: a pong the server did not ask for costs a
// MAX_FRAMES_PER_SECOND token, as a ping does; the answer to the server's
// own ping stays free. A flood of pongs cost nothing, so a client could
// keep the server parsing frames as fast as it could send them. The
// reader, held by the bucket, reads the ping that follows 60 pongs about
// 2 s later at 20 a second.
func TestUnaskedPongsThrottled(t *testing.T) {
	t.Parallel()
	e := startSecEgress(t, map[string]string{"ALLOW_ANONYMOUS": "true", "MAX_FRAMES_PER_SECOND": "20"})
	c := rawDial(t, e, nil)
	start := time.Now()
	for range 60 {
		c.send(clientFrame(true, opPong, nil))
	}
	c.send(clientFrame(true, opPing, []byte("after")))
	_ = c.nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	if op, p := c.read(); op != opPong || string(p) != "after" {
		t.Fatalf("got op %d %q, want the pong to the ping", op, p)
	}
	// A burst of 20, then 20 a second: 41 more take 2 s.
	if d := time.Since(start); d < 1500*time.Millisecond {
		t.Fatalf("the ping after 60 pongs was answered in %v, want about 2 s at MAX_FRAMES_PER_SECOND 20", d)
	}
}

// TestServerPingAnswerFree: the pong that answers the server's ping takes
// no token (an idle socket sends one each PING_INTERVAL, and a token
// bucket would cost it memory). Were they charged, a client answering 10
// pings a second at MAX_FRAMES_PER_SECOND 1 would find its reader held
// further behind each second, and its own ping unanswered for seconds.
func TestServerPingAnswerFree(t *testing.T) {
	t.Parallel()
	e := startSecEgress(t, map[string]string{"ALLOW_ANONYMOUS": "true", "MAX_FRAMES_PER_SECOND": "1", "PING_INTERVAL": "100ms"})
	c := rawDial(t, e, nil)
	pings := 0
	for end := time.Now().Add(2 * time.Second); time.Now().Before(end); {
		if op, _ := c.read(); op != opPing {
			t.Fatalf("got op %d, want the server's ping", op)
		}
		pings++
		c.send(clientFrame(true, opPong, nil))
	}
	if pings < 8 {
		t.Fatalf("%d server pings in 2 s at PING_INTERVAL 100ms", pings)
	}
	c.send(clientFrame(true, opPing, []byte("p")))
	for { // read fails the test after 5 s
		op, p := c.read()
		if op == opPing {
			c.send(clientFrame(true, opPong, nil))
			continue
		}
		if op != opPong || string(p) != "p" {
			t.Fatalf("got op %d %q, want the pong", op, p)
		}
		return
	}
}

// TestFragmentsThrottled: each continuation fragment of a message costs a
// MAX_FRAMES_PER_SECOND token. None did, so a message sent as an endless
// run of empty fragments, which never becomes a request, kept the server
// parsing frames as fast as the client could send them. At 20 a second,
// a ping request in 62 fragments is answered about 2 s later.
func TestFragmentsThrottled(t *testing.T) {
	t.Parallel()
	e := startSecEgress(t, map[string]string{"ALLOW_ANONYMOUS": "true", "MAX_FRAMES_PER_SECOND": "20"})
	c := rawDial(t, e, nil)
	start := time.Now()
	c.send(clientFrame(false, opText, []byte(`{"type":"ping"`)))
	for range 60 {
		c.send(clientFrame(false, opContinuation, nil))
	}
	c.send(clientFrame(true, opContinuation, []byte(`,"ref":7}`)))
	_ = c.nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	if op, p := c.read(); op != opText || !bytes.Contains(p, []byte(`"pong"`)) || !bytes.Contains(p, []byte(`7`)) {
		t.Fatalf("got op %d %q, want the pong to ref 7", op, p)
	}
	// A burst of 20, then 20 a second: 42 more take 2 s.
	if d := time.Since(start); d < 1500*time.Millisecond {
		t.Fatalf("the fragmented ping was answered in %v, want about 2 s at MAX_FRAMES_PER_SECOND 20", d)
	}
}

// TestFragmentsThrottledNotSilent: while MAX_FRAMES_PER_SECOND holds the
// fragments of a message, the server is not reading, and the client's
// answers to its pings wait behind the fragments in the socket: the
// client is not silent, the server is slow, as when it holds a frame's
// requests (docs/protocol.md, Timeouts). The reader charged the
// fragments inside the frame reader, where neither lastRead nor
// handling moved, and the sweep dropped such a client as "missed pong"
// (1006, no close frame) two PING_INTERVALs into the message.
func TestFragmentsThrottledNotSilent(t *testing.T) {
	t.Parallel()
	e := startSecEgress(t, map[string]string{"ALLOW_ANONYMOUS": "true", "MAX_FRAMES_PER_SECOND": "10", "PING_INTERVAL": "300ms"})
	c := rawDial(t, e, nil)
	start := time.Now()
	// A burst of 10, then 10 a second: 30 more fragments take 3 s, five
	// times 2×PING_INTERVAL.
	frames := [][]byte{clientFrame(false, opText, []byte(`{"type":"ping"`))}
	for range 39 {
		frames = append(frames, clientFrame(false, opContinuation, nil))
	}
	c.send(append(frames, clientFrame(true, opContinuation, []byte(`,"ref":7}`)))...)
	for {
		op, p, err := c.next()
		if err != nil {
			t.Fatalf("after %v: %v, want the pong to ref 7", time.Since(start), err)
		}
		switch {
		case op == opPing:
			c.send(clientFrame(true, opPong, p))
			continue
		case op == opClose:
			t.Fatalf("after %v: close %x, want the pong to ref 7", time.Since(start), p)
		case op != opText || !bytes.Contains(p, []byte(`"pong"`)) || !bytes.Contains(p, []byte(`7`)):
			t.Fatalf("got op %d %q, want the pong to ref 7", op, p)
		}
		if d := time.Since(start); d < 2*time.Second {
			t.Fatalf("answered in %v: the test's fragments were not held", d)
		}
		return
	}
}
