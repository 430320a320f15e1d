package main

import (
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
)

// TestRoutes: the floor answers /readyz, and a publish as the ingress
// does (202, a JSON reply with a Content-Length, which the bench's
// generator needs), after reading the whole body; nothing else. So does
// each server FLOOR_SERVER can pick.
func TestRoutes(t *testing.T) {
	for _, server := range []string{"", "net/http", "fasthttp", "fasthttp-adaptor"} {
		t.Run(strings.ReplaceAll(server, "/", "-"), func(t *testing.T) { testRoutes(t, server) })
	}
}

func testRoutes(t *testing.T, server string) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- serve(ln, server) }()
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	defer func() {
		ln.Close()
		<-served
	}()
	url := "http://" + ln.Addr().String()
	for _, tc := range []struct {
		method, path, body string
		status             int
		reply              string
	}{
		{"GET", "/readyz", "", 200, ""},
		{"POST", "/v1/channels/in7/messages", `{"data":{"n":1}}`, 202, reply},
		{"GET", "/v1/channels/in7/messages", "", 405, "Method Not Allowed\n"},
		{"POST", "/v1/messages", "{}", 404, "404 page not found\n"},
		{"POST", "/v1/channels//messages", "{}", 404, "404 page not found\n"},
		{"POST", "/v1/channels/a/b/messages", "{}", 404, "404 page not found\n"},
	} {
		req, err := http.NewRequest(tc.method, url+tc.path, strings.NewReader(tc.body))
		if err != nil {
			t.Fatal(err)
		}
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != tc.status || string(b) != tc.reply {
			t.Errorf("%s %s: %d %q, want %d %q", tc.method, tc.path, resp.StatusCode, b, tc.status, tc.reply)
		}
		if tc.status == 202 && (resp.ContentLength != int64(len(reply)) || resp.Header.Get("Content-Type") != "application/json; charset=utf-8") {
			t.Errorf("publish answered with Content-Length %d, Content-Type %q", resp.ContentLength, resp.Header.Get("Content-Type"))
		}
	}
}

// TestUnknownServer: a FLOOR_SERVER the floor does not know is an error,
// not net/http under another name.
func TestUnknownServer(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if err := serve(ln, "gnet"); err == nil || !strings.Contains(err.Error(), `"gnet"`) {
		t.Fatalf("serve(gnet) = %v, want an error naming it", err)
	}
}
