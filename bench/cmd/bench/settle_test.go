package main

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/wsrelay/wsrelay/bench/harness"
)

// fakeEgress is a wsrelay egress stand-in on 127.0.0.1: it confirms a
// socket's subscription, then sends the frames of send, each after its
// delay, once start is closed.
func fakeEgress(t *testing.T, start <-chan struct{}, send []struct {
	after time.Duration
	frame []byte
}) *sut {
	t.Helper()
	up := websocket.Upgrader{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ws, err := up.Upgrade(w, r, nil)
		if err != nil {
			return
		}
		defer ws.Close()
		_ = ws.WriteMessage(websocket.TextMessage, []byte(`{"type":"subscribed","channel":"c"}`))
		<-start
		for _, s := range send {
			time.Sleep(s.after)
			if ws.WriteMessage(websocket.TextMessage, s.frame) != nil {
				return
			}
		}
		// Hold the socket until the client closes it.
		for {
			if _, _, err := ws.ReadMessage(); err != nil {
				return
			}
		}
	}))
	t.Cleanup(srv.Close)
	port := srv.Listener.Addr().(*net.TCPAddr).Port
	return &sut{kind: wsrelay, sub: &harness.Proc{Port: port}}
}

func message(seq int) []byte {
	return append([]byte(`{"type":"message","channel":"c","data":`), payload(seq, now())[len(`{"data":`):]...)
}

// A duplicate or a misrouted message that arrives after the last expected
// one is still counted: the run does not close its sockets the moment the
// count of expected messages is reached.
func TestLateDuplicateCounted(t *testing.T) {
	start := make(chan struct{})
	sys := fakeEgress(t, start, []struct {
		after time.Duration
		frame []byte
	}{
		{0, message(0)},
		{20 * time.Millisecond, message(0)}, // the same message again
		{20 * time.Millisecond, message(1)}, // another channel's
	})
	ctx := context.Background()
	var rcvd tally
	s, err := dialSubscriber(ctx, sys, "c", 2, &rcvd)
	if err != nil {
		t.Fatal(err)
	}
	s.expected = 1
	s.accept = func(seq int64) bool { return seq == 0 }
	close(start)
	waitDelivered(ctx, &rcvd, 1, 3*time.Second)
	closeAll([]*subscriber{s})
	d := collect([]*subscriber{s}, 2)
	if d.got != 1 || d.lost != 0 || d.dups != 1 || d.stray != 1 {
		t.Fatalf("got %d, lost %d, dup %d, stray %d; want 1, 0, 1, 1", d.got, d.lost, d.dups, d.stray)
	}
}
