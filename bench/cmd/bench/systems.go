package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/gorilla/websocket"

	"github.com/wsrelay/wsrelay/bench/harness"
)

// kind is a system the bench drives: wsrelay itself, or Centrifugo run
// beside it on the same machine in the same run (-centrifugo), so that
// the table can give ratios measured under the same conditions instead
// of against figures from another day.
type kind int

const (
	wsrelay kind = iota
	centrifugo
)

func (k kind) String() string {
	if k == centrifugo {
		return "centrifugo"
	}
	return "wsrelay"
}

// env is the bench's view of one running system: Redis, binaries, logs,
// and Centrifugo when it is compared.
type env struct {
	*harness.Env
	centrifugoBin     string // empty: not compared
	centrifugoHistory bool   // Centrifugo keeps history, as wsrelay does
}

// sut is one running system under test.
type sut struct {
	kind kind
	pub  *harness.Proc // where publishes go: the ingress, or Centrifugo
	sub  *harness.Proc // where sockets connect: the egress, or Centrifugo
	// procs are its processes by role, for CPU accounting.
	procs map[string]*harness.Proc
}

func (s *sut) stop() {
	for _, p := range s.procs {
		harness.Kids.Stop(p.Cmd)
	}
}

// sides says which parts of a system a scenario needs.
type sides int

const (
	publishing sides = 1 << iota // wsrelay's ingress
	delivering                   // wsrelay's egress
)

// startSystem starts k with key prefix pfx: for wsrelay the functions
// need names (the egress with egressEnv); Centrifugo is one process that
// does both. ping > 0 sets the sockets' ping interval (zero: the default).
func (b *bench) startSystem(k kind, pfx string, need sides, ping time.Duration, egressEnv ...string) (*sut, error) {
	if k == centrifugo {
		p, _, err := b.env.startCentrifugo(pfx, ping)
		if err != nil {
			return nil, err
		}
		return &sut{kind: k, pub: p, sub: p, procs: map[string]*harness.Proc{"centrifugo": p}}, nil
	}
	sys := &sut{kind: k, procs: map[string]*harness.Proc{}}
	if need&publishing != 0 {
		ing, _, err := b.env.StartFunction(b.env.Ingress, pfx)
		if err != nil {
			return nil, err
		}
		sys.pub, sys.procs["ingress"] = ing, ing
	}
	if need&delivering != 0 {
		if ping > 0 {
			egressEnv = append(egressEnv, "PING_INTERVAL="+ping.String())
		}
		eg, _, err := b.env.StartFunction(b.env.Egress, pfx, egressEnv...)
		if err != nil {
			sys.stop()
			return nil, err
		}
		sys.sub, sys.procs["egress"] = eg, eg
	}
	return sys, nil
}

// centrifugoAPIKey is the bench's Centrifugo's HTTP API key.
const centrifugoAPIKey = "bench"

