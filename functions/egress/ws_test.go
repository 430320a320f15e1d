package main

import "testing"

// TestSCFStatus: each way a connection ends gets the status SCF reports
// for the invocation (docs/protocol.md), and the egress's own timeout
// closes are named for their metric.
func TestSCFStatus(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		code     int
		byServer bool
		status   int
		timeout  string
	}{
		{1000, true, 200, ""},
		{1000, false, 200, ""},
		{1011, true, 200, ""},
		{1010, false, 200, ""},
		{1001, true, 439, ""},     // drain
		{4000, true, 439, "idle"}, // IDLE_TIMEOUT closes before SCF's own cut (455)
		{4001, true, 439, "lifetime"},
		{4002, true, 439, ""},
		{1006, true, 439, ""},  // missed pong, failed write
		{4000, false, 456, ""}, // the client's own 4000 is not our timeout
		{1001, false, 456, ""},
		{1006, false, 456, ""}, // lost, or SCF cut it
	} {
		if got := scfStatus(tc.code, tc.byServer); got != tc.status {
			t.Errorf("scfStatus(%d, by server %v) = %d, want %d", tc.code, tc.byServer, got, tc.status)
		}
		if got := timeoutClose(tc.code, tc.byServer); got != tc.timeout {
			t.Errorf("timeoutClose(%d, by server %v) = %q, want %q", tc.code, tc.byServer, got, tc.timeout)
		}
	}
}
