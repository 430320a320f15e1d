package redistest

import (
	"context"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// OutOfMemory puts the Redis of rdb at its memory limit, the way a full
// production Redis is: maxmemory-policy noeviction, about 4 MiB of filler
// under prefix, and maxmemory 1 MiB below what Redis then uses, so that it
// refuses every command that may grow its memory ("OOM command not
// allowed when used memory > 'maxmemory'") until free is called. free
// deletes the filler (a DEL is allowed out of memory), which brings the
// memory used well under the limit again. Only for a server of the test's
// own (Start): it changes the server's configuration.
func OutOfMemory(t testing.TB, rdb redis.UniversalClient, prefix string) (free func()) {
	t.Helper()
	ctx := context.Background()
	const fillers, size = 64, 64 << 10
	val := strings.Repeat("x", size)
	keys := make([]string, fillers)
	p := rdb.Pipeline()
	for i := range keys {
		keys[i] = prefix + ":filler:" + strconv.Itoa(i)
		p.Set(ctx, keys[i], val, 0)
	}
	if _, err := p.Exec(ctx); err != nil {
		t.Fatalf("redistest: filling Redis: %v", err)
	}
	used := UsedMemory(t, rdb)
	if err := rdb.ConfigSet(ctx, "maxmemory-policy", "noeviction").Err(); err != nil {
		t.Fatalf("redistest: %v", err)
	}
	if err := rdb.ConfigSet(ctx, "maxmemory", strconv.FormatInt(used-1<<20, 10)).Err(); err != nil {
		t.Fatalf("redistest: %v", err)
	}
	return func() {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := rdb.Del(ctx, keys...).Err(); err != nil {
			t.Fatalf("redistest: freeing memory: %v", err)
		}
	}
}

// UsedMemory is Redis's used_memory (INFO memory), in bytes.
func UsedMemory(t testing.TB, rdb redis.UniversalClient) int64 {
	t.Helper()
	info, err := rdb.Info(context.Background(), "memory").Result()
	if err != nil {
		t.Fatalf("redistest: INFO memory: %v", err)
	}
	for _, line := range strings.Split(info, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "used_memory:"); ok {
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil {
				t.Fatalf("redistest: used_memory %q: %v", v, err)
			}
			return n
		}
	}
	t.Fatalf("redistest: no used_memory in INFO memory")
	return 0
}
