package e2e

import (
	"bytes"
	"errors"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/wsrelay/wsrelay/shared/redistest"
)

// TestStartFailureExits starts each function on a port that is taken,
// with and without the profiling server (DEBUG_ADDR), which starts first:
// the process must exit non-zero at once, saying why, rather than keep
// running with its profiling port open and its own never served, which a
// supervisor (systemd, SCF) would not see as a failure to restart.
func TestStartFailureExits(t *testing.T) {
	ing, eg := binaries(t)
	taken, err := net.Listen("tcp", ":0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	port := strconv.Itoa(taken.Addr().(*net.TCPAddr).Port)
	redisURL := redistest.URL(t)
	for _, fn := range []struct{ name, bin string }{{"ingress", ing}, {"egress", eg}} {
		for _, debug := range []string{"", "127.0.0.1:0"} {
			t.Run(fn.name+"/DEBUG_ADDR="+debug, func(t *testing.T) {
				var out bytes.Buffer
				cmd := exec.Command(fn.bin)
				cmd.Env = append(os.Environ(), "PORT="+port, "DEBUG_ADDR="+debug, "REDIS_URL="+redisURL,
					"REDIS_KEY_PREFIX="+redistest.Prefix(t), "ALLOW_ANONYMOUS=true", "LOG_FORMAT=json")
				cmd.Stdout, cmd.Stderr = &out, &out
				if err := cmd.Start(); err != nil {
					t.Fatal(err)
				}
				exited := make(chan error, 1)
				go func() { exited <- cmd.Wait() }()
				select {
				case err := <-exited:
					var ee *exec.ExitError
					if !errors.As(err, &ee) || ee.ExitCode() != 1 {
						t.Fatalf("exit: %v, want status 1\n%s", err, out.String())
					}
				case <-time.After(15 * time.Second):
					// Bounded only so that a hang fails rather than stalls:
					// it exits within milliseconds.
					_ = cmd.Process.Kill()
					<-exited
					t.Fatalf("still running 15s after its port was found taken\n%s", out.String())
				}
				if want := fn.name + ": listen: "; !strings.Contains(out.String(), want) || !strings.Contains(out.String(), "address already in use") {
					t.Fatalf("output does not say %q…address already in use:\n%s", want, out.String())
				}
			})
		}
	}
}
