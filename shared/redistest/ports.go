package redistest

import (
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
)

// FreePort returns a TCP port that is free on every address at the
// time of the call. It lies below the kernel's ephemeral range
// (ip_local_port_range), so that no outgoing connection of a busy test
// process can take it before the test's server binds it, and it is
// never returned twice by one process. Another process may still take
// it: a server started on it must check that it got it (launch does).
func FreePort() (int, error) { return quietPort(0) }

// portsGiven are the ports FreePort and the cluster nodes were given.
var portsGiven = struct {
	sync.Mutex
	m map[int]bool
}{m: map[int]bool{}}

// quietPort returns a port p such that p and, when offset is not 0,
// p+offset (a cluster node's bus port) are free and below the ephemeral
// range, picked at random from the 12,000 ports under it so that test
// processes running side by side rarely pick the same one.
func quietPort(offset int) (int, error) {
	base, top := portRange(ephemeralLow(), offset)
	portsGiven.Lock()
	defer portsGiven.Unlock()
	for range 200 {
		p := base + rand.IntN(top-base)
		if portsGiven.m[p] || portsGiven.m[p+offset] || !portFree(p) || (offset != 0 && !portFree(p+offset)) {
			continue
		}
		portsGiven.m[p], portsGiven.m[p+offset] = true, true
		return p, nil
	}
	return 0, fmt.Errorf("no free port between %d and %d", base, top)
}

// portRange is where quietPort picks a port p (p+offset too): the 12,000
// ports under the ephemeral range that starts at low or, where that
// leaves fewer than 1,000 (container hosts that start it at 1024), 20000
// up to 32000, as scripts/run.sh does. There an outgoing connection can
// take the port between the check and the server's bind, which launch
// sees and starts the server again on another; failing every test that
// starts a server instead made make test fail on such a host.
func portRange(low, offset int) (base, top int) {
	top = low - offset
	base = max(1024, top-12000)
	if top-base < 1000 {
		return 20000 - offset, 32000 - offset
	}
	return base, top
}

// ephemeralLow is the first port of the kernel's ephemeral range.
func ephemeralLow() int {
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			if n, err := strconv.Atoi(f[0]); err == nil {
				return n
			}
		}
	}
	return 32768 // Linux's default
}

func portFree(p int) bool {
	l, err := net.Listen("tcp", ":"+strconv.Itoa(p))
	if err != nil {
		return false
	}
	_ = l.Close()
	return true
}
