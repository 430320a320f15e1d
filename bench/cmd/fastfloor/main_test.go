package main

import (
	"net"
	"strings"
	"testing"

	"github.com/wsrelay/wsrelay/bench/floorroutes/floortest"
)

// TestRoutes: both servers answer what cmd/floor answers.
func TestRoutes(t *testing.T) {
	for _, server := range []string{"fasthttp", "fasthttp-adaptor"} {
		t.Run(server, func(t *testing.T) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			served := make(chan error, 1)
			go func() { served <- serve(ln, server) }()
			defer func() {
				ln.Close()
				<-served
			}()
			floortest.Check(t, "http://"+ln.Addr().String())
		})
	}
}

// TestUnknownServer: a FLOOR_SERVER it does not know is an error.
func TestUnknownServer(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	for _, s := range []string{"", "net/http", "gnet"} {
		if err := serve(ln, s); err == nil || !strings.Contains(err.Error(), `"`+s+`"`) {
			t.Errorf("serve(%q) = %v, want an error naming it", s, err)
		}
	}
}
