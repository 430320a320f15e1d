package config

import (
	"errors"
	"fmt"
	"reflect"
	"strings"
	"testing"
	"time"
)

type inner struct {
	Timeout time.Duration `env:"INNER_TIMEOUT" envDefault:"1s"`
	Name    string        `env:"INNER_NAME"`
}

type other struct {
	Level string `env:"OTHER_LEVEL"`
}

type sample struct {
	Port  int  `env:"PORT" envDefault:"9000"`
	Debug bool `env:"DEBUG"`
	Inner inner
	Ptr   *other
	Size  int64 `env:"SIZE,required"`
}

func TestLoad(t *testing.T) {
	t.Parallel()
	env := map[string]string{"SIZE": "5", "DEBUG": "true", "INNER_TIMEOUT": "2m"}
	var c sample
	if err := Load(func(k string) string { return env[k] }, &c); err != nil {
		t.Fatal(err)
	}
	if c.Port != 9000 || !c.Debug || c.Size != 5 || c.Inner.Timeout != 2*time.Minute {
		t.Fatalf("loaded %+v", c)
	}
}

// Load reports every bad or missing variable in one error, by variable
// name.
func TestLoadAggregates(t *testing.T) {
	t.Parallel()
	env := map[string]string{"PORT": "nine", "DEBUG": "maybe", "INNER_TIMEOUT": "soon"}
	var c sample
	err := Load(func(k string) string { return env[k] }, &c)
	if err == nil {
		t.Fatal("no error")
	}
	msg := err.Error()
	for _, want := range []string{"PORT", "DEBUG", "INNER_TIMEOUT", "SIZE"} {
		if !strings.Contains(msg, want) {
			t.Errorf("error %q does not name %s", msg, want)
		}
	}
	if !strings.HasPrefix(msg, "configuration: ") || strings.Count(msg, ";") != 3 {
		t.Errorf("error %q is not four errors in one", msg)
	}
}

// Variables cfg does not declare are never read.
func TestLoadReadsOnlyDeclared(t *testing.T) {
	t.Parallel()
	var read []string
	var c sample
	_ = Load(func(k string) string { read = append(read, k); return "" }, &c)
	if !reflect.DeepEqual(read, Names(&c)) {
		t.Fatalf("read %v, want %v", read, Names(&c))
	}
}

func TestNames(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		cfg  any
		want []string
	}{
		{"nested and pointer", &sample{}, []string{"DEBUG", "INNER_NAME", "INNER_TIMEOUT", "OTHER_LEVEL", "PORT", "SIZE"}},
		{"value", inner{}, []string{"INNER_NAME", "INNER_TIMEOUT"}},
		{"not a struct", 3, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := Names(tc.cfg); !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("Names = %v, want %v", got, tc.want)
			}
		})
	}
}

// A value that is a deploy file's variable left unresolved (the Serverless
// Framework's ${env:X} for an X not set where it ran) is refused, naming
// the variable but not its value: a JWT_SECRET of "${env:JWT_SECRET}"
// would be a secret anyone can read in the repository.
func TestLoadRefusesUnresolvedPlaceholders(t *testing.T) {
	t.Parallel()
	for _, v := range []string{"${env:INNER_NAME}", "redis://${env:REDIS_HOST}:6379", "${ssm:/wsrelay/secret}"} {
		env := map[string]string{"SIZE": "5", "INNER_NAME": v}
		var c sample
		err := Load(func(k string) string { return env[k] }, &c)
		if err == nil || !strings.Contains(err.Error(), "INNER_NAME") || strings.Contains(err.Error(), v) {
			t.Errorf("%q: %v, want an error naming INNER_NAME without the value", v, err)
		}
	}
	// A $ alone, or braces without it, are ordinary characters.
	for _, v := range []string{"pa$$word", "{x}", "$x}"} {
		env := map[string]string{"SIZE": "5", "INNER_NAME": v}
		var c sample
		if err := Load(func(k string) string { return env[k] }, &c); err != nil || c.Inner.Name != v {
			t.Errorf("%q: %v, %q", v, err, c.Inner.Name)
		}
	}
}

