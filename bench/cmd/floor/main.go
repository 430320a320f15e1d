// Command floor is S5's yardstick: the least a Go web function can do
// before its first 200, a net/http server answering /readyz on PORT.
// The bench builds it the way it builds the functions (static, trimmed,
// stripped) and starts it beside them, so that S5's table shows what the
// machine itself costs (exec, the Go runtime, a listening socket) on the
// day, and what the functions add to it (docs/benchmarks.md).
package main

import (
	"fmt"
	"net/http"
	"os"
)

func main() {
	http.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusOK) })
	err := http.ListenAndServe("127.0.0.1:"+os.Getenv("PORT"), nil)
	fmt.Fprintln(os.Stderr, "floor:", err)
	os.Exit(1)
}
