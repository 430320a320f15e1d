package auth

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

const secret = "0123456789abcdef0123456789abcdef"

func TestParseKeys(t *testing.T) {
	t.Parallel()
	ks, err := ParseKeys(" full , chat=chat:*|news.* ,adm=+admin, both=+admin|x")
	if err != nil {
		t.Fatal(err)
	}
	if ks.Len() != 4 {
		t.Fatalf("len %d", ks.Len())
	}
	for _, tc := range []struct {
		key, ch      string
		admin, usech bool
	}{
		{"full", "anything", true, true},
		{"chat", "chat:1", false, true},
		{"chat", "news.a.b", false, true},
		{"chat", "other", false, false},
		{"adm", "chat:1", true, false},
		{"both", "x", true, true},
		{"both", "xy", true, false},
	} {
		k, ok := ks.Lookup(tc.key)
		if !ok {
			t.Fatalf("%s not found", tc.key)
		}
		if k.Admin != tc.admin || k.MayUseChannel(tc.ch) != tc.usech {
			t.Errorf("%s on %s: admin %v use %v", tc.key, tc.ch, k.Admin, k.MayUseChannel(tc.ch))
		}
		if strings.Contains(k.ID, tc.key) || !strings.HasPrefix(k.ID, "key:") {
			t.Errorf("ID %q", k.ID)
		}
	}
	if _, ok := ks.Lookup("nope"); ok {
		t.Error("unknown key found")
	}
	if _, ok := ks.Lookup(""); ok {
		t.Error("empty key found")
	}
}

func TestParseKeysRefuses(t *testing.T) {
	t.Parallel()
	for _, in := range []string{"a.b", "k=", "k=bad pattern", "k=+root", "dup,dup", "k=a|", "sp ace"} {
		_, err := ParseKeys(in)
		if err == nil {
			t.Errorf("%q accepted", in)
			continue
		}
		// The error never repeats the key.
		if key, _, _ := strings.Cut(in, "="); strings.Contains(err.Error(), key) {
			t.Errorf("%q: error %q holds the key", in, err)
		}
	}
	if ks, err := ParseKeys(""); err != nil || ks.Len() != 0 {
		t.Errorf("empty: %v %d", err, ks.Len())
	}
}

func TestBearerCredential(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]string{"Bearer abc": "abc", "bearer  abc ": "abc", "Basic abc": "", "Bearer": "", "Bearer ": ""} {
		got, ok := BearerCredential(in)
		if got != want || ok != (want != "") {
			t.Errorf("%q: %q %v", in, got, ok)
		}
	}
	if !IsToken("a.b.c") || IsToken("abc") || IsToken("a.b") || IsToken("a.b.c.d") {
		t.Error("IsToken")
	}
}

