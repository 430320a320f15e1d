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
	"time"

	"github.com/caarlos0/env/v11"
)

// Load fills cfg (a pointer to a struct with `env` tags) from getenv and
// reports every bad or missing variable in one error.
//
// When the only errors are values that do not parse, the error is a
// *ParseError and cfg holds every other value as given and those
// variables' defaults: the caller can go on checking the ranges of the
// rest and report them together, so that an operator who fixes one
// mistake does not restart to meet the next.
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
		var errs []error
		unparsed := true // every error is a value that does not parse
		for _, e := range agg.Errors {
			errs = append(errs, errors.New(describe(cfg, e)))
			if name := varOf(cfg, e); name != "" {
				delete(vars, name)
			} else {
				unparsed = false
			}
		}
		// Again without them: cfg is left with their defaults, not the
		// zero values the failed parse left there.
		if unparsed && env.ParseWithOptions(cfg, env.Options{Environment: vars}) == nil {
			return &ParseError{Errs: errs}
		}
		return fmt.Errorf("configuration: %w", Join(errs...))
	}
	return fmt.Errorf("configuration: %w", err)
}

// ParseError is Load's error when some values do not parse: Errs has one
// error per variable, naming it. The configuration loaded holds the
// defaults of those variables.
type ParseError struct {
	Errs []error
}

func (e *ParseError) Error() string { return "configuration: " + Join(e.Errs...).Error() }

// Unwrap returns Errs.
func (e *ParseError) Unwrap() []error { return e.Errs }

// LoadAll is Load for a caller that checks the values' ranges next and
// reports every error at once. The values that do not parse come back
// as errs, one per variable (which cfg holds at its default), for the
// caller to join with its own; err is a failure that leaves nothing to
// check (an unresolved ${…}, a missing required variable), to be
// returned as it is.
func LoadAll(getenv func(string) string, cfg any) (errs []error, err error) {
	err = Load(getenv, cfg)
	if pe, ok := errors.AsType[*ParseError](err); ok {
		return pe.Errs, nil
	}
	return nil, err
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
	name := varOf(cfg, err)
	if name == "" {
		return err.Error()
	}
	var pe env.ParseError
	errors.As(err, &pe)
	return fmt.Sprintf("%s: %v", name, pe.Err)
}

// varOf is the variable whose value err says does not parse, or "" when
// err is another error or the field cannot be told apart.
func varOf(cfg any, err error) string {
	var pe env.ParseError
	if !errors.As(err, &pe) {
		return ""
	}
	var names []string
	eachVar(reflect.TypeOf(cfg), func(field, name string) {
		if field == pe.Name {
			names = append(names, name)
		}
	})
	if len(names) != 1 {
		return ""
	}
	return names[0]
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

// AtMost is the error for the variable name, whose value v is above max
// ("NAME must be at most 24h"), or nil. The functions bound every
// duration and count from above, far beyond any real deployment's value,
// so that what they derive from it (twice an interval, a grace plus a
// timeout) cannot overflow and turn negative.
func AtMost[T ~int | ~int64](name string, v, max T) error {
	if v <= max {
		return nil
	}
	s := fmt.Sprint(max)
	if d, ok := any(max).(time.Duration); ok {
		s = Duration(d)
	}
	return fmt.Errorf("%s must be at most %s", name, s)
}

// Duration is d as the README writes a bound: 24h and 1m, not 24h0m0s
// and 1m0s.
func Duration(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}
