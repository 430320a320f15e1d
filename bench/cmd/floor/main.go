// Command floor is the bench's yardstick for what the machine and
// net/http cost before the functions' own work: a bare net/http server
// on PORT.
//
//   - S5: it answers /readyz, so that S5's table shows what exec, the Go
//     runtime and a listening socket cost on the day, beside what the
//     functions add to them.
//   - S4: it answers the ingress's publish route as the ingress does
//     (floorroutes), so that S4's `floor pub/s` is the most any ingress
//     built on net/http (as gin is) could reach with the same load
//     generator on the same cores.
//
// It links net/http and nothing more (cmd/fastfloor is the same floor on
// fasthttp, in a binary of its own so that S5's yardstick stays a bare
// net/http server). The bench builds it the way it builds the functions
// (static, trimmed, stripped) and starts it beside them
// (docs/benchmarks.md).
package main

import (
	"fmt"
	"net/http"
	"os"

	"github.com/wsrelay/wsrelay/bench/floorroutes"
)

func main() {
	err := http.ListenAndServe("127.0.0.1:"+os.Getenv("PORT"), floorroutes.Routes())
	fmt.Fprintln(os.Stderr, "floor:", err)
	os.Exit(1)
}
