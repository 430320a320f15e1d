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
		Function: "egress",
		New:      func() any { return &Config{} },
		Load: func(env map[string]string) error {
			c, err := loadConfig(func(k string) string { return env[k] })
			if err == nil {
				_, err = logging.New(c.Log, io.Discard, "egress") // as run does
			}
			return err
		},
		Base: map[string]string{"ALLOW_ANONYMOUS": "true"},
		Unchecked: map[string]map[string]string{
			"IDLE_TIMEOUT":          {"below": "advice for SCF"},
			"MAX_LIFETIME":          {"below": "advice for SCF", "at most": "when a connection is closed, not a bound of the value"},
			"WRITE_TIMEOUT":         {"from half of it to twice it": "when a slow socket is dropped, not a bound of the value"},
			"MAX_FRAME_BYTES":       {"above": "what happens above the limit"},
			"MAX_FRAMES_PER_SECOND": {"above": "what happens above the limit"},
			"MAX_CONNECTIONS":       {"above": "what happens above the limit"},
		},
	})
}
