package main

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"
)

// A short API key is warned of at start, by position, never shown: its
// ID in logs ("by":"key:<12 hex>") is an unsalted SHA-256 prefix, from
// which a short key is recovered offline (sha256("hunter2")[:12]).
func TestWarnSecurityShortAPIKey(t *testing.T) {
	var logs bytes.Buffer
	long := strings.Repeat("a1", 16)
	warnSecurity(slog.New(slog.NewJSONHandler(&logs, nil)), Config{APIKeys: long + ",hunter2=chat:*"})
	out := logs.String()
	if !strings.Contains(out, "API key shorter than 32 characters") || !strings.Contains(out, `"api_keys_item":2`) {
		t.Fatalf("no warning for the short key in item 2; logs: %s", out)
	}
	if strings.Contains(out, `"api_keys_item":1`) || strings.Contains(out, "hunter2") || strings.Contains(out, long) {
		t.Fatalf("warning names the long key or shows a key: %s", out)
	}
}
