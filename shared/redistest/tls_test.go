package redistest

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

func TestMain(m *testing.M) { Main(m) }

// TestStartTLS: a TLS server answers a client that trusts its CA, over
// TLS only, and refuses one that trusts only the system's CAs.
func TestStartTLS(t *testing.T) {
	ca := NewCA(t)
	s := StartTLS(t, ca)
	ctx := context.Background()
	rdb := redis.NewClient(s.Options())
	defer rdb.Close()
	if err := rdb.Ping(ctx).Err(); err != nil {
		t.Fatalf("ping over TLS: %v", err)
	}
	o, err := redis.ParseURL(s.URL())
	if err != nil || o.TLSConfig == nil {
		t.Fatalf("URL %s: TLS %v, %v", s.URL(), o != nil && o.TLSConfig != nil, err)
	}
	plain := redis.NewClient(&redis.Options{Addr: s.Addr(), DialTimeout: time.Second, ReadTimeout: time.Second, MaxRetries: -1})
	defer plain.Close()
	if err := plain.Ping(ctx).Err(); err == nil {
		t.Fatal("a plain-text client was answered")
	}
	untrusted := redis.NewClient(&redis.Options{Addr: s.Addr(), TLSConfig: &tls.Config{ServerName: "127.0.0.1"}, MaxRetries: -1})
	defer untrusted.Close()
	err = untrusted.Ping(ctx).Err()
	if _, ok := errors.AsType[x509.UnknownAuthorityError](err); !ok {
		t.Fatalf("a client without the CA: %v, want x509.UnknownAuthorityError", err)
	}
}

// TestStartClusterTLS: a cluster whose nodes speak only TLS, to clients
// and to each other, serves a cluster client that trusts its CA.
func TestStartClusterTLS(t *testing.T) {
	ca := NewCA(t)
	c := StartClusterTLS(t, ca, 3, 0)
	rdb := c.Client(t)
	ctx := context.Background()
	for _, k := range []string{"a", "b", "c", "d"} {
		if err := rdb.Set(ctx, Prefix(t)+k, "v", time.Minute).Err(); err != nil {
			t.Fatalf("SET over TLS: %v", err)
		}
	}
}
