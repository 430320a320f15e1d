package origin

import (
	"strings"
	"testing"
)

func TestAllowed(t *testing.T) {
	for _, tc := range []struct {
		allowed, origin, host string
		want                  bool
	}{
		{"", "http://example.com", "example.com", true},
		{"", "https://example.com:8443", "example.com:8443", true},
		{"", "http://evil.com", "example.com", false},
		{"", "null", "example.com", false},
		{"https://app.example.com", "https://app.example.com", "api.example.com", true},
		{"https://app.example.com", "HTTPS://APP.EXAMPLE.COM", "api.example.com", true},
		{"https://app.example.com", "http://app.example.com", "api.example.com", false},
		{"https://a.com, https://b.com", "https://b.com", "x", true},
		{"https://a.com", "https://a.com.evil.com", "x", false},
		{"*", "http://anything", "x", true},
	} {
		if got := Allowed(tc.allowed, tc.origin, tc.host); got != tc.want {
			t.Errorf("Allowed(%q, %q, %q) = %v, want %v", tc.allowed, tc.origin, tc.host, got, tc.want)
		}
	}
	if !AllowsAny("https://a.com, *") || AllowsAny("https://a.com") || AllowsAny("") {
		t.Error("AllowsAny")
	}
}

func TestValidate(t *testing.T) {
	for _, ok := range []string{"", "*", "https://app.example.com", "http://localhost:8080, https://a.example.com:8443", "https://a.example.com,*"} {
		if err := Validate(ok); err != nil {
			t.Errorf("Validate(%q): %v", ok, err)
		}
	}
	for _, bad := range []string{"https://app.example.com/", "app.example.com", "https://app.example.com/path", "https://u@app.example.com", "https://", "https://a.example.com?x=1", "https://a.example.com,example.org", "https://*.example.com", "https://a.example.com:443", "http://localhost:80"} {
		if err := Validate(bad); err == nil || !strings.Contains(err.Error(), "ALLOWED_ORIGINS") {
			t.Errorf("Validate(%q) = %v, want an ALLOWED_ORIGINS error", bad, err)
		}
	}
}

// Entries a browser's Origin can never equal are refused at start, and
// the fix the error suggests is itself accepted: an IPv6 literal keeps
// its brackets; a Unicode host name is refused (browsers send its
// punycode form, xn--…), as is an empty port; a legitimate IPv6 origin
// and an upper-case scheme (matched case-insensitively) are accepted.
func TestValidateHosts(t *testing.T) {
	for _, ok := range []string{"http://[::1]:8080", "https://[2001:db8::1]", "https://xn--bcher-kva.example", "HTTPS://App.Example.com"} {
		if err := Validate(ok); err != nil {
			t.Errorf("Validate(%q): %v", ok, err)
		}
	}
	for _, bad := range []string{"https://bücher.example", "https://a.example.com:", "https://a.example.com:0443", "http://a.example.com:0", "http://a.example.com:99999", "http://[::1]:08080"} {
		if err := Validate(bad); err == nil {
			t.Errorf("Validate(%q) accepted an origin no browser sends", bad)
		}
	}
	err := Validate("http://[::1]:80")
	if err == nil || !strings.Contains(err.Error(), "write http://[::1]") {
		t.Errorf("Validate(http://[::1]:80) = %v, want it to suggest http://[::1]", err)
	}
}
