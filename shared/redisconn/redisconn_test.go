package redisconn

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
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
		// 10 × REDIS_TIMEOUT (an idempotency claim) would overflow.
		{"huge timeout", Config{URL: "redis://127.0.0.1:6379/0", Timeout: 1000000 * time.Hour}, []string{"REDIS_TIMEOUT"}, ""},
		// go-redis panics past 2^31-1, and allocates a slice of PoolSize.
		{"huge pool", Config{URL: "redis://127.0.0.1:6379/0", Timeout: time.Second, PoolSize: 1 << 31}, []string{"REDIS_POOL_SIZE"}, ""},
		{"huge pool, cluster", Config{ClusterAddrs: "a:1", Timeout: time.Second, PoolSize: 1_000_000_000}, []string{"REDIS_POOL_SIZE"}, ""},
		// A host:port for net.SplitHostPort, but the dial error (logged)
		// would quote the password.
		{"cluster addr with a password", Config{ClusterAddrs: "a:1,s3cret@h:6379", Timeout: time.Second}, []string{"REDIS_CLUSTER_ADDRS", "entry 2"}, "s3cret"},
		{"cluster addr with a path", Config{ClusterAddrs: "h/x:6379", Timeout: time.Second}, []string{"REDIS_CLUSTER_ADDRS", "entry 1"}, ""},
		// A cluster's settings without REDIS_CLUSTER_ADDRS would go unused,
		// on a connection to REDIS_URL.
		{"cluster password without addrs", Config{URL: "redis://127.0.0.1:6379/0", Timeout: time.Second, ClusterPassword: "s3cret"}, []string{"REDIS_CLUSTER_PASSWORD is set without REDIS_CLUSTER_ADDRS"}, "s3cret"},
		{"cluster user and TLS without addrs", Config{URL: "redis://127.0.0.1:6379/0", Timeout: time.Second, ClusterUsername: "u", ClusterPassword: "p", ClusterTLS: true}, []string{"REDIS_CLUSTER_USERNAME is set without", "REDIS_CLUSTER_PASSWORD is set without", "REDIS_CLUSTER_TLS is set without"}, ""},
		{"cluster IPv6", Config{ClusterAddrs: "[::1]:7000,[fe80::1%eth0]:7001", Timeout: time.Second}, nil, ""},
		{"cluster IPv6 without brackets", Config{ClusterAddrs: "::1:7000", Timeout: time.Second}, []string{"REDIS_CLUSTER_ADDRS"}, ""},
		// The docs' placeholder, or a port number with a typo: it would
		// start, and every dial fail.
		{"cluster port not a number", Config{ClusterAddrs: "a:1,h:port", Timeout: time.Second}, []string{"REDIS_CLUSTER_ADDRS", "entry 2"}, ""},
		{"cluster port 0", Config{ClusterAddrs: "h:0", Timeout: time.Second}, []string{"REDIS_CLUSTER_ADDRS", "entry 1"}, ""},
		{"cluster port above 65535", Config{ClusterAddrs: "h:65536", Timeout: time.Second}, []string{"REDIS_CLUSTER_ADDRS", "entry 1"}, ""},
		{"cluster port 65535", Config{ClusterAddrs: "h:65535", Timeout: time.Second}, nil, ""},
		{"cluster empty entry", Config{ClusterAddrs: "a:1,,b:2", Timeout: time.Second}, []string{"REDIS_CLUSTER_ADDRS", "entry 2"}, ""},
		{"IPv6", Config{URL: "redis://[::1]:6379/0", Timeout: time.Second}, nil, ""},
		{"no port", Config{URL: "redis://h/3", Timeout: time.Second}, nil, ""},
		// go-redis takes a negative database for 0 (the startup line said
		// -1), and a port past 65535 started with every dial failing.
		{"negative database", Config{URL: "redis://:s3cret@h:6379/-1", Timeout: time.Second}, []string{"REDIS_URL", "database"}, "s3cret"},
		{"negative database as a parameter", Config{URL: "redis://h:6379?db=-5", Timeout: time.Second}, []string{"REDIS_URL", "database"}, ""},
		{"port above 65535", Config{URL: "redis://:s3cret@h:99999/0", Timeout: time.Second}, []string{"REDIS_URL", "port"}, "s3cret"},
		{"port 0", Config{URL: "rediss://h:0/0", Timeout: time.Second}, []string{"REDIS_URL", "port"}, ""},
		{"port 65535", Config{URL: "redis://h:65535/0", Timeout: time.Second}, nil, ""},
		{"unix socket", Config{URL: "unix:///run/redis.sock?db=2", Timeout: time.Second}, nil, ""},
		// Options that REDIS_TIMEOUT and REDIS_POOL_SIZE set: go-redis
		// takes them, and New overrode them without a word.
		{"URL dial_timeout", Config{URL: "redis://h:6379/0?dial_timeout=5s", Timeout: time.Second}, []string{"REDIS_URL", "dial_timeout", "REDIS_TIMEOUT"}, ""},
		{"URL read_timeout", Config{URL: "rediss://:s3cret@h:6379/0?read_timeout=-1", Timeout: time.Second}, []string{"REDIS_URL", "read_timeout", "REDIS_TIMEOUT"}, "s3cret"},
		{"URL max_retries", Config{URL: "redis://h:6379/0?max_retries=3", Timeout: time.Second}, []string{"REDIS_URL", "max_retries"}, ""},
		{"URL pool_size", Config{URL: "redis://h:6379/0?pool_size=100000000", Timeout: time.Second}, []string{"REDIS_URL", "pool_size", "REDIS_POOL_SIZE"}, ""},
		{"URL pipeline_pool_size", Config{URL: "redis://h:6379/0?pipeline_pool_size=10", Timeout: time.Second}, []string{"REDIS_URL", "pipeline_pool_size", "REDIS_POOL_SIZE"}, ""},
		// A password with a "#" or "?" not percent-encoded: its start, if
		// digits, parsed as the port of a host that is the user name, and
		// the rest as a fragment go-redis ignores or as a query option;
		// the startup line showed "user:12345" as the Redis address.
		{"password with a hash after digits", Config{URL: "redis://user:12345#s3cret@h:6379/0", Timeout: time.Second}, []string{"REDIS_URL", "percent-encode"}, "12345"},
		{"password with a hash after a port", Config{URL: "redis://:6380#s3cret@h:6379", Timeout: time.Second}, []string{"REDIS_URL", "percent-encode"}, "s3cret"},
		{"password with a question mark", Config{URL: "rediss://user:123?client_name=s3cret@h:6379", Timeout: time.Second}, []string{"REDIS_URL", "percent-encode"}, "s3cret"},
		// "redis:" without "//": go-redis read no host and dialled localhost.
		{"no slashes", Config{URL: "redis:h:6379", Timeout: time.Second}, []string{"REDIS_URL"}, ""},
		// "redis://" with no host: go-redis dialled localhost, as for
		// a REDIS_URL=redis://$HOST:6379 written with HOST unset.
		{"no host", Config{URL: "redis://:6379/0", Timeout: time.Second}, []string{"REDIS_URL", "host"}, ""},
		{"no host with a password", Config{URL: "rediss://:s3cret@:6380/0", Timeout: time.Second}, []string{"REDIS_URL", "host"}, "s3cret"},
		{"nothing after the slashes", Config{URL: "redis://", Timeout: time.Second}, []string{"REDIS_URL", "host"}, ""},
		// go-redis logs in only with a password: the user name was
		// dropped without a word, and it connected without logging in
		// (a password written without its ":" reads as a user name).
		{"user name without a password", Config{URL: "redis://s3cret@h:6379/0", Timeout: time.Second}, []string{"REDIS_URL", "password"}, "s3cret"},
		{"user name with an empty password", Config{URL: "rediss://s3cret:@h:6379/0", Timeout: time.Second}, []string{"REDIS_URL", "password"}, "s3cret"},
		{"unix user name without a password", Config{URL: "unix://s3cret@/run/redis.sock", Timeout: time.Second}, []string{"REDIS_URL", "password"}, "s3cret"},
		{"user name and password", Config{URL: "redis://u:pw@h:6379/0", Timeout: time.Second}, nil, ""},
		{"cluster user name without a password", Config{ClusterAddrs: "a:1", ClusterUsername: "wsrelay", Timeout: time.Second}, []string{"REDIS_CLUSTER_USERNAME", "REDIS_CLUSTER_PASSWORD"}, ""},
		{"cluster user name and password", Config{ClusterAddrs: "a:1", ClusterUsername: "wsrelay", ClusterPassword: "pw", Timeout: time.Second}, nil, ""},
		{"cluster password alone", Config{ClusterAddrs: "a:1", ClusterPassword: "pw", Timeout: time.Second}, nil, ""},
		// go-redis panics in New (not an error) past 2^31-1.
		{"URL min_idle_conns past int32", Config{URL: "redis://h:6379/0?min_idle_conns=3000000000", Timeout: time.Second}, []string{"REDIS_URL", "min_idle_conns"}, ""},
		{"URL max_idle_conns past int32", Config{URL: "redis://h:6379/0?max_idle_conns=3000000000", Timeout: time.Second}, []string{"REDIS_URL", "max_idle_conns"}, ""},
		{"URL max_active_conns past int32", Config{URL: "redis://h:6379/0?max_active_conns=3000000000", Timeout: time.Second}, []string{"REDIS_URL", "max_active_conns"}, ""},
		{"URL idle and active conns", Config{URL: "redis://h:6379/0?max_idle_conns=5&max_active_conns=20", Timeout: time.Second}, nil, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.c.Validate()
			if tc.want == nil {
				if err != nil {
					t.Fatalf("Validate: %v", err)
				}
				rdb, err := New(tc.c)
				if err != nil {
					t.Fatalf("New: %v", err)
				}
				rdb.Close()
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

// pingCounter counts the PINGs a client sends, alone or in a pipeline.
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
	return func(ctx context.Context, cmds []redis.Cmder) error {
		for _, cmd := range cmds {
			if cmd.Name() == "ping" {
				h.n.Add(1)
			}
		}
		return next(ctx, cmds)
	}
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
	// The interval holds the ten checks and stopping Redis (a process to
	// wait for): 300 ms was not always enough on a loaded machine.
	const interval = 3 * time.Second
	r := NewReadiness(rdb, interval)
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
	time.Sleep(interval + 50*time.Millisecond)
	if err := r.Check(t.Context()); err == nil {
		t.Fatal("Check after the interval of a stopped Redis succeeded")
	}
	if n := pings.n.Load(); n != 2 {
		t.Fatalf("%d PINGs, want 2", n)
	}
}

// The startup line says where Redis is, whether TLS checks the server's
// certificate, and never the password.
func TestLogAttrs(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		c    Config
		want map[string]any
	}{
		{"plain", Config{URL: "redis://:s3cret@h:6379/2"}, map[string]any{"redis": "h:6379", "redis_db": 2, "redis_tls": false, "redis_password": true}},
		{"tls", Config{URL: "rediss://h:6380/0"}, map[string]any{"redis": "h:6380", "redis_tls": true, "redis_tls_verify": true}},
		{"tls without verification", Config{URL: "rediss://:s3cret@h:6380/0?skip_verify=true"}, map[string]any{"redis_tls": true, "redis_tls_verify": false}},
		{"IPv6", Config{URL: "redis://[::1]:6379/0"}, map[string]any{"redis": "[::1]:6379"}},
		{"unix", Config{URL: "unix://:s3cret@/run/redis.sock?db=3"}, map[string]any{"redis": "/run/redis.sock", "redis_db": 3, "redis_password": true}},
		{"cluster", Config{ClusterAddrs: "a:1, b:2", ClusterPassword: "s3cret", ClusterTLS: true}, map[string]any{"redis_cluster": "a:1,b:2", "redis_tls": true, "redis_password": true}},
	} {
		attrs := tc.c.LogAttrs()
		got := map[string]any{}
		for i := 0; i+1 < len(attrs); i += 2 {
			got[attrs[i].(string)] = attrs[i+1]
		}
		for k, v := range tc.want {
			if got[k] != v {
				t.Errorf("%s: %s = %v, want %v (all: %v)", tc.name, k, got[k], v, attrs)
			}
		}
		if s := fmt.Sprint(attrs...); strings.Contains(s, "s3cret") {
			t.Errorf("%s: attributes show the password: %s", tc.name, s)
		}
	}
}