// A value that does not parse is a *ParseError naming it, and the rest of
// the configuration is loaded (that variable at its default), so that the
// caller can check the other values' ranges and report them in the same
// error.
func TestLoadParseErrorKeepsTheRest(t *testing.T) {
	t.Parallel()
	env := map[string]string{"SIZE": "5", "PORT": "nine", "INNER_TIMEOUT": "2m", "INNER_NAME": "x"}
	var c sample
	err := Load(func(k string) string { return env[k] }, &c)
	pe, ok := errors.AsType[*ParseError](err)
	if !ok || len(pe.Errs) != 1 || !strings.HasPrefix(pe.Errs[0].Error(), "PORT: ") || !strings.HasPrefix(err.Error(), "configuration: PORT: ") {
		t.Fatalf("error %#v, want a *ParseError naming PORT", err)
	}
	if c.Port != 9000 || c.Size != 5 || c.Inner.Timeout != 2*time.Minute || c.Inner.Name != "x" {
		t.Fatalf("loaded %+v, want the other values and PORT's default", c)
	}
	// A missing required variable is not a value that does not parse.
	delete(env, "SIZE")
	err = Load(func(k string) string { return env[k] }, &c)
	if _, ok := errors.AsType[*ParseError](err); ok || err == nil || !strings.Contains(err.Error(), "PORT") || !strings.Contains(err.Error(), "SIZE") {
		t.Fatalf("with SIZE missing: %v, want a plain error naming PORT and SIZE", err)
	}
}

// LoadAll hands the values that do not parse back as errors to join with
// the caller's, and any other failure as the error.
func TestLoadAll(t *testing.T) {
	t.Parallel()
	env := map[string]string{"SIZE": "5", "PORT": "nine", "INNER_NAME": "x"}
	var c sample
	errs, err := LoadAll(func(k string) string { return env[k] }, &c)
	if err != nil || len(errs) != 1 || !strings.HasPrefix(errs[0].Error(), "PORT: ") || c.Port != 9000 || c.Size != 5 || c.Inner.Name != "x" {
		t.Fatalf("errs %v, err %v, loaded %+v; want PORT's error, its default and the rest", errs, err, c)
	}
	env["PORT"] = "8080"
	if errs, err := LoadAll(func(k string) string { return env[k] }, &c); errs != nil || err != nil || c.Port != 8080 {
		t.Fatalf("valid: errs %v, err %v, port %d", errs, err, c.Port)
	}
	delete(env, "SIZE")
	env["PORT"] = "nine"
	if errs, err := LoadAll(func(k string) string { return env[k] }, &c); errs != nil || err == nil || !strings.Contains(err.Error(), "SIZE") {
		t.Fatalf("with SIZE missing: errs %v, err %v, want only an error naming SIZE", errs, err)
	}
}

func TestAtMost(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		err  error
		want string
	}{
		{AtMost("PING_INTERVAL", 24*time.Hour, 24*time.Hour), ""},
		{AtMost("PING_INTERVAL", 24*time.Hour+1, 24*time.Hour), "PING_INTERVAL must be at most 24h"},
		{AtMost("PUBLISH_WAIT_TIMEOUT", 2*time.Minute, time.Minute), "PUBLISH_WAIT_TIMEOUT must be at most 1m"},
		{AtMost("REDIS_TIMEOUT", 2*time.Second, 1500*time.Millisecond), "REDIS_TIMEOUT must be at most 1.5s"},
		{AtMost("SHUTDOWN_GRACE", time.Minute, 10*time.Second), "SHUTDOWN_GRACE must be at most 10s"},
		{AtMost("IDLE_TIMEOUT", 25*time.Hour, 90*time.Minute), "IDLE_TIMEOUT must be at most 1h30m"},
		{AtMost("SEND_QUEUE", 1000001, 1000000), "SEND_QUEUE must be at most 1000000"},
		{AtMost("HISTORY_SIZE", int64(-1), 10), ""},
	} {
		if got := fmt.Sprint(tc.err); (tc.want == "" && tc.err != nil) || (tc.want != "" && got != tc.want) {
			t.Errorf("got %v, want %q", tc.err, tc.want)
		}
	}
}
