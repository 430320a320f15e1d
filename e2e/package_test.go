package e2e

import (
	"archive/zip"
	"bytes"
	"debug/buildinfo"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
)

// TestPackage builds the SCF code packages with `make package`, checks
// their layout (exactly the binary and scf_bootstrap at the root, both
// executable, the bootstrap a bash script with LF endings), then unzips
// each and starts it through its scf_bootstrap as SCF would, on a free
// port instead of 9000. `make package LEAN=1`'s egress is checked the
// same way, and is seen to be lean (/metrics not built).
func TestPackage(t *testing.T) {
	if _, err := exec.LookPath("make"); err != nil {
		t.Fatal("make is needed to test `make package`")
	}
	redisURL := redistest.URL(t)
	for _, lean := range []bool{false, true} {
		dist := t.TempDir()
		args := []string{"--no-print-directory", "package", "DIST=" + dist}
		fns := []string{"ingress", "egress"}
		if lean {
			args = append(args, "LEAN=1")
			fns = fns[1:] // its ingress is the default one's
		}
		cmd := exec.Command("make", args...)
		cmd.Dir = repoRoot(t)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("make %s: %v\n%s", strings.Join(args[1:], " "), err, out)
		}
		for _, fn := range fns {
			t.Run(fmt.Sprintf("%s lean=%v", fn, lean), func(t *testing.T) {
				dir := t.TempDir()
				unzip(t, filepath.Join(dist, fn+".zip"), dir, []string{fn, "scf_bootstrap"})
				checkBuild(t, filepath.Join(dir, fn), lean)
				if runtime.GOOS != "linux" || runtime.GOARCH != "amd64" {
					t.Skipf("the package is linux/amd64; this is %s/%s", runtime.GOOS, runtime.GOARCH)
				}
				want := 200 // the egress's /metrics; the ingress's too
				if lean {
					want = 404 // not_built
				}
				runBootstrap(t, dir, redisURL, func(base string) error { return httpStatus(base+"/metrics", want) })
			})
		}
	}
}

// checkBuild checks that a packaged binary was built as the Makefile
// means it to be: static linux/amd64, both functions without net/http's
// bundled HTTP/2 (tag nethttpomithttp2), which plain HTTP/1.1 behind the
// gateway never uses and which is 0.35 MB of each binary, and the ingress
// also without gin's MessagePack codec (tag nomsgpack), which it does not
// use and which costs 6 MB and 1.5 ms of start-up. A lean egress also has
// the tag wsrelay_lean, and no inlining (-gcflags=all=-l), which is
// 0.7 MB of its binary and so of its memory (docs/deployment.md).
func checkBuild(t *testing.T, bin string, lean bool) {
	t.Helper()
	bi, err := buildinfo.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	var tags []string
	settings := map[string]string{}
	for _, s := range bi.Settings {
		settings[s.Key] = s.Value
		if s.Key == "-tags" {
			tags = strings.Split(s.Value, ",")
		}
	}
	// SCF runs x86-64 Linux (CentOS 7: an old glibc), so the binary must be
	// linux/amd64 and static, which CGO_ENABLED=0 makes it.
	for k, want := range map[string]string{"GOOS": "linux", "GOARCH": "amd64", "CGO_ENABLED": "0"} {
		if settings[k] != want {
			t.Errorf("%s built with %s=%q, want %q", filepath.Base(bin), k, settings[k], want)
		}
	}
	slices.Sort(tags)
	want := []string{"nethttpomithttp2"}
	if filepath.Base(bin) == "ingress" {
		want = []string{"nethttpomithttp2", "nomsgpack"}
	}
	wantGC := ""
	if lean {
		want = append(want, "wsrelay_lean")
		wantGC = "all=-l"
	}
	if !slices.Equal(tags, want) {
		t.Errorf("%s built with tags %q, want %q", filepath.Base(bin), tags, want)
	}
	if settings["-gcflags"] != wantGC {
		t.Errorf("%s built with -gcflags %q, want %q", filepath.Base(bin), settings["-gcflags"], wantGC)
	}
	if slices.ContainsFunc(bi.Deps, func(m *debug.Module) bool { return m.Path == "github.com/ugorji/go/codec" }) {
		t.Errorf("%s links gin's MessagePack codec", filepath.Base(bin))
	}
	// One of the bundled HTTP/2 server's error messages.
	b, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(b, []byte("http2: invalid header")) {
		t.Errorf("%s links net/http's bundled HTTP/2", filepath.Base(bin))
	}
}

