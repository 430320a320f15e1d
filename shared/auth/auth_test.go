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
	"fmt"
	"math/big"
	"net/http"
	"net/http/httptest"
	"slices"
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
	// Items joined by something else than a comma (a space, a
	// semicolon, a newline of a YAML block): the keys after the first
	// are read as part of its scope, which the error must not quote.
	for _, in := range []string{"k=chat:* second-key-0123=news.*", "k=chat:*;second-key-0123", "k=+admin\nsecond-key-0123=chat:*", "k=chat:*|news.*|second-key-0123=x",
		// A trailing '|' before the line break: the next key alone is a
		// valid channel pattern.
		"k=chat:*|\nsecond-key-0123", "k=chat:*|\r\nsecond-key-0123", "k=chat:*\n|second-key-0123"} {
		_, err := ParseKeys(in)
		if err == nil {
			t.Errorf("%q accepted", in)
		} else if strings.Contains(err.Error(), "second-key") {
			t.Errorf("%q: error %q holds the second key", in, err)
		}
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
		// nbf after exp: never valid, so not "expired", whether nbf
		// has passed or not.
		"nbf>exp passed": {sign(jwt.SigningMethodHS256, []byte(secret), jwt.MapClaims{"sub": "a", "exp": now.Add(-time.Hour).Unix(), "nbf": now.Add(-time.Minute).Unix()}), ErrInvalidToken},
		"nbf>exp ahead":  {sign(jwt.SigningMethodHS256, []byte(secret), jwt.MapClaims{"sub": "a", "exp": now.Add(-time.Hour).Unix(), "nbf": exp}), ErrInvalidToken},
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
	if got := (TokenConfig{Secret: secret, Issuer: "https://issuer.example", Audience: "wsrelay"}).Describe(); got != "secret+iss checked+aud checked" {
		t.Errorf("Describe with iss and aud = %q", got)
	}
	if got := (TokenConfig{Issuer: "https://issuer.example"}).Describe(); got != "off" {
		t.Errorf("Describe without a key = %q, want off", got)
	}
	if got := (TokenConfig{}).Describe(); got != "off" {
		t.Errorf("Describe: %q", got)
	}
	if w := (TokenConfig{Secret: secret, PreviousSecret: "short"}).ShortSecrets(); !slices.Equal(w, []string{"JWT_SECRET_PREVIOUS"}) {
		t.Errorf("ShortSecrets: %q", w)
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
	// Two Authorization headers, the token first: refused, as the
	// ingress refuses two credentials (which one a proxy meant is not
	// guessed).
	two := req("Bearer scrape-0123456789")
	two.Header.Add("Authorization", "Bearer other")
	if m.Allows(two) {
		t.Error("two Authorization headers, the first the token: allowed")
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

// signRaw signs payload, a JSON object written out as is, with HS256 and
// secret: claims of types jwt.MapClaims would not write.
func signRaw(t *testing.T, payload string) string {
	t.Helper()
	enc := base64.RawURLEncoding
	head := enc.EncodeToString([]byte(`{"alg":"HS256","typ":"JWT"}`)) + "." + enc.EncodeToString([]byte(payload))
	sig, err := jwt.SigningMethodHS256.Sign(head, []byte(secret))
	if err != nil {
		t.Fatal(err)
	}
	return head + "." + enc.EncodeToString(sig)
}

// JWT_ISSUER and JWT_AUDIENCE, when set, must match the token's iss and
// aud (a string or an array of strings); unset, neither is looked at.
func TestVerifyIssuerAudience(t *testing.T) {
	t.Parallel()
	exp := strconv.FormatInt(time.Now().Add(time.Hour).Unix(), 10)
	tok := func(claims string) string {
		return signRaw(t, `{"sub":"alice","exp":`+exp+claims+`}`)
	}
	const (
		iss = "https://auth.example.com/"
		aud = "wsrelay"
	)
	for _, tc := range []struct {
		name     string
		cfg      TokenConfig
		claims   string
		want     error
		wantText string // in the error
	}{
		{"unset, none", TokenConfig{}, ``, nil, ""},
		{"unset, any", TokenConfig{}, `,"iss":"other","aud":["x","y"]`, nil, ""},
		{"iss", TokenConfig{Issuer: iss}, `,"iss":"` + iss + `"`, nil, ""},
		{"iss, aud unset", TokenConfig{Issuer: iss}, `,"iss":"` + iss + `","aud":"other"`, nil, ""},
		{"iss wrong", TokenConfig{Issuer: iss}, `,"iss":"https://auth.example.com"`, ErrInvalidToken, "iss is not JWT_ISSUER"},
		{"iss other case", TokenConfig{Issuer: iss}, `,"iss":"HTTPS://auth.example.com/"`, ErrInvalidToken, "iss is not JWT_ISSUER"},
		{"iss missing", TokenConfig{Issuer: iss}, ``, ErrInvalidToken, "no iss claim"},
		{"iss empty", TokenConfig{Issuer: iss}, `,"iss":""`, ErrInvalidToken, "no iss claim"},
		{"iss named ISS", TokenConfig{Issuer: iss}, `,"ISS":"` + iss + `"`, ErrInvalidToken, "no iss claim"},
		{"iss not a string", TokenConfig{Issuer: iss}, `,"iss":["` + iss + `"]`, ErrInvalidToken, "iss must be a string"},
		{"aud string", TokenConfig{Audience: aud}, `,"aud":"wsrelay"`, nil, ""},
		{"aud array", TokenConfig{Audience: aud}, `,"aud":["billing","wsrelay"]`, nil, ""},
		{"aud wrong", TokenConfig{Audience: aud}, `,"aud":"billing"`, ErrInvalidToken, "aud does not hold JWT_AUDIENCE"},
		{"aud array wrong", TokenConfig{Audience: aud}, `,"aud":["billing","WSRELAY"]`, ErrInvalidToken, "aud does not hold JWT_AUDIENCE"},
		{"aud missing", TokenConfig{Audience: aud}, ``, ErrInvalidToken, "no aud claim"},
		{"aud empty array", TokenConfig{Audience: aud}, `,"aud":[]`, ErrInvalidToken, "no aud claim"},
		{"aud null", TokenConfig{Audience: aud}, `,"aud":null`, ErrInvalidToken, "no aud claim"},
		// jwt's validator takes an aud of one empty string for a missing
		// one (ErrTokenRequiredClaimMissing, as for a missing exp): told
		// as no aud, not as "no exp claim" of a token that has one.
		{"aud empty string", TokenConfig{Audience: aud}, `,"aud":""`, ErrInvalidToken, "no aud claim"},
		{"aud array of an empty string", TokenConfig{Audience: aud}, `,"aud":[""]`, ErrInvalidToken, "no aud claim"},
		{"aud number", TokenConfig{Audience: aud}, `,"aud":1`, ErrInvalidToken, "aud must be a string or an array of strings"},
		{"both", TokenConfig{Issuer: iss, Audience: aud}, `,"iss":"` + iss + `","aud":["wsrelay"]`, nil, ""},
		{"both, iss wrong", TokenConfig{Issuer: iss, Audience: aud}, `,"iss":"x","aud":"wsrelay"`, ErrInvalidToken, "iss is not JWT_ISSUER"},
		{"both, aud wrong", TokenConfig{Issuer: iss, Audience: aud}, `,"iss":"` + iss + `","aud":"x"`, ErrInvalidToken, "aud does not hold JWT_AUDIENCE"},
	} {
		cfg := tc.cfg
		cfg.Secret = secret
		v, err := NewVerifier(cfg)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		token := tok(tc.claims)
		c, err := v.Verify(token)
		switch {
		case tc.want == nil && err != nil:
			t.Errorf("%s: %v, want accepted", tc.name, err)
		case tc.want == nil && c.Subject != "alice":
			t.Errorf("%s: claims %+v", tc.name, c)
		case tc.want != nil && (!errors.Is(err, tc.want) || !strings.Contains(fmt.Sprint(err), tc.wantText)):
			t.Errorf("%s: %v, want %v with %q", tc.name, err, tc.want, tc.wantText)
		}
		if err != nil && strings.Contains(err.Error(), token) {
			t.Errorf("%s: error holds the token", tc.name)
		}
	}

	// A wrong iss or aud is not a matter of time: an expired token
	// from another issuer is an invalid one, not one to refresh.
	v, err := NewVerifier(TokenConfig{Secret: secret, Issuer: iss, Audience: aud})
	if err != nil {
		t.Fatal(err)
	}
	old := strconv.FormatInt(time.Now().Add(-time.Hour).Unix(), 10)
	if _, err := v.Verify(signRaw(t, `{"sub":"alice","exp":`+old+`,"iss":"x","aud":"wsrelay"}`)); errors.Is(err, ErrTokenExpired) || !errors.Is(err, ErrInvalidToken) {
		t.Errorf("expired, wrong iss: %v, want invalid", err)
	}
	if _, err := v.Verify(signRaw(t, `{"sub":"alice","exp":`+old+`,"iss":"`+iss+`","aud":"wsrelay"}`)); !errors.Is(err, ErrTokenExpired) {
		t.Errorf("expired, right iss and aud: %v, want expired", err)
	}
	// Nor is a bad sub or pattern: the next token would be refused too.
	for _, claims := range []string{`"sub":"a b"`, `"sub":"alice","channels":["a b"]`, `"sub":"alice","publish":["a b"]`} {
		if _, err := v.Verify(signRaw(t, `{`+claims+`,"exp":`+old+`,"iss":"`+iss+`","aud":"wsrelay"}`)); errors.Is(err, ErrTokenExpired) || !errors.Is(err, ErrInvalidToken) {
			t.Errorf("expired, %s: %v, want invalid", claims, err)
		}
	}
	// Without exp, the error still says exp.
	if _, err := v.Verify(signRaw(t, `{"sub":"alice","iss":"`+iss+`","aud":"wsrelay"}`)); !errors.Is(err, ErrInvalidToken) || !strings.Contains(err.Error(), "no exp claim") {
		t.Errorf("no exp: %v", err)
	}
}

// JWT_ISSUER and JWT_AUDIENCE are checked at start, named, never shown.
func TestTokenConfigIssuerAudience(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		iss, aud string
		want     string // "" accepted, else the variable named
	}{
		{"", "", ""},
		{"https://auth.example.com/", "wsrelay", ""},
		{"My Company", "api gateway", ""}, // spaces inside are fine
		{strings.Repeat("i", 256), strings.Repeat("a", 256), ""},
		{strings.Repeat("i", 257), "", "JWT_ISSUER"},
		{"", strings.Repeat("a", 257), "JWT_AUDIENCE"},
		{" issuer", "", "JWT_ISSUER"},
		{"issuer\n", "", "JWT_ISSUER"},
		{"", "wsrelay ", "JWT_AUDIENCE"},
		{"", "\twsrelay", "JWT_AUDIENCE"},
		{"is\x00suer", "", "JWT_ISSUER"},
		{"", "aüd", "JWT_AUDIENCE"},
	} {
		for _, secretSet := range []string{secret, ""} {
			_, err := NewVerifier(TokenConfig{Secret: secretSet, Issuer: tc.iss, Audience: tc.aud})
			switch {
			case tc.want == "" && err != nil:
				t.Errorf("iss %q aud %q: %v", tc.iss, tc.aud, err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Errorf("iss %q aud %q: %v, want an error naming %s", tc.iss, tc.aud, err, tc.want)
			case err != nil && ((tc.iss != "" && strings.Contains(err.Error(), tc.iss)) || (tc.aud != "" && strings.Contains(err.Error(), tc.aud))):
				t.Errorf("iss %q aud %q: the error shows the value: %v", tc.iss, tc.aud, err)
			}
		}
	}
}

// Every bad JWT_* variable is reported at once, as every other bad
// value at start: a bad JWT_ISSUER hid a JWT_PUBLIC_KEY that is not a key
// and a JWT_SECRET_PREVIOUS without JWT_SECRET, met at the next restart.
func TestNewVerifierReportsAll(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		c    TokenConfig
		want []string
	}{
		{TokenConfig{Issuer: " iss", PublicKeys: "not a key"}, []string{"JWT_ISSUER", "JWT_PUBLIC_KEY"}},
		{TokenConfig{Audience: "aud ", PreviousSecret: "old"}, []string{"JWT_AUDIENCE", "JWT_SECRET_PREVIOUS"}},
		{TokenConfig{Issuer: " iss", Secret: secret, PublicKeys: "not a key"}, []string{"JWT_ISSUER", "JWT_PUBLIC_KEY"}},
	} {
		v, err := NewVerifier(tc.c)
		if err == nil || v != nil {
			t.Errorf("%+v: %v, %v; want an error", tc.c, v, err)
			continue
		}
		for _, w := range tc.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%+v: %q does not name %s", tc.c, err, w)
			}
		}
		if strings.Contains(err.Error(), "\n") {
			t.Errorf("%+v: %q is not one line", tc.c, err)
		}
	}
}

