// Package redisconn turns the Redis settings shared by both functions into
// a go-redis client: one node (REDIS_URL) or a cluster (REDIS_CLUSTER_ADDRS).
package redisconn

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"maps"
	"math"
	"net"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/config"
)

// Config is the Redis part of each function's configuration.
type Config struct {
	// URL of a single Redis node: redis://[:password@]host:port[/db] or
	// rediss:// for TLS. Ignored when ClusterAddrs is set.
	URL string `env:"REDIS_URL" envDefault:"redis://127.0.0.1:6379/0"`
	// ClusterAddrs, comma-separated host:port seed nodes, switches to Redis
	// Cluster. Empty means single node.
	ClusterAddrs string `env:"REDIS_CLUSTER_ADDRS"`
	// Username and Password for the cluster (a single node takes them from
	// the URL). Empty means none.
	ClusterUsername string `env:"REDIS_CLUSTER_USERNAME"`
	ClusterPassword string `env:"REDIS_CLUSTER_PASSWORD"`
	// ClusterTLS enables TLS to the cluster nodes.
	ClusterTLS bool `env:"REDIS_CLUSTER_TLS"`
	// KeyPrefix starts every key; several deployments can share one Redis
	// under different prefixes. Empty means the default.
	KeyPrefix string `env:"REDIS_KEY_PREFIX" envDefault:"wsr"`
	// Timeout bounds each Redis command and dial, so a dead Redis is
	// reported (503) instead of hanging. 1ms to MaxTimeout.
	Timeout time.Duration `env:"REDIS_TIMEOUT" envDefault:"1s"`
	// PoolSize per node; zero means go-redis's default (10 per CPU, 5
	// per CPU per node for a cluster). At most MaxPoolSize.
	PoolSize int `env:"REDIS_POOL_SIZE"`
	// CertFile is SSL_CERT_FILE, the CAs Go's TLS checks Redis's
	// certificate against in place of the system's (a private CA,
	// docs/deployment.md). Go reads it itself; Validate checks it can,
	// since Go falls back to the system's CAs without a word.
	CertFile string `env:"SSL_CERT_FILE"`
}

const (
	// MaxTimeout bounds REDIS_TIMEOUT: the functions wait for multiples
	// of it (10 × for an idempotency claim), which a huge value would
	// overflow into a negative duration.
	MaxTimeout = time.Minute
	// MaxPoolSize bounds REDIS_POOL_SIZE at Redis's default maxclients:
	// go-redis allocates a slice of the pool's size per node, and panics
	// past 2^31-1.
	MaxPoolSize = 10000
)

// urlOptions are the REDIS_URL query options that New sets, and why:
// go-redis takes them, and New would override them without a word.
var urlOptions = map[string]string{
	"dial_timeout":  "REDIS_TIMEOUT sets it",
	"read_timeout":  "REDIS_TIMEOUT sets it",
	"write_timeout": "REDIS_TIMEOUT sets it",
	"max_retries":   "a command is sent again only when Redis closed its connection before answering; resending a late reply's command would write an append twice",
	"pool_size":     "REDIS_POOL_SIZE sets it",
	// Pipelines share the pool REDIS_POOL_SIZE sizes (noPipelinePool).
	"pipeline_pool_size": "REDIS_POOL_SIZE bounds pipelines too",
}

