package main

import (
	"bytes"
	"io"
	"log/slog"
	"net/http/httptest"
	"net/url"
	"testing"
	"time"

	"github.com/wsrelay/wsrelay/shared/auth"
)

// FuzzAuthenticate drives the upgrade's credential parsing with any query
// token and subprotocol header: nothing panics, and only a token signed
// with the secret yields an identity.
func FuzzAuthenticate(f *testing.F) {
	good, _ := auth.SignHS256(testSecret, auth.Claims{Subject: "alice", Channels: []string{"a.*"}, Expires: time.Unix(4102444800, 0)})
	for _, s := range [][2]string{{good, ""}, {"", "wsrelay, token." + good}, {"a.b.c", "token."}, {"", "token.a.b.c,wsrelay"}, {"x", ","}} {
		f.Add(s[0], s[1])
	}
	cfg, err := loadConfig(func(k string) string { return map[string]string{"JWT_SECRET": testSecret}[k] })
	if err != nil {
		f.Fatal(err)
	}
	s := &Server{cfg: cfg, sec: newSecurity(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))}
	f.Fuzz(func(t *testing.T, tok, protos string) {
		r := httptest.NewRequest("GET", "/ws?"+url.Values{"token": {tok}}.Encode(), nil)
		r.Header.Set("Sec-WebSocket-Protocol", protos)
		id, aerr := s.authenticate(r)
		if aerr != nil {
			if aerr.status != 401 {
				t.Fatalf("status %d", aerr.status)
			}
			return
		}
		if id.user != "alice" || id.allow == nil || id.exp.IsZero() || (id.proto != "" && id.proto != Subprotocol) {
			t.Fatalf("identity %+v", id)
		}
	})
}

// FuzzFrameReader: any byte stream from a client ends in messages, control
// frames and at most one error — never a panic, never a message over the
// limit, never a control frame over 125 bytes.
func FuzzFrameReader(f *testing.F) {
	f.Add(clientFrame(true, opText, []byte(`{"type":"subscribe","channel":"a"}`)))
	f.Add(append(clientFrame(false, opText, []byte("he")), clientFrame(true, opContinuation, []byte("llo"))...))
	f.Add(clientFrame(true, opClose, []byte{0x03, 0xE8}))
	f.Add([]byte{0x81, 0xFF, 0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF})
	f.Fuzz(func(t *testing.T, in []byte) {
		const limit = 4096
		var r frameReader
		r.init(readerConn{r: bytes.NewReader(in)}, limit)
		for {
			op, p, err := r.next()
			if err != nil {
				return
			}
			switch {
			case op >= opClose && len(p) > 125:
				t.Fatalf("control frame of %d bytes", len(p))
			case op < opClose && len(p) > limit:
				t.Fatalf("message of %d bytes over the %d limit", len(p), limit)
			case op != opText && op != opBinary && op != opClose && op != opPing && op != opPong:
				t.Fatalf("returned opcode %#x", op)
			}
			if op == opClose {
				_, _, _ = parseClose(p)
			}
		}
	})
}