func TestVerify(t *testing.T) {
	t.Parallel()
	v, err := NewVerifier(TokenConfig{Secret: secret})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	good, _ := SignHS256(secret, Claims{Subject: "alice", Channels: []string{"room.*"}, Publish: []string{"room.1"}, Expires: now.Add(time.Hour)})
	c, err := v.Verify(good)
	if err != nil {
		t.Fatal(err)
	}
	if c.Subject != "alice" || !c.Channels.Allows("room.9") || c.Channels.Allows("other") || !c.Publish.Allows("room.1") || c.Publish.Allows("room.2") {
		t.Errorf("claims %+v", c)
	}
	if c.Expires.Unix() != now.Add(time.Hour).Unix() {
		t.Errorf("exp %v", c.Expires)
	}

	sign := func(m jwt.SigningMethod, key any, claims jwt.MapClaims) string {
		s, err := jwt.NewWithClaims(m, claims).SignedString(key)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	exp := now.Add(time.Hour).Unix()
	expired, _ := SignHS256(secret, Claims{Subject: "alice", Expires: now.Add(-time.Second)})
	forged, _ := SignHS256("another secret, same length......", Claims{Subject: "alice", Expires: now.Add(time.Hour)})
	tampered := good[:strings.LastIndexByte(good, '.')] + "." + strings.Repeat("A", 43)
	none := sign(jwt.SigningMethodNone, jwt.UnsafeAllowNoneSignatureType, jwt.MapClaims{"sub": "alice", "exp": exp})
	hs512 := sign(jwt.SigningMethodHS512, []byte(secret), jwt.MapClaims{"sub": "alice", "exp": exp})
	for name, tc := range map[string]struct {
		token string
		want  error
	}{
		"expired":        {expired, ErrTokenExpired},
		"forged":         {forged, ErrInvalidToken},
		"tampered":       {tampered, ErrInvalidToken},
		"alg none":       {none, ErrInvalidToken},
		"alg HS512":      {hs512, ErrInvalidToken},
		"no exp":         {sign(jwt.SigningMethodHS256, []byte(secret), jwt.MapClaims{"sub": "alice"}), ErrInvalidToken},
		"no sub":         {sign(jwt.SigningMethodHS256, []byte(secret), jwt.MapClaims{"exp": exp}), ErrInvalidToken},
		"bad sub":        {sign(jwt.SigningMethodHS256, []byte(secret), jwt.MapClaims{"sub": "a b", "exp": exp}), ErrInvalidToken},
		"bad pattern":    {sign(jwt.SigningMethodHS256, []byte(secret), jwt.MapClaims{"sub": "a", "exp": exp, "channels": []string{"a b"}}), ErrInvalidToken},
		"channels!array": {sign(jwt.SigningMethodHS256, []byte(secret), jwt.MapClaims{"sub": "a", "exp": exp, "channels": "x"}), ErrInvalidToken},
		"not yet":        {sign(jwt.SigningMethodHS256, []byte(secret), jwt.MapClaims{"sub": "a", "exp": exp, "nbf": exp}), ErrInvalidToken},
		"garbage":        {"a.b.c", ErrInvalidToken},
		"api key":        {"abc", ErrInvalidToken},
		"huge":           {strings.Repeat("a", MaxTokenBytes) + ".b.c", ErrInvalidToken},
	} {
		_, err := v.Verify(tc.token)
		if !errors.Is(err, tc.want) {
			t.Errorf("%s: %v, want %v", name, err, tc.want)
		}
		if err != nil && len(tc.token) > 20 && strings.Contains(err.Error(), tc.token) {
			t.Errorf("%s: error holds the token", name)
		}
	}
	var nilV *Verifier
	if _, err := nilV.Verify(good); !errors.Is(err, ErrNoVerifier) {
		t.Errorf("nil verifier: %v", err)
	}
	// The clock decides expiry.
	if _, err := v.WithClock(func() time.Time { return now.Add(2 * time.Hour) }).Verify(good); !errors.Is(err, ErrTokenExpired) {
		t.Errorf("later: %v", err)
	}
}

// Claim names are case-sensitive (RFC 7519 §4): "EXP", "Sub" or
// "Channels" are other claims, not exp, sub or channels. encoding/json
// would match them without case, so that a token without exp but with
// an EXP was accepted, and a Sub or Channels after sub or channels
// replaced them, though every other JWT library reads them apart.
func TestVerifyClaimNamesCaseSensitive(t *testing.T) {
	t.Parallel()
	v, err := NewVerifier(TokenConfig{Secret: secret})
	if err != nil {
		t.Fatal(err)
	}
	exp := time.Now().Add(time.Hour).Unix()
	sign := func(claims jwt.MapClaims) string {
		s, err := jwt.NewWithClaims(jwt.SigningMethodHS256, claims).SignedString([]byte(secret))
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	if _, err := v.Verify(sign(jwt.MapClaims{"sub": "alice", "EXP": exp})); !errors.Is(err, ErrInvalidToken) {
		t.Errorf("EXP without exp: %v, want refused", err)
	}
	if _, err := v.Verify(sign(jwt.MapClaims{"SUB": "alice", "exp": exp})); !errors.Is(err, ErrInvalidToken) {
		t.Errorf("SUB without sub: %v, want refused", err)
	}
	// jwt.MapClaims marshals its keys sorted: upper case before lower.
	c, err := v.Verify(sign(jwt.MapClaims{"sub": "alice", "exp": exp, "Sub": "mallory", "channels": []string{"room.1"}, "Channels": []string{"*"}, "PUBLISH": []string{"*"}}))
	if err != nil {
		t.Fatal(err)
	}
	if c.Subject != "alice" || c.Channels.Allows("other") || !c.Channels.Allows("room.1") || c.Publish.Allows("other") {
		t.Errorf("claims %+v: read Sub, Channels or PUBLISH as sub, channels or publish", c)
	}
	// Reversed order in the payload: the exact name still wins.
	raw := `{"Sub":"mallory","sub":"alice","exp":` + strconv.FormatInt(exp, 10) + `,"channels":["room.1"],"Channels":["*"]}`
	head := base64.RawURLEncoding.EncodeToString([]byte(`{"alg":"HS256","typ":"JWT"}`)) + "." + base64.RawURLEncoding.EncodeToString([]byte(raw))
	sig, err := jwt.SigningMethodHS256.Sign(head, []byte(secret))
	if err != nil {
		t.Fatal(err)
	}
	c, err = v.Verify(head + "." + base64.RawURLEncoding.EncodeToString(sig))
	if err != nil {
		t.Fatal(err)
	}
	if c.Subject != "alice" || c.Channels.Allows("other") {
		t.Errorf("claims %+v: read Channels as channels", c)
	}
}

func TestVerifyES256(t *testing.T) {
	t.Parallel()
	pk, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, _ := x509.MarshalPKIXPublicKey(&pk.PublicKey)
	pemText := string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))
	// One line, as in an environment variable.
	v, err := NewVerifier(TokenConfig{PublicKeys: strings.ReplaceAll(pemText, "\n", `\n`)})
	if err != nil {
		t.Fatal(err)
	}
	claims := jwt.MapClaims{"sub": "bob", "exp": time.Now().Add(time.Hour).Unix()}
	tok, _ := jwt.NewWithClaims(jwt.SigningMethodES256, claims).SignedString(pk)
	if c, err := v.Verify(tok); err != nil || c.Subject != "bob" {
		t.Fatalf("%v %+v", err, c)
	}
	// HS256 signed with the public key's bytes (algorithm confusion).
	conf, _ := jwt.NewWithClaims(jwt.SigningMethodHS256, claims).SignedString([]byte(pemText))
	if _, err := v.Verify(conf); !errors.Is(err, ErrInvalidToken) {
		t.Errorf("alg confusion: %v", err)
	}
	if _, err := NewVerifier(TokenConfig{PublicKeys: "not a pem"}); err == nil {
		t.Error("bad PEM accepted")
	}
	if v, err := NewVerifier(TokenConfig{}); v != nil || err != nil {
		t.Error("empty settings should give nil, nil")
	}
}