// Validate reports what is wrong with c.
func (c Config) Validate() error {
	var errs []error
	if c.ClusterAddrs == "" {
		if _, err := parseURL(c.URL); err != nil {
			errs = append(errs, err)
		} else if u, err := url.Parse(c.URL); err == nil {
			for _, o := range slices.Sorted(maps.Keys(u.Query())) {
				if v, ok := urlOptions[o]; ok {
					errs = append(errs, fmt.Errorf("REDIS_URL must not set %s: %s", o, v))
				}
			}
		}
	} else {
		for i, a := range strings.Split(c.ClusterAddrs, ",") {
			// "@" or "/" in the host: a password or a URL, which the dial
			// error (logged) would quote.
			// A port that is not a number (the docs' "host:port" copied as
			// it is) would start, and every dial fail.
			h, ok := splitHostPort(strings.TrimSpace(a))
			if !ok || h == "" || strings.ContainsAny(h, "@/") {
				// By position: an entry pasted as a URL may hold a password.
				errs = append(errs, fmt.Errorf("REDIS_CLUSTER_ADDRS: entry %d is not host:port", i+1))
			}
		}
	}
	if c.ClusterAddrs == "" {
		// A cluster's settings without its nodes: the functions would
		// connect to REDIS_URL (127.0.0.1 by default) with none of them,
		// a half-made configuration whose first sign is a failed dial.
		for _, set := range []struct {
			name string
			on   bool
		}{{"REDIS_CLUSTER_USERNAME", c.ClusterUsername != ""}, {"REDIS_CLUSTER_PASSWORD", c.ClusterPassword != ""}, {"REDIS_CLUSTER_TLS", c.ClusterTLS}} {
			if set.on {
				errs = append(errs, fmt.Errorf("%s is set without REDIS_CLUSTER_ADDRS: set the cluster's nodes, or unset it to use REDIS_URL", set.name))
			}
		}
	}
	if c.ClusterUsername != "" && c.ClusterPassword == "" {
		// go-redis logs in only with a password: the user would be
		// dropped without a word.
		errs = append(errs, errors.New("REDIS_CLUSTER_USERNAME is set without REDIS_CLUSTER_PASSWORD, and would not log in"))
	}
	if strings.ContainsAny(c.KeyPrefix, "{}") {
		// Keys are <prefix>:{c:<channel>}:…, and Redis Cluster hashes the
		// first {…} of a key: braces in the prefix would put a channel's
		// keys in different slots (every append refused) or every
		// channel in one slot (one master doing all the work).
		errs = append(errs, errors.New("REDIS_KEY_PREFIX must not contain { or }"))
	}
	if c.Timeout < time.Millisecond || c.Timeout > MaxTimeout {
		errs = append(errs, fmt.Errorf("REDIS_TIMEOUT must be 1ms to %s", config.Duration(MaxTimeout)))
	}
	if c.PoolSize < 0 || c.PoolSize > MaxPoolSize {
		errs = append(errs, fmt.Errorf("REDIS_POOL_SIZE must be 0 (go-redis's default) to %d", MaxPoolSize))
	}
	if c.CertFile != "" && c.verifiesTLS() {
		if err := checkCertFile(c.CertFile); err != nil {
			errs = append(errs, err)
		}
	}
	return config.Join(errs...)
}

// verifiesTLS reports whether the functions speak TLS to Redis and check
// its certificate: a cluster with REDIS_CLUSTER_TLS, or a rediss://
// REDIS_URL without skip_verify.
func (c Config) verifiesTLS() bool {
	if c.ClusterAddrs != "" {
		return c.ClusterTLS
	}
	o, err := parseURL(c.URL)
	return err == nil && o.TLSConfig != nil && !o.TLSConfig.InsecureSkipVerify
}

// checkCertFile checks that the file SSL_CERT_FILE names can be read and
// holds a PEM certificate. Go's loader reads the file once, at the first
// TLS dial, and when it cannot be read, or holds none, trusts the
// system's CAs instead, without a word: every dial then failed with
// "certificate signed by unknown authority", which sent the operator to
// the CA, not to the file (a CA under /etc/wsrelay, which the systemd
// units' dynamic user cannot read). The path is no secret; the error
// names it.
func checkCertFile(path string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("SSL_CERT_FILE, the CA Redis's certificate is checked against, cannot be read by the functions: %w", err)
	}
	if !x509.NewCertPool().AppendCertsFromPEM(data) {
		return fmt.Errorf("SSL_CERT_FILE (%s) holds no PEM certificate: give the CA's certificate as PEM (-----BEGIN CERTIFICATE-----)", path)
	}
	return nil
}

// errInvalidURL is parseURL's error for a REDIS_URL that may hold a
// password it cannot tell apart.
var errInvalidURL = errors.New("REDIS_URL is not a valid redis:// or rediss:// URL (the parser's message is not shown, as it can quote the password): percent-encode %, #, /, ?, @ and : in the password")

// parseURL parses REDIS_URL. Its error never holds any part of the URL's
// user information, which holds the password: net/url quotes the whole URL
// in its errors, and parts of it in their inner message (a password with a
// "/" reads as an invalid port).
func parseURL(s string) (*redis.Options, error) {
	o, err := redis.ParseURL(s)
	if err == nil {
		// It parsed, but not as meant: a "#" (a fragment, which go-redis
		// ignores), an "@" outside the user information (a password with
		// an unencoded "#", "?" or "/" whose start read as a port, the user
		// name as the host), or no "//" (go-redis reads no host and
		// dials localhost). The address would then show part of the
		// password in the startup line and the dial errors.
		if u, perr := url.Parse(s); perr != nil || u.Opaque != "" || strings.Contains(s, "#") || (u.User == nil && strings.Contains(s, "@")) {
			return nil, errInvalidURL
		}
	}
	if err != nil {
		// With user information in the URL, any message may quote part
		// of it: a password with a "/" can also parse, and land in the
		// path or the database number that go-redis then refuses.
		if _, ok := errors.AsType[*url.Error](err); ok || strings.Contains(s, "@") {
			return nil, errInvalidURL
		}
		return nil, fmt.Errorf("REDIS_URL: %w", err)
	}
	// go-redis takes a negative database for 0 (it selects only a
	// positive one), and a port past 65535 starts, every dial failing.
	if o.DB < 0 {
		return nil, errors.New("REDIS_URL: the database number must not be negative")
	}
	// go-redis logs in only with a password, and dropped the user name
	// without a word: likely a password written without its ":".
	if o.Username != "" && o.Password == "" {
		return nil, errors.New("REDIS_URL has a user name but no password, and would not log in: write redis://user:password@host, or redis://:password@host for a password alone")
	}
	if _, ok := splitHostPort(o.Addr); !ok && o.Network != "unix" {
		return nil, errors.New("REDIS_URL: the port must be 1 to 65535")
	}
	// go-redis dials localhost for an empty host ("redis://:6379", a
	// redis://$HOST:6379 written with HOST unset): a deployment meant
	// for its Redis would use whatever answers on the machine itself.
	if u, err := url.Parse(s); err == nil && o.Network != "unix" && u.Hostname() == "" {
		return nil, errors.New("REDIS_URL has no host: write redis://host:port (127.0.0.1 for this machine)")
	}
	// go-redis panics in NewClient, not at parsing, on a pool count past
	// 2^31-1.
	for _, x := range []struct {
		name string
		v    int
	}{{"min_idle_conns", o.MinIdleConns}, {"max_idle_conns", o.MaxIdleConns}, {"max_active_conns", o.MaxActiveConns}} {
		if x.v > math.MaxInt32 {
			return nil, fmt.Errorf("REDIS_URL: %s must be at most %d", x.name, math.MaxInt32)
		}
	}
	return o, nil
}