// exp, nbf and iat are NumericDates (RFC 7519 §2): JSON numbers, of
// seconds since 1970, perhaps with a fraction. encoding/json reads a
// string holding a number into the json.Number jwt.NumericDate decodes,
// so "exp":"4102444800" passed for a number.
func TestVerifyNumericDates(t *testing.T) {
	t.Parallel()
	v, err := NewVerifier(TokenConfig{Secret: secret})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	later := strconv.FormatInt(now.Add(time.Hour).Unix(), 10)
	earlier := strconv.FormatInt(now.Add(-time.Hour).Unix(), 10)
	for _, tc := range []struct {
		name     string
		claims   string // after sub
		want     error
		wantText string
		expires  int64 // when accepted, Claims.Expires in Unix seconds
	}{
		{"exp", `"exp":` + later, nil, "", now.Add(time.Hour).Unix()},
		{"exp a string", `"exp":"` + later + `"`, ErrInvalidToken, "exp must be a number", 0},
		{"exp a string, expired", `"exp":"` + earlier + `"`, ErrInvalidToken, "exp must be a number", 0},
		{"exp null", `"exp":null`, ErrInvalidToken, "exp must be a number", 0},
		{"exp true", `"exp":true`, ErrInvalidToken, "exp must be a number", 0},
		{"exp an array", `"exp":[` + later + `]`, ErrInvalidToken, "exp must be a number", 0},
		{"nbf a string", `"exp":` + later + `,"nbf":"` + earlier + `"`, ErrInvalidToken, "nbf must be a number", 0},
		{"iat a string", `"exp":` + later + `,"iat":"` + earlier + `"`, ErrInvalidToken, "iat must be a number", 0},
		// Several malformed: the first of exp, nbf, iat is named.
		{"exp and nbf strings", `"nbf":"` + earlier + `","exp":"` + later + `"`, ErrInvalidToken, "exp must be a number", 0},
		{"nbf and iat numbers", `"exp":` + later + `,"nbf":` + earlier + `,"iat":` + earlier, nil, "", now.Add(time.Hour).Unix()},
		// A fraction is allowed and cut to the second.
		{"exp fractional", `"exp":4102444800.999`, nil, "", 4102444800},
		{"exp exponent", `"exp":4.1024448e9`, nil, "", 4102444800},
		{"exp fractional, past", `"exp":1.5`, ErrTokenExpired, "", 0},
		{"exp 0", `"exp":0`, ErrTokenExpired, "", 0},
		{"exp negative", `"exp":-1`, ErrTokenExpired, "", 0},
		{"exp year 9999", `"exp":253402300799`, nil, "", 253402300799},
		// Its fraction is cut to the second: still in the year 9999.
		{"exp year 9999, fractional", `"exp":253402300799.5`, nil, "", 253402300799},
		{"exp before year -6000, fractional", `"exp":-253402300799.5`, ErrTokenExpired, "", 0},
		{"exp year 1", `"exp":-62135596800`, ErrTokenExpired, "", 0},
		// Beyond year 9999 either way is refused: a float64 that large
		// does not convert to an int64 the same way on every CPU.
		{"exp after year 9999", `"exp":253402300800`, ErrInvalidToken, "exp is out of range", 0},
		{"exp huge", `"exp":1e19`, ErrInvalidToken, "exp is out of range", 0},
		{"exp -huge", `"exp":-1e19`, ErrInvalidToken, "exp is out of range", 0},
		{"exp max int64", `"exp":9223372036854775807`, ErrInvalidToken, "exp is out of range", 0},
		{"exp past float64", `"exp":1e400`, ErrInvalidToken, "exp is out of range", 0},
		{"nbf huge", `"exp":` + later + `,"nbf":1e300`, ErrInvalidToken, "nbf is out of range", 0},
		{"iat huge", `"exp":` + later + `,"iat":-1e300`, ErrInvalidToken, "iat is out of range", 0},
	} {
		c, err := v.Verify(signRaw(t, `{"sub":"alice",`+tc.claims+`}`))
		switch {
		case tc.want == nil && err != nil:
			t.Errorf("%s: %v, want accepted", tc.name, err)
		case tc.want == nil && c.Expires.Unix() != tc.expires:
			t.Errorf("%s: expires %d, want %d", tc.name, c.Expires.Unix(), tc.expires)
		case tc.want != nil && (!errors.Is(err, tc.want) || !strings.Contains(fmt.Sprint(err), tc.wantText)):
			t.Errorf("%s: %v, want %v with %q", tc.name, err, tc.want, tc.wantText)
		}
	}
}

