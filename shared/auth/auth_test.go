package auth

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
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
	v, err := NewVerifier(secret, "")
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

func TestVerifyES256(t *testing.T) {
	t.Parallel()
	pk, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, _ := x509.MarshalPKIXPublicKey(&pk.PublicKey)
	pemText := string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))
	// One line, as in an environment variable.
	v, err := NewVerifier("", strings.ReplaceAll(pemText, "\n", `\n`))
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
	if _, err := NewVerifier("", "not a pem"); err == nil {
		t.Error("bad PEM accepted")
	}
	if v, err := NewVerifier("", ""); v != nil || err != nil {
		t.Error("empty settings should give nil, nil")
	}
}