// splitHostPort returns addr's host, and whether addr is host:port with
// a port from 1 to 65535.
func splitHostPort(addr string) (host string, ok bool) {
	h, p, err := net.SplitHostPort(addr)
	n, perr := strconv.Atoi(p)
	return h, err == nil && perr == nil && n >= 1 && n <= 65535
}

// LogAttrs describes c for the functions' startup line: where Redis is
// and how it is used, never a user name or password (whether the URL
// carries one is said, not what it is).
func (c Config) LogAttrs() []any {
	attrs := []any{"key_prefix", c.KeyPrefix, "redis_timeout", c.Timeout.String()}
	if c.IsCluster() {
		var addrs []string
		for _, a := range strings.Split(c.ClusterAddrs, ",") {
			a = strings.TrimSpace(a)
			// Validate refuses "user:pass@host:port"; the cut stays, so
			// that no caller that skipped it logs a password.
			addrs = append(addrs, a[strings.LastIndexByte(a, '@')+1:])
		}
		return append(attrs, "redis_cluster", strings.Join(addrs, ","), "redis_tls", c.ClusterTLS, "redis_password", c.ClusterPassword != "")
	}
	o, err := parseURL(c.URL)
	if err != nil {
		return append(attrs, "redis", "invalid REDIS_URL")
	}
	attrs = append(attrs, "redis", o.Addr, "redis_db", o.DB, "redis_tls", o.TLSConfig != nil, "redis_password", o.Password != "")
	if o.TLSConfig != nil {
		// rediss://…?skip_verify=true: TLS, but to any server.
		attrs = append(attrs, "redis_tls_verify", !o.TLSConfig.InsecureSkipVerify)
	}
	return attrs
}

// noPipelinePool keeps pipelines on a node's one pool of PoolSize
// connections. go-redis gives them a pool of their own by default (up to
// 10 more connections per node, 128 KiB buffers each), so REDIS_POOL_SIZE
// would not bound what a process opens to Redis, and an egress holding
// one socket would hold two command connections (its probe's and its
// registry writes'), which in the one-connection-per-instance mode is
// one Redis connection more per socket (TestPoolSizeBoundsConnections).
const noPipelinePool = -1

// IsCluster reports whether c selects Redis Cluster.
func (c Config) IsCluster() bool { return c.ClusterAddrs != "" }

// New returns a client for c. It does not dial; use Ping to check.
func New(c Config) (redis.UniversalClient, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	if c.IsCluster() {
		var addrs []string
		for _, a := range strings.Split(c.ClusterAddrs, ",") {
			addrs = append(addrs, strings.TrimSpace(a))
		}
		o := &redis.ClusterOptions{
			Addrs:                 addrs,
			Username:              c.ClusterUsername,
			Password:              c.ClusterPassword,
			DialTimeout:           c.Timeout,
			ReadTimeout:           c.Timeout,
			WriteTimeout:          c.Timeout,
			ContextTimeoutEnabled: true,
			PoolSize:              c.PoolSize,
			PipelinePoolSize:      noPipelinePool,
			MaxRedirects:          8,
			DialerRetries:         1, // one dial per attempt, as for a single node below
			DisableIdentity:       true,
		}
		if c.ClusterTLS {
			o.TLSConfig = &tls.Config{MinVersion: tls.VersionTLS12}
		}
		o.NewClient = func(no *redis.Options) *redis.Client {
			n := redis.NewClient(no)
			n.AddHook(maxClientsHook{})
			n.AddHook(resendClosed{})
			return n
		}
		cc := redis.NewClusterClient(o)
		cc.AddHook(reloadOnFailure{cc})
		return cc, nil
	}
	o, err := parseURL(c.URL)
	if err != nil {
		return nil, err
	}
	o.DialTimeout = c.Timeout
	o.ReadTimeout = c.Timeout
	o.WriteTimeout = c.Timeout
	o.ContextTimeoutEnabled = true
	// go-redis's retry is off: it resent a command whose reply timed out
	// (a Redis stalled longer than Timeout, which ran it all the same),
	// and an append ran twice, the message written and delivered twice
	// under two ids. resendClosed resends only what Redis cannot have
	// run.
	o.MaxRetries = -1
	// One dial per attempt: go-redis's default (5 dials 100 ms apart, each
	// up to Timeout) would hold a request for seconds before its 503.
	o.DialerRetries = 1
	o.DisableIdentity = true
	o.PipelinePoolSize = noPipelinePool
	if c.PoolSize > 0 {
		o.PoolSize = c.PoolSize
	}
	rdb := redis.NewClient(o)
	rdb.AddHook(maxClientsHook{})
	rdb.AddHook(resendClosed{})
	return rdb, nil
}

