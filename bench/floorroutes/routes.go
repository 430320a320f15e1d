// Package floorroutes is what the bench's floors answer (cmd/floor,
// cmd/fastfloor): /readyz, and the ingress's publish route as the
// ingress does (the whole body read, 202 and a JSON reply of the same
// size), decoding, checking and storing nothing.
package floorroutes

import (
	"io"
	"net/http"
	"strconv"
)

// Reply is the size of the ingress's answer to a publish, whose id and
// channel the generator does not read.
const Reply = `{"id":"1764590000000-0","channel":"in0"}`

// Routes answers the floor's routes with net/http.
func Routes() *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusOK) })
	mux.HandleFunc("POST /v1/channels/{channel}/messages", func(w http.ResponseWriter, r *http.Request) {
		if _, err := io.Copy(io.Discard, r.Body); err != nil {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		h := w.Header()
		h["Content-Type"] = []string{"application/json; charset=utf-8"}
		h["Content-Length"] = []string{strconv.Itoa(len(Reply))}
		w.WriteHeader(http.StatusAccepted)
		_, _ = io.WriteString(w, Reply)
	})
	return mux
}
