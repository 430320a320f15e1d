package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/auth"
	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// The credentials redisPath uses.
const (
	pathAPIKey    = "key-path-7c1e0b9d4a2f6385"
	pathJWTSecret = "jwt-secret-path-0b1c2d3e4f5a6b7c8d9e0f1a2b3c"
)

// pathEnv is the configuration redisPath needs of both functions, on top
// of where Redis is: credentials, a registry refreshed every second, a
// fast probe, and the publish rate limits kept in Redis, each of the
// three applying to the publishes made with its kind of credential.
func pathEnv(prefix string) env {
	return env{
		"REDIS_KEY_PREFIX": prefix, "API_KEYS": pathAPIKey, "JWT_SECRET": pathJWTSecret,
		"REGISTRY_TTL": "3s", "PROBE_INTERVAL": "200ms", "SHUTDOWN_GRACE": "1s",
		"PUBLISH_RATE_SCOPE": "global", "PUBLISH_RATE_PER_KEY": "1000", "PUBLISH_RATE_PER_IP": "1000", "PUBLISH_RATE_PER_USER": "1000",
	}
}

// redisPath goes, against ingress in and egress eg (started with
// pathEnv), through every path of the two functions that uses Redis:
// readiness, a socket's registry record and its refresh, subscribe,
// unsubscribe (and the linger's end), publish with an API key and with a
// user token (each rate-limited in Redis), an idempotent publish
// repeated, a batch over two channels, resume, history read and removal,
// registry reads, sends to a connection and to a user, and the two
// disconnects. It fails the test on any answer that is not the one
// expected. admin is a client of the same Redis as its default user, to
// watch what the functions did there.
func redisPath(t *testing.T, in, eg *proc, admin redis.UniversalClient, prefix string) {
	t.Helper()
	ctx := context.Background()
	ks := keys.Scheme{Prefix: prefix}
	for _, p := range []*proc{in, eg} {
		testkit.Eventually(t, 5*time.Second, func() error { return httpStatus(p.URL+"/readyz", 200) })
	}
	sign := func(user string) string {
		tok, err := auth.SignHS256(pathJWTSecret, auth.Claims{Subject: user, Channels: []string{"room-*"}, Publish: []string{"room-*"}, Expires: time.Now().Add(time.Hour)})
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	token := sign("alice")
	call := func(method, path, bearer string, hdr map[string]string, body any, out any) int {
		t.Helper()
		var rd io.Reader
		if body != nil {
			b, _ := json.Marshal(body)
			rd = bytes.NewReader(b)
		}
		req, _ := http.NewRequest(method, in.URL+path, rd)
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Authorization", "Bearer "+bearer)
		for k, v := range hdr {
			req.Header.Set(k, v)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", method, path, err)
		}
		defer resp.Body.Close()
		rb, _ := io.ReadAll(resp.Body)
		if out != nil && resp.StatusCode < 300 {
			if err := json.Unmarshal(rb, out); err != nil {
				t.Fatalf("%s %s: %d %s", method, path, resp.StatusCode, rb)
			}
		}
		if resp.StatusCode >= 300 {
			t.Logf("%s %s: %d %s", method, path, resp.StatusCode, rb)
		}
		return resp.StatusCode
	}
	want := func(what string, got, want int) {
		t.Helper()
		if got != want {
			t.Fatalf("%s: %d, want %d", what, got, want)
		}
	}
	type pub struct{ ID string }

	// Bob's socket, open from the start: its record is checked by the
	// egress's probe (EXISTS) once it is older than REDIS_TIMEOUT + 1 s.
	bob := dial(t, eg.wsURL("token="+sign("bob")))
	// Alice's socket: its record, subscribe, and an unsubscribe whose
	// channel the instance drops after the linger (SUNSUBSCRIBE), checked
	// last.
	a := dial(t, eg.wsURL("token="+token))
	a.subscribe("room-1")
	a.subscribe("room-gone")
	a.send(map[string]any{"type": "unsubscribe", "channel": "room-gone"})
	a.waitFrame(func(f frame) bool { return f.Type == "unsubscribed" && f.Channel == "room-gone" })
	aID := a.welcome.ConnectionID

	// Publishes: with the API key, with the user token, the same
	// Idempotency-Key twice (one message), a batch over two channels.
	var ids []string
	for i, bearer := range []string{pathAPIKey, token} {
		var r pub
		want("publish", call("POST", "/v1/channels/room-1/messages", bearer, nil, map[string]any{"data": i}, &r), 202)
		ids = append(ids, r.ID)
	}
	var once, again pub
	idem := map[string]string{"Idempotency-Key": "path-" + prefix}
	want("idempotent publish", call("POST", "/v1/channels/room-1/messages", pathAPIKey, idem, map[string]any{"data": "once"}, &once), 202)
	want("idempotent publish again", call("POST", "/v1/channels/room-1/messages", pathAPIKey, idem, map[string]any{"data": "once"}, &again), 202)
	if once.ID != again.ID {
		t.Fatalf("Idempotency-Key: ids %s and %s", once.ID, again.ID)
	}
	ids = append(ids, once.ID)
	var batch struct{ Results []pub }
	want("batch", call("POST", "/v1/messages", pathAPIKey, nil, map[string]any{"messages": []any{
		map[string]any{"channel": "room-1", "data": "b1"}, map[string]any{"channel": "room-2", "data": "b2"},
	}}, &batch), 202)
	ids = append(ids, batch.Results[0].ID)
	checkSequence(t, "room-1 live", a.waitMessages("room-1", len(ids)), ids)

	// Resume on a second socket from the first message.
	b := dial(t, eg.wsURL("token="+token))
	b.send(map[string]any{"type": "subscribe", "channel": "room-1", "after": ids[0]})
	sub := b.waitFrame(func(f frame) bool { return f.Type == "subscribed" && f.Channel == "room-1" })
	if sub.Recovered == nil || !*sub.Recovered {
		t.Fatalf("resume: %+v, want recovered", sub)
	}
	checkSequence(t, "room-1 resumed", b.waitMessages("room-1", len(ids)-1), ids[1:])

	// History: the newest, from the start; then removed.
	var hist struct{ Messages []pub }
	want("history", call("GET", "/v1/channels/room-1/messages", pathAPIKey, nil, nil, &hist), 200)
	want("history after=0", call("GET", "/v1/channels/room-1/messages?after=0&limit=2", pathAPIKey, nil, nil, &hist), 200)
	if len(hist.Messages) != 2 || hist.Messages[0].ID != ids[0] {
		t.Fatalf("history after=0: %+v, want from %s", hist, ids[0])
	}
	var cleared struct{ Removed int }
	want("clear history", call("DELETE", "/v1/channels/room-1/messages", pathAPIKey, nil, nil, &cleared), 200)
	want("messages removed", cleared.Removed, len(ids))
	// A resume from the last message removed reads an empty range, then
	// the range and the last id again in one transaction.
	bob.send(map[string]any{"type": "subscribe", "channel": "room-1", "after": ids[len(ids)-1]})
	sub = bob.waitFrame(func(f frame) bool { return f.Type == "subscribed" && f.Channel == "room-1" })
	if sub.Recovered == nil || !*sub.Recovered {
		t.Fatalf("resume from the last message removed: %+v, want recovered", sub)
	}

	// Registry: reads, and the record refreshed (its TTL set again).
	var rec struct{ ID, User string }
	want("connection record", call("GET", "/v1/connections/"+aID, pathAPIKey, nil, nil, &rec), 200)
	if rec.User != "alice" {
		t.Fatalf("record %+v", rec)
	}
	var list connList
	want("channel connections", call("GET", "/v1/channels/room-1/connections", pathAPIKey, nil, nil, &list), 200)
	want("connections on room-1", len(list.Connections), 3)
	want("user connections", call("GET", "/v1/users/alice/connections", pathAPIKey, nil, nil, &list), 200)
	want("alice's connections", len(list.Connections), 2)
	if err := admin.PExpire(ctx, ks.Conn(aID), time.Second).Err(); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, 5*time.Second, func() error {
		if ttl := admin.PTTL(ctx, ks.Conn(aID)).Val(); ttl <= time.Second {
			return fmt.Errorf("record's TTL %s: not refreshed yet", ttl)
		}
		return nil
	})

	// Targeted sends, then the two disconnects.
	want("send to connection", call("POST", "/v1/connections/"+aID+"/messages", pathAPIKey, nil, map[string]any{"data": "to-a"}, nil), 202)
	a.waitFrame(func(f frame) bool {
		return f.Type == "message" && f.Target == "connection" && string(f.Data) == `"to-a"`
	})
	var toUser struct{ Connections int }
	want("send to user", call("POST", "/v1/users/alice/messages", pathAPIKey, nil, map[string]any{"data": "to-alice"}, &toUser), 202)
	want("users' connections sent to", toUser.Connections, 2)
	for _, c := range []*wsClient{a, b} {
		c.waitFrame(func(f frame) bool { return f.Type == "message" && f.Target == "user" && string(f.Data) == `"to-alice"` })
	}
	want("disconnect", call("DELETE", "/v1/connections/"+aID, pathAPIKey, nil, nil, nil), 202)
	waitClosed(t, a, 4003)
	var dis struct{ Disconnected int }
	want("disconnect user", call("DELETE", "/v1/users/alice/connections", pathAPIKey, nil, nil, &dis), 202)
	waitClosed(t, b, 4003)

	// The channel unsubscribed above, dropped after the linger (10 s).
	var numsub redis.UniversalClient = admin
	if cc, ok := admin.(*redis.ClusterClient); ok {
		// Only the channel's master knows its subscribers.
		m, err := cc.MasterForKey(ctx, ks.Notify("room-gone"))
		if err != nil {
			t.Fatal(err)
		}
		numsub = m
	}
	testkit.Eventually(t, 15*time.Second, func() error {
		n, err := numsub.PubSubShardNumSub(ctx, ks.Notify("room-gone")).Result()
		if err != nil || n[ks.Notify("room-gone")] != 0 {
			return fmt.Errorf("room-gone still subscribed: %v %v", n, err)
		}
		return nil
	})
	// Bob's record lost (as after a FLUSHALL): the probe finds it missing,
	// or the next refresh, and writes it back.
	if err := admin.Del(ctx, ks.Conn(bob.welcome.ConnectionID)).Err(); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, 5*time.Second, func() error {
		if admin.Exists(ctx, ks.Conn(bob.welcome.ConnectionID)).Val() == 0 {
			return fmt.Errorf("bob's record not written back yet")
		}
		return nil
	})
	for _, p := range []*proc{in, eg} {
		if err := httpStatus(p.URL+"/readyz", 200); err != nil {
			t.Fatalf("%s at the end: %v", p.name, err)
		}
	}
}

