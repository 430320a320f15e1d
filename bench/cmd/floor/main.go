// Command floor is the bench's yardstick for what the machine and
// net/http cost before the functions' own work: a bare net/http server
// on PORT.
//
//   - S5: it answers /readyz, so that S5's table shows what exec, the Go
//     runtime and a listening socket cost on the day, beside what the
//     functions add to them.
//   - S4: it answers the ingress's publish route as the ingress does
//     (the whole body read, 202 and a JSON reply of the same size), but
//     decodes, checks and stores nothing, so that S4's `floor pub/s` is
//     the most any ingress built on net/http (as gin is) could reach
//     with the same load generator on the same cores.
//
// FLOOR_SERVER picks another HTTP server for the same routes, to measure
// what leaving net/http would change (bench's -s4-floors): "fasthttp"
// answers them with valyala/fasthttp's own handler, "fasthttp-adaptor"
// serves the net/http handler through fasthttpadaptor, which is how gin
// (an http.Handler) would run on fasthttp.
//
// The bench builds it the way it builds the functions (static, trimmed,
// stripped) and starts it beside them (docs/benchmarks.md).
package main

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"

	"github.com/valyala/fasthttp"
	"github.com/valyala/fasthttp/fasthttpadaptor"
)

// reply is the size of the ingress's answer to a publish, whose id and
// channel the generator does not read.
const reply = `{"id":"1764590000000-0","channel":"in0"}`

func main() {
	ln, err := net.Listen("tcp", "127.0.0.1:"+os.Getenv("PORT"))
	if err == nil {
		err = serve(ln, os.Getenv("FLOOR_SERVER"))
	}
	fmt.Fprintln(os.Stderr, "floor:", err)
	os.Exit(1)
}

// serve answers the floor's routes on ln with the server named by
// FLOOR_SERVER ("" is net/http).
func serve(ln net.Listener, server string) error {
	switch server {
	case "", "net/http":
		return http.Serve(ln, routes())
	case "fasthttp":
		return (&fasthttp.Server{Handler: fastRoutes}).Serve(ln)
	case "fasthttp-adaptor":
		return (&fasthttp.Server{Handler: fasthttpadaptor.NewFastHTTPHandler(routes())}).Serve(ln)
	}
	return fmt.Errorf("FLOOR_SERVER %q: want net/http, fasthttp or fasthttp-adaptor", server)
}

func routes() *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusOK) })
	mux.HandleFunc("POST /v1/channels/{channel}/messages", func(w http.ResponseWriter, r *http.Request) {
		if _, err := io.Copy(io.Discard, r.Body); err != nil {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		h := w.Header()
		h["Content-Type"] = []string{"application/json; charset=utf-8"}
		h["Content-Length"] = []string{strconv.Itoa(len(reply))}
		w.WriteHeader(http.StatusAccepted)
		_, _ = io.WriteString(w, reply)
	})
	return mux
}

// fastRoutes is routes for fasthttp, which has read the whole body
// before it calls the handler.
func fastRoutes(c *fasthttp.RequestCtx) {
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
		c.SetBodyString(reply)
	default:
		c.Error("404 page not found\n", http.StatusNotFound)
	}
}
