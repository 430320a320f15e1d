package e2e

import (
	"bytes"
	"net"
	"sync"
	"testing"
)

// tcpProxy forwards TCP connections to a target and can cut or stall them
// on command: the fault tests put it between the functions and Redis,
// the publisher's between it and the ingress (DropReplies).
type tcpProxy struct {
	ln     net.Listener
	target string

	mu          sync.Mutex
	conns       map[net.Conn]struct{}
	refuse      bool
	stall       chan struct{} // non-nil while stalled: closed by Unstall
	hold        chan struct{} // non-nil while HoldAfterHeaders holds: closed by Release
	dropReplies int           // connections still to have their reply dropped
	dropped     int           // replies dropped
	wg          sync.WaitGroup
}

func newProxy(t testing.TB, target string) *tcpProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &tcpProxy{ln: ln, target: target, conns: map[net.Conn]struct{}{}}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.close)
	return p
}

// Addr is the proxy's host:port.
func (p *tcpProxy) Addr() string { return p.ln.Addr().String() }

func (p *tcpProxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		if p.refuse {
			p.mu.Unlock()
			c.Close()
			continue
		}
		up, err := net.Dial("tcp", p.target)
		if err != nil {
			p.mu.Unlock()
			c.Close()
			continue
		}
		p.conns[c] = struct{}{}
		p.conns[up] = struct{}{}
		drop := p.dropReplies > 0
		if drop {
			p.dropReplies--
		}
		hold := p.hold
		p.mu.Unlock()
		p.wg.Add(2)
		switch {
		case drop:
			go p.dropReply(c, up)
		case hold != nil:
			go p.holdAfterHeaders(c, up, hold)
		default:
			go p.pipe(c, up)
		}
		go p.pipe(up, c)
	}
}

func (p *tcpProxy) pipe(dst, src net.Conn) {
	defer p.wg.Done()
	buf := make([]byte, 32*1024)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			p.mu.Lock()
			stall := p.stall
			p.mu.Unlock()
			if stall != nil {
				<-stall // hold the bytes: the connection looks open but is silent
			}
			if _, werr := dst.Write(buf[:n]); werr != nil {
				break
			}
		}
		if err != nil {
			break
		}
	}
	dst.Close()
	src.Close()
	p.mu.Lock()
	delete(p.conns, dst)
	delete(p.conns, src)
	p.mu.Unlock()
}

// holdAfterHeaders forwards the target's reply on up to c through the
// end of its HTTP header block (a WebSocket upgrade's 101), holds what
// follows until hold is closed, then forwards as pipe does.
func (p *tcpProxy) holdAfterHeaders(c, up net.Conn, hold chan struct{}) {
	var head []byte
	buf := make([]byte, 32*1024)
	for {
		n, rerr := up.Read(buf)
		head = append(head, buf[:n]...)
		if i := bytes.Index(head, []byte("\r\n\r\n")); i >= 0 {
			_, err := c.Write(head[:i+4])
			if err == nil {
				<-hold
				_, err = c.Write(head[i+4:])
			}
			if err == nil && rerr == nil {
				p.pipe(c, up) // its wg.Done is this goroutine's
				return
			}
			break
		}
		if rerr != nil {
			break
		}
	}
	c.Close()
	up.Close()
	p.mu.Lock()
	delete(p.conns, c)
	delete(p.conns, up)
	p.mu.Unlock()
	p.wg.Done()
}

// dropReply waits for the target's first reply bytes on up and, instead
// of forwarding them, closes the client's connection c: the request was
// served, and the client never learns how.
func (p *tcpProxy) dropReply(c, up net.Conn) {
	defer p.wg.Done()
	buf := make([]byte, 32*1024)
	n, _ := up.Read(buf)
	c.Close()
	up.Close()
	p.mu.Lock()
	if n > 0 {
		p.dropped++
	}
	delete(p.conns, c)
	delete(p.conns, up)
	p.mu.Unlock()
}

// DropReplies makes the next n connections forward what the client sends
// but drop the target's reply, closing the client's side when it comes
// (a reply lost on the way back).
func (p *tcpProxy) DropReplies(n int) {
	p.mu.Lock()
	p.dropReplies = n
	p.mu.Unlock()
}

// Dropped is how many replies DropReplies has dropped.
func (p *tcpProxy) Dropped() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.dropped
}

// Cut closes every open connection and refuses new ones until Heal.
func (p *tcpProxy) Cut() {
	p.mu.Lock()
	p.refuse = true
	for c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
}

// Stall keeps every connection open but forwards nothing (new ones too)
// until Unstall: a Redis that hangs without an error.
func (p *tcpProxy) Stall() {
	p.mu.Lock()
	if p.stall == nil {
		p.stall = make(chan struct{})
	}
	p.mu.Unlock()
}

// Unstall forwards again what was held, and everything after.
func (p *tcpProxy) Unstall() {
	p.mu.Lock()
	if p.stall != nil {
		close(p.stall)
		p.stall = nil
	}
	p.mu.Unlock()
}

// HoldAfterHeaders makes the connections accepted from now on forward the
// target's reply up to the end of its HTTP header block and hold what
// follows until Release: a server that upgrades the socket and then says
// nothing, not even its welcome.
func (p *tcpProxy) HoldAfterHeaders() {
	p.mu.Lock()
	if p.hold == nil {
		p.hold = make(chan struct{})
	}
	p.mu.Unlock()
}

// Release forwards what HoldAfterHeaders held, and new connections whole.
func (p *tcpProxy) Release() {
	p.mu.Lock()
	if p.hold != nil {
		close(p.hold)
		p.hold = nil
	}
	p.mu.Unlock()
}

// Heal accepts connections again.
func (p *tcpProxy) Heal() {
	p.mu.Lock()
	p.refuse = false
	p.mu.Unlock()
}

func (p *tcpProxy) close() {
	p.ln.Close()
	p.Unstall()
	p.Release()
	p.Cut()
	p.wg.Wait()
}