// waitClosed waits until c's socket is closed with code.
func waitClosed(t *testing.T, c *wsClient, code int) {
	t.Helper()
	select {
	case <-c.closed:
	case <-time.After(10 * time.Second):
		t.Fatalf("socket not closed")
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closeCode != code {
		t.Fatalf("closed with %d, want %d", c.closeCode, code)
	}
}

// noPermission fails the test on any of permissionErrors.
func noPermission(t *testing.T, admin redis.UniversalClient, procs ...*proc) {
	t.Helper()
	for _, e := range permissionErrors(admin, procs...) {
		t.Error(e)
	}
}

// permissionErrors describes what Redis refused the functions: a command,
// a key or a channel (its ACL LOG, which shows a refusal the functions
// handled, such as ROLE's, as well), and each function that logged
// a refusal (NOPERM). admin is a client of a node as its default user.
func permissionErrors(admin redis.UniversalClient, procs ...*proc) []string {
	var out []string
	entries, err := admin.ACLLog(context.Background(), 100).Result()
	if err != nil {
		return []string{fmt.Sprintf("ACL LOG: %v", err)}
	}
	for _, e := range entries {
		out = append(out, fmt.Sprintf("Redis refused the user %s: %s %q (%s), %d times", e.Username, e.Reason, e.Object, e.Context, e.Count))
	}
	for _, p := range procs {
		// A command refused inside a script is an ERR, not a NOPERM.
		if l := p.Logs(); strings.Contains(l, "NOPERM") || strings.Contains(l, "can't run this command") {
			out = append(out, p.name+" logged a command Redis refused it")
		}
	}
	return out
}

// aclRules returns the arguments of the ACL SETUSER line of
// docs/deployment.md ("TLS and ACL users"), for prefix and password:
// what is tested is what the page says.
func aclRules(t *testing.T, prefix, password string) []string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot(t), "docs", "deployment.md"))
	if err != nil {
		t.Fatal(err)
	}
	var line string
	for l := range strings.Lines(string(b)) {
		if strings.HasPrefix(l, "ACL SETUSER wsrelay ") {
			if line != "" {
				t.Fatal("docs/deployment.md has two ACL SETUSER wsrelay lines")
			}
			line = strings.TrimSpace(l)
		}
	}
	if line == "" {
		t.Fatal("docs/deployment.md has no ACL SETUSER wsrelay line")
	}
	line = strings.ReplaceAll(line, "REDIS_KEY_PREFIX", prefix)
	line = strings.ReplaceAll(line, ">PASSWORD", ">"+password)
	return strings.Fields(line)
}

