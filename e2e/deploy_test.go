package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"
)

// scfFunction is the part of a Serverless Framework SCF function the
// deployment relies on (component scf inputs, or one multi-scf function).
type scfFunction struct {
	Type           string `yaml:"type"`
	Runtime        string `yaml:"runtime"`
	Timeout        int    `yaml:"timeout"`
	MemorySize     int    `yaml:"memorySize"`
	ProtocolType   string `yaml:"protocolType"`
	ProtocolParams struct {
		WSParams struct {
			IdleTimeOut int `yaml:"idleTimeOut"`
		} `yaml:"wsParams"`
	} `yaml:"protocolParams"`
	Environment struct {
		Variables map[string]string `yaml:"variables"`
	} `yaml:"environment"`
	// multi-scf spells the environment as a list.
	Environments []struct {
		Key   string `yaml:"key"`
		Value string `yaml:"value"`
	} `yaml:"environments"`
	Events []struct {
		APIGW *struct {
			Parameters struct {
				Endpoints []struct {
					Path     string         `yaml:"path"`
					Function map[string]any `yaml:"function"`
				} `yaml:"endpoints"`
			} `yaml:"parameters"`
		} `yaml:"apigw"`
	} `yaml:"events"`
}

func (f scfFunction) env() map[string]string {
	m := map[string]string{}
	for k, v := range f.Environment.Variables {
		m[k] = v
	}
	for _, kv := range f.Environments {
		m[kv.Key] = kv.Value
	}
	return m
}

type serverlessYAML struct {
	Component string `yaml:"component"`
	Inputs    struct {
		scfFunction `yaml:",inline"`
		Functions   map[string]scfFunction `yaml:"functions"` // multi-scf
	} `yaml:"inputs"`
}

func repoRoot(t testing.TB) string {
	t.Helper()
	_, file, _, _ := runtime.Caller(0)
	return filepath.Dir(filepath.Dir(file))
}

// envNames runs `<binary> -env`: the variables the function reads.
func envNames(t testing.TB, bin string) []string {
	t.Helper()
	out, err := exec.Command(bin, "-env").Output()
	if err != nil {
		t.Fatalf("%s -env: %v", bin, err)
	}
	names := strings.Fields(string(out))
	if !slices.Contains(names, "REDIS_URL") || !slices.Contains(names, "PORT") {
		t.Fatalf("%s -env printed %q: REDIS_URL or PORT missing", bin, names)
	}
	return names
}