// A token whose signature does not verify (another secret, alg none)
// gets the same answer whatever its claims hold: the claims are decoded
// before the signature is checked, but what is wrong with them is told
// only to a token that is signed with our key.
func TestVerifyForgedTellsNothingOfClaims(t *testing.T) {
	t.Parallel()
	v, err := NewVerifier(TokenConfig{Secret: secret, Issuer: "https://auth.example.com/", Audience: "wsrelay"})
	if err != nil {
		t.Fatal(err)
	}
	later := strconv.FormatInt(time.Now().Add(time.Hour).Unix(), 10)
	good := `{"sub":"alice","iss":"https://auth.example.com/","aud":"wsrelay","exp":` + later + `}`
	enc := base64.RawURLEncoding
	forgeries := map[string]func(payload string) string{
		"other secret": func(p string) string { return SignPayloadHS256("another secret, not ours", p) },
		"alg none": func(p string) string {
			return enc.EncodeToString([]byte(`{"alg":"none","typ":"JWT"}`)) + "." + enc.EncodeToString([]byte(p)) + "."
		},
	}
	for name, forge := range forgeries {
		_, want := v.Verify(forge(good))
		if !errors.Is(want, ErrInvalidToken) {
			t.Fatalf("%s: %v, want ErrInvalidToken", name, want)
		}
		for _, claims := range []string{
			`{"sub":"alice","exp":"` + later + `"}`,
			`{"sub":"alice","exp":` + later + `,"nbf":"0"}`,
			`{"sub":"alice","exp":1e19}`,
			`{"sub":"alice","exp":` + later + `,"iss":5}`,
			`{"sub":"alice","exp":` + later + `,"aud":["wsrelay",1]}`,
			`{"sub":"alice","exp":` + later + `,"channels":"x"}`,
		} {
			if _, err := v.Verify(forge(claims)); fmt.Sprint(err) != fmt.Sprint(want) {
				t.Errorf("%s, claims %s: %v, want %v (as with valid claims)", name, claims, err, want)
			}
		}
	}
	// Signed with our key, the same claims are refused by name.
	for claims, text := range map[string]string{
		`{"sub":"alice","exp":"` + later + `"}`:                                                           "exp must be a number",
		`{"sub":"alice","iss":"https://auth.example.com/","aud":"wsrelay","exp":` + later + `,"nbf":"0"}`: "nbf must be a number",
		`{"sub":"alice","exp":` + later + `,"iss":5}`:                                                     "iss must be a string",
		`{"sub":"alice","exp":` + later + `,"channels":"room.1"}`:                                         "channels must be an array of strings",
		`{"sub":"alice","exp":` + later + `,"channels":["a",1]}`:                                          "channels must be an array of strings",
	} {
		if _, err := v.Verify(signRaw(t, claims)); !errors.Is(err, ErrInvalidToken) || !strings.Contains(err.Error(), text) {
			t.Errorf("claims %s: %v, want %q", claims, err, text)
		}
	}
}

