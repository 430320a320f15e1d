// Command storm measures a reconnect storm: N clients subscribed to one
// channel on egress A, A is killed (SIGKILL), messages are published
// while they are away, and all N resume on egress B at once (-spread 0,
// the worst case; the reference clients' first reconnect is drawn from
// [0, 500 ms], -spread 500ms) while more messages are published. The
// clients are plain WebSockets that do not reconnect, so that every
// refusal or close the storm causes shows. It checks that every client
// gets every message once and in order, and reports the Redis commands
// of the storm (INFO commandstats, the ingress's appends included) and
// B's memory and goroutines. Run from the repository:
//
//	go run ./bench/cmd/storm -clients 2000 -spread 500ms
//
// With -drain, A is stopped as a deploy stops it (SIGTERM): its drain
// closes the clients 1001, DRAIN_RATE a second (-env DRAIN_RATE=0: all at
// once), and each client reconnects to B a wait drawn from [0, 500 ms]
// after its close, as the reference clients do, while messages are
// published (-during; -gap and -spread do not apply). It reports the
// most clients that reached B within any 100 ms.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"

	"github.com/wsrelay/wsrelay/bench/harness"
	"github.com/wsrelay/wsrelay/shared/stream"
)

func main() { harness.Main("storm", run) }

type client struct {
	user       string
	ws         *websocket.Conn
	mu         sync.Mutex
	ids        []string
	last       string
	subs       int // subscribed frames
	errs       []string
	recovered  []bool
	closeCodes []int
	done       chan struct{}
}

func (c *client) readLoop() {
	defer close(c.done)
	for {
		_, b, err := c.ws.ReadMessage()
		if err != nil {
			var ce *websocket.CloseError
			c.mu.Lock()
			if errors.As(err, &ce) {
				c.closeCodes = append(c.closeCodes, ce.Code)
			} else {
				c.closeCodes = append(c.closeCodes, 1006)
			}
			c.mu.Unlock()
			return
		}
		var f struct {
			Type      string `json:"type"`
			ID        string `json:"id"`
			Code      string `json:"code"`
			Message   string `json:"message"`
			Recovered *bool  `json:"recovered"`
			Position  string `json:"position"`
		}
		if err := json.Unmarshal(b, &f); err != nil {
			continue
		}
		c.mu.Lock()
		switch f.Type {
		case "message":
			c.ids = append(c.ids, f.ID)
			c.last = f.ID
		case "subscribed":
			c.subs++
			if f.Recovered != nil {
				c.recovered = append(c.recovered, *f.Recovered)
			}
			if c.last == "" {
				c.last = f.Position
			}
		case "error":
			c.errs = append(c.errs, f.Code+": "+f.Message)
		}
		c.mu.Unlock()
	}
}

func dial(ctx context.Context, base, user string) (*websocket.Conn, error) {
	d := websocket.Dialer{HandshakeTimeout: 30 * time.Second}
	ws, _, err := d.DialContext(ctx, "ws"+strings.TrimPrefix(base, "http")+"/ws?user="+user, nil)
	if err != nil {
		return nil, err
	}
	// welcome
	ws.SetReadDeadline(time.Now().Add(30 * time.Second))
	_, b, err := ws.ReadMessage()
	if err != nil {
		ws.Close()
		return nil, fmt.Errorf("welcome: %w", err)
	}
	if !bytes.Contains(b, []byte(`"welcome"`)) {
		ws.Close()
		return nil, fmt.Errorf("first frame %s", b)
	}
	ws.SetReadDeadline(time.Time{})
	return ws, nil
}

