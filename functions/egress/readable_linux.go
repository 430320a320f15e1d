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
// goroutine then meets the error itself).
func (r *frameReader) writeNow(b []byte) int {
	if r.raw == nil {
		return 0
	}
	n := 0
	_ = r.raw.Write(func(fd uintptr) bool {
		w, _, errno := syscall.RawSyscall(syscall.SYS_WRITE, fd, uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)))
		if errno == 0 {
			n = int(w)
		}
		return true // never wait
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