// setACLUser runs the ACL SETUSER line args on rc.
func setACLUser(t *testing.T, rc redis.UniversalClient, args []string) {
	t.Helper()
	cmd := make([]any, len(args))
	for i, a := range args {
		cmd[i] = a
	}
	if err := rc.Do(context.Background(), cmd...).Err(); err != nil {
		t.Fatalf("%s: %v", strings.Join(args[:3], " "), err)
	}
}

// TestRedisACLUser runs both functions as a Redis user with exactly the
// rules docs/deployment.md gives, over every path that uses Redis, with a
// replica so that PUBLISH_WAIT_REPLICAS makes every publish WAIT, and
// fails on anything Redis refused them.
func TestRedisACLUser(t *testing.T) {
	const password = "acl-pw-3e9b0c7d1a"
	// The replica's first sync without the default 5 s wait for others.
	srv := redistest.Start(t, "--repl-diskless-sync-delay", "0")
	redistest.Start(t, "--replicaof", "127.0.0.1", strconv.Itoa(srv.Port))
	admin := redis.NewClient(srv.Options())
	t.Cleanup(func() { admin.Close() })
	testkit.Eventually(t, 10*time.Second, func() error {
		info := admin.Info(context.Background(), "replication").Val()
		if !strings.Contains(info, "connected_slaves:1") || !strings.Contains(info, "state=online") {
			return fmt.Errorf("replica not online yet")
		}
		return nil
	})
	prefix := redistest.Prefix(t)
	setACLUser(t, admin, aclRules(t, prefix, password))
	e := pathEnv(prefix)
	e["REDIS_URL"] = "redis://wsrelay:" + password + "@" + srv.Addr() + "/0"
	e["PUBLISH_WAIT_REPLICAS"] = "1"
	in := start(t, "ingress", e)
	eg := start(t, "egress", e)
	redisPath(t, in, eg, admin, prefix)
	noPermission(t, admin, in, eg)
}

