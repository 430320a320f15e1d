package auth

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// A token of exactly MaxTokenBytes is read; one byte more is refused
// before it is parsed.
func TestVerifyTokenLengthLimit(t *testing.T) {
	t.Parallel()
	v, err := NewVerifier(TokenConfig{Secret: secret})
	if err != nil {
		t.Fatal(err)
	}
	exp := strconv.FormatInt(time.Now().Add(time.Hour).Unix(), 10)
	tokenOf := func(pad int, sep string) string { // padded by a claim that is not read
		return signRaw(t, `{"sub":"alice","exp":`+exp+`,`+sep+`"pad":"`+strings.Repeat("x", pad)+`"}`)
	}
	// Base64 skips some lengths: a space in the JSON shifts it.
	var pad int
	var sep string
	for pad = MaxTokenBytes * 3 / 4; len(tokenOf(pad, sep)) > MaxTokenBytes; pad-- {
	}
	if len(tokenOf(pad, sep)) != MaxTokenBytes {
		sep = " "
	}
	if tok := tokenOf(pad, sep); len(tok) != MaxTokenBytes {
		t.Fatalf("no token of %d bytes: %d", MaxTokenBytes, len(tok))
	} else if c, err := v.Verify(tok); err != nil || c.Subject != "alice" {
		t.Errorf("token of %d bytes: %v", len(tok), err)
	}
	if tok := tokenOf(pad+1, sep); len(tok) <= MaxTokenBytes {
		t.Fatalf("token of %d bytes", len(tok))
	} else if _, err := v.Verify(tok); !errors.Is(err, ErrInvalidToken) || !strings.Contains(err.Error(), "longer than") {
		t.Errorf("token of %d bytes: %v", len(tok), err)
	}
}

// A secret shorter than 32 bytes is warned about; one of 32 is not.
func TestShortSecretsBoundary(t *testing.T) {
	t.Parallel()
	s31, s32 := strings.Repeat("s", 31), strings.Repeat("s", 32)
	if w := (TokenConfig{Secret: s31, PreviousSecret: s31}).ShortSecrets(); !slices.Equal(w, []string{"JWT_SECRET", "JWT_SECRET_PREVIOUS"}) {
		t.Errorf("31 bytes: %q", w)
	}
	if w := (TokenConfig{Secret: s32, PreviousSecret: s32}).ShortSecrets(); len(w) != 0 {
		t.Errorf("32 bytes: %q", w)
	}
}

// JWT_SECRET_PREVIOUS without JWT_SECRET is refused also when public
// keys are set: it would otherwise be ignored in silence.
func TestPreviousSecretWithPublicKeysOnly(t *testing.T) {
	t.Parallel()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKIXPublicKey(&k.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	const old = "the previous secret, 32 bytes or more"
	pub := string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))
	if _, err := NewVerifier(TokenConfig{PublicKeys: pub, PreviousSecret: old}); err == nil || !strings.Contains(err.Error(), "JWT_SECRET_PREVIOUS") || strings.Contains(err.Error(), old) {
		t.Errorf("previous secret with public keys only: %v", err)
	}
}

// A key is 1–256 characters, and short below 32; spaces around a scope
// are not part of it; a carriage return inside an item is a line break.
func TestParseKeysBounds(t *testing.T) {
	t.Parallel()
	k31, k32 := strings.Repeat("k", 31), strings.Repeat("l", 32)
	ks, err := ParseKeys(strings.Repeat("m", 256) + "," + k31 + "," + k32)
	if err != nil {
		t.Fatal(err)
	}
	if got := ks.ShortKeys(); !slices.Equal(got, []int{2}) {
		t.Errorf("ShortKeys = %v, want [2]", got)
	}
	if _, err := ParseKeys(strings.Repeat("m", 257)); err == nil {
		t.Error("a key of 257 characters accepted")
	}
	ks, err = ParseKeys(k32 + "= chat:* | +admin ")
	if err != nil {
		t.Fatal(err)
	}
	if k, ok := ks.Lookup(k32); !ok || !k.Admin || k.AllChannels || !k.MayUseChannel("chat:1") || k.MayUseChannel("news") {
		t.Errorf("scopes with spaces: %+v %v", k, ok)
	}
	if _, err := ParseKeys(k32 + "=chat:*\r|news"); err == nil || !strings.Contains(err.Error(), "line break") {
		t.Errorf("carriage return inside an item: %v", err)
	}
}

// A key is named by "key:" and the first 12 hex digits of its SHA-256
// (docs/security.md): rate-limit buckets in Redis carry the name, so it
// must not change between versions.
func TestKeyID(t *testing.T) {
	t.Parallel()
	k32 := strings.Repeat("l", 32)
	ks, err := ParseKeys(k32)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256([]byte(k32))
	if k, ok := ks.Lookup(k32); !ok || k.ID != "key:"+hex.EncodeToString(sum[:])[:12] {
		t.Errorf("ID %+v", k)
	}
}
