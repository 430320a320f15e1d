package redisconn

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/redistest"
)

func TestMain(m *testing.M) { redistest.Main(m) }

func TestValidate(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		c    Config
		want []string // substrings of the error; nil means valid
		hide string   // must not be in the error (a password)
	}{
		{"single", Config{URL: "redis://127.0.0.1:6379/0", Timeout: time.Second}, nil, ""},
		{"tls with password", Config{URL: "rediss://:pw@example.com:6380/2", Timeout: time.Second}, nil, ""},
		{"cluster", Config{ClusterAddrs: "a:1, b:2", Timeout: time.Second}, nil, ""},
		{"cluster ignores URL", Config{URL: "junk", ClusterAddrs: "a:1", Timeout: time.Second}, nil, ""},
		{"bad scheme", Config{URL: "http://x", Timeout: time.Second}, []string{"REDIS_URL"}, ""},
		{"bad cluster addr", Config{ClusterAddrs: "a:1,b", Timeout: time.Second}, []string{"REDIS_CLUSTER_ADDRS", "entry 2"}, ""},
		{"all bad", Config{URL: "nope://", Timeout: 0}, []string{"REDIS_URL", "REDIS_TIMEOUT"}, ""},
		{"cluster addr as a URL", Config{ClusterAddrs: "redis://127.0.0.1:6379", Timeout: time.Second}, []string{"REDIS_CLUSTER_ADDRS"}, ""},
		{"cluster addr without a port", Config{ClusterAddrs: "a:", Timeout: time.Second}, []string{"REDIS_CLUSTER_ADDRS"}, ""},
		{"negative pool", Config{URL: "redis://127.0.0.1:6379/0", Timeout: time.Second, PoolSize: -1}, []string{"REDIS_POOL_SIZE"}, ""},
		{"URL with a password that does not parse", Config{URL: "redis://user:s3cret%zz@h:6379/0", Timeout: time.Second}, []string{"REDIS_URL", "percent-encode"}, "s3cret"},
		{"password with a slash", Config{URL: "redis://:S3cr/et9@10.0.0.1:6379/0", Timeout: time.Second}, []string{"REDIS_URL"}, "S3cr"},
		{"password with a slash after digits", Config{URL: "redis://:1234/s3cretpw@10.0.0.1:6379/0", Timeout: time.Second}, []string{"REDIS_URL", "percent-encode"}, "s3cretpw"},
		{"password with a slash after the port", Config{URL: "redis://:6379/s3cretpw@h:6379", Timeout: time.Second}, []string{"REDIS_URL"}, "s3cretpw"},
		{"cluster addr as a URL with a password", Config{ClusterAddrs: "a:1,redis://:s3cret@h:6379", Timeout: time.Second}, []string{"REDIS_CLUSTER_ADDRS", "entry 2"}, "s3cret"},
		{"negative pool, cluster", Config{ClusterAddrs: "a:1", Timeout: time.Second, PoolSize: -1}, []string{"REDIS_POOL_SIZE"}, ""},
		{"braces in the key prefix", Config{URL: "redis://127.0.0.1:6379/0", Timeout: time.Second, KeyPrefix: "{}"}, []string{"REDIS_KEY_PREFIX"}, ""},
		{"timeout under 1ms", Config{URL: "redis://127.0.0.1:6379/0", Timeout: time.Nanosecond}, []string{"REDIS_TIMEOUT"}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.c.Validate()
			if tc.want == nil {
				if err != nil {
					t.Fatalf("Validate: %v", err)
				}
				if _, err := New(tc.c); err != nil {
					t.Fatalf("New: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatal("no error")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %s", err, w)
				}
			}
			_, nerr := New(tc.c)
			if nerr == nil {
				t.Error("New accepted an invalid config")
			}
			if tc.hide != "" && (strings.Contains(err.Error(), tc.hide) || strings.Contains(nerr.Error(), tc.hide)) {
				t.Errorf("error shows the password: %q, %q", err, nerr)
			}
		})
	}
}

