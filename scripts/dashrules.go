//go:build ignore

// Command dashrules turns the PromQL queries of a Grafana dashboard into
// a Prometheus rule file, one recording rule per query, so that
// `promtool check rules` parses each query as Prometheus would run it
// (scripts/promtool.sh). Grafana's $__rate_interval becomes 5m; any other
// variable in a query is refused, since the dashboard defines none for
// queries. It writes the rules (JSON, which is YAML) to standard output.
//
//	go run scripts/dashrules.go deploy/grafana/wsrelay-dashboard.json > rules.yml
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
)

type panel struct {
	ID      int     `json:"id"`
	Title   string  `json:"title"`
	Panels  []panel `json:"panels"`
	Targets []struct {
		RefID string `json:"refId"`
		Expr  string `json:"expr"`
	} `json:"targets"`
}

type rule struct {
	Record string `json:"record"`
	Expr   string `json:"expr"`
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: go run scripts/dashrules.go <dashboard.json>")
		os.Exit(2)
	}
	rules, err := convert(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, "dashrules:", err)
		os.Exit(1)
	}
	out := map[string]any{"groups": []any{map[string]any{"name": "dashboard", "rules": rules}}}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	if err := enc.Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, "dashrules:", err)
		os.Exit(1)
	}
}

func convert(path string) ([]rule, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var d struct {
		Panels []panel `json:"panels"`
	}
	if err := json.Unmarshal(b, &d); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	var rules []rule
	var walk func([]panel) error
	walk = func(ps []panel) error {
		for _, p := range ps {
			for _, t := range p.Targets {
				expr := strings.ReplaceAll(t.Expr, "$__rate_interval", "5m")
				if strings.Contains(expr, "$") {
					return fmt.Errorf("panel %d (%s), query %s: a variable other than $__rate_interval: %s", p.ID, p.Title, t.RefID, t.Expr)
				}
				rules = append(rules, rule{Record: fmt.Sprintf("dashboard:panel_%d_%s", p.ID, t.RefID), Expr: expr})
			}
			if err := walk(p.Panels); err != nil {
				return err
			}
		}
		return nil
	}
	if err := walk(d.Panels); err != nil {
		return nil, err
	}
	if len(rules) == 0 {
		return nil, errors.New(path + ": no query found")
	}
	return rules, nil
}
