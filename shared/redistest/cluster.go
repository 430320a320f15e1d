package redistest

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// clusterNodeTimeout is the cluster-node-timeout of test clusters: a
// stopped master is failed over within a few seconds.
const clusterNodeTimeout = 1000 * time.Millisecond

// clusterBusOffset is how far above a node's port its cluster bus
// listens (Redis's default).
const clusterBusOffset = 10000

// Cluster is a Redis Cluster for a test: the one named by
// REDIS_CLUSTER_ADDRS, or real redis-server processes started on free
// ports and stopped at the end of the test.
type Cluster struct {
	addrs   []string
	servers []*Server // nil when the cluster is external
	ca      *CA       // set for a cluster that speaks only TLS (StartClusterTLS)
}

// StartCluster returns a Redis Cluster of masters masters with
// replicasPerMaster replicas each. When REDIS_CLUSTER_ADDRS is set it
// returns that cluster instead (whatever its shape; Owned reports false).
func StartCluster(t testing.TB, masters, replicasPerMaster int) *Cluster {
	t.Helper()
	return startCluster(t, masters, replicasPerMaster, nil)
}

// StartOwnedCluster is StartCluster for a test that changes the cluster
// it runs on (stops, fails over, reshards or adds its nodes): it skips
// under -short, and when REDIS_CLUSTER_ADDRS names a cluster the test
// does not own, saying why (why) it needs its own.
func StartOwnedCluster(t testing.TB, masters, replicasPerMaster int, why string) *Cluster {
	t.Helper()
	if testing.Short() {
		t.Skip("starts a Redis Cluster")
	}
	c := StartCluster(t, masters, replicasPerMaster)
	if !c.Owned() {
		t.Skip("REDIS_CLUSTER_ADDRS is set: " + why)
	}
	return c
}

// StartClusterTLS starts a Redis Cluster as StartCluster does, whose
// nodes speak only TLS with the certificate of ca, to clients, to each
// other (--tls-cluster) and to their replicas (--tls-replication). It
// ignores REDIS_CLUSTER_ADDRS.
func StartClusterTLS(t testing.TB, ca *CA, masters, replicasPerMaster int) *Cluster {
	t.Helper()
	return startCluster(t, masters, replicasPerMaster, ca)
}

func startCluster(t testing.TB, masters, replicasPerMaster int, ca *CA) *Cluster {
	t.Helper()
	if env := os.Getenv("REDIS_CLUSTER_ADDRS"); env != "" && ca == nil {
		c := &Cluster{}
		for _, a := range strings.Split(env, ",") {
			c.addrs = append(c.addrs, strings.TrimSpace(a))
		}
		return c
	}
	cli, err := exec.LookPath("redis-cli")
	if err != nil {
		t.Fatalf("redistest: redis-cli not found (it ships with redis-server): %v", err)
	}
	// redis-cli --cluster create can wait forever for nodes that never
	// meet (a bus port taken by another process between the check and
	// the bind): each attempt is bounded, and a second one is made on
	// fresh ports.
	for attempt := 1; ; attempt++ {
		c, err := createCluster(cli, masters, replicasPerMaster, ca)
		if err == nil {
			t.Cleanup(c.stop)
			return c
		}
		if attempt == 2 {
			t.Fatalf("redistest: %v", err)
		}
		t.Logf("redistest: %v; trying again on other ports", err)
	}
}

// clusterCreateTimeout bounds redis-cli --cluster create, which takes a
// second or two.
const clusterCreateTimeout = time.Minute