// TestRedisACLUserHistoryKeptForever is TestRedisACLUser with
// HISTORY_TTL=0, which makes the append script take a stream's expiry off
// (PERSIST) instead of setting it: the ACL line must allow that too.
// Without +persist every publish that created a stream was written
// (XADD), then refused inside the script, and answered 500.
func TestRedisACLUserHistoryKeptForever(t *testing.T) {
	aclUserPath(t, nil, "", map[string]string{"HISTORY_TTL": "0"})
}

// aclUserPath runs both functions, with env's settings, as a user with
// the ACL line of docs/deployment.md and rules, on database 0 of a Redis
// of its own (query appended to REDIS_URL), over every path that uses
// Redis, and fails on anything Redis refused them. It returns the admin
// client and the key prefix.
func aclUserPath(t *testing.T, rules []string, query string, env map[string]string) (redis.UniversalClient, string) {
	t.Helper()
	const password = "acl-pw-path-8a4c2e6b1d"
	srv := redistest.Start(t)
	admin := redis.NewClient(srv.Options())
	t.Cleanup(func() { admin.Close() })
	prefix := redistest.Prefix(t)
	setACLUser(t, admin, append(aclRules(t, prefix, password), rules...))
	e := pathEnv(prefix)
	maps.Copy(e, env)
	e["REDIS_URL"] = "redis://wsrelay:" + password + "@" + srv.Addr() + "/0" + query
	in := start(t, "ingress", e)
	eg := start(t, "egress", e)
	redisPath(t, in, eg, admin, prefix)
	noPermission(t, admin, in, eg)
	return admin, prefix
}