// iss and aud are read only when JWT_ISSUER and JWT_AUDIENCE are set,
// and jti never (docs/security.md): a token whose unchecked iss, aud or
// jti is not a string (a numeric jti, an aud of numbers) is accepted,
// not refused as malformed.
func TestVerifyUncheckedClaimsNotRead(t *testing.T) {
	t.Parallel()
	exp := strconv.FormatInt(time.Now().Add(time.Hour).Unix(), 10)
	v, err := NewVerifier(TokenConfig{Secret: secret})
	if err != nil {
		t.Fatal(err)
	}
	for _, claims := range []string{`,"jti":123`, `,"iss":5`, `,"aud":[1]`, `,"aud":{"a":1}`} {
		if c, err := v.Verify(signRaw(t, `{"sub":"alice","exp":`+exp+claims+`}`)); err != nil || c.Subject != "alice" {
			t.Errorf("claims %s, JWT_ISSUER and JWT_AUDIENCE unset: %v, want accepted", claims, err)
		}
	}
	// Set, they are read, and must be of their type.
	v, err = NewVerifier(TokenConfig{Secret: secret, Issuer: "i", Audience: "a"})
	if err != nil {
		t.Fatal(err)
	}
	for _, claims := range []string{`,"iss":5,"aud":"a"`, `,"iss":"i","aud":[1]`} {
		if _, err := v.Verify(signRaw(t, `{"sub":"alice","exp":`+exp+claims+`}`)); !errors.Is(err, ErrInvalidToken) {
			t.Errorf("claims %s, JWT_ISSUER and JWT_AUDIENCE set: %v, want refused", claims, err)
		}
	}
	if _, err := v.Verify(signRaw(t, `{"sub":"alice","exp":`+exp+`,"iss":"i","aud":"a","jti":7}`)); err != nil {
		t.Errorf("numeric jti, JWT_ISSUER and JWT_AUDIENCE set: %v, want accepted", err)
	}
}

