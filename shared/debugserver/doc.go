// Package debugserver serves Go's profiling endpoints (net/http/pprof) on
// an address of their own, off by default, so that an operator can profile
// a function in production without exposing the profiles on its public
// port. A lean build (-tags wsrelay_lean) leaves profiling out: there
// Start refuses an address with ErrNotBuilt.
package debugserver

import "errors"

// ErrNotBuilt is Start's answer to an address in a lean build.
var ErrNotBuilt = errors.New("profiling is not in this build (built with -tags wsrelay_lean); use a default build to profile")
