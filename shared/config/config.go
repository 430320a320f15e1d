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
	for _, name := range Names(cfg) {
		if v := getenv(name); v != "" {
			vars[name] = v
		}
	}
	err := env.ParseWithOptions(cfg, env.Options{Environment: vars})
	if err == nil {
		return nil
	}
	var agg env.AggregateError
	if errors.As(err, &agg) {
		msgs := make([]string, 0, len(agg.Errors))
		for _, e := range agg.Errors {
			msgs = append(msgs, e.Error())
		}
		return fmt.Errorf("configuration: %s", strings.Join(msgs, "; "))
	}
	return fmt.Errorf("configuration: %w", err)
}

// Names lists every environment variable cfg reads, sorted, including
// those of nested structs.
func Names(cfg any) []string {
	var names []string
	collect(reflect.TypeOf(cfg), &names)
	sort.Strings(names)
	return names
}

func collect(t reflect.Type, names *[]string) {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t.Kind() != reflect.Struct {
		return
	}
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		if tag := f.Tag.Get("env"); tag != "" {
			name, _, _ := strings.Cut(tag, ",")
			if name != "" {
				*names = append(*names, name)
				continue
			}
		}
		if f.Type.Kind() == reflect.Struct || (f.Type.Kind() == reflect.Pointer && f.Type.Elem().Kind() == reflect.Struct) {
			collect(f.Type, names)
		}
	}
}
