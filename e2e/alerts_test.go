package e2e

import (
	"bufio"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/wsrelay/wsrelay/shared/redistest"
)

// alertRules is the part of a Prometheus rule file the test checks.
type alertRules struct {
	Groups []struct {
		Name  string `yaml:"name"`
		Rules []struct {
			Alert       string            `yaml:"alert"`
			Expr        string            `yaml:"expr"`
			For         string            `yaml:"for"`
			Labels      map[string]string `yaml:"labels"`
			Annotations map[string]string `yaml:"annotations"`
		} `yaml:"rules"`
	} `yaml:"groups"`
}

// exported scrapes url's /metrics: the names of the series it exports
// (a histogram's with _bucket, _sum and _count).
func exported(t *testing.T, url string, into map[string]bool) {
	t.Helper()
	resp, err := http.Get(url + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("%s/metrics: %d", url, resp.StatusCode)
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 4 && f[0] == "#" && f[1] == "TYPE" {
			into[f[2]] = true
			if f[3] == "histogram" || f[3] == "summary" {
				for _, s := range []string{"_bucket", "_sum", "_count"} {
					into[f[2]+s] = true
				}
			}
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
}

// TestAlertRules checks deploy/prometheus/wsrelay-alerts.yml against the
// real functions: every metric its expressions name is one the ingress or
// the egress exports (a renamed metric would leave an alert that never
// fires), and each rule has what an operator's routing needs (a unique
// name, a severity, a summary, a valid for). Its PromQL was checked with
// Prometheus's own rule parser (model/rulefmt) when written; the
// Prometheus module is not a dependency here, so that check is not
// repeated (docs/metrics.md).
func TestAlertRules(t *testing.T) {
	e := env{
		"REDIS_URL":        redistest.URL(t),
		"REDIS_KEY_PREFIX": redistest.Prefix(t),
		"ALLOW_ANONYMOUS":  "true",
	}
	ing, eg := start(t, "ingress", e), start(t, "egress", e)
	// A labelled family is exported once it has a series: one publish.
	if code := post(t, ing.URL+"/v1/channels/alerts/messages", map[string]any{"data": 1}, nil); code != http.StatusAccepted {
		t.Fatalf("publish: %d", code)
	}
	names := map[string]bool{}
	exported(t, ing.URL, names)
	exported(t, eg.URL, names)

	b, err := os.ReadFile(filepath.Join(repoRoot(t), "deploy", "prometheus", "wsrelay-alerts.yml"))
	if err != nil {
		t.Fatal(err)
	}
	var rules alertRules
	dec := yaml.NewDecoder(strings.NewReader(string(b)))
	dec.KnownFields(true)
	if err := dec.Decode(&rules); err != nil {
		t.Fatal(err)
	}
	metric := regexp.MustCompile(`\b(?:wsrelay|process|go)_[a-z_]+\b`)
	seen := map[string]bool{}
	n := 0
	for _, g := range rules.Groups {
		for _, r := range g.Rules {
			n++
			if r.Alert == "" || seen[r.Alert] {
				t.Errorf("rule %d of %s: alert name %q empty or repeated", n, g.Name, r.Alert)
			}
			seen[r.Alert] = true
			if strings.Count(r.Expr, "(") != strings.Count(r.Expr, ")") {
				t.Errorf("%s: unbalanced parentheses in %q", r.Alert, r.Expr)
			}
			used := metric.FindAllString(r.Expr, -1)
			if len(used) == 0 {
				t.Errorf("%s: no metric in %q", r.Alert, r.Expr)
			}
			for _, m := range used {
				if !names[m] {
					t.Errorf("%s: %s is not exported by the ingress or the egress", r.Alert, m)
				}
			}
			switch r.Labels["severity"] {
			case "critical", "warning", "info":
			default:
				t.Errorf("%s: severity %q, want critical, warning or info", r.Alert, r.Labels["severity"])
			}
			if r.Annotations["summary"] == "" || r.Annotations["description"] == "" {
				t.Errorf("%s: summary or description missing", r.Alert)
			}
			if r.For != "" {
				if d, err := time.ParseDuration(r.For); err != nil || d <= 0 {
					t.Errorf("%s: for %q", r.Alert, r.For)
				}
			}
		}
	}
	if n < 5 {
		t.Fatalf("%d rules read: the file's shape changed", n)
	}
}