func TestNew(t *testing.T) {
	t.Parallel()
	single, err := New(Config{URL: redistest.URL(t), Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer single.Close()
	if _, ok := single.(*redis.Client); !ok {
		t.Fatalf("single node client is %T", single)
	}
	if err := Ping(t.Context(), single); err != nil {
		t.Fatalf("Ping: %v", err)
	}
	cluster, err := New(Config{ClusterAddrs: "127.0.0.1:1,127.0.0.1:2", Timeout: time.Second, ClusterTLS: true})
	if err != nil {
		t.Fatal(err)
	}
	defer cluster.Close()
	if _, ok := cluster.(*redis.ClusterClient); !ok {
		t.Fatalf("cluster client is %T", cluster)
	}
}

// A Redis that is down is reported within about the timeout, not after
// go-redis's default dial retries.
func TestPingDown(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	rdb, err := New(Config{URL: rs.URL(), Timeout: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer rdb.Close()
	if err := Ping(t.Context(), rdb); err != nil {
		t.Fatalf("Ping up: %v", err)
	}
	rs.Stop()
	start := time.Now()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	if err := Ping(ctx, rdb); err == nil {
		t.Fatal("Ping of a stopped server succeeded")
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("Ping failed after %v", d)
	}
}

// NodeFailure tells a node that is gone or demoted (the cluster's slot map
// must be reloaded) from a Redis reply or a caller giving up.
func TestNodeFailure(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	rdb := redis.NewClient(&redis.Options{Addr: rs.Addr(), DisableIdentity: true, DialerRetries: 1})
	defer rdb.Close()
	ctx := t.Context()
	nilErr := rdb.Get(ctx, "no such key").Err()
	scriptErr := rdb.Eval(ctx, "return redis.error_reply('boom')", nil).Err()
	readonly := rdb.Eval(ctx, "return redis.error_reply('READONLY You can\\'t write against a read only replica.')", nil).Err()
	rs.Stop()
	down := rdb.Ping(ctx).Err()
	canceled, cancel := context.WithCancel(ctx)
	cancel()
	for _, tc := range []struct {
		name string
		err  error
		want bool
	}{
		{"nil", nil, false},
		{"missing key", nilErr, false},
		{"script error", scriptErr, false},
		{"canceled", context.Canceled, false},
		{"canceled wrapped", rdb.Ping(canceled).Err(), false},
		{"readonly", readonly, true},
		{"node down", down, true},
		{"deadline", context.DeadlineExceeded, true},
	} {
		if got := NodeFailure(tc.err); got != tc.want {
			t.Errorf("%s (%v): NodeFailure = %v, want %v", tc.name, tc.err, got, tc.want)
		}
	}
}

// pingCounter counts the PINGs a client sends.
type pingCounter struct{ n atomic.Int32 }

func (h *pingCounter) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h *pingCounter) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if cmd.Name() == "ping" {
			h.n.Add(1)
		}
		return next(ctx, cmd)
	}
}

func (h *pingCounter) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

// Readiness pings once per interval, whatever the number of checks, and
// reports a Redis gone down once the interval has passed.
func TestReadiness(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t)
	rdb, err := New(Config{URL: rs.URL(), Timeout: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer rdb.Close()
	pings := &pingCounter{}
	rdb.AddHook(pings)
	r := NewReadiness(rdb, 300*time.Millisecond)
	canceled, cancel := context.WithCancel(t.Context())
	cancel()
	for range 10 {
		// A caller that gave up does not make the answer an error.
		if err := r.Check(canceled); err != nil {
			t.Fatalf("Check: %v", err)
		}
	}
	if n := pings.n.Load(); n != 1 {
		t.Fatalf("%d PINGs for 10 checks within the interval, want 1", n)
	}
	rs.Stop()
	if err := r.Check(t.Context()); err != nil {
		t.Fatalf("Check within the interval, the last answer cached: %v", err)
	}
	time.Sleep(350 * time.Millisecond)
	if err := r.Check(t.Context()); err == nil {
		t.Fatal("Check after the interval of a stopped Redis succeeded")
	}
	if n := pings.n.Load(); n != 2 {
		t.Fatalf("%d PINGs, want 2", n)
	}
}
