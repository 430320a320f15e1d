package e2e

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// sentPublish is one publish request a shutdown test made and what it
// was answered.
type sentPublish struct {
	batch  bool
	keyed  bool
	data   []string // one per message: unique across the test
	chans  []string
	status int      // 0: no answer (the connection was cut or refused)
	ids    []string // with a 202
	code   string   // error code, with an error status
}

// publishLoad runs clients publishing over keep-alive connections (single
// and batch publishes, with and without Idempotency-Key) until stop is
// closed, then until a request finds the ingress gone.
type publishLoad struct {
	mu       sync.Mutex
	sent     []*sentPublish
	accepted atomic.Int64
	wg       sync.WaitGroup
}

var shutdownChans = []string{"sd-a", "sd-b", "sd-c"}

func startPublishLoad(url string, clients int, stop <-chan struct{}) *publishLoad {
	l := &publishLoad{}
	for c := range clients {
		l.wg.Go(func() {
			tr := &http.Transport{MaxIdleConnsPerHost: 1}
			defer tr.CloseIdleConnections()
			hc := &http.Client{Transport: tr, Timeout: 30 * time.Second}
			stopped := false
			for i := 0; ; i++ {
				select {
				case <-stop:
					stopped = true
				default:
				}
				sp := &sentPublish{batch: (c+i)%2 == 1, keyed: c%4 >= 2}
				var body any
				path := "/v1/messages"
				if sp.batch {
					var items []map[string]any
					for j := range 1 + (c+i)%4 {
						d := fmt.Sprintf("c%d-%d-%d", c, i, j)
						ch := shutdownChans[(c+j)%len(shutdownChans)]
						sp.data, sp.chans = append(sp.data, d), append(sp.chans, ch)
						items = append(items, map[string]any{"channel": ch, "data": d})
					}
					body = map[string]any{"messages": items}
				} else {
					d := fmt.Sprintf("c%d-%d", c, i)
					ch := shutdownChans[c%len(shutdownChans)]
					sp.data, sp.chans = []string{d}, []string{ch}
					body = map[string]any{"data": d}
					path = "/v1/channels/" + ch + "/messages"
				}
				b, _ := json.Marshal(body)
				req, _ := http.NewRequest("POST", url+path, bytes.NewReader(b))
				req.Header.Set("Content-Type", "application/json")
				if sp.keyed {
					req.Header.Set("Idempotency-Key", fmt.Sprintf("k-%d-%d", c, i))
				}
				resp, err := hc.Do(req)
				if err == nil {
					rb, _ := io.ReadAll(resp.Body)
					resp.Body.Close()
					sp.status = resp.StatusCode
					var ans struct {
						ID      string `json:"id"`
						Results []struct {
							ID string `json:"id"`
						} `json:"results"`
						Error struct {
							Code string `json:"code"`
						} `json:"error"`
					}
					_ = json.Unmarshal(rb, &ans)
					sp.code = ans.Error.Code
					if ans.ID != "" {
						sp.ids = []string{ans.ID}
					}
					for _, r := range ans.Results {
						sp.ids = append(sp.ids, r.ID)
					}
					if sp.status == 202 {
						l.accepted.Add(1)
					}
				}
				l.mu.Lock()
				l.sent = append(l.sent, sp)
				l.mu.Unlock()
				if err != nil && stopped {
					return // the ingress is gone
				}
				if err != nil {
					time.Sleep(5 * time.Millisecond)
				}
			}
		})
	}
	return l
}

// check compares what the clients were answered with what the streams
// hold (history: data → ids): a 202 is there exactly once, with the ids
// answered; a 503 (outcome unknown, docs/api.md) or no answer at all at
// most once; any other answer not at all.
func (l *publishLoad) check(t *testing.T, held map[string][]string) {
	t.Helper()
	counts := map[int]int{}
	for _, sp := range l.sent {
		counts[sp.status]++
		for j, d := range sp.data {
			got := held[d]
			switch {
			case sp.status == 202:
				if len(sp.ids) != len(sp.data) || len(got) != 1 || got[0] != sp.ids[j] {
					t.Errorf("%+v: answered 202, message %s held as %v", sp, d, got)
				}
			case sp.status == 503 || sp.status == 0:
				if len(got) > 1 {
					t.Errorf("%+v: answered %d, message %s held %d times: %v", sp, sp.status, d, len(got), got)
				}
			default:
				if len(got) != 0 {
					t.Errorf("%+v: answered %d %s, message %s held as %v", sp, sp.status, sp.code, d, got)
				}
			}
		}
	}
	t.Logf("answers by status (0: none): %v", counts)
}