// startCentrifugo starts Centrifugo with its Redis engine on the bench's
// Redis, prefix pfx, and waits for /health. Clients connect without a
// token and may subscribe to any channel (client.insecure), as wsrelay's
// run with ALLOW_ANONYMOUS; otherwise it runs with its defaults, which
// keep no history (a client that reconnects cannot recover what it
// missed) unless -centrifugo-history. ping > 0 sets its ping interval
// (zero: its default, 25 s).
func (e *env) startCentrifugo(pfx string, ping time.Duration) (*harness.Proc, time.Duration, error) {
	port, err := harness.FreePort()
	if err != nil {
		return nil, 0, err
	}
	cfg := map[string]any{
		"http_server": map[string]any{"address": "127.0.0.1", "port": port},
		"log":         map[string]any{"level": "error"},
		"engine": map[string]any{"type": "redis", "redis": map[string]any{
			"address": []string{e.RedisURL}, "prefix": pfx,
		}},
		"client":      map[string]any{"insecure": true, "allowed_origins": []string{"*"}},
		"http_api":    map[string]any{"key": centrifugoAPIKey},
		"health":      map[string]any{"enabled": true},
		"usage_stats": map[string]any{"disabled": true},
	}
	if ping > 0 {
		// S3's ping rounds, as wsrelay's PING_INTERVAL there.
		client := cfg["client"].(map[string]any)
		client["ping_interval"], client["pong_timeout"] = ping.String(), (ping / 2).String()
	}
	if e.centrifugoHistory {
		// What wsrelay keeps by default (HISTORY_SIZE, HISTORY_TTL), with
		// recovery on: a client that reconnects loses nothing, as with
		// wsrelay's resume.
		cfg["channel"] = map[string]any{"without_namespace": map[string]any{
			"history_size": 1000, "history_ttl": "24h", "force_recovery": true,
		}}
	}
	b, err := json.Marshal(cfg)
	if err != nil {
		return nil, 0, err
	}
	path := filepath.Join(e.LogDir, "centrifugo-"+pfx+".json")
	if err := os.WriteFile(path, b, 0o644); err != nil {
		return nil, 0, err
	}
	logf, err := os.OpenFile(filepath.Join(e.LogDir, "centrifugo.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, 0, err
	}
	defer logf.Close()
	vars := append([]string{"PATH=" + os.Getenv("PATH"), "HOME=" + e.LogDir}, harness.RuntimeVars()...)
	return harness.StartReady(e.centrifugoBin, []string{"-c", path}, vars, port, "/health", logf)
}

// wsPath is the path, with query, a socket subscribing to ch dials.
func (k kind) wsPath(ch string) string {
	if k == centrifugo {
		return "/connection/websocket"
	}
	return "/ws?channels=" + ch
}

var (
	subscribedMsg = []byte(`"type":"subscribed"`)
	cfSubscribed  = []byte(`"id":2,"subscribe":`)
)

// subscribe completes the subscription of a dialled socket to ch and
// waits for its confirmation: wsrelay subscribes from the URL and says so;
// Centrifugo wants a connect command, then a subscribe command.
func (k kind) subscribe(ws *websocket.Conn, ch string) error {
	want := subscribedMsg
	if k == centrifugo {
		cmds := `{"id":1,"connect":{}}` + "\n" + `{"id":2,"subscribe":{"channel":"` + ch + `"}}`
		if err := ws.WriteMessage(websocket.TextMessage, []byte(cmds)); err != nil {
			return err
		}
		want = cfSubscribed
	}
	for {
		_, b, err := ws.ReadMessage()
		if err != nil {
			return err
		}
		if bytes.Contains(b, want) {
			return nil
		}
		if k == centrifugo && bytes.Contains(b, []byte(`"error":`)) {
			return fmt.Errorf("centrifugo refused: %s", b)
		}
	}
}

// publishRequest appends to b the HTTP/1.1 request that publishes body
// (`{"data":…}`) to ch on addr.
func (k kind) publishRequest(b []byte, addr, ch string, body []byte) []byte {
	if k == centrifugo {
		b = append(b, "POST /api/publish HTTP/1.1\r\nHost: "...)
		b = append(b, addr...)
		b = append(b, "\r\nX-API-Key: "+centrifugoAPIKey+"\r\nContent-Type: application/json\r\nContent-Length: "...)
		// {"channel":"<ch>", then body without its opening brace.
		b = strconv.AppendInt(b, int64(len(body)+len(`"channel":"",`)+len(ch)), 10)
		b = append(b, "\r\n\r\n{\"channel\":\""...)
		b = append(b, ch...)
		b = append(b, `",`...)
		return append(b, body[1:]...)
	}
	b = append(b, "POST /v1/channels/"...)
	b = append(b, ch...)
	b = append(b, "/messages HTTP/1.1\r\nHost: "...)
	b = append(b, addr...)
	b = append(b, "\r\nContent-Type: application/json\r\nContent-Length: "...)
	b = strconv.AppendInt(b, int64(len(body)), 10)
	b = append(b, "\r\n\r\n"...)
	return append(b, body...)
}

// publishError says whether a publish response is a failure: wsrelay
// answers 202; Centrifugo answers 200, with an error in the body if any.
func (k kind) publishError(status int, body []byte) error {
	want := 202
	if k == centrifugo {
		want = 200
	}
	if status != want {
		return fmt.Errorf("%w %d: %s", errStatus, status, body)
	}
	if k == centrifugo && bytes.Contains(body, []byte(`"error"`)) {
		return fmt.Errorf("centrifugo publish: %s", body)
	}
	return nil
}
