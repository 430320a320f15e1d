//go:build linux

package main

import (
	"syscall"
	"unsafe"
)

// initRaw reads the socket with non-blocking read(2) calls made from the
// poller's callback (syscall.RawConn.Read): the reader then waits for data
// a few small frames deep, where a read through net.Conn would wait under
// a dozen larger ones, and an idle connection's goroutine fits a 2 KiB
// stack. Conns that are not plain sockets (TLS, wrappers) keep src.Read.
func (r *frameReader) initRaw() {
	sc, ok := r.src.(syscall.Conn)
	if !ok {
		return
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return
	}
	r.raw = raw
	r.rawFn = r.readFD // allocated once per connection, not per read
}

// readFD is one non-blocking read(2) into the free end of the buffer; it
// returns false to have the poller wait until the socket is readable.
func (r *frameReader) readFD(fd uintptr) bool {
	for {
		free := r.buf[r.w:]
		n, _, errno := syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(&free[0])), uintptr(len(free)))
		switch errno {
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return false
		case 0:
			r.n, r.errno = int(n), 0
		default:
			r.n, r.errno = 0, errno
		}
		return true
	}
}

// writeNow writes what of b fits in the socket's send buffer now, without
// waiting, and returns how many bytes that was (0 on any error: the writer
// goroutine then meets the error itself). The caller holds the writer's
// place (ping), so no other write runs. Through Control, not
// RawConn.Write: that one fails at once, without writing, once the write
// deadline the writer armed for its last write has passed, which on an
// idle socket it always has by the next ping (WRITE_TIMEOUT 10s,
// PING_INTERVAL 25s), and every ping started a writer goroutine. The
// socket is non-blocking, so the write never waits, deadline or not.
func (r *frameReader) writeNow(b []byte) int {
	if r.raw == nil {
		return 0
	}
	n := 0
	_ = r.raw.Control(func(fd uintptr) {
		w, _, errno := syscall.RawSyscall(syscall.SYS_WRITE, fd, uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)))
		if errno == 0 {
			n = int(w)
		}
	})
	return n
}

// unsent returns how many bytes the socket's send queue holds, written
// but not yet acknowledged by the peer (ioctl TIOCOUTQ, alias SIOCOUTQ);
// 0 when it cannot tell.
func (r *frameReader) unsent() int {
	if r.raw == nil {
		return 0
	}
	var n int32
	_ = r.raw.Control(func(fd uintptr) {
		if _, _, errno := syscall.Syscall(syscall.SYS_IOCTL, fd, syscall.TIOCOUTQ, uintptr(unsafe.Pointer(&n))); errno != 0 {
			n = 0
		}
	})
	return int(n)
}

// hungUp reports whether the client has hung up, for a reader that reads
// nothing meanwhile (awaitReplay): its FIN has come, even behind
// bytes not read yet, which stay in the socket (poll(2)'s POLLRDHUP), or
// a reset (POLLHUP, POLLERR). False when it cannot tell. One ppoll that
// does not wait: epoll's EPOLLRDHUP, EPOLLHUP and EPOLLERR are poll's
// bits under their epoll names, which package syscall has.
func (r *frameReader) hungUp() bool {
	if r.raw == nil {
		return false
	}
	const gone = syscall.EPOLLRDHUP | syscall.EPOLLHUP | syscall.EPOLLERR
	pfd := struct {
		fd              int32
		events, revents int16
	}{events: syscall.EPOLLRDHUP}
	var now syscall.Timespec // a zero timeout: ppoll returns at once
	hung := false
	_ = r.raw.Control(func(fd uintptr) {
		pfd.fd = int32(fd)
		n, _, errno := syscall.RawSyscall6(syscall.SYS_PPOLL, uintptr(unsafe.Pointer(&pfd)), 1, uintptr(unsafe.Pointer(&now)), 0, 0, 0)
		hung = errno == 0 && n == 1 && pfd.revents&gone != 0
	})
	return hung
}