// TestKeyRotation: the secret and the public keys can be rotated without
// refusing a valid token. HS256 tokens signed with JWT_SECRET_PREVIOUS
// are accepted beside JWT_SECRET's; JWT_PUBLIC_KEY holds several keys,
// RSA and ECDSA mixed, and each verifies its own tokens.
func TestKeyRotation(t *testing.T) {
	t.Parallel()
	const old = "the previous secret, 32 bytes or more"
	exp := time.Now().Add(time.Hour)
	v, err := NewVerifier(TokenConfig{Secret: secret, PreviousSecret: old})
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{secret, old} {
		tok, _ := SignHS256(s, Claims{Subject: "alice", Expires: exp})
		if _, err := v.Verify(tok); err != nil {
			t.Errorf("signed with the %s secret: %v", map[bool]string{true: "current", false: "previous"}[s == secret], err)
		}
	}
	other, _ := SignHS256("neither of them, but 32 bytes long", Claims{Subject: "alice", Expires: exp})
	if _, err := v.Verify(other); !errors.Is(err, ErrInvalidToken) {
		t.Errorf("signed with another secret: %v", err)
	}
	expired, _ := SignHS256(old, Claims{Subject: "alice", Expires: time.Now().Add(-time.Second)})
	if _, err := v.Verify(expired); !errors.Is(err, ErrTokenExpired) {
		t.Errorf("expired, previous secret: %v", err)
	}
	if _, err := NewVerifier(TokenConfig{PreviousSecret: old}); err == nil || !strings.Contains(err.Error(), "JWT_SECRET_PREVIOUS") || strings.Contains(err.Error(), old) {
		t.Errorf("previous secret alone: %v", err)
	}

	ec1, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ec2, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	rk, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	pemOf := func(pub any) string {
		der, err := x509.MarshalPKIXPublicKey(pub)
		if err != nil {
			t.Fatal(err)
		}
		return string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))
	}
	keys := pemOf(&ec1.PublicKey) + pemOf(&rk.PublicKey) + pemOf(&ec2.PublicKey)
	v, err = NewVerifier(TokenConfig{PublicKeys: strings.ReplaceAll(keys, "\n", `\n`)})
	if err != nil {
		t.Fatal(err)
	}
	claims := jwt.MapClaims{"sub": "bob", "exp": exp.Unix()}
	for name, tc := range map[string]struct {
		m   jwt.SigningMethod
		key any
	}{"first ECDSA": {jwt.SigningMethodES256, ec1}, "RSA": {jwt.SigningMethodRS256, rk}, "second ECDSA": {jwt.SigningMethodES256, ec2}} {
		tok, _ := jwt.NewWithClaims(tc.m, claims).SignedString(tc.key)
		if c, err := v.Verify(tok); err != nil || c.Subject != "bob" {
			t.Errorf("%s: %v", name, err)
		}
	}
	ec3, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tok, _ := jwt.NewWithClaims(jwt.SigningMethodES256, claims).SignedString(ec3)
	if _, err := v.Verify(tok); !errors.Is(err, ErrInvalidToken) {
		t.Errorf("a key not listed: %v", err)
	}
	hs, _ := SignHS256(secret, Claims{Subject: "bob", Expires: exp})
	if _, err := v.Verify(hs); !errors.Is(err, ErrInvalidToken) {
		t.Errorf("HS256 with public keys only: %v", err)
	}

	if got := (TokenConfig{Secret: secret, PreviousSecret: old, PublicKeys: keys}).Describe(); got != "secret+previous secret+3 public keys" {
		t.Errorf("Describe: %q", got)
	}
	if got := (TokenConfig{PublicKeys: pemOf(&ec1.PublicKey)}).Describe(); got != "1 public key" {
		t.Errorf("Describe: %q", got)
	}
	if got := (TokenConfig{}).Describe(); got != "off" {
		t.Errorf("Describe: %q", got)
	}
	if w := (TokenConfig{Secret: secret, PreviousSecret: "short"}).Warnings(); len(w) != 1 || !strings.Contains(w[0], "JWT_SECRET_PREVIOUS") {
		t.Errorf("Warnings: %q", w)
	}

	// Each unusable key is named by its position, never shown.
	for name, tc := range map[string]struct{ keys, want string }{
		"second not a key":  {pemOf(&ec1.PublicKey) + "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "key 2"},
		"text after a key":  {pemOf(&ec1.PublicKey) + "trailing", "key 2"},
		"text before a key": {pemOf(&ec1.PublicKey) + "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n" + pemOf(&ec2.PublicKey), "text before key 2"},
		// A block pem.Decode cannot read is not skipped for the next one:
		// the new key of a rotation, pasted badly, would be left out
		// while the startup line counts it.
		"second not base64":  {pemOf(&ec1.PublicKey) + "-----BEGIN PUBLIC KEY-----\n!!!!\n-----END PUBLIC KEY-----\n" + pemOf(&ec2.PublicKey), "key 2"},
		"second without END": {pemOf(&ec1.PublicKey) + strings.TrimSuffix(pemOf(&ec2.PublicKey), "-----END PUBLIC KEY-----\n") + pemOf(&rk.PublicKey), "key 2"},
		"first cut short":    {pemOf(&ec1.PublicKey)[:60] + "\n" + pemOf(&ec2.PublicKey), "key 1"},
		"a private key":      {string(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: []byte("x")})), "key 1"},
		"P-384":              {pemOf(&mustEC(t, elliptic.P384()).PublicKey), "key 1"},
		"whitespace only":    {" \n ", "key 1"},
	} {
		_, err := NewVerifier(TokenConfig{PublicKeys: tc.keys})
		if err == nil || !strings.Contains(err.Error(), "JWT_PUBLIC_KEY: "+tc.want) {
			t.Errorf("%s: %v, want an error about %s", name, err, tc.want)
		}
	}
}

