package redistest

import (
	"context"
	"fmt"
	"net"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestFreePortBelowEphemeralRange(t *testing.T) {
	low := ephemeralLow()
	if _, top := portRange(low, clusterBusOffset); top+clusterBusOffset > low {
		// portRange's fallback (TestPortRangeWithoutRoomBelowEphemeral).
		low = top + clusterBusOffset
	}
	seen := map[int]bool{}
	for range 50 {
		p, err := FreePort()
		if err != nil {
			t.Fatal(err)
		}
		if p >= low || p < 1024 {
			t.Fatalf("FreePort gave %d, want 1024 <= port < %d", p, low)
		}
		if seen[p] {
			t.Fatalf("FreePort gave %d twice", p)
		}
		seen[p] = true
	}
	p, err := quietPort(clusterBusOffset)
	if err != nil {
		t.Fatal(err)
	}
	if p+clusterBusOffset >= low {
		t.Fatalf("cluster port %d: bus port %d not below %d", p, p+clusterBusOffset, low)
	}
}

// Where the ephemeral range leaves no room below it, ports are still
// given, from 20000 to 32000 (bus ports included), not refused.
func TestPortRangeWithoutRoomBelowEphemeral(t *testing.T) {
	for _, tc := range []struct{ low, offset, base, top int }{
		{32768, 0, 20768, 32768},
		{32768, clusterBusOffset, 10768, 22768},
		{1024, 0, 20000, 32000},
		{1024, clusterBusOffset, 10000, 22000},
		{2000, 0, 20000, 32000},
		{12000, clusterBusOffset, 10000, 22000},
	} {
		base, top := portRange(tc.low, tc.offset)
		if base != tc.base || top != tc.top {
			t.Errorf("portRange(%d, %d) = [%d, %d), want [%d, %d)", tc.low, tc.offset, base, top, tc.base, tc.top)
		}
	}
}

// A server whose port another Redis holds is not taken for that Redis.
func TestLaunchRefusesAForeignRedis(t *testing.T) {
	first := Start(t)
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	s := &Server{Port: first.Port, Dir: dir, args: []string{"--port", strconv.Itoa(first.Port), "--bind", "127.0.0.1", "--save", "", "--dir", dir}}
	if err := s.launch(bin); err == nil {
		s.Stop()
		t.Fatalf("launch on port %d, held by another redis-server, succeeded", first.Port)
	} else {
		t.Logf("launch: %v", err)
	}
	if s.cmd != nil {
		t.Fatal("the refused server's process is left running")
	}
	if err := first.pidMatches(); err != nil {
		t.Fatal(err)
	}
}

// A server whose port something else holds fails at once, and stops.
func TestLaunchPortTaken(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	port := l.Addr().(*net.TCPAddr).Port
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	s := &Server{Port: port, Dir: dir, args: []string{"--port", strconv.Itoa(port), "--bind", "127.0.0.1", "--save", "", "--dir", dir}}
	started := time.Now()
	err = s.launch(bin)
	if err == nil {
		s.Stop()
		t.Fatalf("launch on port %d, held by a listener, succeeded", port)
	}
	if !strings.Contains(err.Error(), "exited") {
		t.Fatalf("launch: %v, want the process seen exiting", err)
	}
	t.Logf("launch: %v (after %s)", err, time.Since(started).Round(time.Millisecond))
	if s.cmd != nil {
		t.Fatal("the refused server's process is left running")
	}
}

// pidMatches checks that the Redis on s's port is s's own process.
func (s *Server) pidMatches() error {
	pid, err := s.pid()
	if err != nil {
		return err
	}
	if pid != s.cmd.Process.Pid {
		return fmt.Errorf("port %d is served by pid %d, not the server's %d", s.Port, pid, s.cmd.Process.Pid)
	}
	return nil
}

// A server with a password is still recognised as its own.
func TestStartWithPasswordIsOwnProcess(t *testing.T) {
	s, admin := StartWithPassword(t, "pw")
	if err := admin.Ping(context.Background()).Err(); err != nil {
		t.Fatal(err)
	}
	if err := s.pidMatches(); err != nil {
		t.Fatal(err)
	}
}
