package e2e

import (
	"fmt"
	"testing"
	"time"

	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// TestOnRedisCluster runs the core paths with both functions on a real
// three-master Redis Cluster (REDIS_CLUSTER_ADDRS, or one started here):
// broadcast over channels owned by different masters, targeted sends to a
// user connected on two instances, registry reads and cleanup, resume.
func TestOnRedisCluster(t *testing.T) {
	rc := redistest.StartCluster(t, 3, 0)
	// REDIS_CLUSTER_ADDRS wins over REDIS_URL in both functions. Records
	// live 60 s on their own, far beyond any wait below: a record gone
	// within one was removed, not expired.
	c := startCluster(t, "redis://127.0.0.1:1/0", env{"REDIS_CLUSTER_ADDRS": rc.AddrsEnv(), "REGISTRY_TTL": "60s"})
	rdb := rc.Client(t)
	t.Cleanup(func() { redistest.Cleanup(rdb, c.prefix) })

	t.Run("broadcast", func(t *testing.T) {
		// Eight channels: with three masters, several masters own some.
		chans := []string{"a", "b", "c", "d", "e", "f", "g", "h"}
		owners := map[string]bool{}
		for _, ch := range chans {
			m, err := rdb.MasterForKey(t.Context(), c.prefix+":{c:"+ch+"}:n")
			if err != nil {
				t.Fatal(err)
			}
			owners[m.Options().Addr] = true
		}
		if len(owners) < 2 {
			t.Fatalf("channels on %d masters only", len(owners))
		}
		all := "a,b,c,d,e,f,g,h"
		subs := []*wsClient{dial(t, c.egress[0].wsURL("channels="+all)), dial(t, c.egress[1].wsURL("channels="+all))}
		for _, s := range subs {
			for _, ch := range chans {
				s.waitFrame(func(f frame) bool { return f.Type == "subscribed" && f.Channel == ch })
			}
		}
		ids := map[string][]string{}
		for i := range 10 {
			for _, ch := range chans {
				var res struct{ ID string }
				if st := post(t, c.ingress[i%2].URL+"/v1/channels/"+ch+"/messages", map[string]any{"data": i}, &res); st != 202 {
					t.Fatalf("publish: %d", st)
				}
				ids[ch] = append(ids[ch], res.ID)
			}
		}
		for i, s := range subs {
			for _, ch := range chans {
				s.waitMessages(ch, len(ids[ch]))
			}
			time.Sleep(100 * time.Millisecond) // a duplicate would arrive now
			for _, ch := range chans {
				checkSequence(t, fmt.Sprintf("subscriber %d on %s", i, ch), s.messages(ch), ids[ch])
			}
		}
		t.Logf("80 messages over 8 channels on %d masters, delivered to 2 instances once each, in order", len(owners))
	})

	t.Run("resume", func(t *testing.T) {
		var first struct{ ID string }
		postAccepted(t, c.ingress[0].URL+"/v1/channels/resume-me/messages", map[string]any{"data": 0}, &first)
		var want []string
		for i := 1; i <= 3; i++ {
			var res struct{ ID string }
			postAccepted(t, c.ingress[1].URL+"/v1/channels/resume-me/messages", map[string]any{"data": i}, &res)
			want = append(want, res.ID)
		}
		s := dial(t, c.egress[1].wsURL(""))
		s.send(map[string]any{"type": "subscribe", "channel": "resume-me", "after": first.ID})
		f := s.waitFrame(func(f frame) bool { return f.Type == "subscribed" })
		if f.Recovered == nil || !*f.Recovered {
			t.Fatalf("subscribed: %+v", f)
		}
		checkSequence(t, "resumed", s.waitMessages("resume-me", 3), want)
	})

	t.Run("targeted and registry", func(t *testing.T) {
		a1 := dial(t, c.egress[0].wsURL("user=alice&channels=lobby"))
		a2 := dial(t, c.egress[1].wsURL("user=alice"))
		a1.waitFrame(func(f frame) bool { return f.Type == "subscribed" })
		var res map[string]any
		if st := post(t, c.ingress[0].URL+"/v1/users/alice/messages", map[string]any{"data": "hi alice"}, &res); st != 202 {
			t.Fatalf("to user: %d %v", st, res)
		}
		for _, cl := range []*wsClient{a1, a2} {
			cl.waitFrame(func(f frame) bool { return f.Type == "message" && f.Target == "user" && string(f.Data) == `"hi alice"` })
		}
		if st := post(t, c.ingress[1].URL+"/v1/connections/"+a2.welcome.ConnectionID+"/messages", map[string]any{"data": "only a2"}, &res); st != 202 {
			t.Fatalf("to connection: %d %v", st, res)
		}
		a2.waitFrame(func(f frame) bool { return f.Target == "connection" && string(f.Data) == `"only a2"` })

		var list connList
		getJSON(t, c.ingress[1].URL+"/v1/channels/lobby/connections", &list)
		if len(list.Connections) != 1 || list.Connections[0].User != "alice" {
			t.Fatalf("lobby connections: %+v", list)
		}
		var rec map[string]any
		if st := getJSON(t, c.ingress[0].URL+"/v1/connections/"+a2.welcome.ConnectionID, &rec); st != 200 || rec["instance"] != a2.welcome.Instance {
			t.Fatalf("record: %d %v", st, rec)
		}
		a1.ws.Close() // its record would live on for REGISTRY_TTL (60 s) if not removed
		testkit.Eventually(t, 5*time.Second, func() error {
			var l connList
			getJSON(t, c.ingress[0].URL+"/v1/channels/lobby/connections", &l)
			if len(l.Connections) != 0 {
				return fmt.Errorf("lobby still lists %+v", l.Connections)
			}
			return statusIs(getJSON(t, c.ingress[0].URL+"/v1/connections/"+a1.welcome.ConnectionID, nil), 404)
		})
	})
}