// docRule returns the rule docs/deployment.md ("TLS and ACL users") says
// a case (what) needs on top of the ACL SETUSER line, as the page gives
// it: re's first group.
func docRule(t *testing.T, re, what string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot(t), "docs", "deployment.md"))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(re).FindSubmatch(b)
	if m == nil {
		t.Fatalf("docs/deployment.md does not say what %s needs", what)
	}
	return string(m[1])
}

// TestRedisACLUserClientName runs both functions with a REDIS_URL that
// names their connections (?client_name=, a go-redis option the README
// lets through) as a user with the ACL line of docs/deployment.md and the
// rule it gives for that option, over every path that uses Redis: go-redis
// names each connection in its HELLO, which needs no rule, and then again
// with CLIENT SETNAME, which does. With the line alone, Redis refused
// every connection of both functions.
func TestRedisACLUserClientName(t *testing.T) {
	rule := docRule(t, "`\\?client_name=[^`]*` also needs\\s+`([^`]+)`", "a REDIS_URL with ?client_name=")
	name := "wsrelay-" + redistest.Prefix(t)
	admin, _ := aclUserPath(t, []string{rule}, "?client_name="+name, nil)
	if l := admin.ClientList(context.Background()).Val(); !strings.Contains(l, "name="+name+" ") {
		t.Errorf("no connection named %s:\n%s", name, l)
	}
}

// TestRedisACLRuleMissing: the check of TestRedisACLUser sees a rule
// missing. Without the channel pattern, the egress cannot subscribe nor
// probe, is not ready, and Redis's ACL LOG says which channel it refused.
func TestRedisACLRuleMissing(t *testing.T) {
	const password = "acl-pw-6f1d2a9c0b"
	srv := redistest.Start(t)
	admin := redis.NewClient(srv.Options())
	t.Cleanup(func() { admin.Close() })
	prefix := redistest.Prefix(t)
	rules := slices.DeleteFunc(aclRules(t, prefix, password), func(r string) bool { return strings.HasPrefix(r, "&") })
	setACLUser(t, admin, rules)
	e := pathEnv(prefix)
	e["REDIS_URL"] = "redis://wsrelay:" + password + "@" + srv.Addr() + "/0"
	eg := start(t, "egress", e)
	testkit.Eventually(t, 5*time.Second, func() error {
		if errs := permissionErrors(admin, eg); len(errs) == 0 {
			return fmt.Errorf("nothing refused yet")
		}
		return nil
	})
	if err := httpStatus(eg.URL+"/readyz", 503); err != nil {
		t.Fatal(err)
	}
	t.Logf("refused, as it should be: %s", strings.Join(permissionErrors(admin, eg), "; "))
}

