package redact

import (
	"net/url"
	"testing"
)

func TestURL(t *testing.T) {
	for in, want := range map[string]string{
		"https://key:s3cret@h:8080/p?token=s3cret#s3cret": "https://key:xxxxx@h:8080/p",
		"ws://h/ws?":                   "ws://h/ws",
		"http://ada@h/":                "http://ada@h/",
		"wss://h/ws?token=a.b.c&x=1#f": "wss://h/ws",
	} {
		u, err := url.Parse(in)
		if err != nil {
			t.Fatal(err)
		}
		if got := URL(u); got != want {
			t.Errorf("URL(%q) = %q, want %q", in, got, want)
		}
	}
}
