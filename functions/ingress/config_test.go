package main

import (
	"strings"
	"testing"
	"time"
)

func TestLoadConfigDefaults(t *testing.T) {
	t.Parallel()
	c, err := loadConfig(func(k string) string { return map[string]string{"ALLOW_ANONYMOUS": "true"}[k] })
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name      string
		got, want any
	}{
		{"PORT", c.Port, 9000},
		{"REDIS_URL", c.Redis.URL, "redis://127.0.0.1:6379/0"},
		{"REDIS_KEY_PREFIX", c.Redis.KeyPrefix, "wsr"},
		{"REDIS_TIMEOUT", c.Redis.Timeout, time.Second},
		{"HISTORY_SIZE", c.HistorySize, int64(1000)},
		{"HISTORY_TTL", c.HistoryTTL, 24 * time.Hour},
		{"MAX_MESSAGE_BYTES", c.MaxMessageBytes, int64(65536)},
		{"MAX_BATCH_BYTES", c.MaxBatchBytes, int64(4 << 20)},
		{"MAX_BATCH_ITEMS", c.MaxBatchItems, 1000},
		{"IDEMPOTENCY_WINDOW", c.IdempotencyWindow, 24 * time.Hour},
		{"REGISTRY_TTL", c.RegistryTTL, 30 * time.Second},
		{"PUBLISH_RATE_SCOPE", c.PublishRateScope, "instance"},
	} {
		if tc.got != tc.want {
			t.Errorf("%s = %v, want %v", tc.name, tc.got, tc.want)
		}
	}
}

func TestLoadConfigSettings(t *testing.T) {
	t.Parallel()
	env := map[string]string{
		"PORT":              "8080",
		"HISTORY_SIZE":      "0",
		"HISTORY_TTL":       "1h",
		"MAX_MESSAGE_BYTES": "1024",
		"MAX_BATCH_BYTES":   "2048",
		"MAX_BATCH_ITEMS":   "10",
		"ALLOW_ANONYMOUS":   "true",
	}
	c, err := loadConfig(func(k string) string { return env[k] })
	if err != nil {
		t.Fatal(err)
	}
	if c.Port != 8080 || c.HistorySize != 0 || c.HistoryTTL != time.Hour || c.MaxMessageBytes != 1024 || c.MaxBatchBytes != 2048 || c.MaxBatchItems != 10 {
		t.Fatalf("config = %+v", c)
	}
}

// Every bad variable is reported, in one error.
func TestLoadConfigErrors(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		env  map[string]string
		want []string
	}{
		{"unparsable values together", map[string]string{"PORT": "x", "HISTORY_TTL": "forever", "MAX_BATCH_ITEMS": "many"},
			[]string{"PORT", "HISTORY_TTL", "MAX_BATCH_ITEMS"}},
		{"out of range together", map[string]string{
			"PORT": "70000", "HISTORY_SIZE": "-1", "HISTORY_TTL": "-1s", "MAX_MESSAGE_BYTES": "10",
			"MAX_BATCH_ITEMS": "1001", "IDEMPOTENCY_WINDOW": "10ms", "REGISTRY_TTL": "100ms", "REDIS_TIMEOUT": "0s",
		}, []string{"PORT", "HISTORY_SIZE", "HISTORY_TTL", "MAX_MESSAGE_BYTES", "MAX_BATCH_ITEMS", "IDEMPOTENCY_WINDOW", "REGISTRY_TTL", "REDIS_TIMEOUT"}},
		{"batch smaller than message", map[string]string{"MAX_MESSAGE_BYTES": "4096", "MAX_BATCH_BYTES": "1024"}, []string{"MAX_BATCH_BYTES"}},
		{"bad redis url", map[string]string{"REDIS_URL": "http://x"}, []string{"REDIS_URL"}},
		{"bad cluster addrs", map[string]string{"REDIS_CLUSTER_ADDRS": "a:1,nohost"}, []string{"REDIS_CLUSTER_ADDRS"}},
		// Refreshed every REGISTRY_TTL/3 by a once-a-second sweep.
		{"registry ttl under 3s", map[string]string{"REGISTRY_TTL": "2s"}, []string{"REGISTRY_TTL"}},
		{"origin with a path", map[string]string{"ALLOWED_ORIGINS": "https://app.example/"}, []string{"ALLOWED_ORIGINS"}},
		// Redis Cluster hashes the first {…} of a key.
		{"braces in the key prefix", map[string]string{"REDIS_KEY_PREFIX": "{app}"}, []string{"REDIS_KEY_PREFIX"}},
		// WAIT takes milliseconds, and WAIT n 0 waits forever.
		{"wait timeout under 1ms", map[string]string{"PUBLISH_WAIT_REPLICAS": "1", "PUBLISH_WAIT_TIMEOUT": "500us"}, []string{"PUBLISH_WAIT_TIMEOUT"}},
		// Redis answers a WAIT that ran out up to 100 ms late (its timer
		// tick), and the answer must come within REDIS_TIMEOUT.
		{"wait timeout too close to the Redis timeout", map[string]string{"PUBLISH_WAIT_REPLICAS": "1", "PUBLISH_WAIT_TIMEOUT": "801ms"}, []string{"PUBLISH_WAIT_TIMEOUT"}},
		{"Redis timeout too short for the wait", map[string]string{"PUBLISH_WAIT_REPLICAS": "1", "PUBLISH_WAIT_TIMEOUT": "1ms", "REDIS_TIMEOUT": "200ms"}, []string{"PUBLISH_WAIT_TIMEOUT"}},
		// Off or not, it is part of an Idempotency-Key claim's TTL: a negative
		// one made every request with a key fail (SET with a negative expiry).
		{"negative wait timeout with the wait off", map[string]string{"PUBLISH_WAIT_TIMEOUT": "-20s"}, []string{"PUBLISH_WAIT_TIMEOUT"}},
		{"negative shutdown grace", map[string]string{"SHUTDOWN_GRACE": "-1s"}, []string{"SHUTDOWN_GRACE"}},
		{"history ttl under 1s", map[string]string{"HISTORY_TTL": "500us"}, []string{"HISTORY_TTL"}},
		// A space pasted along would refuse every token.
		{"issuer and audience with spaces at an end", map[string]string{"JWT_SECRET": "x", "JWT_ISSUER": " https://auth.example.com/", "JWT_AUDIENCE": "wsrelay\n"},
			[]string{"JWT_ISSUER", "JWT_AUDIENCE"}},
		{"client IP header not a header name", map[string]string{"CLIENT_IP_HEADER": "X Forwarded: For"}, []string{"CLIENT_IP_HEADER"}},
		{"negative bursts", map[string]string{"PUBLISH_BURST_PER_KEY": "-1", "PUBLISH_BURST_PER_IP": "-1", "PUBLISH_BURST_PER_USER": "-1"},
			[]string{"PUBLISH_BURST_PER_KEY", "PUBLISH_BURST_PER_IP", "PUBLISH_BURST_PER_USER"}},
		{"rates that are not numbers", map[string]string{"PUBLISH_RATE_PER_KEY": "NaN", "PUBLISH_RATE_PER_IP": "Inf", "PUBLISH_RATE_PER_USER": "1e20"},
			[]string{"PUBLISH_RATE_PER_KEY", "PUBLISH_RATE_PER_IP", "PUBLISH_RATE_PER_USER"}},
		// A value that does not parse and values out of range, in one
		// error: an operator who fixed one mistake met the next at the
		// next start.
		{"unparsable and out of range together", map[string]string{"HISTORY_SIZE": "x", "MAX_BATCH_ITEMS": "1001", "PORT": "70000", "PUBLISH_BURST_PER_KEY": "-1"},
			[]string{"HISTORY_SIZE", "MAX_BATCH_ITEMS", "PORT", "PUBLISH_BURST_PER_KEY"}},
		// Reported with the others, not alone.
		{"unknown rate scope", map[string]string{"PUBLISH_RATE_SCOPE": "cluster", "PUBLISH_BURST_PER_KEY": "-1"},
			[]string{"PUBLISH_RATE_SCOPE", "PUBLISH_BURST_PER_KEY"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := loadConfig(func(k string) string { return tc.env[k] })
			if err == nil {
				t.Fatal("no error")
			}
			// One line: SCF logs stderr line by line.
			if strings.Contains(err.Error(), "\n") {
				t.Errorf("error %q is several lines", err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not name %s", err, w)
				}
			}
		})
	}
}

