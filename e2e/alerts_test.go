package e2e

import (
	"bufio"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"go.yaml.in/yaml/v3"

	"github.com/wsrelay/wsrelay/shared/redistest"
	"github.com/wsrelay/wsrelay/shared/testkit"
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
// fires), with the labels its selectors match on, rate() and increase()
// only of counters, and each rule has what an operator's routing needs
// (a unique name, a severity, a summary, a valid for). Its PromQL is
// parsed by Prometheus's own promtool in make lint (scripts/promtool.sh),
// not here: the Prometheus module is not a dependency (docs/metrics.md).
func TestAlertRules(t *testing.T) {
	fams, names := scrapeEveryFamily(t)
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
	seen := map[string]bool{}
	n := 0
	for _, g := range rules.Groups {
		for _, r := range g.Rules {
			n++
			if r.Alert == "" || seen[r.Alert] {
				t.Errorf("rule %d of %s: alert name %q empty or repeated", n, g.Name, r.Alert)
			}
			seen[r.Alert] = true
			checkExpr(t, r.Alert, r.Expr, names, fams)
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

var (
	metricName = regexp.MustCompile(`\b(?:wsrelay|process|go)_[a-z_]+\b`)
	selector   = regexp.MustCompile(`\b(wsrelay_[a-z_]+)\{([^}]*)\}`)
	matcher    = regexp.MustCompile(`([a-zA-Z_]+)\s*(?:=~|!~|!=|=)`)
	ranged     = regexp.MustCompile(`\b(rate|irate|increase)\(\s*(wsrelay_[a-z_]+)`)
)

// checkExpr checks the PromQL expr (of the alert or panel where) against
// what the functions export: names, every series name a scrape declared
// (exported), and fams, the wsrelay_* families with their labels
// (families). Every metric it names is exported (a renamed metric would
// leave an alert that never fires, a panel that stays empty), a selector
// matches only on labels its family has, and rate(), irate() and
// increase() take counters. It returns the wsrelay_* families expr
// names.
func checkExpr(t *testing.T, where, expr string, names map[string]bool, fams map[string]family) []string {
	t.Helper()
	// base is the family of a wsrelay series name (a histogram's
	// _bucket, _sum and _count are its family's).
	base := func(name string) (string, family, bool) {
		if f, ok := fams[name]; ok {
			return name, f, true
		}
		for _, sfx := range []string{"_bucket", "_sum", "_count"} {
			if f, ok := fams[strings.TrimSuffix(name, sfx)]; ok && f.typ == "histogram" && strings.HasSuffix(name, sfx) {
				return strings.TrimSuffix(name, sfx), f, true
			}
		}
		return "", family{}, false
	}
	if strings.Count(expr, "(") != strings.Count(expr, ")") {
		t.Errorf("%s: unbalanced parentheses in %q", where, expr)
	}
	used := metricName.FindAllString(expr, -1)
	if len(used) == 0 {
		t.Errorf("%s: no metric in %q", where, expr)
	}
	var fam []string
	for _, m := range used {
		if !names[m] {
			t.Errorf("%s: %s is not exported by the ingress or the egress", where, m)
		}
		if name, _, ok := base(m); ok {
			fam = append(fam, name)
		}
	}
	// The labels a selector matches on are the family's (a misspelt one
	// matches nothing).
	for _, m := range selector.FindAllStringSubmatch(expr, -1) {
		name, f, ok := base(m[1])
		if !ok {
			continue // reported above
		}
		have := strings.Split(f.labels, ",")
		if strings.HasSuffix(m[1], "_bucket") {
			have = append(have, "le")
		}
		for _, l := range matcher.FindAllStringSubmatch(m[2], -1) {
			if !slices.Contains(have, l[1]) {
				t.Errorf("%s: %s has no label %s (it has %q)", where, name, l[1], f.labels)
			}
		}
	}
	// rate() and increase() only on counters (a histogram's series are
	// counters too).
	for _, m := range ranged.FindAllStringSubmatch(expr, -1) {
		if name, f, ok := base(m[2]); ok && f.typ != "counter" && (f.typ != "histogram" || name == m[2]) {
			t.Errorf("%s: %s() of %s, a %s", where, m[1], m[2], f.typ)
		}
	}
	return fam
}

// family is a metric family as /metrics exports it or docs/metrics.md
// lists it: its type and its label names.
type family struct {
	typ    string
	labels string // sorted, comma-separated
}

// families scrapes url's /metrics: the wsrelay_* families, by name.
func families(t *testing.T, url string, into map[string]family) {
	t.Helper()
	resp, err := http.Get(url + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(nil, 1<<20)
	series := regexp.MustCompile(`^(wsrelay_[a-z_]+?)(?:_bucket|_sum|_count)?(?:\{([^}]*)\})? `)
	label := regexp.MustCompile(`([a-z_]+)="`)
	for sc.Scan() {
		line := sc.Text()
		if f := strings.Fields(line); len(f) == 4 && f[0] == "#" && f[1] == "TYPE" && strings.HasPrefix(f[2], "wsrelay_") {
			into[f[2]] = family{typ: f[3]}
			continue
		}
		m := series.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		fam, ok := into[m[1]]
		var names []string
		for _, l := range label.FindAllStringSubmatch(m[2], -1) {
			if l[1] != "le" {
				names = append(names, l[1])
			}
		}
		slices.Sort(names)
		if ok {
			fam.labels = strings.Join(names, ",")
			into[m[1]] = fam
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
}

// scrapeEveryFamily starts both functions and makes every labelled
// wsrelay_* family appear (they appear at their first increment: a
// publish, a refused upgrade, a resume, a socket ended by MAX_LIFETIME),
// then scrapes them: the wsrelay_* families with their types and labels
// (families), and every series name declared (exported).
func scrapeEveryFamily(t *testing.T) (map[string]family, map[string]bool) {
	t.Helper()
	e := env{
		"REDIS_URL":        redistest.URL(t),
		"REDIS_KEY_PREFIX": redistest.Prefix(t),
		"ALLOW_ANONYMOUS":  "true",
		"MAX_LIFETIME":     "1s",
	}
	ing, eg := start(t, "ingress", e), start(t, "egress", e)
	if code := post(t, ing.URL+"/v1/channels/doc/messages", map[string]any{"data": 1}, nil); code != http.StatusAccepted {
		t.Fatalf("publish: %d", code)
	}
	if _, resp, err := websocket.DefaultDialer.Dial(eg.wsURL("channels=b%20d"), nil); err == nil || resp == nil || resp.StatusCode != 400 {
		t.Fatalf("invalid channel: %v %v", err, resp)
	}
	w := dial(t, eg.wsURL("channels=doc"))
	w.waitFrame(func(f frame) bool { return f.Type == "subscribed" })
	w.send(map[string]any{"type": "subscribe", "channel": "doc2", "after": "0-0"}) // a resume
	w.waitFrame(func(f frame) bool { return f.Type == "subscribed" && f.Channel == "doc2" })
	got := map[string]family{}
	testkit.Eventually(t, 10*time.Second, func() error {
		clear(got)
		families(t, ing.URL, got)
		families(t, eg.URL, got)
		if _, ok := got["wsrelay_egress_timeout_closes_total"]; !ok {
			return errors.New("no lifetime close yet")
		}
		if _, ok := got["wsrelay_egress_closes_total"]; !ok {
			return errors.New("no close counted yet")
		}
		return nil
	})
	names := map[string]bool{}
	exported(t, ing.URL, names)
	exported(t, eg.URL, names)
	return got, names
}

// TestMetricsDocumented: docs/metrics.md lists every wsrelay_* family the
// functions export, with its type and labels, and nothing they do not
// export. Labelled families appear at their first increment: the test
// makes one of each happen first (a publish, a refused upgrade, a resume,
// a socket ended by MAX_LIFETIME).
func TestMetricsDocumented(t *testing.T) {
	got, _ := scrapeEveryFamily(t)
	b, err := os.ReadFile(filepath.Join(repoRoot(t), "docs", "metrics.md"))
	if err != nil {
		t.Fatal(err)
	}
	doc := map[string]family{}
	entry := regexp.MustCompile("(?m)^- `(wsrelay_[a-z_]+)(?:\\{([a-z_,]*)\\})?` — (counter|gauge|histogram)\\b")
	for _, m := range entry.FindAllStringSubmatch(string(b), -1) {
		if _, dup := doc[m[1]]; dup {
			t.Errorf("docs/metrics.md lists %s twice", m[1])
		}
		names := strings.Split(m[2], ",")
		slices.Sort(names)
		doc[m[1]] = family{typ: m[3], labels: strings.Join(slices.DeleteFunc(names, func(s string) bool { return s == "" }), ",")}
	}
	if len(got) < 15 || len(doc) < 15 {
		t.Fatalf("%d families exported, %d documented: the scrape or the page's shape changed", len(got), len(doc))
	}
	for name, f := range got {
		if d, ok := doc[name]; !ok {
			t.Errorf("%s (%s{%s}) is exported but not in docs/metrics.md", name, f.typ, f.labels)
		} else if d != f {
			t.Errorf("%s: exported as %s{%s}, documented as %s{%s}", name, f.typ, f.labels, d.typ, d.labels)
		}
	}
	for name := range doc {
		if _, ok := got[name]; !ok {
			t.Errorf("docs/metrics.md lists %s, which neither function exports", name)
		}
	}
	t.Logf("%d families exported, %d documented", len(got), len(doc))
}
