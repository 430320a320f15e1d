// Package bench holds the load harness: the benchmark behind `make bench`
// (cmd/bench), the long run under churn behind `make soak` (cmd/soak), a
// reconnect storm on one egress (cmd/storm), and what they use to build
// and start the functions and Redis (harness).
package bench
