package main

import (
	"testing"

	"github.com/wsrelay/wsrelay/shared/redistest"
)

// TestMain stops the Redis servers the tests started, and fails a run
// that passed but left a goroutine running (redistest.Main).
func TestMain(m *testing.M) { redistest.Main(m) }