// heldMessages reads the shutdown channels' whole history through ing.
func heldMessages(t *testing.T, ingURL string) map[string][]string {
	t.Helper()
	held := map[string][]string{}
	for _, ch := range shutdownChans {
		after := "0"
		for {
			var page struct {
				Messages []struct {
					ID   string `json:"id"`
					Data string `json:"data"`
				} `json:"messages"`
				Next string `json:"next"`
			}
			if st := getJSON(t, ingURL+"/v1/channels/"+ch+"/messages?limit=1000&after="+after, &page); st != 200 {
				t.Fatalf("history of %s: %d", ch, st)
			}
			if len(page.Messages) == 0 {
				break
			}
			for _, m := range page.Messages {
				held[m.Data] = append(held[m.Data], m.ID)
			}
			after = page.Next
		}
	}
	return held
}

// TestIngressSigtermInFlight: SIGTERM while keep-alive clients publish
// (single and batch, with and without Idempotency-Key), with Redis
// answering, sleeping (less than REDIS_TIMEOUT), or pausing writes and
// cutting connections. Every publish answered 202 is in its stream once,
// with the ids answered; one answered 503 (outcome unknown, docs/api.md)
// or not at all at most once; any other answer wrote nothing. New
// connections are refused once the ingress is told to stop, and it exits.
func TestIngressSigtermInFlight(t *testing.T) {
	for _, tc := range []struct {
		name    string
		trouble []string // Redis commands sent just before SIGTERM
	}{
		{"redis answering", nil},
		{"redis asleep", []string{"DEBUG SLEEP 1"}},
		{"redis paused and connections cut", []string{"CLIENT PAUSE 1500 WRITE", "CLIENT KILL TYPE normal SKIPME yes"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rs := redistest.Start(t, "--enable-debug-command", "local")
			e := env{"REDIS_URL": rs.URL(), "REDIS_KEY_PREFIX": redistest.Prefix(t), "ALLOW_ANONYMOUS": "true",
				"HISTORY_SIZE": "0", "REDIS_TIMEOUT": "1200ms"}
			ing := start(t, "ingress", e)
			stop := make(chan struct{})
			load := startPublishLoad(ing.URL, 16, stop)
			testkit.Eventually(t, 10*time.Second, func() error {
				if n := load.accepted.Load(); n < 200 {
					return fmt.Errorf("%d publishes accepted so far", n)
				}
				return nil
			})
			for _, cmd := range tc.trouble {
				c := redisCLI(t, rs.Addr())
				fmt.Fprintf(c, "%s\r\n", cmd)
				if strings.HasPrefix(cmd, "DEBUG") {
					time.Sleep(200 * time.Millisecond) // it answers when it wakes
					continue
				}
				if line, err := bufio.NewReader(c).ReadString('\n'); err != nil || strings.HasPrefix(line, "-") {
					t.Fatalf("%s: %q %v", cmd, line, err)
				}
			}
			_ = ing.cmd.Process.Signal(syscall.SIGTERM)
			close(stop)
			// New connections are refused while requests in flight finish.
			testkit.Eventually(t, 5*time.Second, func() error {
				c, err := net.DialTimeout("tcp", strings.TrimPrefix(ing.URL, "http://"), time.Second)
				if err == nil {
					c.Close()
					return fmt.Errorf("a connection was accepted after SIGTERM")
				}
				return nil
			})
			select {
			case <-ing.done:
			case <-time.After(20 * time.Second):
				t.Fatal("the ingress did not exit")
			}
			load.wg.Wait()
			if !strings.Contains(ing.Logs(), `"msg":"stopped"`) {
				t.Errorf("no stopped line")
			}
			reader := start(t, "ingress", e)
			load.check(t, heldMessages(t, reader.URL))
		})
	}
}

// redisCLI dials Redis at addr for raw commands; closed when t ends.
func redisCLI(t *testing.T, addr string) net.Conn {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}
