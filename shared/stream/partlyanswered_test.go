package stream

import (
	"encoding/json"
	"testing"
	"time"
)

// TestPartlyAnsweredPipelineKeepsItsReplies: in a pipeline of appends
// (which the Batcher fills with the appends of concurrent requests) whose
// connection was cut, or whose replies came late, after Redis's first
// reply was read, the append answered keeps its id: it was written, and
// its request is answered 202. go-redis gives the pipeline's error to
// every command it left without one, the ones whose replies it had read
// included, and the request whose append was answered was answered 503
// (the message written all the same: a publisher retrying without an
// Idempotency-Key wrote it twice). The append not answered fails.
func TestPartlyAnsweredPipelineKeepsItsReplies(t *testing.T) {
	t.Parallel()
	relay, s, admin, ks := relayedStore(t)
	msg := func(ch string) Append {
		return Append{Stream: ks.Stream(ch), Notify: ks.Notify(ch),
			Msg: Message{Channel: ch, TS: time.Now().UnixMilli(), Data: json.RawMessage(`{"n":1}`)}}
	}
	// The script is loaded and the connection pooled first.
	if _, err := s.Append(t.Context(), []Append{msg("warm")}); err != nil {
		t.Fatal(err)
	}
	for i, c := range []struct {
		name string
		arm  func(marker string)
	}{
		{"cut", relay.ArmFirstReply},
		{"late", func(m string) { relay.ArmFirstReplyHold(m, time.Second) }},
	} {
		first, second := c.name+"-first", c.name+"-second"
		c.arm(ks.Stream(first))
		ids, errs := s.appendEach(t.Context(), []Append{msg(first), msg(second)})
		if relay.Dropped() != i+1 {
			t.Fatalf("%s: %d pipelines acted on, want %d", c.name, relay.Dropped(), i+1)
		}
		got, err := admin.XRange(t.Context(), ks.Stream(first), "-", "+").Result()
		if err != nil || len(got) != 1 {
			t.Fatalf("%s: the first append's stream holds %v (%v), want 1 entry", c.name, got, err)
		}
		if errs[0] != nil || ids[0] != got[0].ID {
			t.Errorf("%s: the append answered before the pipeline failed returned %q, %v; want %s, no error (it was written)", c.name, ids[0], errs[0], got[0].ID)
		}
		if errs[1] == nil {
			t.Errorf("%s: the append not answered returned %q and no error", c.name, ids[1])
		}
	}
}
