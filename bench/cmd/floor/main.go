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
// The bench builds it the way it builds the functions (static, trimmed,
// stripped) and starts it beside them (docs/benchmarks.md).
package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
)

// reply is the size of the ingress's answer to a publish, whose id and
// channel the generator does not read.
const reply = `{"id":"1764590000000-0","channel":"in0"}`

func main() {
	err := http.ListenAndServe("127.0.0.1:"+os.Getenv("PORT"), routes())
	fmt.Fprintln(os.Stderr, "floor:", err)
	os.Exit(1)
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