// TestLoadConfigUpperBounds: every duration and count has an upper bound,
// checked at start, so that no value starts and then overflows what is
// derived from it (2×REGISTRY_TTL, an Idempotency-Key claim's expiry).
func TestLoadConfigUpperBounds(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ name, ok, bad string }{
		{"HISTORY_SIZE", "1000000000", "1000000001"},
		{"HISTORY_TTL", "8760h", "8761h"},
		{"MAX_MESSAGE_BYTES", "67108864", "67108865"},
		{"MAX_BATCH_BYTES", "268435456", "268435457"},
		{"IDEMPOTENCY_WINDOW", "8760h", "8761h"},
		{"PUBLISH_WAIT_REPLICAS", "100", "101"},
		{"PUBLISH_WAIT_TIMEOUT", "1m", "1m1s"},
		{"PUBLISH_WAIT_TIMEOUT", "1m", "2000000h"},
		{"SHUTDOWN_GRACE", "24h", "25h"},
		{"REGISTRY_TTL", "24h", "1300000h"},
		{"PUBLISH_BURST_PER_KEY", "2000000", "2000001"},
		{"PUBLISH_BURST_PER_IP", "2000000", "2000001"},
		{"PUBLISH_BURST_PER_USER", "2000000", "2000001"},
	} {
		load := func(v string) error {
			env := map[string]string{"ALLOW_ANONYMOUS": "true", "MAX_BATCH_BYTES": "268435456"}
			env[tc.name] = v
			_, err := loadConfig(func(k string) string { return env[k] })
			return err
		}
		if err := load(tc.ok); err != nil {
			t.Errorf("%s=%s: %v", tc.name, tc.ok, err)
		}
		if err := load(tc.bad); err == nil || !strings.Contains(err.Error(), tc.name) || !strings.Contains(err.Error(), "at most") {
			t.Errorf("%s=%s: %v, want an error naming it and its bound", tc.name, tc.bad, err)
		}
	}
}

// TestWaitTimeoutMargin: PUBLISH_WAIT_TIMEOUT may come up to 200 ms
// below REDIS_TIMEOUT with the wait on (TestLoadConfigErrors has one
// past it), and is not held to it with the wait off.
func TestWaitTimeoutMargin(t *testing.T) {
	t.Parallel()
	for _, env := range []map[string]string{
		{"ALLOW_ANONYMOUS": "true", "PUBLISH_WAIT_REPLICAS": "1", "PUBLISH_WAIT_TIMEOUT": "800ms"},
		{"ALLOW_ANONYMOUS": "true", "PUBLISH_WAIT_REPLICAS": "1", "PUBLISH_WAIT_TIMEOUT": "1ms", "REDIS_TIMEOUT": "201ms"},
		{"ALLOW_ANONYMOUS": "true", "PUBLISH_WAIT_TIMEOUT": "5s"},
	} {
		if _, err := loadConfig(func(k string) string { return env[k] }); err != nil {
			t.Errorf("%v: %v", env, err)
		}
	}
}
