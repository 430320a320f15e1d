// Package keys is the Redis key scheme shared by ingress and egress.
//
// Every key that belongs to one channel carries the hash tag {c:<channel>},
// every key of one user {u:<user>}, of one egress instance {i:<instance>},
// so that keys used together by one command or script live in one Redis
// Cluster slot, while different channels spread over all masters. A
// publish rate-limit bucket is one key tagged {l:<bucket>}, so buckets
// spread over the masters too.
// Names are validated (package channel) before they get here.
package keys

import "strconv"

// Scheme builds keys under one prefix. The zero Scheme uses no prefix;
// production uses "wsr", tests a unique prefix each.
type Scheme struct {
	Prefix string
}

func (s Scheme) p() string {
	if s.Prefix == "" {
		return ""
	}
	return s.Prefix + ":"
}

// Stream is the channel's message stream (history and resume).
func (s Scheme) Stream(channel string) string { return s.p() + "{c:" + channel + "}:s" }

// Notify is the shard Pub/Sub channel on which each append to the channel's
// stream is announced, with the message, to egress instances.
func (s Scheme) Notify(channel string) string { return s.p() + "{c:" + channel + "}:n" }

// ChannelConns is the sorted set of connection ids subscribed to channel,
// scored by the unix-ms time their registration expires.
func (s Scheme) ChannelConns(channel string) string { return s.p() + "{c:" + channel + "}:conns" }

// Inbox is an egress instance's stream of targeted messages and commands.
func (s Scheme) Inbox(instance string) string { return s.p() + "{i:" + instance + "}:s" }

// InboxNotify announces appends to the instance's inbox.
func (s Scheme) InboxNotify(instance string) string { return s.p() + "{i:" + instance + "}:n" }

// RegistryCheck is a short-lived key an egress instance with no
// connection writes to learn whether registry writes succeed again.
func (s Scheme) RegistryCheck(instance string) string { return s.p() + "{i:" + instance + "}:check" }

// Conn is one connection's registry record.
func (s Scheme) Conn(id string) string { return s.p() + "{r:" + id + "}" }

// UserConns is the sorted set of a user's connection ids, scored like
// ChannelConns.
func (s Scheme) UserConns(user string) string { return s.p() + "{u:" + user + "}:conns" }

// Idempotency holds the outcome of a publish made with an Idempotency-Key;
// digest is a hash of the credential and the key, never the key itself.
func (s Scheme) Idempotency(digest string) string { return s.p() + "{k:" + digest + "}" }

// PublishRate is a publish rate limit's bucket when the limits are kept
// in Redis (PUBLISH_RATE_SCOPE=global); bucket names the caller and the
// limit: "user:<user>", "key:<short hash of the API key>" or
// "ip:<address>". One key per bucket, tagged by it.
func (s Scheme) PublishRate(bucket string) string { return s.p() + "{l:" + bucket + "}" }

// Once is the at-most-once record of the i-th append of an idempotent
// request (digest: of the credential, route and Idempotency-Key) to the
// stream key streamKey; it shares the stream's hash tag.
func (s Scheme) Once(streamKey, digest string, i int) string {
	return streamKey + ":once:" + digest + ":" + strconv.Itoa(i)
}

// Last caches the id of the last entry appended to the stream key
// streamKey, so that the append script learns the predecessor of a new
// entry with a GET instead of reading the whole previous entry; it shares
// the stream's hash tag and lives twice the stream's TTL, so that it
// outlasts its stream (docs/design.md).
func Last(streamKey string) string { return streamKey + ":last" }