// ErrReplica is Ping's answer from a replica: it answers, but refuses
// every write (READONLY).
var ErrReplica = errors.New("redis: the node is a replica (read-only)")

// Ping checks that Redis answers within the client's timeout, and is not
// a replica. In a cluster, every master must answer, and every node the
// slot map names a master must be one: one that has become a replica
// makes it reload the map. Replicas are not asked: the functions neither
// read from nor write to them, and one replica down made every instance
// of both functions unready (a load balancer then sends them nothing)
// until the cluster marked it failed, 15 s or more.
func Ping(ctx context.Context, rdb redis.UniversalClient) error {
	if c, ok := rdb.(*redis.ClusterClient); ok {
		// Each master is pinged on its own client, whose hooks alone see
		// it: MasterPing tells them these commands from those the
		// cluster client routes there (which its own hooks have seen).
		err := c.ForEachMaster(context.WithValue(ctx, masterPingKey{}, true), pingMaster)
		if errors.Is(err, ErrReplica) {
			c.ReloadState(ctx)
		}
		return err
	}
	if c, ok := rdb.(*redis.Client); ok {
		return pingMaster(ctx, c)
	}
	return rdb.Ping(ctx).Err()
}

type masterPingKey struct{}

// MasterPing reports whether ctx is that of Ping's commands to a cluster
// master, sent on the master's own client (ClusterClient.ForEachMaster):
// only that node client's hooks see them, not the cluster client's. A
// hook added to the node clients (ClusterClient.OnNewNode) that counts
// only these counts each once, without counting again the commands the
// cluster client routes to the same node clients.
func MasterPing(ctx context.Context) bool { return ctx.Value(masterPingKey{}) != nil }

// pingMaster checks that n answers a PING, which a Redis still loading
// its data refuses (ROLE would not), and then that its ROLE is not a
// replica's. A ROLE refused (an ACL without it, a managed Redis that
// renames it) counts as a master. Two plain commands, not a pipeline of
// the two: with the pipeline, every egress in S6 of docs/benchmarks.md
// dialled Redis again during the window (a HELLO each), where it sends
// nothing but its probe.
func pingMaster(ctx context.Context, n *redis.Client) error {
	if err := n.Ping(ctx).Err(); err != nil {
		return err
	}
	r, err := n.Do(ctx, "ROLE").Slice()
	var re redis.Error
	switch {
	case err == nil:
		if len(r) > 0 && r[0] == "slave" {
			return ErrReplica
		}
		return nil
	case errors.As(err, &re):
		return nil
	default:
		return err
	}
}

// PipelineFailed reports whether one of cmds, a pipeline's commands,
// Failed: what a counter of failed pipelines counts.
func PipelineFailed(ctx context.Context, cmds []redis.Cmder) bool {
	for _, c := range cmds {
		if Failed(ctx, c, c.Err()) {
			return true
		}
	}
	return false
}

// Failed reports whether err, cmd's outcome, is a Redis failure for the
// functions' error counters: not a missing key (redis.Nil), a script not
// yet cached (NOSCRIPT, which go-redis answers by loading it), a caller
// that gave up, the connection handshake's optional commands, nor a ROLE
// Redis answered with an error (refused to an ACL user without +role, or
// renamed), which Ping takes for a master's: a user without it is
// supported (docs/deployment.md), not a failure at every probe. Nor is
// a connection Redis had closed (closedByRedis) on a first sending that
// resendClosed, outside the hooks that count, will send again on a new
// connection (ctx says so): that sending's dial or reply says whether
// Redis is there; counted, every idle connection Redis or a proxy closed
// (unseen over TLS) was an error. A sending again closed as well (Redis
// down behind a proxy, which accepts and closes every connection), or
// one the cluster client's hooks see at the end, counts.
func Failed(ctx context.Context, cmd redis.Cmder, err error) bool {
	if err == nil || errors.Is(err, redis.Nil) || errors.Is(err, context.Canceled) || redis.HasErrorPrefix(err, "NOSCRIPT") ||
		resent(ctx, err) {
		return false
	}
	switch cmd.Name() {
	case "client", "hello":
		return false
	case "role":
		var re redis.Error
		return !errors.As(err, &re)
	}
	return true
}

