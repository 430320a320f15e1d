// Package bench holds the load harness: the benchmark behind `make bench`
// (cmd/bench), the long run under churn behind `make soak` (cmd/soak), and
// what both use to build and start the functions and Redis (harness).
package bench