// createCluster starts the nodes of a cluster, joins them and waits for
// it to be healthy; on error it stops what it started.
func createCluster(cli string, masters, replicasPerMaster int, ca *CA) (*Cluster, error) {
	c := &Cluster{ca: ca}
	ok := false
	defer func() {
		if !ok {
			c.stop()
		}
	}()
	n := masters * (1 + replicasPerMaster)
	for range n {
		s, err := startClusterNode(ca)
		if err != nil {
			return nil, fmt.Errorf("start cluster node: %w", err)
		}
		c.servers = append(c.servers, s)
		c.addrs = append(c.addrs, s.Addr())
	}
	var args []string
	if ca != nil {
		args = []string{"--tls", "--cacert", ca.CertFile}
	}
	args = append(args, "--cluster", "create")
	args = append(args, c.addrs...)
	args = append(args, "--cluster-replicas", strconv.Itoa(replicasPerMaster), "--cluster-yes")
	ctx, cancel := context.WithTimeout(context.Background(), clusterCreateTimeout)
	defer cancel()
	if out, err := exec.CommandContext(ctx, cli, args...).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("redis-cli --cluster create: %v (%v)\n%s", err, ctx.Err(), out)
	}
	if err := c.waitHealthy(n, masters, masters*replicasPerMaster, 30*time.Second); err != nil {
		return nil, fmt.Errorf("cluster not ready: %w", err)
	}
	ok = true
	return c, nil
}

// startClusterNode starts one cluster-enabled node (startServer) on a
// port whose cluster bus port (port+10000) is free too.
func startClusterNode(ca *CA) (*Server, error) {
	args := []string{
		"--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
		"--cluster-node-timeout", strconv.FormatInt(clusterNodeTimeout.Milliseconds(), 10),
		// Keep the other masters serving while one slot range fails over.
		"--cluster-require-full-coverage", "no",
		// A replica may always take over, however long it was cut off.
		"--cluster-replica-validity-factor", "0",
	}
	if ca != nil {
		args = append(args, "--tls-cluster", "yes", "--tls-replication", "yes")
	}
	return startServer(args, ca, clusterBusOffset)
}