// Why says, for an operator reading a failed readiness probe, why Redis
// made it fail: err is Ping's (or Readiness.Check's) error, non-nil. The
// first that applies, in the order an operator would act on; never a
// secret nor an address. A Redis that answers with an error of its own
// (LOADING after a restart, BUSY behind a long script, CLUSTERDOWN,
// MASTERDOWN) is named by its code, the reply's first word, which sends
// the operator to Redis rather than to the network.
func Why(err error) string {
	switch {
	case LoginRefused(err):
		return "Redis refuses the login (the user or password in REDIS_URL; see the log)"
	case Refused(err):
		return "Redis refuses a command to the functions' ACL user (see the log)"
	case errors.Is(err, ErrReplica):
		// It answers: "does not answer" would send the operator to the
		// network. REDIS_URL names a replica, or a failover demoted it.
		return "Redis is a replica (read-only), not the master"
	}
	var re redis.Error
	if errors.As(err, &re) {
		if code, _, _ := strings.Cut(re.Error(), " "); code != "" {
			return "Redis answers the probe with an error: " + code
		}
	}
	return "Redis does not answer"
}

// Readiness answers whether Redis answers (Ping) for readiness probes, with
// at most one Ping per interval: callers within it share the last answer,
// so that a probe storm (the endpoint is public behind a gateway) does not
// become a Redis storm; in a cluster a Ping goes to every master. Safe for
// concurrent use.
type Readiness struct {
	rdb   redis.UniversalClient
	every time.Duration

	mu  sync.Mutex
	at  time.Time // of the last Ping; zero before the first
	err error
}

// NewReadiness returns a Readiness of rdb that pings at most every interval.
func NewReadiness(rdb redis.UniversalClient, every time.Duration) *Readiness {
	return &Readiness{rdb: rdb, every: every}
}

// Check returns the answer of a Ping made at most the interval ago, making
// one (bounded by a second) when the last is older. The Ping does not end
// with ctx: its answer is shared with the callers that come after.
func (r *Readiness) Check(ctx context.Context) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.at.IsZero() || time.Since(r.at) > r.every {
		pctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
		r.err = Ping(pctx, r.rdb)
		cancel()
		r.at = time.Now()
	}
	return r.err
}

// reloadOnFailure reloads a cluster client's slot map when a command fails
// for want of its node (a connection error or timeout, or a node that is
// no longer a master). go-redis reloads it by itself on MOVED, ASK and
// READONLY and every ClusterStateReloadInterval (60 s), not on a
// connection error: after a master died, its slots' commands went on to
// the dead node for up to a minute after its replica had been promoted. The reload is lazy (in the background, one
// at a time, 200 ms apart), so a burst of failures costs a few CLUSTER
// SLOTS, not one each.
type reloadOnFailure struct{ c *redis.ClusterClient }

func (h reloadOnFailure) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h reloadOnFailure) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		err := next(ctx, cmd)
		if NodeFailure(err) {
			h.c.ReloadState(ctx)
		}
		return err
	}
}

func (h reloadOnFailure) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		err := next(ctx, cmds)
		for _, cmd := range cmds {
			if NodeFailure(cmd.Err()) {
				h.c.ReloadState(ctx)
				break
			}
		}
		return err
	}
}

// NodeFailure reports an error that may mean the cluster's topology
// changed: not a reply of Redis (a missing key, a script error…) nor a
// caller that gave up, but a node that could not be reached or did not
// answer in time, or one that answers it is not (or no longer) the master
// of the slot.
func NodeFailure(err error) bool {
	if err == nil || errors.Is(err, context.Canceled) {
		return false
	}
	var re redis.Error
	if errors.As(err, &re) {
		return redis.HasErrorPrefix(err, "READONLY") || redis.HasErrorPrefix(err, "CLUSTERDOWN") || redis.HasErrorPrefix(err, "MASTERDOWN")
	}
	return true
}

// OutOfMemory reports whether err is Redis refusing a write because it is
// at its maxmemory and may not evict (maxmemory-policy noeviction, or
// nothing left to evict): "OOM command not allowed when used memory >
// 'maxmemory'". Redis refuses such a command, and a script at its first
// command that may grow memory unless the script has already written
// something: the append script writes nothing before its XADD, so a
// refused append has written nothing. Reads and removals still succeed.
// It lasts until memory is freed (keys expire or are trimmed) or
// maxmemory is raised, not a second.
func OutOfMemory(err error) bool { return redis.HasErrorPrefix(err, "OOM") }

