//go:build ignore

// Command mkzip writes an SCF code package: a zip whose entries are the
// given files at the archive root, each executable (mode 0755), with a
// fixed timestamp so the same inputs give the same zip. It needs nothing
// but Go, so `make package` works on a fresh machine.
//
//	go run scripts/mkzip.go -o dist/ingress.zip bin/linux/ingress functions/ingress/scf_bootstrap
package main

import (
	"archive/zip"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"
)

func main() {
	out := flag.String("o", "", "zip file to write")
	flag.Parse()
	if err := write(*out, flag.Args()); err != nil {
		fmt.Fprintln(os.Stderr, "mkzip:", err)
		os.Exit(1)
	}
}

func write(out string, files []string) error {
	if out == "" || len(files) == 0 {
		return errors.New("usage: mkzip -o out.zip file...")
	}
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	seen := map[string]bool{}
	for _, f := range files {
		name := filepath.Base(f)
		if seen[name] {
			return fmt.Errorf("two files named %s", name)
		}
		seen[name] = true
		if err := add(zw, f, name); err != nil {
			return err
		}
	}
	if err := zw.Close(); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return err
	}
	return os.WriteFile(out, buf.Bytes(), 0o644)
}

func add(zw *zip.Writer, path, name string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	h := &zip.FileHeader{
		Name:     name,
		Method:   zip.Deflate,
		Modified: time.Date(2020, 1, 1, 0, 0, 0, 0, time.UTC),
	}
	// Unix mode in the external attributes: SCF unpacks with it, and
	// scf_bootstrap and the binary must be executable.
	h.SetMode(0o755)
	w, err := zw.CreateHeader(h)
	if err != nil {
		return err
	}
	if _, err := io.Copy(w, f); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}
