package stream

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// splitConn writes a pipeline holding mark in two parts: up to the
// command that holds mark, then, once between has run, the rest. Redis
// runs what it has read before it reads more, so between runs after the
// first part's commands and before the rest, as when another client's
// commands land between two reads of a large pipeline.
type splitConn struct {
	net.Conn
	mark    []byte
	between func()
}

func (c *splitConn) Write(p []byte) (int, error) {
	i := bytes.Index(p, c.mark)
	if c.mark == nil || i < 0 {
		return c.Conn.Write(p)
	}
	cut := bytes.LastIndex(p[:i], []byte("\r\n*")) + 2 // the start of mark's command
	c.mark = nil
	n, err := c.Conn.Write(p[:cut])
	if err != nil {
		return n, err
	}
	c.between()
	m, err := c.Conn.Write(p[cut:])
	return n + m, err
}

// TestAppendOrderWhenScriptLoadedMidPipeline: one caller's appends to one
// stream keep their order, through a Store and through a Batcher, even
// when Redis's script cache is empty as the pipeline starts and another
// client loads the script while it runs (after a restart or a failover
// every ingress reloads it at once): the first append must not be
// refused (NOSCRIPT) and then run again after a later one.
func TestAppendOrderWhenScriptLoadedMidPipeline(t *testing.T) {
	t.Parallel()
	for _, name := range []string{"store", "batcher"} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			rs := redistest.Start(t)
			ctx := t.Context()
			other := redis.NewClient(&redis.Options{Addr: rs.Addr(), DisableIdentity: true})
			defer other.Close()
			rdb := redis.NewClient(&redis.Options{Addr: rs.Addr(), DisableIdentity: true, PoolSize: 1,
				Dialer: func(dctx context.Context, network, addr string) (net.Conn, error) {
					c, err := (&net.Dialer{}).DialContext(dctx, network, addr)
					if err != nil {
						return nil, err
					}
					return &splitConn{Conn: c, mark: []byte(`"second"`), between: func() {
						// Once Redis has run (or refused) the first append,
						// another client loads the script.
						testkit.Eventually(t, 5*time.Second, func() error {
							if s := other.Info(ctx, "commandstats").Val(); !strings.Contains(s, "cmdstat_eval") {
								return errors.New("the first append has not reached Redis")
							}
							return nil
						})
						if err := other.ScriptLoad(ctx, appendSrc).Err(); err != nil {
							t.Error(err)
						}
					}}, nil
				}})
			defer rdb.Close()
			ks := keys.Scheme{Prefix: "order"}
			ap := func(ch, data string) Append {
				return Append{Stream: ks.Stream(ch), Notify: ks.Notify(ch), Msg: Message{Channel: ch, TS: 1, Data: []byte(data)}}
			}
			as := []Append{ap("x", `"first"`), ap("y", `"other"`), ap("x", `"second"`)}
			var ids []string
			var err error
			if name == "store" {
				ids, err = NewStore(rdb).Append(ctx, as)
			} else {
				ids, err = NewBatcher(NewStore(rdb), 5*time.Second, 1, 64).Append(ctx, as)
			}
			if err != nil {
				t.Fatal(err)
			}
			msgs, err := other.XRange(ctx, ks.Stream("x"), "-", "+").Result()
			if err != nil {
				t.Fatal(err)
			}
			var order []string
			for _, e := range entriesOf(msgs) {
				d, _ := e.Decode()
				order = append(order, string(d.Data))
			}
			if len(order) != 2 || order[0] != `"first"` || !MustParseID(ids[0]).Less(MustParseID(ids[2])) {
				t.Fatalf("stream holds %v; ids answered %v", order, ids)
			}
		})
	}
}

// TestLoadFirstOfRepeated: the first of a caller's appends to each stream
// it appends to more than once is marked, within the caller's own
// appends only, for few appends (compared pairwise) and many (a map).
func TestLoadFirstOfRepeated(t *testing.T) {
	t.Parallel()
	of := func(streams ...string) []Append {
		as := make([]Append, len(streams))
		for i, s := range streams {
			as[i].Stream = s
		}
		return as
	}
	if load := loadFirstOfRepeated(nil, of("a", "b", "c"), 0, 3); load != nil {
		t.Fatalf("no stream repeated: %v", load)
	}
	// Two callers: [a b a a] and [b c]; b is repeated only across them.
	as := of("a", "b", "a", "a", "b", "c")
	load := loadFirstOfRepeated(nil, as, 0, 4)
	load = loadFirstOfRepeated(load, as, 4, 6)
	if want := []bool{true, false, false, false, false, false}; !slices.Equal(load, want) {
		t.Fatalf("load = %v, want %v", load, want)
	}
	// The smallest repeat: a caller's two appends to one stream, after
	// another caller's one to it.
	as = of("a", "a", "a")
	load = loadFirstOfRepeated(nil, as, 0, 1)
	load = loadFirstOfRepeated(load, as, 1, 3)
	if want := []bool{false, true, false}; !slices.Equal(load, want) {
		t.Fatalf("two appends to a: load = %v, want %v", load, want)
	}
	var many []string
	for i := range 40 {
		many = append(many, fmt.Sprint(i%20)) // 0…19 twice
	}
	many = append(many, "x")
	load = loadFirstOfRepeated(nil, of(many...), 0, len(many))
	for i, l := range load {
		if l != (i < 20) {
			t.Fatalf("many: load[%d] = %v", i, l)
		}
	}
}
