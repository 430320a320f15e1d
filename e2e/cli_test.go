package e2e

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/wsrelay/wsrelay/shared/redistest"
)

// TestCommandLine runs each binary as an operator would on a host whose
// environment already holds a working configuration (the systemd env
// file loaded, as docs/deployment.md does to try a unit without systemd):
// `-env` (README.md) and its GNU spelling `--env` print the variable
// names, `-h`/`--help` print the usage, and any other argument is refused
// naming it. None of them may start serving: an argument the function
// does not know must never be taken as "run".
func TestCommandLine(t *testing.T) {
	ing, eg := binaries(t)
	redisURL := redistest.URL(t)
	for fn, bin := range map[string]string{"ingress": ing, "egress": eg} {
		t.Run(fn, func(t *testing.T) {
			names := envNames(t, bin)
			port, err := redistest.FreePort()
			if err != nil {
				t.Fatal(err)
			}
			env := append(os.Environ(),
				"PORT="+strconv.Itoa(port),
				"REDIS_URL="+redisURL,
				"REDIS_KEY_PREFIX="+redistest.Prefix(t),
				"ALLOW_ANONYMOUS=true",
			)
			run := func(args ...string) (stdout, stderr string, code int) {
				t.Helper()
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				cmd := exec.CommandContext(ctx, bin, args...)
				cmd.Env = env
				var o, e bytes.Buffer
				cmd.Stdout, cmd.Stderr = &o, &e
				err := cmd.Run()
				if ctx.Err() != nil {
					t.Fatalf("%s %s: still running after 5s (it started serving):\n%s%s", fn, strings.Join(args, " "), o.String(), e.String())
				}
				var ee *exec.ExitError
				if err != nil && !errors.As(err, &ee) {
					t.Fatalf("%s %s: %v", fn, strings.Join(args, " "), err)
				}
				return o.String(), e.String(), cmd.ProcessState.ExitCode()
			}
			for _, flag := range []string{"-env", "--env"} {
				out, errOut, code := run(flag)
				if code != 0 || !slices.Equal(strings.Fields(out), names) || errOut != "" {
					t.Errorf("%s %s: status %d, stdout %q, stderr %q; want status 0 and the names of -env", fn, flag, code, out, errOut)
				}
			}
			for _, flag := range []string{"-h", "-help", "--help"} {
				out, _, code := run(flag)
				if code != 0 || !strings.Contains(out, "Usage: "+fn) || !strings.Contains(out, "-env") {
					t.Errorf("%s %s: status %d, stdout %q; want status 0 and a usage naming -env", fn, flag, code, out)
				}
			}
			for _, args := range [][]string{{"-envs"}, {"serve"}, {"-env", "extra"}, {"-port=8080"}} {
				out, errOut, code := run(args...)
				bad := strings.Join(args, " ")
				if code != 2 || out != "" || !strings.Contains(errOut, fn+": ") || !strings.Contains(errOut, strconv.Quote(bad)) || !strings.Contains(errOut, "-env") {
					t.Errorf("%s %s: status %d, stdout %q, stderr %q; want status 2 and an error naming %q and -env", fn, strings.Join(args, " "), code, out, errOut, bad)
				}
			}
		})
	}
}