// unzip extracts zipPath into dir, checking it holds exactly want, each
// with the owner's exec bit, and that scf_bootstrap is a LF bash script.
func unzip(t *testing.T, zipPath, dir string, want []string) {
	t.Helper()
	zr, err := zip.OpenReader(zipPath)
	if err != nil {
		t.Fatal(err)
	}
	defer zr.Close()
	var names []string
	for _, f := range zr.File {
		names = append(names, f.Name)
		if f.Mode()&0o100 == 0 {
			t.Errorf("%s: %s has mode %v, want executable", zipPath, f.Name, f.Mode())
		}
		rc, err := f.Open()
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(rc)
		rc.Close()
		if err != nil {
			t.Fatal(err)
		}
		if f.Name == "scf_bootstrap" {
			if !bytes.HasPrefix(b, []byte("#!/bin/bash\n")) {
				t.Errorf("scf_bootstrap does not start with #!/bin/bash and LF: %q", b[:min(len(b), 20)])
			}
			if bytes.ContainsRune(b, '\r') {
				t.Error("scf_bootstrap has CR line endings; SCF cannot start it")
			}
		}
		if err := os.WriteFile(filepath.Join(dir, filepath.Base(f.Name)), b, f.Mode().Perm()); err != nil {
			t.Fatal(err)
		}
	}
	slices.Sort(names)
	slices.Sort(want)
	if !slices.Equal(names, want) {
		t.Fatalf("%s holds %q, want exactly %q at the root", zipPath, names, want)
	}
}

// runBootstrap starts dir/scf_bootstrap as SCF would, from another
// working directory, waits for /healthz, then sends SIGTERM to the process
// it started: through scf_bootstrap's exec, the function itself, which
// must stop as it does on SIGTERM ("stopped", status 0). Without the exec,
// bash would die of the signal and leave the function running. check,
// if not nil, is asked of the running function (its base URL) first.
func runBootstrap(t *testing.T, dir, redisURL string, check func(base string) error) {
	t.Helper()
	port, err := redistest.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	var logs testkit.SyncBuffer
	cmd := exec.Command(filepath.Join(dir, "scf_bootstrap"))
	cmd.Dir = t.TempDir()
	cmd.Env = append(os.Environ(),
		"SCF_PORT_OVERRIDE="+strconv.Itoa(port),
		"REDIS_URL="+redisURL,
		"REDIS_KEY_PREFIX="+redistest.Prefix(t),
		"ALLOW_ANONYMOUS=true",
	)
	cmd.Stdout, cmd.Stderr = &logs, &logs
	// A group of its own, so that the cleanup also ends a function that a
	// bootstrap without exec left behind; and Wait returns when the
	// process it started exits, though such a function holds its output.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-exited
		if t.Failed() {
			t.Logf("logs:\n%s", logs.String())
		}
	})
	testkit.Eventually(t, 20*time.Second, func() error {
		select {
		case err := <-exited:
			exited <- err
			return fmt.Errorf("scf_bootstrap exited: %v", err)
		default:
		}
		return httpStatus("http://127.0.0.1:"+strconv.Itoa(port)+"/healthz", 200)
	})
	if check != nil {
		if err := check("http://127.0.0.1:" + strconv.Itoa(port)); err != nil {
			t.Error(err)
		}
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		exited <- err
		if err != nil {
			t.Fatalf("after SIGTERM: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("still running 20s after SIGTERM")
	}
	if !strings.Contains(logs.String(), `"msg":"stopped"`) {
		t.Fatalf("exited without its stopped line: SIGTERM did not reach the function")
	}
	if httpStatus("http://127.0.0.1:"+strconv.Itoa(port)+"/healthz", 200) == nil {
		t.Fatal("the function still answers after its scf_bootstrap exited")
	}
}
