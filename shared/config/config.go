// Package config loads a function's settings from its environment.
//
// The environment variable names live in the struct tags of each function's
// Config type and nowhere else: deploy/ is checked against them by a test
// (see Names), so the two cannot drift apart.
package config

import (
	"errors"
	"fmt"
	"reflect"
	"sort"
	"strings"

	"github.com/caarlos0/env/v11"
)

// Load fills cfg (a pointer to a struct with `env` tags) from getenv and
// reports every bad or missing variable in one error.
func Load(getenv func(string) string, cfg any) error {
	vars := make(map[string]string)
	var unresolved []string
	for _, name := range Names(cfg) {
		if v := getenv(name); v != "" {
			vars[name] = v
			if placeholder(v) {
				unresolved = append(unresolved, name)
			}
		}
	}
	if len(unresolved) > 0 {
		// Named, never shown: the value may be a secret after all.
		return fmt.Errorf("configuration: %s: the value holds an unresolved ${…} variable of a deploy file (a ${env:X} left as it is, X not being set where the deploy ran); set it there, or here", strings.Join(unresolved, ", "))
	}
	err := env.ParseWithOptions(cfg, env.Options{Environment: vars})
	if err == nil {
		return nil
	}
	var agg env.AggregateError
	if errors.As(err, &agg) {
		msgs := make([]string, 0, len(agg.Errors))
		for _, e := range agg.Errors {
			msgs = append(msgs, describe(cfg, e))
		}
		return fmt.Errorf("configuration: %s", strings.Join(msgs, "; "))
	}
	return fmt.Errorf("configuration: %w", err)
}

// placeholder reports a value holding "${…}": a deploy file's variable
// that was not resolved (serverless.yml's ${env:JWT_SECRET} with
// JWT_SECRET unset where it was deployed), which no setting of ours
// means. Taken as it is, it would be a JWT secret or an API key anyone
// can read in the repository.
func placeholder(v string) bool {
	i := strings.Index(v, "${")
	return i >= 0 && strings.Contains(v[i+2:], "}")
}

// Join reports errs (nil ones skipped) as one error, nil if there are
// none. Its message is one line, the errors separated by "; ": errors.Join
// puts each on a line of its own, and a platform that logs stderr line by
// line (SCF) would split them into separate records, only the first
// saying what they are about.
func Join(errs ...error) error {
	var j joined
	for _, e := range errs {
		if e != nil {
			j = append(j, e)
		}
	}
	if len(j) == 0 {
		return nil
	}
	return j
}

type joined []error

func (j joined) Error() string {
	msgs := make([]string, len(j))
	for i, e := range j {
		msgs[i] = e.Error()
	}
	return strings.Join(msgs, "; ")
}

func (j joined) Unwrap() []error { return j }

// describe names the variable behind a parse error (the library names
// only the Go field), so the operator knows what to fix.
func describe(cfg any, err error) string {
	var pe env.ParseError
	if !errors.As(err, &pe) {
		return err.Error()
	}
	var names []string
	eachVar(reflect.TypeOf(cfg), func(field, name string) {
		if field == pe.Name {
			names = append(names, name)
		}
	})
	if len(names) != 1 {
		return err.Error()
	}
	return fmt.Sprintf("%s: %v", names[0], pe.Err)
}

// Names lists every environment variable cfg reads, sorted, including
// those of nested structs.
func Names(cfg any) []string {
	var names []string
	eachVar(reflect.TypeOf(cfg), func(_, name string) { names = append(names, name) })
	sort.Strings(names)
	return names
}

// eachVar calls fn with the Go field name and the variable name of every
// field of t (a struct, or a pointer to one) that has an `env` tag,
// descending into untagged struct fields.
func eachVar(t reflect.Type, fn func(field, name string)) {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t.Kind() != reflect.Struct {
		return
	}
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		if name, _, _ := strings.Cut(f.Tag.Get("env"), ","); name != "" {
			fn(f.Name, name)
			continue
		}
		eachVar(f.Type, fn)
	}
}
