package main

import (
	"net/http/httptest"
	"os/exec"
	"strings"
	"testing"

	"github.com/wsrelay/wsrelay/bench/floorroutes"
	"github.com/wsrelay/wsrelay/bench/floorroutes/floortest"
)

func TestRoutes(t *testing.T) {
	srv := httptest.NewServer(floorroutes.Routes())
	defer srv.Close()
	floortest.Check(t, srv.URL)
}

// TestLinksOnlyNetHTTP: S5's yardstick is a bare net/http server, so the
// floor links nothing outside the standard library but its routes (a
// dependency here, fasthttp for one, would slow its start and skew what
// the functions' rows are compared with).
func TestLinksOnlyNetHTTP(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "-tags", "nethttpomithttp2", "-f", "{{if not .Standard}}{{.ImportPath}}{{end}}", ".").Output()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range strings.Fields(string(out)) {
		if p != "github.com/wsrelay/wsrelay/bench/cmd/floor" && p != "github.com/wsrelay/wsrelay/bench/floorroutes" {
			t.Errorf("cmd/floor links %s", p)
		}
	}
}
