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
		{"https://api.example.com/%zzs3cretpw", false},
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
