package redistest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// CA is a private certificate authority made for one test, with a server
// certificate it signed for 127.0.0.1, ::1 and localhost: what a managed
// Redis's TLS looks like to its clients, a certificate no system store
// trusts. The files are PEM, in the test's temporary directory.
type CA struct {
	// CertFile is the CA's certificate: what a client is told to trust
	// (SSL_CERT_FILE for the functions, --tls-ca-cert-file for Redis).
	CertFile string
	// ServerCertFile and ServerKeyFile are the server's certificate and
	// key (--tls-cert-file, --tls-key-file). The certificate is for both
	// server and client use, as a cluster node is a client of the others.
	ServerCertFile, ServerKeyFile string

	pool *x509.CertPool
}

// NewCA makes a CA and a server certificate valid for an hour.
func NewCA(t testing.TB) *CA {
	t.Helper()
	dir := t.TempDir()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatalf("redistest: %v", err)
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "redistest CA " + Prefix(t)},
		NotBefore:             now.Add(-time.Minute),
		NotAfter:              now.Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatalf("redistest: CA certificate: %v", err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	srvKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatalf("redistest: %v", err)
	}
	srvTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "redis"},
		NotBefore:    now.Add(-time.Minute),
		NotAfter:     now.Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
		DNSNames:     []string{"localhost"},
	}
	srvDER, err := x509.CreateCertificate(rand.Reader, srvTmpl, caCert, &srvKey.PublicKey, caKey)
	if err != nil {
		t.Fatalf("redistest: server certificate: %v", err)
	}
	keyDER, err := x509.MarshalECPrivateKey(srvKey)
	if err != nil {
		t.Fatalf("redistest: %v", err)
	}
	c := &CA{
		CertFile:       filepath.Join(dir, "ca.crt"),
		ServerCertFile: filepath.Join(dir, "redis.crt"),
		ServerKeyFile:  filepath.Join(dir, "redis.key"),
		pool:           x509.NewCertPool(),
	}
	c.pool.AddCert(caCert)
	for _, f := range []struct {
		path, kind string
		der        []byte
	}{{c.CertFile, "CERTIFICATE", caDER}, {c.ServerCertFile, "CERTIFICATE", srvDER}, {c.ServerKeyFile, "EC PRIVATE KEY", keyDER}} {
		if err := os.WriteFile(f.path, pem.EncodeToMemory(&pem.Block{Type: f.kind, Bytes: f.der}), 0o600); err != nil {
			t.Fatalf("redistest: %v", err)
		}
	}
	return c
}

// ClientConfig is a TLS configuration that trusts only c.
func (c *CA) ClientConfig() *tls.Config {
	return &tls.Config{RootCAs: c.pool, MinVersion: tls.VersionTLS12}
}

// serverArgs are redis-server's TLS arguments for c: clients need no
// certificate of their own (--tls-auth-clients no), as with managed
// Redis services.
func (c *CA) serverArgs() []string {
	return []string{"--tls-cert-file", c.ServerCertFile, "--tls-key-file", c.ServerKeyFile,
		"--tls-ca-cert-file", c.CertFile, "--tls-auth-clients", "no"}
}

// StartTLS is Start for a server that accepts only TLS (its plain port
// is off), with the certificate of ca. Its URL is rediss://.
func StartTLS(t testing.TB, ca *CA, extra ...string) *Server {
	t.Helper()
	s, err := startServer(extra, ca, 0)
	if err != nil {
		t.Fatalf("redistest: %v", err)
	}
	t.Cleanup(s.Stop)
	return s
}
