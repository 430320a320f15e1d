package keys

import (
	"testing"
)

func TestScheme(t *testing.T) {
	t.Parallel()
	p := Scheme{Prefix: "wsr"}
	for _, tc := range []struct{ got, want string }{
		{p.Stream("room-1"), "wsr:{c:room-1}:s"},
		{p.Notify("room-1"), "wsr:{c:room-1}:n"},
		{p.ChannelConns("room-1"), "wsr:{c:room-1}:conns"},
		{p.Inbox("i1"), "wsr:{i:i1}:s"},
		{p.InboxNotify("i1"), "wsr:{i:i1}:n"},
		{p.Conn("c1"), "wsr:{r:c1}"},
		{p.UserConns("alice"), "wsr:{u:alice}:conns"},
		{p.Idempotency("ab12"), "wsr:{k:ab12}"},
		{p.PublishRate("user:alice"), "wsr:{l:user:alice}"},
		{Scheme{}.Stream("x"), "{c:x}:s"},
		{Last(p.Stream("room-1")), "wsr:{c:room-1}:s:last"},
		{Last(p.Inbox("i1")), "wsr:{i:i1}:s:last"},
		{p.RegistryCheck("i1"), "wsr:{i:i1}:check"},
		// Once keys outlive a deploy: an instance of the next version
		// must find the keys this one wrote, or a retry writes twice.
		{p.Once(p.Stream("room-1"), "ab12", 3), "wsr:{c:room-1}:s:once:ab12:3"},
	} {
		if tc.got != tc.want {
			t.Errorf("key %q, want %q", tc.got, tc.want)
		}
	}
}

// Keys used together share a hash tag (one Cluster slot); different
// channels, users and instances do not.
func TestHashTags(t *testing.T) {
	t.Parallel()
	s := Scheme{Prefix: "p"}
	same := [][]string{
		{s.Stream("a"), s.Notify("a"), s.ChannelConns("a"), Last(s.Stream("a")), s.Once(s.Stream("a"), "d", 0)},
		{s.Inbox("i"), s.InboxNotify("i"), Last(s.Inbox("i"))},
	}
	for _, group := range same {
		for _, k := range group[1:] {
			if tag(k) != tag(group[0]) {
				t.Errorf("%s and %s have different hash tags", group[0], k)
			}
		}
	}
	distinct := []string{s.Stream("a"), s.Stream("b"), s.Inbox("a"), s.UserConns("a"), s.Conn("a"), s.Idempotency("a"), s.PublishRate("a")}
	seen := map[string]string{}
	for _, k := range distinct {
		if other, ok := seen[tag(k)]; ok {
			t.Errorf("%s and %s share hash tag %s", k, other, tag(k))
		}
		seen[tag(k)] = k
	}
}

// tag is the part of key Redis Cluster hashes: the first {...} with
// something inside.
func tag(key string) string {
	for i := 0; i < len(key); i++ {
		if key[i] == '{' {
			for j := i + 1; j < len(key); j++ {
				if key[j] == '}' {
					if j > i+1 {
						return key[i+1 : j]
					}
					return key
				}
			}
			return key
		}
	}
	return key
}