// A token whose header has "crit" is refused: RFC 7515 §4.1.11 makes a
// JWS invalid when its recipient does not understand every extension
// crit lists, and wsrelay understands none. A forged one is told only
// that its signature is bad.
func TestVerifyCritHeader(t *testing.T) {
	t.Parallel()
	v, err := NewVerifier(TokenConfig{Secret: secret})
	if err != nil {
		t.Fatal(err)
	}
	exp := strconv.FormatInt(time.Now().Add(time.Hour).Unix(), 10)
	enc := base64.RawURLEncoding
	sign := func(key, head string) string {
		si := enc.EncodeToString([]byte(head)) + "." + enc.EncodeToString([]byte(`{"sub":"alice","exp":`+exp+`}`))
		sig, err := jwt.SigningMethodHS256.Sign(si, []byte(key))
		if err != nil {
			t.Fatal(err)
		}
		return si + "." + enc.EncodeToString(sig)
	}
	for _, head := range []string{
		`{"alg":"HS256","typ":"JWT","crit":["exp"],"exp":1}`,
		`{"alg":"HS256","crit":["b64"],"b64":false}`,
		`{"alg":"HS256","crit":[]}`,
		`{"alg":"HS256","crit":null}`,
	} {
		if _, err := v.Verify(sign(secret, head)); !errors.Is(err, ErrInvalidToken) || !strings.Contains(err.Error(), "crit") {
			t.Errorf("header %s: %v, want refused, naming crit", head, err)
		}
		if _, err := v.Verify(sign("another secret, not ours", head)); !errors.Is(err, ErrInvalidToken) || !strings.Contains(err.Error(), "bad signature") {
			t.Errorf("header %s, forged: %v, want bad signature", head, err)
		}
	}
	// Other header parameters are not read: kid, typ, cty.
	if _, err := v.Verify(sign(secret, `{"alg":"HS256","typ":"at+jwt","kid":"../../x","cty":"JWT"}`)); err != nil {
		t.Errorf("kid, typ, cty: %v, want accepted", err)
	}
}

