package main

import (
	"context"
	"encoding/json"
	"errors"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/stream"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// TestInboxLostNotificationAndStalledRead: a targeted message whose
// notification never reached the instance (appended with the
// notification sent elsewhere), then one whose catch-up read of the inbox
// fails for a while (the read path stalls). Once the inbox can be read,
// the connection gets both, in order, each once; and a further send is
// delivered once.
func TestInboxLostNotificationAndStalledRead(t *testing.T) {
	t.Parallel()
	rdb, prefix := redistest.Client(t)
	ks := keys.Scheme{Prefix: prefix}
	erdb := redis.NewClient(&redis.Options{Addr: strings.TrimPrefix(strings.TrimSuffix(redistest.URL(t), "/0"), "redis://")})
	t.Cleanup(func() { erdb.Close() })
	var failing atomic.Bool
	var failed atomic.Int64
	inboxRead := func(cmd redis.Cmder) bool {
		args := cmd.Args()
		if failing.Load() && len(args) > 1 && strings.EqualFold(cmd.Name(), "xrange") && strings.Contains(args[1].(string), "{i:") {
			failed.Add(1)
			return true
		}
		return false
	}
	erdb.AddHook(redistest.Fail{Cmd: inboxRead, Pipeline: func(cmds []redis.Cmder) bool {
		for _, c := range cmds {
			if inboxRead(c) {
				return true
			}
		}
		return false
	}})
	e := startEgressOn(t, erdb, prefix, map[string]string{"ALLOW_ANONYMOUS": "true"})
	ws, _, err := e.dial(t, url.Values{"user": {"ann"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	w := next(t, ws, "welcome")
	toConn := func(notify string, n int) string {
		t.Helper()
		ids, err := stream.NewStore(rdb).Append(context.Background(), []stream.Append{{Stream: ks.Inbox(w.Instance), Notify: notify,
			Msg:    stream.Message{Route: stream.ToConnection(w.ConnectionID), TS: time.Now().UnixMilli(), Data: json.RawMessage(`"` + string(rune('0'+n)) + `"`)},
			Limits: stream.Limits{MaxLen: 10000, MaxAgeMS: 60000, TTLMS: 60000}}})
		if err != nil {
			t.Fatal(err)
		}
		return ids[0]
	}
	lost := toConn(ks.InboxNotify("elsewhere"), 1)
	failing.Store(true)
	second := toConn(ks.InboxNotify(w.Instance), 2)
	testkit.Eventually(t, 5*time.Second, func() error {
		if failed.Load() < 2 {
			return errors.New("the inbox read has not failed twice yet")
		}
		return nil
	})
	failing.Store(false)
	got, code := readMessages(ws, 5*time.Second, func(id string) bool { return id == second })
	if len(got) != 2 || got[0] != lost || got[1] != second {
		t.Fatalf("got %v (close %d), want [%s %s]", got, code, lost, second)
	}
	third := toConn(ks.InboxNotify(w.Instance), 3)
	got, code = readMessages(ws, 5*time.Second, func(id string) bool { return id == third })
	if len(got) != 1 || got[0] != third {
		t.Fatalf("after: got %v (close %d), want [%s]", got, code, third)
	}
}
