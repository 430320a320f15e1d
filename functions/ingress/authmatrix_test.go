package main

import (
	"cmp"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/wsrelay/wsrelay/shared/auth"
)

// TestAuthMatrix is docs/security.md's permissions as a table: every
// route (routes.go) against every kind of credential, with and without
// ALLOW_ANONYMOUS. Refused requests must leave nothing behind (no message,
// no inbox entry, no rate-limit token), and "from" is a user token's sub
// whatever the body says, the body's otherwise (an API key's, anonymous).
// Cells are written from the docs: a change of permission changes a cell.
func TestAuthMatrix(t *testing.T) {
	t.Parallel()
	const (
		oldSecret = "previous-secret-0123456789abcdef0123"
		adminChat = "admin-chat-key-0123456789"
		metricsT  = "metrics-token-0123456789"
	)
	hour := time.Now().Add(time.Hour)
	tok := userToken(t, auth.Claims{Subject: "alice", Channels: []string{"chat:1"}, Publish: []string{"chat:*"}})
	old, _ := auth.SignHS256(oldSecret, auth.Claims{Subject: "carol", Channels: []string{"chat:1"}, Publish: []string{"chat:*"}, Expires: hour})
	bare := userToken(t, auth.Claims{Subject: "dave"})
	expired := userToken(t, auth.Claims{Subject: "alice", Publish: []string{"*"}, Expires: time.Now().Add(-time.Second)})
	forged, _ := auth.SignHS256("not-the-secret-0123456789abcdef", auth.Claims{Subject: "alice", Channels: []string{"*"}, Publish: []string{"*"}, Expires: hour})
	// The columns: the Authorization header sent, and the user a token
	// stamps as from.
	b := func(cred string) string { return "Bearer " + cred }
	creds := []struct{ name, auth, sub string }{
		{"none", "", ""}, {"full", b(fullKey), ""}, {"chat", b(chatKey), ""}, {"admin", b(adminKey), ""},
		{"admin+chat", b(adminChat), ""}, {"token", b(tok), "alice"}, {"previous secret", b(old), "carol"},
		{"no claims", b(bare), "dave"}, {"expired", b(expired), ""}, {"forged", b(forged), ""},
		{"two dots", b(fullKey + ".x.y"), ""}, {"unknown key", b("no-such-key-0123"), ""},
		{"not bearer", "Basic " + fullKey, ""}, {"metrics token", b(metricsT), ""},
	}
	// Each cell: ok (the route's success), 401 (unauthorized), bad
	// (401 invalid_token), exp (401 token_expired), 403 (forbidden).
	const (
		publish = `{"data":"WHO","from":"mallory"}`
		batch   = `{"messages":[{"channel":"chat:1","data":"WHO","from":"mallory"},{"channel":"%s","data":"WHO","from":"mallory"}]}`
	)
	type row struct {
		method, path, body string
		ok                 int
		writes             []string // channels (or "inbox") an accepted request appends to
		cells              string
	}
	//                                                                 none full chat admn a+ch tokn prev bare expd forg dots unkn basc metr
	rows := []row{
		{"POST", "/v1/channels/chat:1/messages", publish, 202, []string{"chat:1"}, "401  ok   ok   403  ok   ok   ok   403  exp  bad  bad  401  401  401"},
		{"POST", "/v1/channels/other/messages", publish, 202, []string{"other"}, "401  ok   403  403  403  403  403  403  exp  bad  bad  401  401  401"},
		{"POST", "/v1/messages", fmt.Sprintf(batch, "chat:2"), 202, []string{"chat:1", "chat:2"}, "401  ok   ok   403  ok   ok   ok   403  exp  bad  bad  401  401  401"},
		{"POST", "/v1/messages", fmt.Sprintf(batch, "other"), 202, []string{"chat:1", "other"}, "401  ok   403  403  403  403  403  403  exp  bad  bad  401  401  401"},
		{"GET", "/v1/channels/chat:1/messages", "", 200, nil, "401  ok   ok   403  ok   ok   ok   403  exp  bad  bad  401  401  401"},
		{"GET", "/v1/channels/chat:2/messages", "", 200, nil, "401  ok   ok   403  ok   403  403  403  exp  bad  bad  401  401  401"},
		{"DELETE", "/v1/channels/chat:9/messages", "", 200, nil, "401  ok   403  403  ok   403  403  403  exp  bad  bad  401  401  401"},
		{"POST", "/v1/connections/c1/messages", publish, 202, []string{"inbox"}, "401  ok   403  ok   ok   403  403  403  exp  bad  bad  401  401  401"},
		{"POST", "/v1/users/bob/messages", publish, 202, []string{"inbox"}, "401  ok   403  ok   ok   403  403  403  exp  bad  bad  401  401  401"},
		{"DELETE", "/v1/connections/c1", "", 202, []string{"inbox"}, "401  ok   403  ok   ok   403  403  403  exp  bad  bad  401  401  401"},
		{"GET", "/v1/connections/c1", "", 200, nil, "401  ok   403  ok   ok   403  403  403  exp  bad  bad  401  401  401"},
		{"GET", "/v1/channels/chat:1/connections", "", 200, nil, "401  ok   403  ok   ok   403  403  403  exp  bad  bad  401  401  401"},
		{"GET", "/v1/users/bob/connections", "", 200, nil, "401  ok   403  ok   ok   403  403  403  exp  bad  bad  401  401  401"},
		{"DELETE", "/v1/users/bob/connections", "", 202, []string{"inbox"}, "401  ok   403  ok   ok   403  403  403  exp  bad  bad  401  401  401"},
		{"GET", "/healthz", "", 200, nil, "ok   ok   ok   ok   ok   ok   ok   ok   ok   ok   ok   ok   ok   ok"},
		{"GET", "/readyz", "", 200, nil, "ok   ok   ok   ok   ok   ok   ok   ok   ok   ok   ok   ok   ok   ok"},
		{"GET", "/metrics", "", 200, nil, "401  401  401  401  401  401  401  401  401  401  401  401  401  ok"},
		{"OPTIONS", "/v1/channels/chat:1/messages", "", 204, nil, "ok   ok   ok   ok   ok   ok   ok   ok   ok   ok   ok   ok   ok   ok"},
	}
	// HEAD wherever GET, with GET's checks: the same cells (the recorder
	// keeps the body net/http discards, so that its code can be read).
	for _, r := range rows {
		if r.method == "GET" {
			r.method = "HEAD"
			rows = append(rows, r)
		}
	}
	codes := map[string]struct {
		status int
		code   string
	}{"401": {401, "unauthorized"}, "bad": {401, "invalid_token"}, "exp": {401, "token_expired"}, "403": {403, "forbidden"}}

	for _, anon := range []bool{false, true} {
		t.Run(fmt.Sprint("anonymous=", anon), func(t *testing.T) {
			env := map[string]string{
				"API_KEYS":            testKeys + "," + adminChat + "=+admin|chat:*",
				"JWT_SECRET":          testSecret,
				"JWT_SECRET_PREVIOUS": oldSecret,
				"ALLOWED_ORIGINS":     "https://app.example",
				"METRICS_TOKEN":       metricsT,
			}
			if anon {
				// Anonymous: no credential is full access; and /metrics
				// without METRICS_TOKEN is open to any request.
				env["ALLOW_ANONYMOUS"] = "true"
				delete(env, "METRICS_TOKEN")
			}
			e, logs := newSecEnv(t, env)
			e.register("c1", "bob", "inst-1", "chat:1")
			want := map[string]int{} // appends expected, by channel or "inbox"
			for _, r := range rows {
				cells := strings.Fields(r.cells)
				for i, c := range creds {
					cell := cells[i]
					switch {
					case anon && c.name == "none" && strings.HasPrefix(r.path, "/v1/"):
						cell = "ok"
					case anon && r.path == "/metrics":
						cell = "ok"
					}
					var hdr []string
					if c.auth != "" {
						hdr = []string{"Authorization", c.auth}
					}
					if r.method == "OPTIONS" {
						hdr = append(hdr, "Origin", "https://app.example", "Access-Control-Request-Method", "POST")
					}
					w := e.do(r.method, r.path, strings.ReplaceAll(r.body, "WHO", c.name), hdr...)
					name := fmt.Sprintf("%s %s with %s", r.method, r.path, c.name)
					if cell == "ok" {
						if w.Code != r.ok {
							t.Errorf("%s: %d %s, want %d", name, w.Code, w.Body, r.ok)
						}
						for _, ch := range r.writes {
							want[ch]++
						}
						continue
					}
					x := codes[cell]
					if w.Code != x.status {
						t.Errorf("%s: %d %s, want %d %s", name, w.Code, w.Body, x.status, x.code)
					} else if code, _ := errorOf(t, w); code != x.code {
						t.Errorf("%s: code %s, want %s", name, code, x.code)
					} else if x.status == 401 && !strings.HasPrefix(w.Header().Get("WWW-Authenticate"), "Bearer") {
						t.Errorf("%s: 401 with WWW-Authenticate %q", name, w.Header().Get("WWW-Authenticate"))
					}
				}
			}
			// Refused requests wrote nothing; accepted ones carry the
			// token's sub as from, or the body's.
			subs := map[string]string{}
			for _, c := range creds {
				subs[c.name] = c.sub
			}
			for _, ch := range []string{"chat:1", "chat:2", "other"} {
				if n := e.xlen(ch); n != int64(want[ch]) {
					t.Errorf("%s holds %d messages, want %d", ch, n, want[ch])
				}
				w := e.do("GET", "/v1/channels/"+ch+"/messages?limit=1000", "", bearer(fullKey)...)
				for _, m := range decode[historyResp](t, w).Messages {
					var by string
					_ = json.Unmarshal(m.Data, &by)
					if from := cmp.Or(subs[by], "mallory"); m.From != from {
						t.Errorf("%s: a message published with %s is from %q, want %q", ch, by, m.From, from)
					}
				}
			}
			inbox := e.inbox("inst-1")
			if len(inbox) != want["inbox"] {
				t.Errorf("the inbox holds %d entries, want %d", len(inbox), want["inbox"])
			}
			for _, en := range inbox {
				if d, _ := en.Decode(); d.Target != "" && d.From != "mallory" {
					t.Errorf("a targeted send is from %q, want the body's", d.From)
				}
			}
			noSecrets(t, logs, fullKey, chatKey, adminKey, adminChat, testSecret, oldSecret, metricsT, tok, old, forged)
		})
	}

	// Patterns (docs/security.md): a glob where only * is special; it
	// spans . and :, and everything else, case included, is literal.
	t.Run("patterns", func(t *testing.T) {
		t.Parallel()
		e, _ := newSecEnv(t, map[string]string{"JWT_SECRET": testSecret,
			"API_KEYS": "star-key=*,exact-key=chat,glob-key=chat:*|a*b*c|news.*"})
		claims := func(ps ...string) string { return userToken(t, auth.Claims{Subject: "u", Publish: ps, Channels: ps}) }
		for _, tc := range []struct {
			cred, channel string
			status        int
		}{
			{"star-key", "anything.at:all", 202},
			{"exact-key", "chat", 202},
			{"exact-key", "chat:1", 403},
			{"exact-key", "Chat", 403},
			{"glob-key", "chat:", 202},
			{"glob-key", "chat:a.b:c", 202},
			{"glob-key", "chat", 403},
			{"glob-key", "Chat:1", 403},
			{"glob-key", "xchat:1", 403},
			{"glob-key", "a-b-c", 202},
			{"glob-key", "abc", 202},
			{"glob-key", "acb", 403},
			{"glob-key", "newsX", 403}, // . is a dot, not a regex's any character
			{"glob-key", "news.", 202},
			{claims("*"), "any:thing", 202},
			{claims("room.*"), "room.1.x:y", 202},
			{claims("room.*"), "ROOM.1", 403},
			{claims("room.1"), "room.10", 403},
			{claims(), "room.1", 403},
			{claims("room[1]"), "room.1", 401}, // not a pattern: the token is refused
			{claims(".*"), "room.1", 403},
		} {
			if w := e.do("POST", "/v1/channels/"+tc.channel+"/messages", `{"data":1}`, bearer(tc.cred)...); w.Code != tc.status {
				t.Errorf("publish to %s with %.20s: %d %s, want %d", tc.channel, tc.cred, w.Code, w.Body, tc.status)
			}
			read := map[int]int{202: 200}[tc.status]
			if w := e.do("GET", "/v1/channels/"+tc.channel+"/messages", "", bearer(tc.cred)...); w.Code != cmp.Or(read, tc.status) {
				t.Errorf("history of %s with %.20s: %d %s, want the same as a publish", tc.channel, tc.cred, w.Code, w.Body)
			}
		}
	})

	// A refused request takes nothing from a rate-limit bucket: the 403s,
	// 400s and 401s below leave the two publishes the per-IP burst allows.
	t.Run("refusals take no token", func(t *testing.T) {
		t.Parallel()
		e, _ := newSecEnv(t, map[string]string{"JWT_SECRET": testSecret, "API_KEYS": testKeys,
			"PUBLISH_RATE_PER_IP": "0.001", "PUBLISH_BURST_PER_IP": "2",
			"PUBLISH_RATE_PER_KEY": "0.001", "PUBLISH_BURST_PER_KEY": "1", "PUBLISH_BURST_PER_USER": "1"})
		tok := userToken(t, auth.Claims{Subject: "u", Publish: []string{"chat:*"}})
		for _, r := range []struct {
			cred, method, path, body string
			status                   int
		}{
			{chatKey, "POST", "/v1/channels/other/messages", `{"data":1}`, 403},
			{chatKey, "POST", "/v1/messages", `{"messages":[{"channel":"chat:1","data":1},{"channel":"other","data":1}]}`, 403},
			{chatKey, "POST", "/v1/users/u/messages", `{"data":1}`, 403},
			{chatKey, "POST", "/v1/channels/chat:1/messages", `{"data":null}`, 400},
			{tok, "POST", "/v1/channels/other/messages", `{"data":1}`, 403},
			{tok, "POST", "/v1/connections/c1/messages", `{"data":1}`, 403},
			{"no-such-key-0123", "POST", "/v1/channels/chat:1/messages", `{"data":1}`, 401},
			{chatKey, "POST", "/v1/channels/chat:1/messages", `{"data":1}`, 202},
			{tok, "POST", "/v1/channels/chat:1/messages", `{"data":1}`, 202},
			{fullKey, "POST", "/v1/channels/chat:1/messages", `{"data":1}`, 429}, // the IP's two are spent
		} {
			if w := e.do(r.method, r.path, r.body, bearer(r.cred)...); w.Code != r.status {
				t.Errorf("%s %s with %.20s: %d %s, want %d", r.method, r.path, r.cred, w.Code, w.Body, r.status)
			}
		}
	})
}
