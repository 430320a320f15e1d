package main

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/wsrelay/wsrelay/bench/harness"
	"github.com/wsrelay/wsrelay/shared/publisher"
	"github.com/wsrelay/wsrelay/shared/testkit/delivery"
)

func addr(p *harness.Proc) string { return "127.0.0.1:" + strconv.Itoa(p.Port) }

// drain is a rolling deploy of the egress: clients reach an old egress
// through a balancer; the new egress is put in, the old one taken out and
// sent SIGTERM, which closes their sockets with 1001; they dial again,
// land on the new one and resume after the last id they got. Publishes
// go on all the while, one channel's in turn through the old and the new
// ingress. Every resume must be recovered and every message arrive once.
func (u *upgrade) drain(ctx context.Context, r *result) {
	lb, err := harness.NewBalancer()
	if err != nil {
		r.bad("balancer: %v", err)
		return
	}
	defer lb.Close()
	lb.Add(addr(u.drained))
	chans := []string{"upg-c-0", "upg-c-1"}
	logs := map[string]*delivery.Log{}
	for _, ch := range chans {
		logs[ch] = delivery.NewLog()
	}
	var ws []*wsUser
	defer func() { closeAll(ws) }()
	for i := range 3 {
		w, err := dialUser("c-user"+strconv.Itoa(i), "ws://"+lb.Addr()+"/ws")
		if err != nil {
			r.bad("dial: %v", err)
			return
		}
		ws = append(ws, w)
		for _, ch := range chans {
			if err := w.subscribe(ch); err != nil {
				r.bad("%v", err)
				return
			}
		}
	}
	if why := eventually(ctx, 10*time.Second, func() string { return ready(ws) }); why != "" {
		r.bad("clients not ready after 10 s: %s", why)
		return
	}
	oldInstance := ws[0].instances()[0]

	pubCtx, stopPub := context.WithCancel(ctx)
	defer stopPub()
	var wg sync.WaitGroup
	var via [2]atomic.Int64 // acknowledged through the old, the new ingress
	var failed atomic.Int64
	rels := [2]*release{&u.old, &u.new}
	for ci, ch := range chans {
		wg.Go(func() {
			tick := time.NewTicker(20 * time.Millisecond)
			defer tick.Stop()
			for n := 0; ; n++ {
				select {
				case <-pubCtx.Done():
					return
				case <-tick.C:
				}
				i := (n + ci) % 2
				// Not pubCtx: a publish under way when they stop
				// finishes, so that its outcome is known.
				cctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				res, err := rels[i].pub.Publish(cctx, ch, publisher.Message{Data: map[string]int{"seq": n}},
					publisher.WithIdempotencyKey(fmt.Sprintf("%s-%d", ch, n)))
				cancel()
				if err == nil {
					err = logs[ch].Ack(n, res.ID)
				}
				if err != nil {
					logs[ch].Fail(n, err)
					failed.Add(1)
					continue
				}
				via[i].Add(1)
			}
		})
	}
	_ = harness.SleepCtx(ctx, time.Second)
	lb.Add(addr(u.new.egress))
	lb.Remove(addr(u.drained))
	took, err := harness.Kids.Term(u.drained.Cmd, grace+5*time.Second)
	if err != nil {
		r.bad("old egress: %v", err)
	}
	_ = harness.SleepCtx(ctx, 1500*time.Millisecond)
	stopPub()
	wg.Wait()

	if why := eventually(ctx, 15*time.Second, func() string {
		if o := owed(ws, logs); o != "" {
			return o
		}
		for _, w := range ws {
			if in := w.instances(); in[len(in)-1] != newEgressID {
				return w.user + " not on the new egress yet"
			}
		}
		return ""
	}); why != "" {
		r.bad("after 15 s: %s", why)
	}
	_ = harness.SleepCtx(ctx, 300*time.Millisecond)
	checkChains(r, ws, logs)
	if n := failed.Load(); n > 0 {
		r.bad("%d publishes failed", n)
	}
	for i := range via {
		if via[i].Load() == 0 {
			r.bad("no publish acknowledged through the %s ingress", rels[i].name)
		}
	}
	for _, w := range ws {
		in := w.instances()
		w.mu.Lock()
		closes := slices.Clone(w.closes)
		w.mu.Unlock()
		if in[0] != oldInstance || in[len(in)-1] != newEgressID || len(in) != 2 {
			r.bad("%s connected to %v, want %s then %s", w.user, in, oldInstance, newEgressID)
		}
		if !slices.Equal(closes, []int{1001}) {
			r.bad("%s: the server closed its connections with %v, want [1001]", w.user, closes)
		}
	}
	var msgs int
	for _, w := range ws {
		for _, cn := range w.chains {
			msgs += cn.Messages()
		}
	}
	r.count("%d clients × %d channels moved from the old egress (drained in %s) to the new one", len(ws), len(chans), took.Round(time.Millisecond))
	r.count("%d publishes (%d through the old ingress, %d through the new), %d deliveries", via[0].Load()+via[1].Load(), via[0].Load(), via[1].Load(), msgs)
}
