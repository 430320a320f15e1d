package harness

import (
	"io"
	"net"
	"slices"
	"sync"
	"time"
)

// Balancer forwards each connection it accepts to the next of its
// backends that takes it, round robin, as the load balancer in front of
// egress instances does; a rolling restart takes an instance out of it
// before draining it and puts the new one in once it is ready. The soak
// (make soak) and the upgrade check (make upgrade-check) put one in front
// of their egress instances. Its methods are safe for concurrent use.
type Balancer struct {
	ln net.Listener
	wg sync.WaitGroup

	mu       sync.Mutex
	backends []string
	next     int
	conns    map[net.Conn]struct{}
	closed   bool
}

// NewBalancer listens on a free port of 127.0.0.1, with no backend yet.
func NewBalancer() (*Balancer, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	b := &Balancer{ln: ln, conns: map[net.Conn]struct{}{}}
	b.wg.Go(b.accept)
	return b, nil
}

// Addr is the host:port clients dial.
func (b *Balancer) Addr() string { return b.ln.Addr().String() }

// Add puts backend (host:port) in the rotation.
func (b *Balancer) Add(backend string) {
	b.mu.Lock()
	b.backends = append(b.backends, backend)
	b.mu.Unlock()
}

// Remove takes backend out of the rotation; its connections stay.
func (b *Balancer) Remove(backend string) {
	b.mu.Lock()
	b.backends = slices.DeleteFunc(b.backends, func(s string) bool { return s == backend })
	b.mu.Unlock()
}

func (b *Balancer) accept() {
	for {
		c, err := b.ln.Accept()
		if err != nil {
			return
		}
		b.wg.Go(func() { b.serve(c) })
	}
}

func (b *Balancer) serve(c net.Conn) {
	b.mu.Lock()
	backends := slices.Clone(b.backends)
	first := b.next
	b.next++
	b.mu.Unlock()
	var up net.Conn
	for i := range backends {
		var err error
		if up, err = net.DialTimeout("tcp", backends[(first+i)%len(backends)], time.Second); err == nil {
			break
		}
	}
	if up == nil {
		c.Close() // no instance: the client backs off and dials again
		return
	}
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		c.Close()
		up.Close()
		return
	}
	b.conns[c], b.conns[up] = struct{}{}, struct{}{}
	b.mu.Unlock()
	var wg sync.WaitGroup
	wg.Go(func() { b.pipe(up, c) })
	b.pipe(c, up)
	wg.Wait()
	b.mu.Lock()
	delete(b.conns, c)
	delete(b.conns, up)
	b.mu.Unlock()
}

// pipe copies src to dst, then closes both: one side's end ends the other.
func (b *Balancer) pipe(dst, src net.Conn) {
	_, _ = io.Copy(dst, src)
	dst.Close()
	src.Close()
}

// Close stops accepting, cuts every connection and waits for its
// goroutines.
func (b *Balancer) Close() {
	b.ln.Close()
	b.mu.Lock()
	b.closed = true
	for c := range b.conns {
		c.Close()
	}
	b.mu.Unlock()
	b.wg.Wait()
}