// TestRedisACLUserOtherDB runs both functions on database 3 of a Redis
// (REDIS_URL's /3) as a user with the ACL line of docs/deployment.md and
// the rule it gives for a database other than 0, over every path that
// uses Redis, and fails on anything Redis refused them or on a key of
// theirs in database 0.
func TestRedisACLUserOtherDB(t *testing.T) {
	const password = "acl-pw-db3-5c8e1f0a27"
	srv := redistest.Start(t)
	admin := redis.NewClient(srv.Options())
	t.Cleanup(func() { admin.Close() })
	o := srv.Options()
	o.DB = 3
	admin3 := redis.NewClient(o)
	t.Cleanup(func() { admin3.Close() })
	prefix := redistest.Prefix(t)
	setACLUser(t, admin, append(aclRules(t, prefix, password), docRule(t, "database other than 0 also needs\\s+`([^`]+)`", "a database other than 0")))
	e := pathEnv(prefix)
	e["REDIS_URL"] = "redis://wsrelay:" + password + "@" + srv.Addr() + "/3"
	in := start(t, "ingress", e)
	eg := start(t, "egress", e)
	redisPath(t, in, eg, admin3, prefix)
	noPermission(t, admin, in, eg)

	ctx := context.Background()
	if ks, err := admin3.Keys(ctx, prefix+":*").Result(); err != nil || len(ks) == 0 {
		t.Errorf("database 3 holds %d keys of the functions (%v), want some", len(ks), err)
	}
	if ks, err := admin.Keys(ctx, "*").Result(); err != nil || len(ks) != 0 {
		t.Errorf("database 0 holds %v (%v), want nothing", ks, err)
	}
}

// TestRedisACLSelectMissing: a user without the rule for a database
// other than 0 cannot select it, so every connection of the functions is
// refused. Both start but are not ready, Redis's ACL LOG names the
// command, and each function says why in a warning or an error (Redis's
// refusal of SELECT), without the password.
func TestRedisACLSelectMissing(t *testing.T) {
	const password = "acl-pw-nosel-9d2b7e4c13"
	srv := redistest.Start(t)
	admin := redis.NewClient(srv.Options())
	t.Cleanup(func() { admin.Close() })
	prefix := redistest.Prefix(t)
	setACLUser(t, admin, aclRules(t, prefix, password))
	e := pathEnv(prefix)
	e["REDIS_URL"] = "redis://wsrelay:" + password + "@" + srv.Addr() + "/3"
	in := start(t, "ingress", e)
	eg := start(t, "egress", e)
	for _, p := range []*proc{in, eg} {
		var why string
		testkit.Eventually(t, 10*time.Second, func() error {
			if err := httpStatus(p.URL+"/readyz", 503); err != nil {
				return err
			}
			for l := range strings.Lines(p.Logs()) {
				var rec struct{ Level, Msg, Err string }
				if json.Unmarshal([]byte(l), &rec) == nil && (rec.Level == "WARN" || rec.Level == "ERROR") &&
					strings.Contains(rec.Err, "NOPERM") && strings.Contains(rec.Err, "'select'") {
					why = rec.Msg + ": " + rec.Err
					return nil
				}
			}
			return fmt.Errorf("%s has not said that Redis refused select:\n%s", p.name, p.Logs())
		})
		if err := httpStatus(p.URL+"/readyz", 503); err != nil {
			t.Errorf("%s: %v", p.name, err)
		}
		if strings.Contains(p.Logs(), password) {
			t.Errorf("%s logged the password:\n%s", p.name, p.Logs())
		}
		t.Logf("%s says: %s", p.name, why)
	}
	var refused bool
	for _, e := range permissionErrors(admin) {
		refused = refused || strings.Contains(e, `"select"`)
	}
	if !refused {
		t.Errorf("Redis's ACL LOG does not show select refused: %v", permissionErrors(admin))
	}
}