func mustEC(t *testing.T, c elliptic.Curve) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(c, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestMetricsToken(t *testing.T) {
	t.Parallel()
	req := func(auth string) *http.Request {
		r := httptest.NewRequest("GET", "/metrics", nil)
		if auth != "" {
			r.Header.Set("Authorization", auth)
		}
		return r
	}
	open, err := NewMetricsToken("")
	if err != nil || !open.Allows(req("")) {
		t.Fatalf("no token: %v, or a scrape without a credential refused", err)
	}
	m, err := NewMetricsToken("scrape-0123456789")
	if err != nil {
		t.Fatal(err)
	}
	for auth, want := range map[string]bool{
		"Bearer scrape-0123456789": true,
		"bearer scrape-0123456789": true,
		"":                         false,
		"Bearer scrape-012345678":  false,
		"Basic scrape-0123456789":  false,
		"scrape-0123456789":        false,
	} {
		if got := m.Allows(req(auth)); got != want {
			t.Errorf("%q: %v, want %v", auth, got, want)
		}
	}
	for _, bad := range []string{"has space", "tab\there", strings.Repeat("x", 257), "naïve"} {
		m, err := NewMetricsToken(bad)
		if err == nil || !strings.Contains(err.Error(), "METRICS_TOKEN") || strings.Contains(err.Error(), bad) {
			t.Errorf("%q: %v", bad, err)
		}
		if m.Allows(req("")) || m.Allows(req("Bearer "+bad)) {
			t.Errorf("%q: an unusable token lets scrapes through", bad)
		}
	}
}
