package main

import "testing"

func TestNextData(t *testing.T) {
	body := payload(1234, 987654321)
	data := body[len(`{"data":`) : len(body)-1]
	if len(data) != dataSize {
		t.Fatalf("data is %d bytes, want %d: %s", len(data), dataSize, data)
	}
	frame := append([]byte(`{"type":"message","channel":"s1","id":"1700000000000-0","ts":1700000000000,"data":`), data...)
	frame = append(frame, '}')
	seq, sent, rest, ok := nextData(frame)
	if !ok || seq != 1234 || sent != 987654321 {
		t.Fatalf("nextData(%s) = %d, %d, %v", frame, seq, sent, ok)
	}
	if _, _, _, ok := nextData(rest); ok {
		t.Fatalf("a second message in %s", frame)
	}
	for _, bad := range []string{
		`{"type":"subscribed","channel":"s1","position":"0-0"}`,
		`{"type":"message","data":{"s":,"t":5}}`,
		`{"type":"message","data":{"s":5}}`,
		`{"type":"message","data":{"s":5,"t":}}`,
		`{"type":"message","data":{"s":5`,
	} {
		if _, _, _, ok := nextData([]byte(bad)); ok {
			t.Errorf("nextData(%s) ok", bad)
		}
	}
}

// Centrifugo puts several pushes in one frame, one per line; a malformed
// one among them is skipped, not the rest.
func TestNextDataMany(t *testing.T) {
	frame := []byte(`{"push":{"channel":"c","pub":{"data":{"s":1,"t":10,"p":"x"}}}}` + "\n" +
		`{"push":{"channel":"c","pub":{"data":{"s":,"t":11}}}}` + "\n" +
		`{"push":{"channel":"c","pub":{"data":{"s":3,"t":12,"p":"x"}}}}`)
	var got []int64
	for rest := frame; ; {
		seq, sent, next, ok := nextData(rest)
		if !ok {
			break
		}
		got = append(got, seq, sent)
		rest = next
	}
	if len(got) != 4 || got[0] != 1 || got[1] != 10 || got[2] != 3 || got[3] != 12 {
		t.Fatalf("got %v, want [1 10 3 12]", got)
	}
}

func TestCentrifugoPublishRequest(t *testing.T) {
	body := payload(7, 8)
	req := centrifugo.publishRequest(nil, "127.0.0.1:1", "ch9", body)
	const head = "POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1:1\r\nX-API-Key: bench\r\nContent-Type: application/json\r\nContent-Length: "
	s := string(req)
	if len(s) < len(head) || s[:len(head)] != head {
		t.Fatalf("request %q", s)
	}
	var n int
	var rest string
	for i, c := range s[len(head):] {
		if c < '0' || c > '9' {
			rest = s[len(head)+i:]
			break
		}
		n = n*10 + int(c-'0')
	}
	want := `{"channel":"ch9",` + string(body[1:])
	if rest != "\r\n\r\n"+want || n != len(want) {
		t.Fatalf("Content-Length %d, body %q; want %d, %q", n, rest, len(want), want)
	}
}