// waitHealthy polls until every running node reports cluster_state:ok,
// knows every node, and the cluster has masters masters with all slots
// and, unless replicas is negative, replicas replicas online beside
// them. A client's slot map comes from any one node: until every node
// lists every replica, a map reloaded from another may lose some.
func (c *Cluster) waitHealthy(nodes, masters, replicas int, within time.Duration) error {
	deadline := time.Now().Add(within)
	var last error
	for time.Now().Before(deadline) {
		if last = c.healthy(nodes, masters, replicas); last == nil {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return last
}

func (c *Cluster) healthy(nodes, masters, replicas int) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	for i, a := range c.addrs {
		if c.servers != nil && c.servers[i].cmd == nil {
			continue // stopped
		}
		rc := redis.NewClient(c.nodeOptions(a))
		info, err := rc.ClusterInfo(ctx).Result()
		if err == nil && !strings.Contains(info, "cluster_state:ok") {
			err = fmt.Errorf("%s: cluster_state not ok", a)
		}
		if err == nil && !strings.Contains(info, "cluster_known_nodes:"+strconv.Itoa(nodes)+"\r") {
			err = fmt.Errorf("%s: does not know all %d nodes yet", a, nodes)
		}
		if err == nil && !strings.Contains(info, "cluster_slots_ok:16384") {
			err = fmt.Errorf("%s: not all slots ok", a)
		}
		var owners map[string]bool
		online := 0
		if err == nil {
			owners, online, err = shardNodes(ctx, rc)
		}
		rc.Close()
		if err != nil {
			return err
		}
		if len(owners) != masters {
			return fmt.Errorf("%s: %d masters, want %d", a, len(owners), masters)
		}
		if replicas >= 0 && online != replicas {
			return fmt.Errorf("%s: lists %d replicas online, want %d", a, online, replicas)
		}
	}
	return nil
}

// Addrs are the nodes' host:port addresses (seed nodes for clients).
func (c *Cluster) Addrs() []string { return append([]string(nil), c.addrs...) }

// AddrsEnv is Addrs in the REDIS_CLUSTER_ADDRS form.
func (c *Cluster) AddrsEnv() string { return strings.Join(c.addrs, ",") }

// nodeOptions are go-redis options for a client of the node at addr, as
// the default user.
func (c *Cluster) nodeOptions(addr string) *redis.Options {
	o := &redis.Options{Addr: addr, DisableIdentity: true}
	if c.ca != nil {
		o.TLSConfig = c.ca.ClientConfig()
	}
	return o
}

// NodeClients returns a client of each node, as the default user (to
// set the cluster up: ACL SETUSER, which a node does not pass on to the
// others), closed at the end of the test.
func (c *Cluster) NodeClients(t testing.TB) []*redis.Client {
	t.Helper()
	var out []*redis.Client
	for _, a := range c.addrs {
		rc := redis.NewClient(c.nodeOptions(a))
		t.Cleanup(func() { rc.Close() })
		out = append(out, rc)
	}
	return out
}

// Owned reports whether the test started the cluster (and may stop nodes).
func (c *Cluster) Owned() bool { return c.servers != nil }

// Client returns a cluster client with short timeouts, closed at the end
// of the test.
func (c *Cluster) Client(t testing.TB) *redis.ClusterClient {
	t.Helper()
	o := &redis.ClusterOptions{
		Addrs:           c.Addrs(),
		DialTimeout:     500 * time.Millisecond,
		ReadTimeout:     time.Second,
		WriteTimeout:    time.Second,
		MaxRedirects:    8,
		DisableIdentity: true,
	}
	if c.ca != nil {
		o.TLSConfig = c.ca.ClientConfig()
	}
	rdb := redis.NewClusterClient(o)
	t.Cleanup(func() { rdb.Close() })
	return rdb
}

// Index returns the index (for StopNode) of the node at addr, or -1.
func (c *Cluster) Index(addr string) int {
	for i, a := range c.addrs {
		if a == addr {
			return i
		}
	}
	return -1
}

// StopNode kills node i (to make the cluster fail it over). It fails the
// test on a cluster the test did not start.
func (c *Cluster) StopNode(t testing.TB, i int) {
	t.Helper()
	if !c.Owned() {
		t.Fatalf("redistest: cannot stop a node of REDIS_CLUSTER_ADDRS")
	}
	c.servers[i].Stop()
}

// WaitFailover polls until addr no longer owns any slot and the cluster
// is ok again on every running node.
func (c *Cluster) WaitFailover(t testing.TB, addr string, within time.Duration) {
	t.Helper()
	if !c.awaitFailover(addr, time.Now().Add(within)) {
		t.Fatalf("redistest: %s was not failed over within %s", addr, within)
	}
}

// awaitFailover polls until addr is failed over (failedOver), and
// reports false if until passes first.
func (c *Cluster) awaitFailover(addr string, until time.Time) bool {
	for time.Now().Before(until) {
		if c.failedOver(addr) {
			return true
		}
		time.Sleep(50 * time.Millisecond)
	}
	return false
}

// ManualFailover promotes replica in place of its master at master with
// CLUSTER FAILOVER (the coordinated switch-over: the master pauses its
// clients until the replica has caught up), and waits until the cluster
// is ok again without master owning slots. Redis abandons a manual
// failover that takes more than 5 s, which happens on a saturated
// machine, and an operator would ask again: so does ManualFailover,
// until within has passed.
func (c *Cluster) ManualFailover(t testing.TB, replica, master string, within time.Duration) {
	t.Helper()
	rc := redis.NewClient(c.nodeOptions(replica))
	defer rc.Close()
	deadline := time.Now().Add(within)
	for attempt := 1; time.Now().Before(deadline); attempt++ {
		if err := rc.Do(context.Background(), "CLUSTER", "FAILOVER").Err(); err != nil {
			t.Fatalf("redistest: CLUSTER FAILOVER on %s: %v", replica, err)
		}
		// Redis's own limit (CLUSTER_MF_TIMEOUT), and then some.
		until := time.Now().Add(8 * time.Second)
		if until.After(deadline) {
			until = deadline
		}
		if c.awaitFailover(master, until) {
			return
		}
		t.Logf("redistest: CLUSTER FAILOVER %d of %s to %s not done within 8s; asking again", attempt, master, replica)
	}
	t.Fatalf("redistest: %s was not failed over to %s within %s", master, replica, within)
}

func (c *Cluster) failedOver(addr string) bool {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	for i, a := range c.addrs {
		if a == addr || (c.servers != nil && c.servers[i].cmd == nil) {
			continue
		}
		rc := redis.NewClient(c.nodeOptions(a))
		info, err := rc.ClusterInfo(ctx).Result()
		owners, err2 := slotOwners(ctx, rc)
		rc.Close()
		if err != nil || err2 != nil || !strings.Contains(info, "cluster_state:ok") ||
			!strings.Contains(info, "cluster_slots_ok:16384") || owners[addr] {
			return false
		}
	}
	return true
}

// slotOwners returns the addresses of the masters that own slots, as
// the node rc is connected to sees them.
func slotOwners(ctx context.Context, rc *redis.Client) (map[string]bool, error) {
	owners, _, err := shardNodes(ctx, rc)
	return owners, err
}

// shardNodes returns the addresses of the masters that own slots and
// the number of replicas online (known and in sync) beside them, as the
// node rc is connected to sees them.
func shardNodes(ctx context.Context, rc *redis.Client) (owners map[string]bool, replicas int, err error) {
	shards, err := rc.ClusterShards(ctx).Result()
	if err != nil {
		return nil, 0, err
	}
	owners = map[string]bool{}
	for _, s := range shards {
		if len(s.Slots) == 0 {
			continue
		}
		for _, n := range s.Nodes {
			if n.Health != "online" {
				continue
			}
			switch n.Role {
			case "master":
				port := n.Port
				if port == 0 { // a TLS node: its plain port is off
					port = n.TLSPort
				}
				owners[net.JoinHostPort(n.IP, strconv.FormatInt(port, 10))] = true
			case "replica":
				replicas++
			}
		}
	}
	return owners, replicas, nil
}

func (c *Cluster) stop() {
	for _, s := range c.servers {
		s.Stop()
		os.RemoveAll(s.Dir)
	}
}

// AddMaster starts one more cluster node and joins it to the cluster as
// a master without slots (redis-cli --cluster add-node), and returns its
// address once every node knows it. It fails the test on a cluster the
// test did not start.
func (c *Cluster) AddMaster(t testing.TB) string {
	t.Helper()
	if !c.Owned() {
		t.Fatalf("redistest: cannot add a node to REDIS_CLUSTER_ADDRS")
	}
	cli, err := exec.LookPath("redis-cli")
	if err != nil {
		t.Fatalf("redistest: redis-cli not found: %v", err)
	}
	s, err := startClusterNode(c.ca)
	if err != nil {
		t.Fatalf("redistest: start cluster node: %v", err)
	}
	var args []string
	if c.ca != nil {
		args = []string{"--tls", "--cacert", c.ca.CertFile}
	}
	args = append(args, "--cluster", "add-node", s.Addr(), c.addrs[0])
	ctx, cancel := context.WithTimeout(context.Background(), clusterCreateTimeout)
	defer cancel()
	if out, err := exec.CommandContext(ctx, cli, args...).CombinedOutput(); err != nil {
		s.Stop()
		os.RemoveAll(s.Dir)
		t.Fatalf("redistest: redis-cli --cluster add-node: %v\n%s", err, out)
	}
	c.servers = append(c.servers, s)
	c.addrs = append(c.addrs, s.Addr())
	rc := redis.NewClient(c.nodeOptions(c.addrs[0]))
	owners, err := slotOwners(context.Background(), rc)
	rc.Close()
	if err != nil {
		t.Fatalf("redistest: %v", err)
	}
	if err := c.waitHealthy(len(c.addrs), len(owners), -1, 30*time.Second); err != nil {
		t.Fatalf("redistest: cluster with %s added: %v", s.Addr(), err)
	}
	return s.Addr()
}

// UnreachableCluster is a cluster client whose one seed address has
// nothing listening: it can read no slot map, so it cannot tell which
// master a key is on and every command through it fails (after a dial of
// at most 500 ms, never retried).
func UnreachableCluster(t testing.TB) *redis.ClusterClient {
	t.Helper()
	port, err := FreePort()
	if err != nil {
		t.Fatal(err)
	}
	rdb := redis.NewClusterClient(&redis.ClusterOptions{
		Addrs:       []string{fmt.Sprintf("127.0.0.1:%d", port)},
		DialTimeout: 500 * time.Millisecond, MaxRetries: -1, DisableIdentity: true,
	})
	t.Cleanup(func() { rdb.Close() })
	return rdb
}
