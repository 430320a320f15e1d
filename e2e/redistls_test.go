package e2e

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// TestRedisOverTLS runs both functions against a Redis that speaks only
// TLS, with a certificate of a private CA that they are told to trust
// the way an operator does, with SSL_CERT_FILE (no skip_verify), as the
// ACL user of docs/deployment.md, over every path that uses Redis.
func TestRedisOverTLS(t *testing.T) {
	const password, adminPassword = "tls-acl-pw-9d2c7e", "tls-admin-pw-51be0a"
	ca := redistest.NewCA(t)
	srv := redistest.StartTLS(t, ca, "--requirepass", adminPassword)
	o := srv.Options()
	o.Password = adminPassword
	admin := redis.NewClient(o)
	t.Cleanup(func() { admin.Close() })
	prefix := redistest.Prefix(t)
	setACLUser(t, admin, aclRules(t, prefix, password))
	e := pathEnv(prefix)
	e["REDIS_URL"] = "rediss://wsrelay:" + password + "@" + srv.Addr() + "/0"
	e["SSL_CERT_FILE"] = ca.CertFile
	in := start(t, "ingress", e)
	eg := start(t, "egress", e)
	for _, p := range []*proc{in, eg} {
		if l := p.Logs(); !strings.Contains(l, `"redis_tls":true`) || !strings.Contains(l, `"redis_tls_verify":true`) {
			t.Fatalf("%s's startup line does not say TLS with verification:\n%s", p.name, l)
		}
	}
	redisPath(t, in, eg, admin, prefix)
	noPermission(t, admin, in, eg)
}

// TestRedisClusterOverTLS is TestRedisOverTLS on a three-master Redis
// Cluster whose nodes speak only TLS (REDIS_CLUSTER_TLS=true), with the
// ACL user on every node (REDIS_CLUSTER_USERNAME, REDIS_CLUSTER_PASSWORD).
func TestRedisClusterOverTLS(t *testing.T) {
	const password = "tls-cluster-pw-7a03d1"
	ca := redistest.NewCA(t)
	rc := redistest.StartClusterTLS(t, ca, 3, 0)
	prefix := redistest.Prefix(t)
	nodes := rc.NodeClients(t)
	for _, n := range nodes {
		setACLUser(t, n, aclRules(t, prefix, password))
	}
	e := pathEnv(prefix)
	e["REDIS_CLUSTER_ADDRS"] = rc.AddrsEnv()
	e["REDIS_CLUSTER_TLS"] = "true"
	e["REDIS_CLUSTER_USERNAME"] = "wsrelay"
	e["REDIS_CLUSTER_PASSWORD"] = password
	e["SSL_CERT_FILE"] = ca.CertFile
	in := start(t, "ingress", e)
	eg := start(t, "egress", e)
	redisPath(t, in, eg, rc.Client(t), prefix)
	for _, n := range nodes {
		noPermission(t, n, in, eg)
	}
}

// TestRedisOverTLSWrongCA: functions that do not trust the Redis's
// certificate (SSL_CERT_FILE names another CA) start, are not ready, and
// log that the certificate is the problem, without the password.
func TestRedisOverTLSWrongCA(t *testing.T) {
	const password = "tls-redis-pw-4b8a1f"
	ca, other := redistest.NewCA(t), redistest.NewCA(t)
	srv := redistest.StartTLS(t, ca, "--requirepass", password)
	e := pathEnv(redistest.Prefix(t))
	e["REDIS_URL"] = "rediss://:" + password + "@" + srv.Addr() + "/0"
	e["SSL_CERT_FILE"] = other.CertFile
	in := start(t, "ingress", e)
	eg := start(t, "egress", e)
	for _, p := range []*proc{in, eg} {
		testkit.Eventually(t, 5*time.Second, func() error {
			// The ingress dials Redis when a request needs it.
			if err := httpStatus(p.URL+"/readyz", 503); err != nil {
				return err
			}
			if !strings.Contains(p.Logs(), "x509: certificate signed by unknown authority") {
				return fmt.Errorf("%s has not logged the certificate error yet", p.name)
			}
			return nil
		})
		if err := httpStatus(p.URL+"/readyz", 503); err != nil {
			t.Fatal(err)
		}
		if strings.Contains(p.Logs(), password) {
			t.Fatalf("%s logged the password", p.name)
		}
	}
}