// TestDeployConfigs checks every YAML file under deploy/ against the
// functions: types, the WebSocket settings of the egress, the timing
// relations SCF needs, and that each environment variable set there is one
// the function actually reads.
func TestDeployConfigs(t *testing.T) {
	ing, eg := binaries(t)
	known := map[string][]string{"ingress": envNames(t, ing), "egress": envNames(t, eg)}

	var files []string
	root := filepath.Join(repoRoot(t), "deploy")
	err := filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		if err == nil && d.IsDir() && d.Name() == "prometheus" {
			return filepath.SkipDir // alerting rules: alerts_test.go
		}
		if err == nil && !d.IsDir() && (strings.HasSuffix(p, ".yml") || strings.HasSuffix(p, ".yaml")) {
			files = append(files, p)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(files) == 0 {
		t.Fatal("no YAML under deploy/")
	}
	seen := map[string]bool{}
	for _, file := range files {
		rel, _ := filepath.Rel(root, file)
		b, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		var doc serverlessYAML
		if err := yaml.Unmarshal(b, &doc); err != nil {
			t.Errorf("%s: %v", rel, err)
			continue
		}
		fns := map[string]scfFunction{}
		switch doc.Component {
		case "scf":
			// The directory names the function: deploy/ingress, deploy/egress.
			fns[strings.Split(filepath.ToSlash(rel), "/")[0]] = doc.Inputs.scfFunction
		case "multi-scf":
			for name, f := range doc.Inputs.Functions {
				fns[name] = f
			}
		default:
			t.Errorf("%s: component %q, want scf or multi-scf", rel, doc.Component)
		}
		for name, f := range fns {
			fn := ""
			for _, k := range []string{"ingress", "egress"} {
				if strings.Contains(name, k) {
					fn = k
				}
			}
			if fn == "" {
				t.Errorf("%s: function %q is neither ingress nor egress", rel, name)
				continue
			}
			seen[fn] = true
			checkFunction(t, rel+" "+name, fn, f, known[fn])
		}
	}
	for _, fn := range []string{"ingress", "egress"} {
		if !seen[fn] {
			t.Errorf("no deployment of the %s under deploy/", fn)
		}
	}
}

func checkFunction(t *testing.T, where, fn string, f scfFunction, known []string) {
	t.Helper()
	if f.Type != "web" {
		t.Errorf("%s: type %q, want web (scf_bootstrap on port 9000)", where, f.Type)
	}
	// SCF's execution timeout is 1–900 s (CreateFunction's Timeout, the
	// quota page, the scf component's configure.md); for a WebSocket it is
	// the connection's lifetime, and a longer one is refused.
	if f.Timeout < 1 || f.Timeout > 900 {
		t.Errorf("%s: timeout %d, want 1–900 s (SCF's execution timeout range)", where, f.Timeout)
	}
	// 64 MB, or 128–3072 MB in steps of 128 (CreateFunction's MemorySize).
	if m := f.MemorySize; m != 0 && m != 64 && (m < 128 || m > 3072 || m%128 != 0) {
		t.Errorf("%s: memorySize %d, want 64 or 128–3072 in steps of 128", where, m)
	}
	for _, ev := range f.Events {
		if ev.APIGW == nil {
			continue
		}
		for _, ep := range ev.APIGW.Parameters.Endpoints {
			// A web function's API must say so, or the toolkit creates the
			// trigger for an event function (functionType EVENT); an
			// integrated response is an event function's reply format.
			if f.Type == "web" && ep.Function["type"] != "web" {
				t.Errorf("%s: apigw endpoint %s: function.type %v, want web", where, ep.Path, ep.Function["type"])
			}
			if _, ok := ep.Function["isIntegratedResponse"]; ok && f.Type == "web" {
				t.Errorf("%s: apigw endpoint %s: isIntegratedResponse is for event functions", where, ep.Path)
			}
		}
	}
	env := f.env()
	for k := range env {
		if !slices.Contains(known, k) {
			t.Errorf("%s: environment variable %s is not read by the %s (%s -env)", where, k, fn, fn)
		}
	}
	if _, ok := env["PORT"]; ok {
		t.Errorf("%s: PORT must not be set: SCF requires 9000, which scf_bootstrap sets", where)
	}
	dur := func(k string) (time.Duration, bool) {
		v, ok := env[k]
		if !ok {
			return 0, false
		}
		d, err := time.ParseDuration(v)
		if err != nil {
			t.Errorf("%s: %s=%q: %v", where, k, v, err)
			return 0, false
		}
		return d, true
	}
	switch fn {
	case "ingress":
		if f.ProtocolType != "" && f.ProtocolType != "HTTP" {
			t.Errorf("%s: protocolType %q, want HTTP", where, f.ProtocolType)
		}
	case "egress":
		if f.ProtocolType != "WS" {
			t.Errorf("%s: protocolType %q, want WS", where, f.ProtocolType)
		}
		// 1–600 s on the WebSocket page; the API's WSParams says 1–1800.
		// Within the narrower range both accept it.
		idle := f.ProtocolParams.WSParams.IdleTimeOut
		if idle < 1 || idle > 600 {
			t.Errorf("%s: protocolParams.wsParams.idleTimeOut %d, want 1–600 s", where, idle)
		}
		if f.Timeout < idle {
			t.Errorf("%s: timeout %d < idleTimeOut %d: SCF refuses it", where, f.Timeout, idle)
		}
		platformIdle := time.Duration(idle) * time.Second
		if d, ok := dur("IDLE_TIMEOUT"); ok && (d <= 0 || d >= platformIdle) {
			t.Errorf("%s: IDLE_TIMEOUT %s must be below idleTimeOut %s, so the egress closes first with 4000", where, d, platformIdle)
		}
		lifetime := time.Duration(f.Timeout) * time.Second
		if d, ok := dur("MAX_LIFETIME"); ok && (d <= 0 || d >= lifetime) {
			t.Errorf("%s: MAX_LIFETIME %s must be below timeout %s, so the egress closes first with 4001", where, d, lifetime)
		}
	}
	t.Logf("%s: %s, %d env vars, timeout %ds", where, fn, len(env), f.Timeout)
}

// TestREADMEListsEveryVariable keeps the README's configuration table in
// step with the functions: each variable they read must appear in it.
func TestREADMEListsEveryVariable(t *testing.T) {
	ing, eg := binaries(t)
	b, err := os.ReadFile(filepath.Join(repoRoot(t), "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	readme := string(b)
	for _, bin := range []string{ing, eg} {
		for _, name := range envNames(t, bin) {
			if !strings.Contains(readme, "`"+name+"`") {
				t.Errorf("README.md's configuration table does not list %s (%s -env)", name, filepath.Base(bin))
			}
		}
	}
}