// A token whose alg the configured keys do not take (HS512 or RS256 to
// an egress with only JWT_SECRET, HS256 to one with only JWT_PUBLIC_KEY,
// none) is refused naming its alg and the ones accepted, not as "bad
// signature": a backend that signs with the right secret but another
// algorithm (a library's default, HS512 for a long key) would otherwise
// look for a wrong secret. Said whatever the claims hold, as for any
// token whose signature is not checked.
func TestVerifyAlgNotAccepted(t *testing.T) {
	t.Parallel()
	rk, _ := rsa.GenerateKey(rand.Reader, 2048)
	der, _ := x509.MarshalPKIXPublicKey(&rk.PublicKey)
	pemText := string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))
	hs, _ := NewVerifier(TokenConfig{Secret: secret})
	rs, _ := NewVerifier(TokenConfig{PublicKeys: pemText})
	both, _ := NewVerifier(TokenConfig{Secret: secret, PublicKeys: pemText})
	exp := time.Now().Add(time.Hour).Unix()
	sign := func(m jwt.SigningMethod, key any, claims jwt.MapClaims) string {
		s, err := jwt.NewWithClaims(m, claims).SignedString(key)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	claims := jwt.MapClaims{"sub": "alice", "exp": exp}
	badClaims := jwt.MapClaims{"sub": "a b", "exp": "soon", "channels": "x"}
	for _, tc := range []struct {
		name  string
		v     *Verifier
		token func(jwt.MapClaims) string
		want  string
	}{
		{"HS512, right secret", hs, func(c jwt.MapClaims) string { return sign(jwt.SigningMethodHS512, []byte(secret), c) }, "alg HS512 is not accepted here (accepted: HS256)"},
		{"RS256 to a secret", hs, func(c jwt.MapClaims) string { return sign(jwt.SigningMethodRS256, rk, c) }, "alg RS256 is not accepted here (accepted: HS256)"},
		{"none", hs, func(c jwt.MapClaims) string { return sign(jwt.SigningMethodNone, jwt.UnsafeAllowNoneSignatureType, c) }, "alg none is not accepted here (accepted: HS256)"},
		{"HS256 to a public key", rs, func(c jwt.MapClaims) string { return sign(jwt.SigningMethodHS256, []byte(pemText), c) }, "alg HS256 is not accepted here (accepted: RS256)"},
		{"PS256 to both", both, func(c jwt.MapClaims) string { return sign(jwt.SigningMethodPS256, rk, c) }, "alg PS256 is not accepted here (accepted: HS256, RS256)"},
	} {
		for _, c := range []jwt.MapClaims{claims, badClaims} {
			_, err := tc.v.Verify(tc.token(c))
			if !errors.Is(err, ErrInvalidToken) || !strings.Contains(fmt.Sprint(err), tc.want) {
				t.Errorf("%s, claims %v: %v, want %q", tc.name, c, err, tc.want)
			}
		}
	}
	// An alg the JWT library does not know is not repeated (the client
	// chose it freely): it is refused as malformed, with the same words
	// as any other token the parser cannot take (docs/security.md).
	enc := base64.RawURLEncoding
	for _, alg := range []string{"ES256K", "hs256", "HS256 "} {
		tok := enc.EncodeToString([]byte(`{"alg":"`+alg+`"}`)) + "." + enc.EncodeToString([]byte(`{"sub":"alice","exp":`+strconv.FormatInt(exp, 10)+`}`)) + ".c2ln"
		_, err := both.Verify(tok)
		if !errors.Is(err, ErrInvalidToken) || !strings.Contains(fmt.Sprint(err), "malformed, or signed with an algorithm not accepted here") || strings.Contains(fmt.Sprint(err), alg) {
			t.Errorf("alg %q: %v, want malformed, without the alg", alg, err)
		}
	}
	// An accepted alg with the wrong key is still a bad signature, and
	// algorithm confusion (HS256 signed with the public key's text, to a
	// verifier that takes HS256) one too.
	for name, tok := range map[string]string{
		"other secret": sign(jwt.SigningMethodHS256, []byte("another secret, same length......"), claims),
		"confusion":    sign(jwt.SigningMethodHS256, []byte(pemText), claims),
	} {
		if _, err := both.Verify(tok); !errors.Is(err, ErrInvalidToken) || !strings.Contains(fmt.Sprint(err), "bad signature") {
			t.Errorf("%s: %v, want bad signature", name, err)
		}
	}
}