// SlotMoving reports whether err is a Redis Cluster master refusing a
// command because the slot of its keys is being moved to another master
// (resharding): TRYAGAIN, a call on several keys while they are split
// between the two, or a MOVED or ASK redirection the client could not
// follow. The command did nothing. It lasts as long as the slot's
// migration (docs/scaling.md), not a failure of Redis.
func SlotMoving(err error) bool {
	return redis.HasErrorPrefix(err, "TRYAGAIN") || redis.HasErrorPrefix(err, "MOVED ") || redis.HasErrorPrefix(err, "ASK ")
}

// Refused reports whether err is Redis refusing a command to the user the
// client logged in as (ACL): "NOPERM …" for the command itself, its keys
// or its channels, or, for a command a script calls, "ERR The user
// executing the script can't …". Redis answers the same to every retry
// until an operator gives the user the rule (docs/deployment.md, "TLS and
// ACL users").
func Refused(err error) bool {
	return redis.HasErrorPrefix(err, "NOPERM") || redis.HasErrorPrefix(err, "The user executing the script can't")
}

// LoginRefused reports whether err is Redis refusing the client's login:
// "WRONGPASS …" for a wrong password, or a user that does not exist or
// is disabled (Redis does not say which), and, for no password where
// Redis wants one, "NOAUTH …" or, to a command of more than 10 arguments
// (an append script's call), "Protocol error: unauthenticated multibulk
// length" (Redis reads no more of a client not logged in). go-redis logs
// in as it dials, and returns the server's answer to the command that
// needed the connection, wrapped ("failed to authenticate: …") or not.
// Like Refused, a configuration fault: Redis answers the same to every
// retry until an operator fixes the user or password the functions log
// in with (REDIS_URL's, or REDIS_CLUSTER_USERNAME and
// REDIS_CLUSTER_PASSWORD) or enables the user.
func LoginRefused(err error) bool {
	return redis.HasErrorPrefix(err, "WRONGPASS") || redis.HasErrorPrefix(err, "NOAUTH") ||
		redis.HasErrorPrefix(err, "Protocol error: unauthenticated")
}

// LoggedIn reports whether cmd, carried out with err, is a login Redis
// accepted: the HELLO go-redis sends as it dials (with the user and
// password, if any), or the AUTH it falls back to. Only that shows Redis
// accepts the functions' login again: it goes on serving the connections
// logged in before a password changed or a user was disabled, so a
// command carried out on one of them says nothing of the next login.
func LoggedIn(cmd redis.Cmder, err error) bool {
	if err != nil {
		return false
	}
	switch cmd.Name() {
	case "hello", "auth":
		return true
	}
	return false
}

// OnLogin is a go-redis hook that calls itself after each login Redis
// accepts (LoggedIn): it ends the episode of a refused login. A
// connection logs in through the hooks of the client that dials it: on a
// cluster, add it to each node's client (ClusterClient.OnNewNode), not to
// the cluster client.
type OnLogin func()

// DialHook is next: a dial is not yet a login.
func (f OnLogin) DialHook(next redis.DialHook) redis.DialHook { return next }

// ProcessHook calls f after a login Redis accepted.
func (f OnLogin) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		err := next(ctx, cmd)
		if LoggedIn(cmd, err) {
			f()
		}
		return err
	}
}

// ProcessPipelineHook is next: go-redis logs in with single commands.
func (f OnLogin) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

// AddLoginHook adds OnLogin(ok) where rdb's connections log in: to rdb,
// or to each node's client of a cluster.
func AddLoginHook(rdb redis.UniversalClient, ok func()) {
	if cc, isCluster := rdb.(*redis.ClusterClient); isCluster {
		cc.OnNewNode(func(n *redis.Client) { n.AddHook(OnLogin(ok)) })
		return
	}
	rdb.AddHook(OnLogin(ok))
}

// MaxClients reports whether err is Redis refusing a new connection
// because it has reached its maxclients (ErrMaxClients).
func MaxClients(err error) bool { return errors.Is(err, ErrMaxClients) }

// ErrMaxClients is the error of a command that needed a new connection
// and found Redis at its maxclients: it answers a new connection "ERR max
// number of clients reached" and closes it. It is not a Redis reply to
// the command (nothing was carried out), so it counts as a NodeFailure.
var ErrMaxClients = errors.New("redis refused a new connection: max number of clients reached (its maxclients)")

// resendClosed is a go-redis hook that sends a command, or a pipeline,
// once more on another connection when the connection it was sent on
// turned out closed by Redis (EOF, reset, broken pipe) before its reply
// came: a pooled connection Redis (its idle timeout, a restart, an error
// it closes on) or a proxy had closed, which go-redis finds before use
// only over plain TCP (not TLS), and only if the close has arrived. A
// pipeline is sent again only when none of its commands got a reply:
// those that did ran. A pipeline that fails, cut or timed out, after
// some of its commands got their replies (on either sending) leaves
// those commands their replies, which go-redis replaces with the
// pipeline's error, and the others the error: a shared pipeline's
// append that Redis answered is its request's success. A timeout is not
// resent: Redis, stalled, may have run the command, and an append would
// be written twice (go-redis's own retry, MaxRetries, did that). A command Redis ran before closing the
// connection without answering, or with its answer cut short (a CLIENT
// KILL at that instant), is sent twice; the functions' commands other
// than an append without an Idempotency-Key's once-key (docs/api.md) may
// run twice. So is a transaction (the functions' only one reads).
type resendClosed struct{}

