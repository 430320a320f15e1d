package harness

import (
	"net"
	"os"
	"slices"
	"testing"
)

// The soak's count of a process's Redis connections: its sockets whose
// remote port is the one given, and no others; and their local ports,
// by which the upgrade check finds an egress's connections in Redis's
// CLIENT LIST.
func TestTCPConnsTo(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port := ln.Addr().(*net.TCPAddr).Port
	before, err := TCPConnsTo(os.Getpid(), port)
	if err != nil || before != 0 {
		t.Fatalf("before dialling: %d, %v; want 0", before, err)
	}
	var conns []net.Conn
	var local []int
	for range 2 {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		local = append(local, c.LocalAddr().(*net.TCPAddr).Port)
		s, err := ln.Accept() // its remote port is the dialler's: not counted
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, s)
	}
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	if n, err := TCPConnsTo(os.Getpid(), port); err != nil || n != 2 {
		t.Fatalf("TCPConnsTo = %d, %v; want 2", n, err)
	}
	ports, err := TCPLocalPortsTo(os.Getpid(), port)
	slices.Sort(ports)
	slices.Sort(local)
	if err != nil || !slices.Equal(ports, local) {
		t.Fatalf("TCPLocalPortsTo = %v, %v; want the dialled sockets' %v", ports, err, local)
	}
	if n, err := OpenFDs(os.Getpid()); err != nil || n < 5 {
		t.Fatalf("OpenFDs = %d, %v; want at least the listener and the four sockets", n, err)
	}
}
