// Command upgrade checks that instances of an older release and a newer
// one can share Redis during a rolling deploy, as docs/deployment.md
// ("Upgrading: old and new instances side by side") says: it runs the
// old and the new ingress and egress binaries side by side on one
// throwaway redis-server, under one key prefix, and checks six mixes
// for anything lost, duplicated or misrouted:
//
//	old-egress+new-ingress  sockets on an old egress; publishes, batches,
//	                        sends to a user and to a connection, history
//	                        and registry reads through a new ingress
//	new-egress+old-ingress  the same the other way round
//	catch-up-old-egress     sockets on an old egress, which is stopped
//	                        and its Pub/Sub connection killed in Redis
//	                        while a new ingress publishes and sends to a
//	                        user and to a connection: once continued, it
//	                        reads them from the channels' streams and its
//	                        inbox stream (the notifications reached nobody)
//	catch-up-new-egress     the same the other way round
//	drain-old-to-new        clients of an old egress drained (SIGTERM,
//	                        close 1001) resume on a new one, recovered and
//	                        exactly once, while both ingresses publish
//	idempotency             an Idempotency-Key publish and batch answered
//	                        by one release and retried on the other (both
//	                        ways): written once, the retry replayed; and
//	                        the retry after a reply record was lost
//
// make upgrade-check BASE=<git ref> builds the old binaries from BASE and
// the new ones from the checkout, as the Makefile's build target does,
// and passes their directories as -old and -new. It exits non-zero when
// a check fails, and prints what each process logged at warn or above.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/wsrelay/wsrelay/bench/harness"
)

func main() { harness.Main("upgrade", run) }

// config is the run's shape, from the flags.
type config struct {
	oldDir, newDir string // each holding ingress and egress
	oldName        string // what the old release is called in the report
	newName        string
}

func parse(args []string, stderr io.Writer) (config, error) {
	var c config
	fs := flag.NewFlagSet("upgrade", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&c.oldDir, "old", "", "directory of the old release's ingress and egress binaries (required)")
	fs.StringVar(&c.newDir, "new", "", "directory of the new release's ingress and egress binaries (required)")
	fs.StringVar(&c.oldName, "old-name", "old", "the old release's name in the report (e.g. its commit)")
	fs.StringVar(&c.newName, "new-name", "new", "the new release's name in the report")
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if c.oldDir == "" || c.newDir == "" {
		return c, errors.New("-old and -new are required (make upgrade-check builds them)")
	}
	for _, d := range []string{c.oldDir, c.newDir} {
		for _, f := range []string{"ingress", "egress"} {
			if _, err := os.Stat(filepath.Join(d, f)); err != nil {
				return c, fmt.Errorf("no %s binary: %w", f, err)
			}
		}
	}
	return c, nil
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) (err error) {
	defer func() {
		if p := recover(); p != nil {
			harness.Kids.StopAll()
			err = fmt.Errorf("panic: %v", p)
		}
	}()
	cfg, err := parse(args, stderr)
	if err != nil {
		return err
	}
	logDir, err := os.MkdirTemp("", "wsrelay-upgrade-")
	if err != nil {
		return err
	}
	u := &upgrade{cfg: cfg, env: &harness.Env{LogDir: logDir}, stderr: stderr}
	u.logf("logs in %s; old: %s (%s), new: %s (%s)", logDir, cfg.oldName, cfg.oldDir, cfg.newName, cfg.newDir)
	if err := u.env.StartRedis(); err != nil {
		return err
	}
	defer harness.Kids.Stop(u.env.Redis)
	defer u.env.RDB.Close()
	defer u.stopAll()
	if err := u.start(); err != nil {
		return err
	}
	results := u.runAll(ctx)
	if ctx.Err() != nil {
		return fmt.Errorf("stopped: %w", context.Cause(ctx))
	}
	u.stopAll() // so that every line of the logs is written
	failed := report(stdout, cfg, results, logDir)
	if failed > 0 {
		return fmt.Errorf("%d of %d scenarios failed (above); logs in %s", failed, len(results), logDir)
	}
	return nil
}