func (resendClosed) DialHook(next redis.DialHook) redis.DialHook { return next }

func (resendClosed) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		err := next(context.WithValue(ctx, firstSendingKey{}, single), cmd)
		if closedByRedis(err) && ctx.Err() == nil {
			err = next(ctx, cmd)
		}
		return err
	}
}

func (resendClosed) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		s := &sending{}
		err := s.send(context.WithValue(ctx, firstSendingKey{}, s), next, cmds)
		if s.answered.Load() || !closedByRedis(err) || ctx.Err() != nil {
			return err
		}
		// The sending again is watched too: its connection may fail
		// after some of its replies as well.
		return (&sending{}).send(ctx, next, cmds)
	}
}

// send sends cmds through next, and gives the commands answered before
// the pipeline failed their replies back.
func (s *sending) send(ctx context.Context, next redis.ProcessPipelineHook, cmds []redis.Cmder) error {
	sent := cmds
	// The commands go out watched: go-redis gives a pipeline's error to
	// every command its connection's end left without one, the ones it
	// had read the replies of included, so their errors cannot tell
	// which ran. Not a transaction's: go-redis takes its MULTI for the
	// StatusCmd it made (they all run, or none, and the functions' only
	// one reads).
	if len(cmds) > 0 && cmds[0].Name() != "multi" {
		sent = s.watch(cmds)
	}
	err := next(ctx, sent)
	if err != nil && s.answered.Load() {
		// The commands answered keep their replies (go-redis gave them
		// the pipeline's error): an append answered ran, and its id is
		// its request's, whatever became of the others.
		for _, c := range sent {
			if w, ok := c.(*watched); ok && w.ok && !IsReply(w.Cmder.Err()) {
				w.Cmder.SetErr(nil)
			}
		}
	}
	return err
}

// IsReply reports whether err is nil or an error reply of Redis: the
// command reached Redis and its answer came back; any other error (the
// connection's, a deadline's) may have lost a reply to a command that ran.
func IsReply(err error) bool {
	var re redis.Error
	return err == nil || errors.As(err, &re)
}

// sending is one of resendClosed's sendings of a command or pipeline:
// the first's context carries it (firstSendingKey), for Failed.
type sending struct {
	// answered: a command of the pipeline got its reply (it ran): the
	// pipeline is not sent again. Atomic: on a cluster, the cluster
	// client's own loop may send a node's failed commands, still
	// wrapped, to other nodes at once.
	answered atomic.Bool
}

// single is the first sending of every single command, shared: a
// command has one reply, which came or did not (its error says), so
// nothing marks it answered, and nothing writes to it.
var single = &sending{}

// watch returns cmds, each wrapped to set s.answered when go-redis gives
// it its reply.
func (s *sending) watch(cmds []redis.Cmder) []redis.Cmder {
	ws := make([]watched, len(cmds))
	out := make([]redis.Cmder, len(cmds))
	for i, c := range cmds {
		ws[i] = watched{Cmder: c, s: s}
		out[i] = &ws[i]
	}
	return out
}

// watched is a pipeline's command as resendClosed sends it: go-redis
// sets what it read for it with SetErr (nil, or Redis's error reply); a
// connection's end sets another error, over a nil one too.
type watched struct {
	redis.Cmder
	s  *sending
	ok bool // its reply was read, and was no error
}

func (w *watched) SetErr(err error) {
	if IsReply(err) {
		w.s.answered.Store(true)
		w.ok = w.ok || err == nil
	}
	w.Cmder.SetErr(err)
}

// firstSendingKey marks the context of resendClosed's first sending,
// for Failed: the hooks inside it see a command that it may send again.
type firstSendingKey struct{}

// resent reports whether resendClosed, outside the hooks that see ctx,
// sends again what failed with err: err closed the connection, on a
// first sending of a command, or of a pipeline none of whose commands
// got a reply (the hooks run once the sending is over), while the
// caller still waits: resendClosed sends nothing again for a context that
// has ended, and such a close is counted here. (A context that ends
// between this check and resendClosed's leaves the close uncounted.)
func resent(ctx context.Context, err error) bool {
	s, _ := ctx.Value(firstSendingKey{}).(*sending)
	return s != nil && !s.answered.Load() && closedByRedis(err) && ctx.Err() == nil
}