// TestVerifierRSAKeySize: an RSA key outside 2048–8192 bits is refused at
// start, named by its position: below 2048 bits RFC 7518 §3.3 forbids it
// for RS256 (a 1024-bit key can be factored by a well-funded attacker,
// who then signs any token), and above 8192 every token's verification
// costs more for no security anyone needs. Both ends are accepted.
func TestVerifierRSAKeySize(t *testing.T) {
	t.Parallel()
	pemOf := func(pub any) string {
		der, err := x509.MarshalPKIXPublicKey(pub)
		if err != nil {
			t.Fatal(err)
		}
		return string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))
	}
	// A modulus of n bits: only its size is checked at start, and a real
	// key of 8192 bits or more takes seconds to generate.
	modulus := func(n int) *rsa.PublicKey {
		m := new(big.Int).Lsh(big.NewInt(1), uint(n-1))
		return &rsa.PublicKey{N: m.SetBit(m, 0, 1), E: 65537}
	}
	small, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	ec := mustEC(t, elliptic.P256())
	for name, tc := range map[string]struct {
		keys string
		bad  string // "": accepted; else the error names this key
	}{
		"1024 bits second":  {pemOf(&ec.PublicKey) + pemOf(&small.PublicKey), "key 2"},
		"1024 bits PKCS #1": {string(pem.EncodeToMemory(&pem.Block{Type: "RSA PUBLIC KEY", Bytes: x509.MarshalPKCS1PublicKey(&small.PublicKey)})), "key 1"},
		"2047 bits":         {pemOf(modulus(2047)), "key 1"},
		"2048 bits":         {pemOf(modulus(2048)), ""},
		"8192 bits":         {pemOf(modulus(8192)), ""},
		"8193 bits":         {pemOf(modulus(8193)), "key 1"},
		"16384 bits":        {pemOf(&ec.PublicKey) + pemOf(modulus(16384)), "key 2"},
	} {
		_, err := NewVerifier(TokenConfig{PublicKeys: tc.keys})
		switch {
		case tc.bad == "" && err != nil:
			t.Errorf("%s: %v", name, err)
		case tc.bad != "" && (err == nil || !strings.Contains(err.Error(), "JWT_PUBLIC_KEY: "+tc.bad) || !strings.Contains(err.Error(), "2048")):
			t.Errorf("%s: %v, want an error about %s and its size", name, err, tc.bad)
		}
	}
}

