package e2e

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// dashboardPanel is the part of a Grafana panel the test checks.
type dashboardPanel struct {
	ID         int                      `json:"id"`
	Type       string                   `json:"type"`
	Title      string                   `json:"title"`
	Datasource *dashboardDS             `json:"datasource"`
	GridPos    struct{ H, W, X, Y int } `json:"gridPos"`
	Panels     []dashboardPanel         `json:"panels"`
	Targets    []struct {
		RefID      string       `json:"refId"`
		Expr       string       `json:"expr"`
		Datasource *dashboardDS `json:"datasource"`
	} `json:"targets"`
}

type dashboardDS struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

// TestGrafanaDashboard checks deploy/grafana/wsrelay-dashboard.json
// against the real functions: each query passes the alert rules' checks
// (checkExpr: the metrics it names are exported, with the labels it
// matches on, rate() and increase() of counters), every wsrelay_* family
// the functions export is on some panel (a metric added later without a
// panel fails here), and the dashboard is one Grafana imports as it is:
// a Prometheus data source chosen at import ($datasource, used by every
// panel and query), unique panel ids, queries with unique refIds, panels
// on the 24-column grid without overlapping. make lint parses each query
// with promtool (scripts/dashrules.go).
func TestGrafanaDashboard(t *testing.T) {
	fams, names := scrapeEveryFamily(t)

	b, err := os.ReadFile(filepath.Join(repoRoot(t), "deploy", "grafana", "wsrelay-dashboard.json"))
	if err != nil {
		t.Fatal(err)
	}
	var d struct {
		UID           string `json:"uid"`
		Title         string `json:"title"`
		SchemaVersion int    `json:"schemaVersion"`
		Templating    struct {
			List []struct {
				Name  string `json:"name"`
				Type  string `json:"type"`
				Query string `json:"query"`
			} `json:"list"`
		} `json:"templating"`
		Panels []dashboardPanel `json:"panels"`
	}
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatal(err)
	}
	if d.UID == "" || d.Title == "" || d.SchemaVersion < 36 {
		t.Errorf("uid %q, title %q, schemaVersion %d: want both set and schema 36 or later", d.UID, d.Title, d.SchemaVersion)
	}
	if len(d.Templating.List) != 1 || d.Templating.List[0].Name != "datasource" || d.Templating.List[0].Type != "datasource" || d.Templating.List[0].Query != "prometheus" {
		t.Errorf("templating %+v: want the one variable datasource, a Prometheus data source", d.Templating.List)
	}
	wantDS := func(where string, ds *dashboardDS) {
		if ds == nil || ds.Type != "prometheus" || ds.UID != "${datasource}" {
			t.Errorf("%s: datasource %+v, want the $datasource variable", where, ds)
		}
	}

	ids := map[int]bool{}
	onPanel := map[string]bool{}
	var cells []dashboardPanel
	queries := 0
	var walk func([]dashboardPanel)
	walk = func(ps []dashboardPanel) {
		for _, p := range ps {
			where := "panel " + p.Title
			if p.ID <= 0 || ids[p.ID] {
				t.Errorf("%s: id %d missing or repeated", where, p.ID)
			}
			ids[p.ID] = true
			if p.Title == "" {
				t.Errorf("panel %d has no title", p.ID)
			}
			g := p.GridPos
			if g.W < 1 || g.H < 1 || g.X < 0 || g.Y < 0 || g.X+g.W > 24 {
				t.Errorf("%s: gridPos %+v off the 24-column grid", where, g)
			}
			cells = append(cells, p)
			walk(p.Panels)
			if p.Type == "row" {
				if len(p.Targets) != 0 || g.W != 24 || g.H != 1 {
					t.Errorf("%s: a row with queries, or not a full-width line (%+v)", where, g)
				}
				continue
			}
			if !slices.Contains([]string{"timeseries", "stat"}, p.Type) {
				t.Errorf("%s: type %q", where, p.Type)
			}
			wantDS(where, p.Datasource)
			if len(p.Targets) == 0 {
				t.Errorf("%s: no query", where)
			}
			refs := map[string]bool{}
			for _, q := range p.Targets {
				queries++
				qw := where + ", query " + q.RefID
				if q.RefID == "" || refs[q.RefID] {
					t.Errorf("%s: refId missing or repeated", qw)
				}
				refs[q.RefID] = true
				wantDS(qw, q.Datasource)
				for _, f := range checkExpr(t, qw, q.Expr, names, fams) {
					onPanel[f] = true
				}
			}
		}
	}
	walk(d.Panels)
	if queries < 20 {
		t.Fatalf("%d queries read: the file's shape changed", queries)
	}
	for i, a := range cells {
		for _, b := range cells[i+1:] {
			ag, bg := a.GridPos, b.GridPos
			if ag.X < bg.X+bg.W && bg.X < ag.X+ag.W && ag.Y < bg.Y+bg.H && bg.Y < ag.Y+ag.H {
				t.Errorf("panels %q %+v and %q %+v overlap", a.Title, ag, b.Title, bg)
			}
		}
	}
	var missing []string
	for name := range fams {
		if !onPanel[name] {
			missing = append(missing, name)
		}
	}
	slices.Sort(missing)
	if len(missing) > 0 {
		t.Errorf("on no panel: %s", strings.Join(missing, ", "))
	}
	t.Logf("%d panels, %d queries, %d of %d wsrelay_* families", len(ids), queries, len(onPanel), len(fams))
}
