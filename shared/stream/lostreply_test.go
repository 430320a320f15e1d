package stream

import (
	"bytes"
	"encoding/json"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redisconn"
	"github.com/wsrelay/wsrelay/shared/redistest"
)

// TestAppendLostReplyNotWrittenTwice: an append whose reply is lost after
// Redis ran it (the connection cut then, or the reply later than
// REDIS_TIMEOUT: a Redis busy forking, a slow network) fails, and the
// message is in its stream once. go-redis retried it, on the client
// redisconn.New made (MaxRetries 1), on a new connection: the script ran
// again and the message was written twice, under two ids, and delivered
// twice (a publisher without an Idempotency-Key, and the publisher never
// knew). The caller's error is what lets a publisher retry with its key.
func TestAppendLostReplyNotWrittenTwice(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	relay := newReplyDropper(t, rs.Addr())
	rdb, err := redisconn.New(redisconn.Config{URL: "redis://" + relay.addr(), Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rdb.Close() })
	ks := keys.Scheme{Prefix: redistest.Prefix(t)}
	s := NewStore(rdb)
	appendTo := func(ch string) error {
		_, err := s.Append(t.Context(), []Append{{Stream: ks.Stream(ch), Notify: ks.Notify(ch),
			Msg: Message{Channel: ch, TS: time.Now().UnixMilli(), Data: json.RawMessage(`{"n":1}`)}}})
		return err
	}
	// The script is loaded and the connection pooled first.
	if err := appendTo("warm"); err != nil {
		t.Fatal(err)
	}
	relay.dropAfter([]byte(ks.Stream("lost")))
	err = appendTo("lost")
	if relay.dropped.Load() != 1 {
		t.Fatalf("%d replies dropped, want 1 (the append's)", relay.dropped.Load())
	}
	admin := redis.NewClient(rs.Options())
	defer admin.Close()
	n, xerr := admin.XLen(t.Context(), ks.Stream("lost")).Result()
	if xerr != nil {
		t.Fatal(xerr)
	}
	if n != 1 || err == nil {
		t.Fatalf("after its reply was lost the append returned %v, and its stream holds %d entries; want an error and 1 entry", err, n)
	}
}

// replyDropper relays TCP connections to a Redis; once armed with a
// marker, the connection that next sends it has Redis's reply dropped:
// the connection is cut once Redis has had time to run the command.
type replyDropper struct {
	ln      net.Listener
	target  string
	mu      sync.Mutex
	marker  []byte
	dropped atomic.Int32
	wg      sync.WaitGroup
}

func newReplyDropper(t *testing.T, target string) *replyDropper {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &replyDropper{ln: ln, target: target}
	var conns sync.Map
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			conns.Store(c, up)
			r.wg.Add(2)
			var dropping atomic.Bool
			go func() { // client to Redis
				defer r.wg.Done()
				buf := make([]byte, 64<<10)
				for {
					n, err := c.Read(buf)
					if n > 0 {
						r.mu.Lock()
						hit := r.marker != nil && bytes.Contains(buf[:n], r.marker)
						if hit {
							r.marker = nil
							dropping.Store(true)
						}
						r.mu.Unlock()
						if _, werr := up.Write(buf[:n]); werr != nil {
							return
						}
						if hit {
							time.Sleep(100 * time.Millisecond) // Redis runs it
							r.dropped.Add(1)
							c.Close()
							up.Close()
							return
						}
					}
					if err != nil {
						up.Close()
						return
					}
				}
			}()
			go func() { // Redis to client, until dropping
				defer r.wg.Done()
				buf := make([]byte, 64<<10)
				for {
					n, err := up.Read(buf)
					if n > 0 && !dropping.Load() {
						if _, werr := c.Write(buf[:n]); werr != nil {
							return
						}
					}
					if err != nil {
						c.Close()
						return
					}
				}
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		conns.Range(func(k, v any) bool {
			k.(net.Conn).Close()
			v.(net.Conn).Close()
			return true
		})
		r.wg.Wait()
	})
	return r
}

func (r *replyDropper) addr() string { return r.ln.Addr().String() }

func (r *replyDropper) dropAfter(marker []byte) {
	r.mu.Lock()
	r.marker = marker
	r.mu.Unlock()
}