// NoResend is rdb for scripts that must not run twice (a rate limit's
// charge, a history clear): their Eval and EvalSha are not sent again by
// a cluster client's own loop, which resends a command whose reply came
// later than Timeout (after running it once, Redis runs it again) as it
// does one whose connection failed. A single node's client resends
// neither (MaxRetries -1); rdb is returned as it is. What resendClosed
// resends on the node's own client (a connection Redis closed before the
// reply came) is still sent again, as on a single node.
func NoResend(rdb redis.UniversalClient) redis.UniversalClient {
	if cc, ok := rdb.(*redis.ClusterClient); ok {
		return noResend{cc}
	}
	return rdb
}

type noResend struct{ *redis.ClusterClient }

// onceCmd is a command the cluster client's loop does not resend after
// an error Redis may have run it before (go-redis's Cmder.NoRetry); it
// still follows MOVED and ASK, which Redis answers without running it.
type onceCmd struct{ *redis.Cmd }

func (onceCmd) NoRetry() bool { return true }

func (n noResend) run(ctx context.Context, name, script string, keys []string, args []any) *redis.Cmd {
	a := make([]any, 0, 3+len(keys)+len(args))
	a = append(a, name, script, len(keys))
	for _, k := range keys {
		a = append(a, k)
	}
	a = append(a, args...)
	cmd := redis.NewCmd(ctx, a...)
	_ = n.Process(ctx, onceCmd{cmd})
	return cmd
}

func (n noResend) Eval(ctx context.Context, script string, keys []string, args ...any) *redis.Cmd {
	return n.run(ctx, "eval", script, keys, args)
}

func (n noResend) EvalSha(ctx context.Context, sha1 string, keys []string, args ...any) *redis.Cmd {
	return n.run(ctx, "evalsha", sha1, keys, args)
}

func (n noResend) EvalRO(ctx context.Context, script string, keys []string, args ...any) *redis.Cmd {
	return n.run(ctx, "eval_ro", script, keys, args)
}

func (n noResend) EvalShaRO(ctx context.Context, sha1 string, keys []string, args ...any) *redis.Cmd {
	return n.run(ctx, "evalsha_ro", sha1, keys, args)
}

// closedByRedis reports whether err says the connection was closed by
// the other side: EOF, a reset or a broken pipe (not a timeout).
func closedByRedis(err error) bool {
	return err != nil && (errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE))
}

// maxClientsHook makes a connection Redis refused for its maxclients fail
// with ErrMaxClients. Redis sends that refusal before reading anything
// and closes the connection: it is the reply to go-redis's HELLO, which
// go-redis took for a Redis without HELLO (or retried on the closed
// connection), and the command failed with the broken pipe or EOF of what
// it sent next: an operator read "write: broken pipe" from a Redis that
// was up and answering. The connection's first reply is looked at; after
// a refusal, the connection fails with ErrMaxClients, which is not a
// Redis reply, so go-redis gives it up with that error. Added to the
// client that dials (each node's, on a cluster).
type maxClientsHook struct{}

func (maxClientsHook) DialHook(next redis.DialHook) redis.DialHook {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := next(ctx, network, addr)
		if err != nil {
			return c, err
		}
		rc := &refusalConn{Conn: c}
		if sc, ok := c.(syscall.Conn); ok {
			// go-redis checks a pooled connection before using it (a
			// closed one is dropped, not used for a command that would
			// fail with EOF) only on a syscall.Conn.
			return refusalSysConn{rc, sc}, nil
		}
		return rc, nil
	}
}

func (maxClientsHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook { return next }

func (maxClientsHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

// maxClientsReply begins what Redis sends a connection over its
// maxclients: "-ERR max number of clients reached", or in cluster mode
// "-ERR max number of clients + cluster connections reached".
var maxClientsReply = []byte("-ERR max number of clients")

// refusalConn is a Redis connection that remembers whether its first
// reply was a maxclients refusal (maxClientsHook).
type refusalConn struct {
	net.Conn
	read    atomic.Bool // the first read is done
	refused atomic.Bool
}

func (c *refusalConn) Read(b []byte) (int, error) {
	if c.refused.Load() {
		return 0, ErrMaxClients
	}
	n, err := c.Conn.Read(b)
	// Load before Swap: every later read of a busy connection pays a
	// plain load, not a locked exchange.
	if !c.read.Load() && !c.read.Swap(true) && bytes.HasPrefix(b[:n], maxClientsReply) {
		c.refused.Store(true)
		return 0, ErrMaxClients
	}
	return n, err
}

func (c *refusalConn) Write(b []byte) (int, error) {
	if c.refused.Load() {
		return 0, ErrMaxClients
	}
	return c.Conn.Write(b)
}

// NetConn is the connection wrapped, for go-redis's check of an idle
// connection (it reads the socket without consuming).
func (c *refusalConn) NetConn() net.Conn { return c.Conn }

// refusalSysConn is a refusalConn of a syscall.Conn (TCP, Unix socket).
type refusalSysConn struct {
	*refusalConn
	sc syscall.Conn
}

func (c refusalSysConn) SyscallConn() (syscall.RawConn, error) { return c.sc.SyscallConn() }
