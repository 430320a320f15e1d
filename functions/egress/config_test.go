package main

import (
	"strings"
	"testing"
)

// TestLoadConfigIngressURL: INGRESS_URL goes as it is into the demo page,
// which prefixes its requests with it. A value without a scheme (the
// page's requests then go to a path of the egress), or one that carries
// a user name and password (shown to every visitor of the page), is
// refused at start, naming the variable and not quoting the value.
func TestLoadConfigIngressURL(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		url string
		ok  bool
	}{
		{"", true},
		{"http://localhost:8080", true},
		{"https://api.example.com", true},
		{"https://api.example.com/", true},
		{"https://service-1.gz.apigw.tencentcs.com/release", true},
		{"api.example.com", false},
		{"localhost:8080", false},
		{"//api.example.com", false},
		{"ftp://api.example.com", false},
		{"https://", false},
		{"https://user:s3cretpw@api.example.com", false},
		{"https://api.example.com/?x=1", false},
		{"https://api.example.com/#top", false},
		// An empty fragment: the page's requests went to
		// https://api.example.com#/v1/…, that is to /.
		{"https://api.example.com#", false},
		{"https://api.example.com/?", false},
		{"https://api.example.com/%zzs3cretpw", false},
		// A port and no host, or a port no URL has: browsers refuse the
		// URL, and every request of the page failed.
		{"https://:443", false},
		{"http://:8080/v1", false},
		{"https://api.example.com:99999", false},
		{"https://api.example.com:0", false},
		{"http://localhost:8080/", true},
		{"http://[::1]:8080", true},
	} {
		env := map[string]string{"ALLOW_ANONYMOUS": "true", "INGRESS_URL": tc.url}
		_, err := loadConfig(func(k string) string { return env[k] })
		if tc.ok {
			if err != nil {
				t.Errorf("INGRESS_URL=%q: %v", tc.url, err)
			}
			continue
		}
		if err == nil {
			t.Errorf("INGRESS_URL=%q: accepted", tc.url)
			continue
		}
		if !strings.Contains(err.Error(), "INGRESS_URL") {
			t.Errorf("INGRESS_URL=%q: the error does not name it: %v", tc.url, err)
		}
		if strings.Contains(err.Error(), "s3cretpw") {
			t.Errorf("INGRESS_URL=%q: the error quotes the value: %v", tc.url, err)
		}
	}
}

// TestLoadConfigReportsAll: values that do not parse and values out of
// range are reported in one error, so that an operator fixes them all in
// one go, not one per restart.
func TestLoadConfigReportsAll(t *testing.T) {
	t.Parallel()
	env := map[string]string{"ALLOW_ANONYMOUS": "true", "PING_INTERVAL": "often", "SEND_QUEUE": "many", "MAX_SUBSCRIPTIONS": "0", "REGISTRY_TTL": "1s"}
	_, err := loadConfig(func(k string) string { return env[k] })
	if err == nil {
		t.Fatal("no error")
	}
	for _, name := range []string{"PING_INTERVAL", "SEND_QUEUE", "MAX_SUBSCRIPTIONS", "REGISTRY_TTL"} {
		if !strings.Contains(err.Error(), name) {
			t.Errorf("error %q does not name %s", err, name)
		}
	}
	if strings.Count(err.Error(), "configuration: ") != 1 || strings.Contains(err.Error(), "\n") {
		t.Errorf("error %q is not one line with one prefix", err)
	}
}

// TestLoadConfigUpperBounds: every duration and count has an upper bound,
// checked at start. Without them an absurd value started and then
// misbehaved: a PING_INTERVAL above 1.28 million hours made 2×
// PING_INTERVAL wrap negative (every socket dropped at its first sweep),
// a PROBE_INTERVAL above 850 000 hours kept /readyz at 503.
func TestLoadConfigUpperBounds(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ name, ok, bad string }{
		{"PING_INTERVAL", "24h", "1300000h"},
		{"PING_INTERVAL", "24h", "24h0m1s"},
		{"PROBE_INTERVAL", "24h", "900000h"},
		{"PROBE_INTERVAL", "24h", "24h0m1s"},
		{"IDLE_TIMEOUT", "24h", "25h"},
		{"MAX_LIFETIME", "24h", "25h"},
		{"WRITE_TIMEOUT", "24h", "25h"},
		{"REGISTRY_TTL", "24h", "25h"},
		{"SHUTDOWN_GRACE", "24h", "2000000h"},
		{"MAX_FRAME_BYTES", "67108864", "67108865"},
		{"SEND_QUEUE", "1000000", "1000001"},
		{"MAX_SUBSCRIPTIONS", "100000", "100001"},
		{"MAX_FRAMES_PER_SECOND", "1000000", "1000001"},
		{"MAX_CONNECTIONS", "10000000", "10000001"},
	} {
		load := func(v string) error {
			env := map[string]string{"ALLOW_ANONYMOUS": "true", tc.name: v}
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
