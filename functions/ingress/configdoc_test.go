package main

import (
	"io"
	"path/filepath"
	"testing"

	"github.com/wsrelay/wsrelay/shared/config/configdoc"
	"github.com/wsrelay/wsrelay/shared/logging"
)

// TestConfigDocs checks the README's and docs/security.md's configuration
// tables against loadConfig: every documented default, and every rule
// they state that can be checked by loading a value at its bound and just
// past it.
func TestConfigDocs(t *testing.T) {
	t.Parallel()
	configdoc.Run(t, filepath.Join("..", ".."), configdoc.Check{
		Function: "ingress",
		New:      func() any { return &Config{} },
		Load: func(env map[string]string) error {
			c, err := loadConfig(func(k string) string { return env[k] })
			if err == nil {
				_, err = logging.New(c.Log, io.Discard, "ingress") // as run does
			}
			return err
		},
		Base: map[string]string{"ALLOW_ANONYMOUS": "true"},
		Conditions: map[string]map[string]string{
			"when the wait is on":                      {"PUBLISH_WAIT_REPLICAS": "1"},
			"with `MAX_BATCH_BYTES` at least as large": {"MAX_BATCH_BYTES": "268435456"},
		},
		Unchecked: map[string]map[string]string{
			"API_KEYS": {"below": "a section of docs/security.md"},
		},
	})
}