// TestVerifyPatternCount: channels and publish hold at most 256 patterns
// each (docs/security.md, the claims table): 256 are taken, 257 make the
// token invalid.
func TestVerifyPatternCount(t *testing.T) {
	t.Parallel()
	v, err := NewVerifier(TokenConfig{Secret: secret})
	if err != nil {
		t.Fatal(err)
	}
	list := func(n int) []string {
		ps := make([]string, n)
		for i := range ps {
			ps[i] = "room." + strconv.Itoa(i)
		}
		return ps
	}
	exp := time.Now().Add(time.Hour)
	for _, claim := range []string{"channels", "publish"} {
		for n, ok := range map[int]bool{256: true, 257: false} {
			c := Claims{Subject: "alice", Expires: exp}
			if claim == "channels" {
				c.Channels = list(n)
			} else {
				c.Publish = list(n)
			}
			tok, err := SignHS256(secret, c)
			if err != nil {
				t.Fatal(err)
			}
			got, err := v.Verify(tok)
			switch {
			case ok && err != nil:
				t.Errorf("%s of %d patterns: %v, want accepted", claim, n, err)
			case ok && (claim == "channels" && !got.Channels.Allows("room.255") || claim == "publish" && !got.Publish.Allows("room.255")):
				t.Errorf("%s of %d patterns: the last one is not kept: %+v", claim, n, got)
			case !ok && (!errors.Is(err, ErrInvalidToken) || !strings.Contains(err.Error(), "more than 256")):
				t.Errorf("%s of %d patterns: %v, want invalid: more than 256", claim, n, err)
			}
		}
	}
}
