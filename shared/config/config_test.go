package config

import (
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
