package main

import "testing"

func TestParseData(t *testing.T) {
	body := payload(1234, 987654321)
	data := body[len(`{"data":`) : len(body)-1]
	if len(data) != dataSize {
		t.Fatalf("data is %d bytes, want %d: %s", len(data), dataSize, data)
	}
	frame := append([]byte(`{"type":"message","channel":"s1","id":"1700000000000-0","ts":1700000000000,"data":`), data...)
	frame = append(frame, '}')
	seq, sent, ok := parseData(frame)
	if !ok || seq != 1234 || sent != 987654321 {
		t.Fatalf("parseData(%s) = %d, %d, %v", frame, seq, sent, ok)
	}
	for _, bad := range []string{
		`{"type":"subscribed","channel":"s1","position":"0-0"}`,
		`{"type":"message","data":{"s":,"t":5}}`,
		`{"type":"message","data":{"s":5}}`,
		`{"type":"message","data":{"s":5,"t":}}`,
		`{"type":"message","data":{"s":5`,
	} {
		if _, _, ok := parseData([]byte(bad)); ok {
			t.Errorf("parseData(%s) ok", bad)
		}
	}
}
