package main

import (
	"context"
	"fmt"

	"github.com/wsrelay/wsrelay/shared/keys"
	"github.com/wsrelay/wsrelay/shared/publisher"
)

// idempotency publishes with an Idempotency-Key through one release's
// ingress and retries through the other's, both ways: a publish and a
// batch are answered from the reply the first kept (Idempotent-Replayed,
// the same ids); a publish whose reply record is lost (deleted here, as
// when Redis failed before it was saved) runs again on the other and is
// not written twice (the append script's once-keys), answered with the
// first's id. The channel then holds each message once.
func (u *upgrade) idempotency(ctx context.Context, r *result) {
	for _, dir := range []struct{ first, second *release }{{&u.old, &u.new}, {&u.new, &u.old}} {
		ch := "upg-d-" + dir.first.name + "-then-" + dir.second.name
		way := dir.first.name + " then " + dir.second.name + " ingress"
		var want []string
		// A publish, answered by the first, retried on the second.
		m := publisher.Message{Data: map[string]string{"k": "publish"}}
		key := publisher.WithIdempotencyKey(ch + "-publish")
		a, err := dir.first.pub.Publish(ctx, ch, m, key)
		if err != nil {
			r.bad("%s: publish: %v", way, err)
			continue
		}
		want = append(want, a.ID)
		b, err := dir.second.pub.Publish(ctx, ch, m, key)
		switch {
		case err != nil:
			r.bad("%s: publish retried: %v", way, err)
		case !b.Replayed || b.ID != a.ID:
			r.bad("%s: publish retried: id %s, replayed %v; want %s, replayed", way, b.ID, b.Replayed, a.ID)
		}
		// A batch.
		items := []publisher.Item{
			{Channel: ch, Message: publisher.Message{Data: map[string]string{"k": "batch-0"}}},
			{Channel: ch, Message: publisher.Message{Data: map[string]string{"k": "batch-1"}}},
		}
		key = publisher.WithIdempotencyKey(ch + "-batch")
		ba, err := dir.first.pub.PublishBatch(ctx, items, key)
		if err != nil {
			r.bad("%s: batch: %v", way, err)
			continue
		}
		want = append(want, ba[0].ID, ba[1].ID)
		bb, err := dir.second.pub.PublishBatch(ctx, items, key)
		switch {
		case err != nil:
			r.bad("%s: batch retried: %v", way, err)
		case !bb[0].Replayed || bb[0].ID != ba[0].ID || bb[1].ID != ba[1].ID:
			r.bad("%s: batch retried: ids %s %s, replayed %v; want %s %s, replayed", way, bb[0].ID, bb[1].ID, bb[0].Replayed, ba[0].ID, ba[1].ID)
		}
		// A publish whose reply record is lost: the retry runs again.
		m = publisher.Message{Data: map[string]string{"k": "reply-lost"}}
		key = publisher.WithIdempotencyKey(ch + "-reply-lost")
		c1, err := dir.first.pub.Publish(ctx, ch, m, key)
		if err != nil {
			r.bad("%s: publish: %v", way, err)
			continue
		}
		want = append(want, c1.ID)
		dropped, err := u.dropReplies(ctx)
		if err != nil || dropped == 0 {
			r.bad("%s: deleting the reply records: %d deleted, %v", way, dropped, err)
		}
		c2, err := dir.second.pub.Publish(ctx, ch, m, key)
		switch {
		case err != nil:
			r.bad("%s: publish retried after its reply record was lost: %v", way, err)
		case c2.ID != c1.ID:
			r.bad("%s: publish retried after its reply record was lost: id %s, want %s (written twice)", way, c2.ID, c1.ID)
		}
		// What the channel holds, read through each.
		for _, rel := range []*release{dir.first, dir.second} {
			page, err := rel.pub.History(ctx, ch, "", 100)
			if err != nil {
				r.bad("%s: history through the %s ingress: %v", way, rel.name, err)
				continue
			}
			var got []string
			for _, m := range page.Messages {
				got = append(got, m.ID)
			}
			if fmt.Sprint(got) != fmt.Sprint(want) {
				r.bad("%s: history through the %s ingress: %v, want %v", way, rel.name, got, want)
			}
		}
	}
	r.count("both ways: a publish and a batch retried on the other release (replayed), a publish retried after its reply record was deleted (not written twice)")
}

// dropReplies deletes every stored Idempotency-Key reply, as if Redis
// had failed before they were saved, and says how many there were.
func (u *upgrade) dropReplies(ctx context.Context) (int, error) {
	var ks []string
	iter := u.env.RDB.Scan(ctx, 0, keys.Scheme{Prefix: prefix}.Idempotency("*"), 100).Iterator()
	for iter.Next(ctx) {
		ks = append(ks, iter.Val())
	}
	if err := iter.Err(); err != nil || len(ks) == 0 {
		return 0, err
	}
	return len(ks), u.env.RDB.Del(ctx, ks...).Err()
}