// A unix socket URL reaches Redis, with its database number.
func TestUnixSocket(t *testing.T) {
	t.Parallel()
	sock := filepath.Join(t.TempDir(), "redis.sock")
	redistest.Start(t, "--unixsocket", sock)
	rdb, err := New(Config{URL: "unix://" + sock + "?db=3", Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer rdb.Close()
	if err := rdb.Set(t.Context(), "k", "v", 0).Err(); err != nil {
		t.Fatalf("SET over the socket: %v", err)
	}
	if db := rdb.(*redis.Client).Options().DB; db != 3 {
		t.Fatalf("db %d, want 3", db)
	}
}

// A Redis that answers but is a replica (read-only: every append would
// fail) is not ready.
func TestReadinessReplica(t *testing.T) {
	t.Parallel()
	master := redistest.Start(t)
	replica := redistest.Start(t, "--replicaof", "127.0.0.1", strconv.Itoa(master.Port))
	rdb, err := New(Config{URL: replica.URL(), Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer rdb.Close()
	if err := NewReadiness(rdb, time.Minute).Check(t.Context()); err == nil {
		t.Fatal("a replica is ready")
	} else if !strings.Contains(err.Error(), "replica") {
		t.Fatalf("Check: %v, want it to say replica", err)
	}
	mdb, err := New(Config{URL: master.URL(), Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer mdb.Close()
	if err := NewReadiness(mdb, time.Minute).Check(t.Context()); err != nil {
		t.Fatalf("master: %v", err)
	}
	// A user that may not run ROLE (a managed Redis may refuse it): PING
	// alone decides.
	if err := mdb.Do(t.Context(), "ACL", "SETUSER", "norole", "on", ">pw", "+@all", "-role", "~*").Err(); err != nil {
		t.Fatal(err)
	}
	ndb, err := New(Config{URL: "redis://norole:pw@" + master.Addr() + "/0", Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer ndb.Close()
	if err := NewReadiness(ndb, time.Minute).Check(t.Context()); err != nil {
		t.Fatalf("master, ROLE refused: %v", err)
	}
}

// TestReadinessClusterWithReplicas: a healthy cluster whose masters have
// replicas is ready. Its replicas are checked for an answer, not for
// being masters.
func TestReadinessClusterWithReplicas(t *testing.T) {
	t.Parallel()
	if testing.Short() {
		t.Skip("starts a Redis Cluster")
	}
	c := redistest.StartCluster(t, 3, 1)
	rdb, err := New(Config{ClusterAddrs: c.AddrsEnv(), Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer rdb.Close()
	// Until the replicas have joined and the client's slot map has them,
	// the check would prove nothing.
	cc := rdb.(*redis.ClusterClient)
	var replica atomic.Value // the address of any one replica the client knows
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		var replicas atomic.Int32
		err := cc.ForEachSlave(t.Context(), func(_ context.Context, n *redis.Client) error { // concurrently
			replicas.Add(1)
			replica.Store(n.Options().Addr)
			return nil
		})
		if err == nil && replicas.Load() == 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the client knows %d replicas (%v), want 3", replicas.Load(), err)
		}
		cc.ReloadState(t.Context())
	}
	if err := NewReadiness(rdb, time.Minute).Check(t.Context()); err != nil {
		t.Fatalf("a healthy cluster with replicas: %v", err)
	}
	// A replica down, still in the client's slot map (the cluster has not
	// marked it failed yet): the functions do not use replicas, so the
	// instances stay ready.
	c.StopNode(t, c.Index(replica.Load().(string)))
	if err := NewReadiness(rdb, time.Minute).Check(t.Context()); err != nil {
		t.Fatalf("a replica down: %v, want ready", err)
	}
}

// LoginRefused tells a login Redis refuses (a wrong password, no password
// where one is wanted, a user that does not exist or is disabled) from a
// command refused to a user logged in (Refused) and a Redis out of reach,
// as go-redis reports it: the server's error from the connection's
// handshake, wrapped ("failed to authenticate: WRONGPASS …") or not, to a
// command, a readiness Ping and a Pub/Sub connection alike.
func TestLoginRefused(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t, "--requirepass", "rightpw")
	admin := redis.NewClient(&redis.Options{Addr: rs.Addr(), Password: "rightpw", DisableIdentity: true})
	defer admin.Close()
	for _, args := range [][]any{
		{"ACL", "SETUSER", "off", "off", ">pw", "~*", "+@all"},
		{"ACL", "SETUSER", "pingonly", "on", ">pw", "+ping"},
	} {
		if err := admin.Do(t.Context(), args...).Err(); err != nil {
			t.Fatal(err)
		}
	}
	url := func(userinfo string) string {
		return "redis://" + userinfo + "@" + rs.Addr() + "/0"
	}
	errOf := func(t *testing.T, u string, f func(context.Context, redis.UniversalClient) error) error {
		t.Helper()
		rdb, err := New(Config{URL: u, Timeout: time.Second})
		if err != nil {
			t.Fatal(err)
		}
		defer rdb.Close()
		return f(t.Context(), rdb)
	}
	ping := func(ctx context.Context, rdb redis.UniversalClient) error { return Ping(ctx, rdb) }
	set := func(ctx context.Context, rdb redis.UniversalClient) error { return rdb.Set(ctx, "k", "v", 0).Err() }
	// More than 10 arguments: to a client not logged in, Redis answers
	// "Protocol error: unauthenticated multibulk length" before it reads
	// the command (an append script's call is one).
	mset := func(ctx context.Context, rdb redis.UniversalClient) error {
		return rdb.MSet(ctx, "a", 1, "b", 2, "c", 3, "d", 4, "e", 5, "f", 6).Err()
	}
	subscribe := func(ctx context.Context, rdb redis.UniversalClient) error {
		ps := rdb.SSubscribe(ctx)
		defer ps.Close()
		if err := ps.SSubscribe(ctx, "c"); err != nil {
			return err
		}
		_, err := ps.Receive(ctx)
		return err
	}
	stopped := redistest.Start(t)
	stopped.Stop()
	for _, tc := range []struct {
		name string
		url  string
		f    func(context.Context, redis.UniversalClient) error
		want bool
	}{
		{"wrong password", url(":wrongpw"), ping, true},
		{"wrong password, a command", url(":wrongpw"), set, true},
		{"wrong password, pub/sub", url(":wrongpw"), subscribe, true},
		{"no password", "redis://" + rs.Addr() + "/0", ping, true},
		{"no password, a command", "redis://" + rs.Addr() + "/0", set, true},
		{"no password, a long command", "redis://" + rs.Addr() + "/0", mset, true},
		{"no password, pub/sub", "redis://" + rs.Addr() + "/0", subscribe, true},
		{"unknown user", url("nobody:pw"), ping, true},
		{"disabled user", url("off:pw"), ping, true},
		{"disabled user, pub/sub", url("off:pw"), subscribe, true},
		{"a command refused to the user", url("pingonly:pw"), set, false},
		{"redis down", stopped.URL(), ping, false},
	} {
		err := errOf(t, tc.url, tc.f)
		if err == nil {
			t.Errorf("%s: no error", tc.name)
			continue
		}
		if got := LoginRefused(err); got != tc.want {
			t.Errorf("%s (%v): LoginRefused = %v, want %v", tc.name, err, got, tc.want)
		}
		if tc.want && Refused(err) {
			t.Errorf("%s (%v): Refused too", tc.name, err)
		}
	}
	if LoginRefused(nil) {
		t.Error("LoginRefused(nil)")
	}
}

// TestAddLoginHook: the hook is called at each login Redis accepts (a
// connection's HELLO, which carries the password), for commands and
// Pub/Sub connections alike, on a cluster's nodes too (their connections
// log in through the node clients' hooks), and never for a login Redis
// refuses.
func TestAddLoginHook(t *testing.T) {
	t.Parallel()
	rs := redistest.Start(t, "--requirepass", "rightpw")
	open := redistest.Start(t)
	c := redistest.StartCluster(t, 3, 0)
	subscribe := func(ctx context.Context, rdb redis.UniversalClient) error {
		ps := rdb.SSubscribe(ctx)
		defer ps.Close()
		if err := ps.SSubscribe(ctx, "c"); err != nil {
			return err
		}
		_, err := ps.Receive(ctx)
		return err
	}
	set := func(ctx context.Context, rdb redis.UniversalClient) error { return rdb.Set(ctx, "k", "v", 0).Err() }
	for _, tc := range []struct {
		name   string
		c      Config
		f      func(context.Context, redis.UniversalClient) error
		logins bool
	}{
		{"right password", Config{URL: "redis://:rightpw@" + rs.Addr() + "/0"}, set, true},
		{"right password, pub/sub", Config{URL: "redis://:rightpw@" + rs.Addr() + "/0"}, subscribe, true},
		{"none wanted", Config{URL: open.URL()}, set, true},
		{"cluster", Config{ClusterAddrs: c.AddrsEnv()}, set, true},
		{"cluster, pub/sub", Config{ClusterAddrs: c.AddrsEnv()}, subscribe, true},
		{"wrong password", Config{URL: "redis://:wrongpw@" + rs.Addr() + "/0"}, set, false},
		{"no password", Config{URL: "redis://" + rs.Addr() + "/0"}, set, false},
		{"wrong password, pub/sub", Config{URL: "redis://:wrongpw@" + rs.Addr() + "/0"}, subscribe, false},
	} {
		tc.c.Timeout = time.Second
		rdb, err := New(tc.c)
		if err != nil {
			t.Fatal(err)
		}
		var n atomic.Int32
		AddLoginHook(rdb, func() { n.Add(1) })
		err = tc.f(t.Context(), rdb)
		rdb.Close()
		if (err == nil) != tc.logins {
			t.Errorf("%s: err %v", tc.name, err)
		}
		if got := n.Load() > 0; got != tc.logins {
			t.Errorf("%s: %d logins seen, want some: %v", tc.name, n.Load(), tc.logins)
		}
	}
}

// TestTimeoutBoundSaid: REDIS_TIMEOUT's error gives its bounds as the
// README does and as the functions' other bounds read (config.AtMost),
// "1ms to 1m", not Go's "1m0s".
func TestTimeoutBoundSaid(t *testing.T) {
	t.Parallel()
	for _, d := range []time.Duration{0, 2 * time.Minute} {
		err := Config{URL: "redis://127.0.0.1:6379/0", Timeout: d}.Validate()
		if err == nil || err.Error() != "REDIS_TIMEOUT must be 1ms to 1m" {
			t.Errorf("REDIS_TIMEOUT=%v: %v, want REDIS_TIMEOUT must be 1ms to 1m", d, err)
		}
	}
}

// TestValidateCertFile: SSL_CERT_FILE (the CA a private Redis's
// certificate is checked against, docs/deployment.md) that the functions
// cannot use is refused at start when they speak TLS to Redis. Go's own
// loader falls back to the system's CAs without a word for a file it
// cannot read or that holds no certificate, so the first sign was
// "certificate signed by unknown authority" at every dial, which sent the
// operator to the CA rather than to the file (a CA under /etc/wsrelay,
// which the systemd units' dynamic user cannot read). Without TLS, or
// with TLS that checks nothing (skip_verify), the file is not used and
// not checked.
func TestValidateCertFile(t *testing.T) {
	t.Parallel()
	ca := redistest.NewCA(t)
	dir := t.TempDir()
	notPEM := filepath.Join(dir, "ca.der")
	if err := os.WriteFile(notPEM, []byte("not a certificate\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(dir, "missing.pem")
	for _, tc := range []struct {
		name string
		c    Config
		want []string // substrings of the error; nil means valid
	}{
		{"tls, a CA file", Config{URL: "rediss://h:6380", CertFile: ca.CertFile}, nil},
		{"cluster tls, a CA file", Config{ClusterAddrs: "a:1", ClusterTLS: true, CertFile: ca.CertFile}, nil},
		{"tls, a file missing", Config{URL: "rediss://h:6380", CertFile: missing}, []string{"SSL_CERT_FILE", missing, "no such file"}},
		{"cluster tls, a file missing", Config{ClusterAddrs: "a:1", ClusterTLS: true, CertFile: missing}, []string{"SSL_CERT_FILE", "no such file"}},
		{"tls, a directory", Config{URL: "rediss://h:6380", CertFile: dir}, []string{"SSL_CERT_FILE", "is a directory"}},
		{"tls, no certificate in it", Config{URL: "rediss://h:6380", CertFile: notPEM}, []string{"SSL_CERT_FILE", notPEM, "no PEM certificate"}},
		{"no tls: not used", Config{URL: "redis://h:6379", CertFile: missing}, nil},
		{"tls checking nothing: not used", Config{URL: "rediss://h:6380?skip_verify=true", CertFile: missing}, nil},
		{"cluster without tls: not used", Config{ClusterAddrs: "a:1", CertFile: missing}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.c.Timeout = time.Second
			err := tc.c.Validate()
			if tc.want == nil {
				if err != nil {
					t.Fatalf("Validate: %v, want nil", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("Validate: nil, want an error with %q", tc.want)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("Validate: %v, want it to hold %q", err, w)
				}
			}
		})
	}
}

// TestTLSClosedConnectionResent: over TLS go-redis cannot tell that a
// pooled connection was closed by Redis (its check before use needs a
// plain socket), so the next command on it finds it closed: it is sent
// again on a new connection and succeeds, counted as no failure. Redis
// closing idle connections (its timeout, a provider's proxy; here
// CLIENT KILL) then costs nothing. Without the resend every such
// connection failed one command (go-redis's own retry, which hid it,
// also resent commands whose reply was only late: an append twice).
func TestTLSClosedConnectionResent(t *testing.T) {
	t.Parallel()
	ca := redistest.NewCA(t)
	rs := redistest.StartTLS(t, ca)
	rdb, err := New(Config{URL: "rediss://" + rs.Addr() + "?skip_verify=true", Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rdb.Close() })
	var failed atomic.Int32
	rdb.AddHook(countFailures{&failed})
	key := redistest.Prefix(t) + ":n"
	if err := rdb.Incr(t.Context(), key).Err(); err != nil {
		t.Fatal(err)
	}
	o := rs.Options()
	o.TLSConfig = ca.ClientConfig()
	admin := redis.NewClient(o)
	t.Cleanup(func() { admin.Close() })
	t.Cleanup(func() { admin.Del(context.Background(), key) })
	for i := range 3 {
		if err := admin.Do(t.Context(), "CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes").Err(); err != nil {
			t.Fatal(err)
		}
		n, err := rdb.Incr(t.Context(), key).Result()
		if err != nil || n != int64(i+2) {
			t.Fatalf("INCR on a pooled connection Redis closed: %d, %v; want %d, nil", n, err, i+2)
		}
		pipe := rdb.Pipeline()
		pipe.Incr(t.Context(), key)
		pipe.Decr(t.Context(), key)
		if _, err := pipe.Exec(t.Context()); err != nil {
			t.Fatalf("a pipeline after its connection was closed: %v", err)
		}
		if err := admin.Do(t.Context(), "CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes").Err(); err != nil {
			t.Fatal(err)
		}
		pipe = rdb.Pipeline()
		pipe.Incr(t.Context(), key)
		pipe.Decr(t.Context(), key)
		if _, err := pipe.Exec(t.Context()); err != nil {
			t.Fatalf("a pipeline on a pooled connection Redis closed: %v", err)
		}
	}
	if n := failed.Load(); n != 0 {
		t.Errorf("%d failures counted for connections Redis closed and the commands sent again", n)
	}
}

// countFailures is a hook, added after New's, that counts what Failed
// calls a failure, as the functions' error counters do.
type countFailures struct{ n *atomic.Int32 }

func (h countFailures) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h countFailures) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		err := next(ctx, cmd)
		if Failed(ctx, cmd, err) {
			h.n.Add(1)
		}
		return err
	}
}

func (h countFailures) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		err := next(ctx, cmds)
		if PipelineFailed(ctx, cmds) {
			h.n.Add(1)
		}
		return err
	}
}

// relayedCounted is a client of New to a Redis of the test's own through
// a ReplyDropper, whose failures (Failed) are counted in failed.
func relayedCounted(t *testing.T) (rdb redis.UniversalClient, relay *testkit.ReplyDropper, failed *atomic.Int32) {
	t.Helper()
	rs := redistest.Start(t)
	relay = testkit.NewReplyDropper(t, rs.Addr())
	rdb, err := New(Config{URL: "redis://" + relay.Addr, Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rdb.Close() })
	failed = new(atomic.Int32)
	rdb.AddHook(countFailures{failed})
	return rdb, relay, failed
}

// TestPipelinePartlyCutCounted: a pipeline whose connection Redis closed
// after answering some of its commands is not sent again (those ran),
// and fails, counted as a failure, as the request it serves fails. It
// was sent again, and its answered commands ran twice: go-redis gives
// the pipeline's error to every command it left without one, answered
// ones included, so resendClosed took them all for unanswered (and the
// counters, for a pipeline it would send again: nothing counted).
func TestPipelinePartlyCutCounted(t *testing.T) {
	t.Parallel()
	rdb, relay, failed := relayedCounted(t)
	key := redistest.Prefix(t) + ":n"
	ctx := t.Context()
	relay.ArmFirstReply(key)
	pipe := rdb.Pipeline()
	pipe.Incr(ctx, key)
	pipe.Incr(ctx, key)
	if _, err := pipe.Exec(ctx); err == nil {
		t.Fatal("a pipeline cut after its first reply: no error")
	}
	// Redis ran both (its second reply was cut): once each.
	if n, err := rdb.Get(ctx, key).Int(); err != nil || n != 2 {
		t.Fatalf("INCRs run: %d, %v; want 2, once each (not sent again)", n, err)
	}
	if n := failed.Load(); n != 1 {
		t.Errorf("%d failures counted for a pipeline cut after its first reply, want 1", n)
	}
}

// cancelOnClose cancels the command's context when its connection was
// closed by Redis, as a request whose client went away at that instant.
type cancelOnClose struct{ cancel context.CancelFunc }

func (h cancelOnClose) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h cancelOnClose) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		err := next(ctx, cmd)
		if closedByRedis(err) {
			h.cancel()
		}
		return err
	}
}

func (h cancelOnClose) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

// A command whose connection Redis closed is not sent again once its
// context has ended, so its failure is counted: before, Failed took it
// for one resendClosed would send again, and it was counted nowhere.
func TestClosedWithContextEndedCounted(t *testing.T) {
	t.Parallel()
	rdb, relay, failed := relayedCounted(t)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	rdb.AddHook(cancelOnClose{cancel})
	key := redistest.Prefix(t) + ":n"
	if err := rdb.Ping(t.Context()).Err(); err != nil {
		t.Fatal(err)
	}
	relay.ArmCut(key)
	if err := rdb.Incr(ctx, key).Err(); !closedByRedis(err) {
		t.Fatalf("INCR on a cut connection, its context ended: %v; want the close", err)
	}
	if n, err := rdb.Get(t.Context(), key).Int(); !errors.Is(err, redis.Nil) {
		t.Fatalf("INCR run: %d, %v; want never sent again", n, err)
	}
	if n := failed.Load(); n != 1 {
		t.Errorf("%d failures counted for a command closed as its context ended, want 1", n)
	}
}
