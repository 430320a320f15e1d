package e2e

import (
	"cmp"
	"fmt"
	"maps"
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
	Events []scfEvent `yaml:"events"`
}

// scfEvent is one trigger of a function: the two kinds a web function can
// be reached through, and any other kind by name.
type scfEvent struct {
	// An API Gateway trigger (retired by Tencent for new accounts:
	// docs/deployment.md).
	APIGW *struct {
		Parameters struct {
			Endpoints []struct {
				Path     string         `yaml:"path"`
				Function map[string]any `yaml:"function"`
			} `yaml:"endpoints"`
		} `yaml:"parameters"`
	} `yaml:"apigw"`
	// A function URL: the toolkit (serverless-tencent/tencent-component-
	// toolkit, src/modules/triggers/http.ts) creates it as CreateTrigger
	// Type "http" with these parameters.
	HTTP *struct {
		Parameters struct {
			NetConfig struct {
				EnableIntranet *bool `yaml:"enableIntranet"`
				EnableExtranet *bool `yaml:"enableExtranet"`
			} `yaml:"netConfig"`
			Qualifier string `yaml:"qualifier"`
			AuthType  string `yaml:"authType"`
		} `yaml:"parameters"`
	} `yaml:"http"`
	Other map[string]any `yaml:",inline"`
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
// functions: types, triggers (a public function URL), the WebSocket
// settings of the egress, the timing relations SCF needs, and that each
// environment variable set there is one the function actually reads.
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
	if f.Type == "web" {
		for _, p := range triggerProblems(f) {
			t.Errorf("%s: %s", where, p)
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
		// The idle check runs every second: its close comes up to a
		// second after IDLE_TIMEOUT (docs/protocol.md, Timeouts).
		if d, ok := dur("IDLE_TIMEOUT"); ok && (d <= 0 || d > platformIdle-time.Second) {
			t.Errorf("%s: IDLE_TIMEOUT %s must be at least a second below idleTimeOut %s, so the egress closes first with 4000", where, d, platformIdle)
		}
		lifetime := time.Duration(f.Timeout) * time.Second
		if d, ok := dur("MAX_LIFETIME"); ok && (d <= 0 || d >= lifetime) {
			t.Errorf("%s: MAX_LIFETIME %s must be below timeout %s, so the egress closes first with 4001", where, d, lifetime)
		}
	}
	t.Logf("%s: %s, %d env vars, timeout %ds", where, fn, len(env), f.Timeout)
}

// triggerProblems checks a web function's triggers: each is a function URL
// or an API Gateway trigger, and there is a function URL anyone can reach,
// the default now that new API Gateway triggers need a ticket
// (docs/deployment.md).
func triggerProblems(f scfFunction) []string {
	var problems []string
	urls := map[string]bool{} // qualifiers with a function URL
	for i, ev := range f.Events {
		kinds := slices.Sorted(maps.Keys(ev.Other))
		if ev.APIGW != nil {
			kinds = append(kinds, "apigw")
		}
		if ev.HTTP != nil {
			kinds = append(kinds, "http")
		}
		if len(kinds) != 1 || (ev.APIGW == nil && ev.HTTP == nil) {
			problems = append(problems, fmt.Sprintf("event %d is %v, want one http (function URL) or apigw trigger", i, kinds))
			continue
		}
		if ev.APIGW != nil {
			for _, ep := range ev.APIGW.Parameters.Endpoints {
				// A web function's API must say so, or the toolkit creates
				// the trigger for an event function (functionType EVENT);
				// an integrated response is an event function's reply
				// format.
				if ep.Function["type"] != "web" {
					problems = append(problems, fmt.Sprintf("apigw endpoint %s: function.type %v, want web", ep.Path, ep.Function["type"]))
				}
				if _, ok := ep.Function["isIntegratedResponse"]; ok {
					problems = append(problems, fmt.Sprintf("apigw endpoint %s: isIntegratedResponse is for event functions", ep.Path))
				}
			}
			continue
		}
		p := ev.HTTP.Parameters
		q := cmp.Or(p.Qualifier, "$DEFAULT") // the toolkit's default
		if urls[q] {
			problems = append(problems, fmt.Sprintf("two http events for %s: SCF allows one function URL per alias or version", q))
		}
		urls[q] = true
		// The toolkit sends false when it is unset: no public URL.
		if e := p.NetConfig.EnableExtranet; e == nil || !*e {
			problems = append(problems, "http: netConfig.enableExtranet must be true, or the function URL is not public")
		}
		switch p.AuthType {
		case "", "NONE": // the toolkit's default is NONE
		case "CAM":
			problems = append(problems, "http: authType CAM makes every caller sign with Tencent credentials, which browsers and the clients cannot; the functions check keys and tokens themselves: use NONE")
		default:
			problems = append(problems, fmt.Sprintf("http: authType %q, want NONE (SCF knows NONE and CAM)", p.AuthType))
		}
	}
	if len(urls) == 0 {
		problems = append(problems, "no http event: the function URL is the default trigger (new API Gateway triggers need a ticket: docs/deployment.md)")
	}
	return problems
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

func TestTriggerProblems(t *testing.T) {
	const url = `
    - http:
        parameters:
          netConfig: {enableIntranet: false, enableExtranet: true}
          qualifier: $DEFAULT
          authType: NONE`
	const apigw = `
    - apigw:
        parameters:
          endpoints:
            - path: /
              method: ANY
              function: {type: web}`
	for _, c := range []struct {
		name, events string
		want         string // a problem containing this; "" for none
	}{
		{"function URL", url, ""},
		{"function URL and API Gateway", url + apigw, ""},
		{"defaults but public", `
    - http:
        parameters:
          netConfig: {enableExtranet: true}`, ""},
		{"API Gateway only", apigw, "no http event"},
		{"no events", ``, "no http event"},
		{"extranet unset", `
    - http:
        parameters:
          qualifier: $DEFAULT`, "enableExtranet"},
		{"extranet off", `
    - http:
        parameters:
          netConfig: {enableIntranet: true, enableExtranet: false}`, "enableExtranet"},
		{"CAM", `
    - http:
        parameters:
          netConfig: {enableExtranet: true}
          authType: CAM`, "CAM"},
		{"unknown auth", `
    - http:
        parameters:
          netConfig: {enableExtranet: true}
          authType: OPEN`, `"OPEN"`},
		{"two URLs on one alias", url + `
    - http:
        parameters:
          netConfig: {enableExtranet: true}`, "one function URL per alias"},
		{"other trigger", url + `
    - timer:
        parameters:
          cronExpression: '*/5 * * * * * *'`, "timer"},
		{"empty event", url + `
    - http:`, "event 1"},
		{"API Gateway for an event function", url + `
    - apigw:
        parameters:
          endpoints:
            - path: /
              method: ANY`, "function.type"},
		{"integrated response", url + `
    - apigw:
        parameters:
          endpoints:
            - path: /
              method: ANY
              function: {type: web, isIntegratedResponse: true}`, "isIntegratedResponse"},
	} {
		t.Run(c.name, func(t *testing.T) {
			var f scfFunction
			if err := yaml.Unmarshal([]byte("type: web\nevents:"+c.events+"\n"), &f); err != nil {
				t.Fatal(err)
			}
			got := triggerProblems(f)
			if c.want == "" {
				if len(got) != 0 {
					t.Errorf("problems %q, want none", got)
				}
				return
			}
			if !slices.ContainsFunc(got, func(p string) bool { return strings.Contains(p, c.want) }) {
				t.Errorf("problems %q, want one naming %q", got, c.want)
			}
		})
	}
}
