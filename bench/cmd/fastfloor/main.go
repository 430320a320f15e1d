// Command fastfloor is cmd/floor on valyala/fasthttp, to measure what
// leaving net/http would change for S4 (the bench's -s4-floors):
// FLOOR_SERVER=fasthttp answers the floor's routes (floorroutes) with a
// fasthttp handler of its own; FLOOR_SERVER=fasthttp-adaptor serves
// floorroutes' net/http handler through fasthttpadaptor, which is how
// gin, an http.Handler, would run on fasthttp.
package main

import (
	"bytes"
	"fmt"
	"net"
	"net/http"
	"os"

	"github.com/valyala/fasthttp"
	"github.com/valyala/fasthttp/fasthttpadaptor"

	"github.com/wsrelay/wsrelay/bench/floorroutes"
)

func main() {
	ln, err := net.Listen("tcp", "127.0.0.1:"+os.Getenv("PORT"))
	if err == nil {
		err = serve(ln, os.Getenv("FLOOR_SERVER"))
	}
	fmt.Fprintln(os.Stderr, "fastfloor:", err)
	os.Exit(1)
}

// serve answers the floor's routes on ln with the server named by
// FLOOR_SERVER.
func serve(ln net.Listener, server string) error {
	switch server {
	case "fasthttp":
		return (&fasthttp.Server{Handler: routes}).Serve(ln)
	case "fasthttp-adaptor":
		return (&fasthttp.Server{Handler: fasthttpadaptor.NewFastHTTPHandler(floorroutes.Routes())}).Serve(ln)
	}
	return fmt.Errorf("FLOOR_SERVER %q: want fasthttp or fasthttp-adaptor", server)
}

// routes is floorroutes.Routes for fasthttp, which has read the whole
// body before it calls the handler.
func routes(c *fasthttp.RequestCtx) {
	path := c.Path()
	switch {
	case string(path) == "/readyz":
	case bytes.HasPrefix(path, []byte("/v1/channels/")) && bytes.HasSuffix(path, []byte("/messages")) &&
		bytes.Count(path, []byte("/")) == 4 && len(path) > len("/v1/channels//messages"):
		if !c.IsPost() {
			c.Error("Method Not Allowed\n", http.StatusMethodNotAllowed)
			return
		}
		c.SetContentType("application/json; charset=utf-8")
		c.SetStatusCode(http.StatusAccepted)
		c.SetBodyString(floorroutes.Reply)
	default:
		c.Error("404 page not found\n", http.StatusNotFound)
	}
}