func publish(ctx context.Context, base, ch string, n int) ([]string, error) {
	var ids []string
	for i := range n {
		body := fmt.Sprintf(`{"data":{"i":%d,"pad":"%s"}}`, i, strings.Repeat("x", 100))
		req, _ := http.NewRequestWithContext(ctx, "POST", base+"/v1/channels/"+ch+"/messages", strings.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return ids, err
		}
		var out struct{ ID string }
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 202 || json.Unmarshal(b, &out) != nil {
			return ids, fmt.Errorf("publish: %d %s", resp.StatusCode, b)
		}
		ids = append(ids, out.ID)
	}
	return ids, nil
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("storm", flag.ContinueOnError)
	n := fs.Int("clients", 2000, "clients")
	gap := fs.Int("gap", 300, "messages published while the clients are away")
	during := fs.Int("during", 200, "messages published during the storm")
	spread := fs.Duration("spread", 0, "reconnects spread uniformly over this long (0: all at once)")
	extra := fs.String("env", "", "extra egress env, comma-separated K=V")
	drain := fs.Bool("drain", false, "stop A with SIGTERM (its drain's 1001s) instead of SIGKILL; each client reconnects 0-500 ms after its close")
	if err := fs.Parse(args); err != nil {
		return err
	}
	harness.RaiseNoFile()
	root, err := harness.RepoRoot()
	if err != nil {
		return err
	}
	bins, err := harness.Build(root, false)
	if err != nil {
		return err
	}
	logDir, _ := os.MkdirTemp("", "storm-")
	fmt.Fprintln(stdout, "logs in", logDir)
	e := &harness.Env{Binaries: bins, LogDir: logDir}
	if err := e.StartRedis(); err != nil {
		return err
	}
	prefix := "storm"
	ing, _, err := e.StartFunction(bins.Ingress, prefix)
	if err != nil {
		return err
	}
	var eargs []string
	if *extra != "" {
		eargs = strings.Split(*extra, ",")
	}
	a, _, err := e.StartNamed("egressA", bins.Egress, prefix, eargs...)
	if err != nil {
		return err
	}
	b, _, err := e.StartNamed("egressB", bins.Egress, prefix, eargs...)
	if err != nil {
		return err
	}
	const ch = "storm"
	// Phase 1: N clients live on A.
	clients := make([]*client, *n)
	var wg sync.WaitGroup
	sem := make(chan struct{}, 50)
	var dialErr atomic.Value
	for i := range clients {
		c := &client{user: "u" + strconv.Itoa(i), done: make(chan struct{})}
		clients[i] = c
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			ws, err := dial(ctx, a.Base, c.user)
			if err != nil {
				dialErr.Store(err)
				return
			}
			c.ws = ws
			go c.readLoop()
			_ = ws.WriteMessage(websocket.TextMessage, []byte(`{"type":"subscribe","channel":"`+ch+`"}`))
		}()
	}
	wg.Wait()
	if v := dialErr.Load(); v != nil {
		return fmt.Errorf("dial A: %v", v)
	}
	waitAll := func(what string, ok func(c *client) bool, limit time.Duration) error {
		deadline := time.Now().Add(limit)
		for {
			bad := 0
			var ex *client
			for _, c := range clients {
				c.mu.Lock()
				good := ok(c)
				c.mu.Unlock()
				if !good {
					bad++
					ex = c
				}
			}
			if bad == 0 {
				return nil
			}
			if time.Now().After(deadline) {
				ex.mu.Lock()
				defer ex.mu.Unlock()
				return fmt.Errorf("%s: %d clients not there after %s; e.g. %s: %d ids, subs %d, errs %v, closes %v", what, bad, limit, ex.user, len(ex.ids), ex.subs, ex.errs, ex.closeCodes)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	if err := waitAll("subscribed on A", func(c *client) bool { return c.subs == 1 }, 60*time.Second); err != nil {
		return err
	}
	pre, err := publish(ctx, ing.Base, ch, 20)
	if err != nil {
		return err
	}
	if err := waitAll("pre messages", func(c *client) bool { return len(c.ids) == len(pre) }, 30*time.Second); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "%d clients live on A, %d messages each\n", *n, len(pre))
	// Phase 2: kill A; publish while they are away.
	var gapIDs []string
	if !*drain {
		harness.Kids.Stop(a.Cmd)
		for _, c := range clients {
			<-c.done
			c.ws.Close()
		}
		if gapIDs, err = publish(ctx, ing.Base, ch, *gap); err != nil {
			return err
		}
	}
	runtime.GC()
	rssBefore, _ := harness.RSSKiB(b.Pid())
	mnames := []string{"go_goroutines", "go_memstats_heap_inuse_bytes", "go_memstats_heap_alloc_bytes"}
	mBefore, _ := harness.Metrics(b.Base, mnames...)
	_ = e.RDB.ConfigResetStat(ctx).Err()
	// Phase 3: the storm on B, while publishing.
	var peak atomic.Int64
	stopPoll := make(chan struct{})
	var pollWG sync.WaitGroup
	pollWG.Go(func() {
		for {
			if r, err := harness.RSSKiB(b.Pid()); err == nil && r > peak.Load() {
				peak.Store(r)
			}
			select {
			case <-stopPoll:
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
	})
	start := make(chan struct{})
	var failed atomic.Int64
	var firstFail atomic.Value
	var arrivals sync.Mutex
	var dialedAt []time.Time // when each dial to B began
	for i, c := range clients {
		closedA := c.done
		if !*drain {
			c.done = make(chan struct{})
			c.ws = nil
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			if *drain {
				<-closedA
				c.ws.Close()
				c.ws = nil
				c.done = make(chan struct{})
				time.Sleep(rand.N(500 * time.Millisecond))
			} else if *spread > 0 {
				time.Sleep(time.Duration(int64(*spread) * int64(i) / int64(len(clients))))
			}
			arrivals.Lock()
			dialedAt = append(dialedAt, time.Now())
			arrivals.Unlock()
			c.mu.Lock()
			after := c.last
			c.mu.Unlock()
			ws, err := dial(ctx, b.Base, c.user)
			if err != nil {
				failed.Add(1)
				firstFail.CompareAndSwap(nil, err.Error())
				close(c.done)
				return
			}
			c.ws = ws
			go c.readLoop()
			_ = ws.WriteMessage(websocket.TextMessage, []byte(`{"type":"subscribe","channel":"`+ch+`","after":"`+after+`"}`))
		}()
	}
	t0 := time.Now()
	close(start)
	var termErr error
	termDone := make(chan struct{})
	go func() {
		defer close(termDone)
		if *drain {
			_, termErr = harness.Kids.Term(a.Cmd, time.Minute)
		}
	}()
	var duringIDs []string
	var pubErr error
	pubDone := make(chan struct{})
	go func() {
		defer close(pubDone)
		for range *during {
			ids, err := publish(ctx, ing.Base, ch, 1)
			if err != nil {
				pubErr = err
				return
			}
			duringIDs = append(duringIDs, ids...)
			time.Sleep(5 * time.Millisecond)
		}
	}()
	wg.Wait()
	dialed := time.Since(t0)
	<-pubDone
	if pubErr != nil {
		return pubErr
	}
	<-termDone
	if termErr != nil {
		return fmt.Errorf("egress A: %w", termErr)
	}
	want := slices.Concat(pre, gapIDs, duringIDs)
	werr := waitAll("all messages after the storm", func(c *client) bool { return len(c.ids) >= len(want) }, 60*time.Second)
	settled := time.Since(t0)
	close(stopPoll)
	pollWG.Wait()
	after, err := e.CommandStats(ctx)
	if err != nil {
		return err
	}
	rssAfter, _ := harness.RSSKiB(b.Pid())
	mAfter, _ := harness.Metrics(b.Base, mnames...)
	time.Sleep(3 * time.Second)
	mLater, _ := harness.Metrics(b.Base, mnames...)
	rssLater, _ := harness.RSSKiB(b.Pid())
	// Check every client.
	var lost, dup, disorder, notRecovered, errFrames, closed int
	var ex []string
	closesA := map[int]int{} // how each client's socket on A ended
	for _, c := range clients {
		c.mu.Lock()
		if len(c.closeCodes) > 0 {
			closesA[c.closeCodes[0]]++
		}
		seen := map[string]int{}
		for _, id := range c.ids {
			seen[id]++
		}
		for _, id := range want {
			if seen[id] == 0 {
				lost++
			}
		}
		for _, k := range seen {
			if k > 1 {
				dup += k - 1
			}
		}
		for i := 1; i < len(c.ids); i++ {
			if !stream.MustParseID(c.ids[i-1]).Less(stream.MustParseID(c.ids[i])) {
				disorder++
				break
			}
		}
		for _, r := range c.recovered {
			if !r {
				notRecovered++
			}
		}
		errFrames += len(c.errs)
		if len(c.errs) > 0 && len(ex) < 3 {
			ex = append(ex, c.user+": "+strings.Join(c.errs, "; "))
		}
		if len(c.closeCodes) > 1 {
			closed++
			if len(ex) < 3 {
				ex = append(ex, fmt.Sprintf("%s closes %v", c.user, c.closeCodes))
			}
		}
		c.mu.Unlock()
	}
	fmt.Fprintf(stdout, "storm: %d clients resumed on B (dial+subscribe sent in %s, dial failures %d %v), all %d messages delivered: %v (in %s)\n",
		*n, dialed.Round(time.Millisecond), failed.Load(), firstFail.Load(), len(want), werr == nil, settled.Round(time.Millisecond))
	fmt.Fprintf(stdout, "sockets on A ended by close code: %v; most dials to B within 100 ms: %d\n", closesA, peakWithin(dialedAt, 100*time.Millisecond))
	fmt.Fprintf(stdout, "lost %d, duplicated %d, out of order %d clients, recovered:false %d, error frames %d, closed during storm %d %v\n",
		lost, dup, disorder, notRecovered, errFrames, closed, ex)
	var names []string
	for k := range after {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, k := range names {
		fmt.Fprintf(stdout, "  %-20s %d (%.2f per client)\n", k, after[k], float64(after[k])/float64(*n))
	}
	fmt.Fprintf(stdout, "B RSS: before %d KiB, peak %d KiB, after %d KiB (%.1f KiB per client over before)\n",
		rssBefore, peak.Load(), rssAfter, float64(rssAfter-rssBefore)/float64(*n))
	fmt.Fprintf(stdout, "B RSS 3 s later %d KiB\n", rssLater)
	for _, k := range mnames {
		fmt.Fprintf(stdout, "  %s: before %.0f, settled %.0f, 3 s later %.0f\n", k, mBefore[k], mAfter[k], mLater[k])
	}
	for _, c := range clients {
		if c.ws != nil {
			c.ws.Close()
		}
	}
	if werr != nil {
		return werr
	}
	// Every client having as many messages as were sent is not every
	// message delivered once, in order: a duplicate makes up for a loss.
	if lost+dup+disorder > 0 {
		return fmt.Errorf("lost %d, duplicated %d, out of order at %d clients", lost, dup, disorder)
	}
	return nil
}

// peakWithin is the most of ts (in any order) within any window of d.
func peakWithin(ts []time.Time, d time.Duration) int {
	ts = slices.Clone(ts)
	slices.SortFunc(ts, time.Time.Compare)
	most := 0
	for i, j := 0, 0; j < len(ts); j++ {
		for ts[j].Sub(ts[i]) > d {
			i++
		}
		most = max(most, j-i+1)
	}
	return most
}
