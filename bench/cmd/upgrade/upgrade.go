package main

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/wsrelay/wsrelay/bench/harness"
	"github.com/wsrelay/wsrelay/shared/publisher"
)

const (
	prefix    = "upg"
	apiKey    = "upgrade-api-key-0123456789abcdef"
	jwtSecret = "upgrade-jwt-secret-0123456789abcdef0123456789"
	grace     = 3 * time.Second // SHUTDOWN_GRACE of the egress
	// newEgressID is the new egress's INSTANCE_ID, which the drained
	// clients' welcomes must name once they have moved.
	newEgressID = "new-egress"
)

// release is one build's running instances and their publisher.
type release struct {
	name    string // old or new, for the report
	dir     string
	ingress *harness.Proc
	egress  *harness.Proc
	pub     *publisher.Client
	pubHTTP *http.Transport
}

// upgrade is one run: an old and a new release on one Redis, one key
// prefix, and a second old egress that the drain scenario stops.
type upgrade struct {
	cfg      config
	env      *harness.Env
	stderr   io.Writer
	logMu    sync.Mutex
	old, new release
	drained  *harness.Proc // an old egress for drain-old-to-new alone
}

func (u *upgrade) logf(f string, a ...any) {
	u.logMu.Lock()
	defer u.logMu.Unlock()
	fmt.Fprintf(u.stderr, "upgrade: "+f+"\n", a...)
}

// common is the environment of every function: as in production
// (ALLOW_ANONYMOUS=false, an API key for the backends, HS256 user tokens
// for the sockets).
func common() []string {
	return []string{"ALLOW_ANONYMOUS=false", "JWT_SECRET=" + jwtSecret, "PROBE_INTERVAL=1s"}
}

func (u *upgrade) startIngress(r *release) error {
	p, _, err := u.env.StartNamed(r.name+"-ingress", filepath.Join(r.dir, "ingress"), prefix,
		append(common(), "API_KEYS="+apiKey)...)
	if err != nil {
		return fmt.Errorf("%s ingress: %w", r.name, err)
	}
	r.ingress = p
	r.pubHTTP = &http.Transport{MaxIdleConnsPerHost: 8}
	r.pub, err = publisher.New(publisher.Options{
		URL:        p.Base,
		Token:      apiKey,
		HTTPClient: &http.Client{Transport: r.pubHTTP, Timeout: 5 * time.Second},
		MinBackoff: 50 * time.Millisecond,
		MaxBackoff: time.Second,
	})
	return err
}

func (u *upgrade) startEgress(name, dir, instance string) (*harness.Proc, error) {
	p, _, err := u.env.StartNamed(name, filepath.Join(dir, "egress"), prefix,
		append(common(), "INSTANCE_ID="+instance, "SHUTDOWN_GRACE="+grace.String())...)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	return p, nil
}

func (u *upgrade) start() error {
	u.old = release{name: "old", dir: u.cfg.oldDir}
	u.new = release{name: "new", dir: u.cfg.newDir}
	for _, r := range []*release{&u.old, &u.new} {
		if err := u.startIngress(r); err != nil {
			return err
		}
		var err error
		if r.egress, err = u.startEgress(r.name+"-egress", r.dir, r.name+"-egress"); err != nil {
			return err
		}
	}
	var err error
	u.drained, err = u.startEgress("old-egress-drained", u.old.dir, "old-egress-drained")
	return err
}

// stopAll ends whatever is still running, on every way out.
func (u *upgrade) stopAll() {
	for _, r := range []*release{&u.old, &u.new} {
		if r.pubHTTP != nil {
			r.pubHTTP.CloseIdleConnections()
		}
		for _, p := range []*harness.Proc{r.ingress, r.egress} {
			if p != nil {
				harness.Kids.Stop(p.Cmd)
			}
		}
	}
	if u.drained != nil {
		harness.Kids.Stop(u.drained.Cmd)
	}
}

// result is one scenario's outcome.
type result struct {
	name     string
	took     time.Duration
	counts   []string // what it did, for the report
	problems []string
}

func (r *result) count(format string, a ...any) {
	r.counts = append(r.counts, fmt.Sprintf(format, a...))
}
func (r *result) bad(format string, a ...any) {
	r.problems = append(r.problems, fmt.Sprintf(format, a...))
}

// runAll runs the scenarios one after the other, each on channels and
// users of its own; a failing one does not stop the next.
func (u *upgrade) runAll(ctx context.Context) []*result {
	scenarios := []struct {
		name string
		run  func(context.Context, *result)
	}{
		{"old-egress+new-ingress", func(ctx context.Context, r *result) { u.fanout(ctx, r, "a", u.old.egress, &u.new) }},
		{"new-egress+old-ingress", func(ctx context.Context, r *result) { u.fanout(ctx, r, "b", u.new.egress, &u.old) }},
		{"catch-up-old-egress", func(ctx context.Context, r *result) { u.catchUp(ctx, r, "d", u.old.egress, &u.new) }},
		{"catch-up-new-egress", func(ctx context.Context, r *result) { u.catchUp(ctx, r, "e", u.new.egress, &u.old) }},
		{"drain-old-to-new", u.drain},
		{"idempotency", u.idempotency},
	}
	var out []*result
	for _, s := range scenarios {
		if ctx.Err() != nil {
			break
		}
		r := &result{name: s.name}
		u.logf("%s ...", s.name)
		t0 := time.Now()
		s.run(ctx, r)
		r.took = time.Since(t0)
		verdict := "ok"
		if len(r.problems) > 0 {
			verdict = strconv.Itoa(len(r.problems)) + " problem(s)"
		}
		u.logf("%s: %s in %s", s.name, verdict, r.took.Round(time.Millisecond))
		out = append(out, r)
	}
	return out
}

// token mints a user token (HS256) for user, allowed every upg- channel.
func token(user string) string {
	enc := base64.RawURLEncoding
	head := enc.EncodeToString([]byte(`{"alg":"HS256","typ":"JWT"}`))
	claims, _ := json.Marshal(map[string]any{
		"sub": user, "exp": time.Now().Add(time.Hour).Unix(), "channels": []string{"upg-*"},
	})
	msg := head + "." + enc.EncodeToString(claims)
	mac := hmac.New(sha256.New, []byte(jwtSecret))
	mac.Write([]byte(msg))
	return msg + "." + enc.EncodeToString(mac.Sum(nil))
}

func wsURL(p *harness.Proc) string { return "ws://127.0.0.1:" + strconv.Itoa(p.Port) + "/ws" }

// eventually polls cond every 50 ms until it returns "" or d has passed,
// and returns its last answer.
func eventually(ctx context.Context, d time.Duration, cond func() string) string {
	deadline := time.Now().Add(d)
	for {
		why := cond()
		if why == "" || time.Now().After(deadline) {
			return why
		}
		if harness.SleepCtx(ctx, 50*time.Millisecond) != nil {
			return "stopped: " + why
		}
	}
}
