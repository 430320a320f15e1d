// Package configdoc checks the documentation's configuration tables (the
// README's and docs/security.md's) against a function's Config: each
// documented default against the code's, and each documented rule ("at
// least 1s", "not negative", "1–1000", "0: off", …) by loading the value
// at its bound and just past it. Only tests import it.
package configdoc

import (
	"fmt"
	"maps"
	"math"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/wsrelay/wsrelay/shared/config"
)

// Files are the documents, relative to the repository root, whose tables
// with a "variable" and a "default" column are checked.
var Files = []string{"README.md", "docs/security.md"}

// Row is one row of a configuration table. A row may document a pair of
// variables ("`A` / `B`", defaults "`1` / `2`").
type Row struct {
	Where     string   // file:line
	Vars      []string // variable names
	Defaults  []string // per variable, "" for "empty"
	Functions []string // "ingress", "egress"
	Meaning   string
}

// Rows reads the configuration tables of Files under root.
func Rows(t testing.TB, root string) []Row {
	t.Helper()
	var rows []Row
	for _, f := range Files {
		b, err := os.ReadFile(filepath.Join(root, f))
		if err != nil {
			t.Fatal(err)
		}
		var cols []string // header of the current table, lower case
		section := ""
		for i, line := range strings.Split(string(b), "\n") {
			if h, ok := strings.CutPrefix(line, "### "); ok {
				section = strings.ToLower(h)
				continue
			}
			if !strings.HasPrefix(line, "|") {
				cols = nil
				continue
			}
			cells := splitRow(line)
			if cols == nil {
				cols = make([]string, len(cells))
				for j, c := range cells {
					cols[j] = strings.ToLower(c)
				}
				continue
			}
			if strings.HasPrefix(cells[0], "---") || !slices.Contains(cols, "variable") || !slices.Contains(cols, "default") {
				continue
			}
			if len(cells) != len(cols) {
				t.Errorf("%s:%d: %d cells, header has %d", f, i+1, len(cells), len(cols))
				continue
			}
			cell := func(name string) string { return cells[slices.Index(cols, name)] }
			r := Row{Where: fmt.Sprintf("%s:%d", f, i+1), Meaning: cells[len(cells)-1]}
			for _, v := range strings.Split(cell("variable"), " / ") {
				r.Vars = append(r.Vars, strings.Trim(v, "`"))
			}
			for _, d := range strings.Split(cell("default"), " / ") {
				if d == "empty" {
					r.Defaults = append(r.Defaults, "")
				} else if m := regexp.MustCompile("^`([^`]*)`").FindStringSubmatch(d); m != nil {
					r.Defaults = append(r.Defaults, m[1])
				} else {
					t.Errorf("%s: default %q is neither empty nor `value`", r.Where, d)
					r.Defaults = append(r.Defaults, d)
				}
			}
			if len(r.Defaults) != len(r.Vars) {
				t.Errorf("%s: %d variables, %d defaults", r.Where, len(r.Vars), len(r.Defaults))
				continue
			}
			fn := section
			if slices.Contains(cols, "function") {
				fn = cell("function")
			}
			switch {
			case fn == "both" || strings.HasPrefix(fn, "both functions"):
				r.Functions = []string{"ingress", "egress"}
			case fn == "ingress" || fn == "egress":
				r.Functions = []string{fn}
			default:
				t.Errorf("%s: which function reads it? (section or function column %q)", r.Where, fn)
			}
			rows = append(rows, r)
		}
	}
	return rows
}

// splitRow splits a Markdown table row on the | not inside `code`.
func splitRow(line string) []string {
	var cells []string
	var cur strings.Builder
	code := false
	for _, r := range strings.TrimSpace(line)[1:] {
		switch {
		case r == '`':
			code = !code
			cur.WriteRune(r)
		case r == '|' && !code:
			cells = append(cells, strings.TrimSpace(cur.String()))
			cur.Reset()
		default:
			cur.WriteRune(r)
		}
	}
	return cells
}

// Check is what a function's test gives Run.
type Check struct {
	Function string // "ingress" or "egress"
	// New returns a pointer to a zero Config.
	New func() any
	// Load loads a configuration from env as the function does at
	// start and returns its error.
	Load func(env map[string]string) error
	// Base is the environment every check starts from (it must load).
	Base map[string]string
	// Conditions name the environment under which a rule that says so
	// applies: "when the wait is on" → {"PUBLISH_WAIT_REPLICAS": "1"}.
	Conditions map[string]map[string]string
	// Unchecked lists, per variable, the rule-like phrases of its
	// meaning that Run does not check, each with why. A phrase that is
	// neither parsed nor listed fails the test, and so does a listed one
	// that no longer appears. The phrases of variables both functions
	// read are in commonUnchecked, added to these.
	Unchecked map[string]map[string]string
}

// commonUnchecked is Check.Unchecked for the variables both functions
// read, with the same rows.
var commonUnchecked = map[string]map[string]string{
	"REDIS_KEY_PREFIX":    {"must be the channel's": "why, not a rule"},
	"REGISTRY_TTL":        {"at most": "what the value means", "must": "equal in both functions: e2e's deploy test checks deploy/"},
	"JWT_PUBLIC_KEY":      {"or more": "how many keys, not a bound"},
	"JWT_SECRET_PREVIOUS": {"below": "a section of docs/security.md"},
	"SHUTDOWN_GRACE":      {"up to": "how long the stop waits, not a bound of the value"},
	"JWT_SECRET":          {"≥": "a recommendation: a shorter secret only logs a warning"},
}

// rule phrases Run parses. val is a number, a duration or a `VARIABLE`.
const val = "`?([0-9][0-9,]*(?:\\.[0-9]+)?(?:ns|us|µs|ms|s|m|h)?|[A-Z][A-Z0-9_]*)`?"

var (
	reSubject = regexp.MustCompile(`(?i)\b(rate|burst)\s*$`)
	reAtLeast = regexp.MustCompile("\\b(?i:at least) " + val)
	reAtMost  = regexp.MustCompile("\\b(?i:at most) " + val)
	reBelow   = regexp.MustCompile("\\bbelow `([A-Z][A-Z0-9_]*)`")
	reNoChars = regexp.MustCompile("\\b(?i:no) `(.)` or `(.)`")
	reNeeds   = regexp.MustCompile("\\b(?:Needs|Refused at start without) `([A-Z][A-Z0-9_]*)`")
	reNotNeg  = regexp.MustCompile(`(?i)\b(?:not|never) negative`)
	reRange   = regexp.MustCompile("(?i)\\b([0-9][0-9,]*)–([0-9][0-9,]*)( printable ASCII characters| characters `\\[[^]`]+\\]`)?")
	reZero    = regexp.MustCompile("(?:^|[^0-9.,`])`?0`?(?::| =) ")
	reEnum    = regexp.MustCompile("^(`[a-z]+`(?:, | or )?)+\\.?$")
	// What reads like a rule: left over after the parsed phrases are
	// taken out, it must be listed in Unchecked.
	reRuleish = regexp.MustCompile(`(?i)\b(at least|at most|negative|below|above|between|up to|or more|or less|minimum|maximum|must)\b|[≥≤]|[0-9]–[0-9]`)
)

// Run checks every row of the tables that documents a variable of
// c.Function.
func Run(t *testing.T, root string, c Check) {
	unchecked := maps.Clone(commonUnchecked)
	for name, phrases := range c.Unchecked {
		unchecked[name] = phrases
	}
	c.Unchecked = unchecked
	names := config.Names(c.New())
	defaults := c.New()
	if err := config.Load(func(string) string { return "" }, defaults); err != nil {
		t.Fatalf("loading the defaults: %v", err)
	}
	if err := c.Load(c.with(nil, "", "")); err != nil {
		t.Fatalf("the base environment %v does not load: %v", c.Base, err)
	}
	documented := map[string]bool{}
	seenUnchecked := map[string]bool{}
	for _, r := range Rows(t, root) {
		if !slices.Contains(r.Functions, c.Function) {
			continue
		}
		for i, name := range r.Vars {
			documented[name] = true
			if !slices.Contains(names, name) {
				t.Errorf("%s: %s is documented for the %s, which does not read it", r.Where, name, c.Function)
				continue
			}
			f := field(defaults, name)
			if err := sameValue(f, r.Defaults[i]); err != nil {
				t.Errorf("%s: %s: documented default %q, the code's is %v: %v", r.Where, name, r.Defaults[i], f.Interface(), err)
			}
		}
		left := checkRules(t, r, c, defaults)
		for _, name := range r.Vars {
			for phrase := range c.Unchecked[name] {
				if strings.Contains(left, phrase) {
					seenUnchecked[name+"\x00"+phrase] = true
					left = strings.ReplaceAll(left, phrase, "")
				}
			}
		}
		if m := reRuleish.FindAllString(left, -1); m != nil {
			t.Errorf("%s: %s: rule-like phrase(s) %q neither checked nor listed in Unchecked: %q", r.Where, strings.Join(r.Vars, " / "), m, left)
		}
	}
	for name, phrases := range c.Unchecked {
		for phrase := range phrases {
			if !seenUnchecked[name+"\x00"+phrase] {
				t.Errorf("Unchecked[%s] lists %q, which no row of %s says any more", name, phrase, c.Function)
			}
		}
	}
	for _, name := range names {
		if !documented[name] {
			t.Errorf("no table of %v documents %s for the %s", Files, name, c.Function)
		}
	}
}

// checkRules checks the rules of r's meaning it parses and returns the
// meaning without them.
func checkRules(t *testing.T, r Row, c Check, defaults any) string {
	t.Helper()
	var left []string
	// Every variable the row needs: each "Needs" rule is checked with
	// the others met.
	needs := map[string]string{}
	for _, m := range reNeeds.FindAllStringSubmatch(r.Meaning, -1) {
		needs[m[1]] = sample(m[1], "b")
	}
	for _, clause := range regexp.MustCompile(`[;.] `).Split(r.Meaning+" ", -1) {
		env := map[string]string{}
		for cond, e := range c.Conditions {
			if strings.Contains(clause, cond) {
				clause = strings.ReplaceAll(clause, cond, "")
				for k, v := range e {
					env[k] = v
				}
			}
		}
		if reEnum.MatchString(strings.TrimSpace(clause)) && len(r.Vars) == 1 {
			for _, v := range regexp.MustCompile("`([a-z]+)`").FindAllStringSubmatch(clause, -1) {
				accept(t, r, c, env, r.Vars[0], v[1])
			}
			refuse(t, r, c, env, r.Vars[0], "bogus")
			continue
		}
		// subject picks the variable of a pair a phrase is about: the
		// one its clause or the phrase names first ("burst 0: …").
		subject := func(start int) string {
			if len(r.Vars) == 1 {
				return r.Vars[0]
			}
			m := reSubject.FindStringSubmatch(clause[:start])
			if m != nil && strings.EqualFold(m[1], "burst") {
				return r.Vars[1]
			}
			return r.Vars[0]
		}
		cut := func(re *regexp.Regexp, f func(name string, m []string)) {
			for _, ix := range re.FindAllStringSubmatchIndex(clause, -1) {
				m := make([]string, len(ix)/2)
				for i := range m {
					if ix[2*i] >= 0 {
						m[i] = clause[ix[2*i]:ix[2*i+1]]
					}
				}
				f(subject(ix[0]), m)
			}
			clause = re.ReplaceAllString(clause, " ")
		}
		cut(reAtLeast, func(name string, m []string) {
			x := value(t, r, defaults, name, m[1])
			accept(t, r, c, env, name, format(x))
			refuse(t, r, c, env, name, format(step(x, -1)))
		})
		cut(reAtMost, func(name string, m []string) {
			x := value(t, r, defaults, name, m[1])
			accept(t, r, c, env, name, format(x))
			refuse(t, r, c, env, name, format(step(x, +1)))
		})
		cut(reBelow, func(name string, m []string) {
			x := value(t, r, defaults, name, m[1])
			accept(t, r, c, env, name, format(step(x, -1)))
			refuse(t, r, c, env, name, format(x))
		})
		cut(reNoChars, func(name string, m []string) {
			refuse(t, r, c, env, name, "a"+m[1])
			refuse(t, r, c, env, name, "a"+m[2])
		})
		cut(reNeeds, func(name string, m []string) {
			v := sample(name, "a")
			met := maps.Clone(env)
			maps.Copy(met, needs)
			refuse(t, r, c, with(met, m[1], ""), name, v)
			accept(t, r, c, met, name, v)
		})
		cut(reNotNeg, func(name string, _ []string) {
			x := value(t, r, defaults, name, "0")
			accept(t, r, c, env, name, format(x))
			refuse(t, r, c, env, name, format(step(x, -1)))
		})
		cut(reRange, func(name string, m []string) {
			lo, hi := value(t, r, defaults, "", m[1]).(int64), value(t, r, defaults, "", m[2]).(int64)
			if m[3] != "" { // a length
				accept(t, r, c, env, name, strings.Repeat("a", int(lo)))
				if lo > 1 {
					refuse(t, r, c, env, name, strings.Repeat("a", int(lo-1)))
				}
				accept(t, r, c, env, name, strings.Repeat("a", int(hi)))
				refuse(t, r, c, env, name, strings.Repeat("a", int(hi+1)))
				return
			}
			lo, hi = value(t, r, defaults, name, m[1]).(int64), value(t, r, defaults, name, m[2]).(int64)
			accept(t, r, c, env, name, format(lo))
			refuse(t, r, c, env, name, format(lo-1))
			accept(t, r, c, env, name, format(hi))
			refuse(t, r, c, env, name, format(hi+1))
		})
		cut(reZero, func(name string, _ []string) {
			accept(t, r, c, env, name, "0")
		})
		left = append(left, clause)
	}
	return strings.Join(left, "; ")
}

func accept(t *testing.T, r Row, c Check, cond map[string]string, name, v string) {
	t.Helper()
	if err := c.Load(c.with(cond, name, v)); err != nil {
		t.Errorf("%s: %s=%q (with %v) should be accepted: %v", r.Where, name, v, cond, err)
	}
}

func refuse(t *testing.T, r Row, c Check, cond map[string]string, name, v string) {
	t.Helper()
	err := c.Load(c.with(cond, name, v))
	if err == nil {
		t.Errorf("%s: %s=%q (with %v) should be refused, and loads", r.Where, name, v, cond)
	} else if !strings.Contains(err.Error(), name) {
		t.Errorf("%s: %s=%q (with %v) is refused, but the error does not name it: %v", r.Where, name, v, cond, err)
	}
}

// with is env with name=v.
// samples are values the variables whose values have a form accept, for
// the "Needs" rules; any other variable is given 32 of a letter.
var samples = map[string]string{
	"REDIS_CLUSTER_ADDRS": "127.0.0.1:7000",
	"REDIS_CLUSTER_TLS":   "true",
}

// sample is a value name accepts: its entry in samples, or 32 of letter.
func sample(name, letter string) string {
	if v, ok := samples[name]; ok {
		return v
	}
	return strings.Repeat(letter, 32)
}

func with(env map[string]string, name, v string) map[string]string {
	e := map[string]string{name: v}
	for k, x := range env {
		if k != name {
			e[k] = x
		}
	}
	return e
}

// with is c.Base with cond and name=v on top.
func (c Check) with(cond map[string]string, name, v string) map[string]string {
	env := map[string]string{}
	for _, m := range []map[string]string{c.Base, cond} {
		for k, x := range m {
			env[k] = x
		}
	}
	if name != "" {
		env[name] = v
	}
	return env
}

// value reads s ("1s", "64", "1,000,000", "`MAX_MESSAGE_BYTES`") as a
// value of name's type: time.Duration, int64 or float64 (int64 when name
// is ""). A variable name stands for its default.
func value(t *testing.T, r Row, defaults any, name, s string) any {
	t.Helper()
	kind := reflect.Int64
	var f reflect.Value
	if name != "" {
		f = field(defaults, name)
		kind = f.Kind()
	}
	if regexp.MustCompile(`^[A-Z][A-Z0-9_]*$`).MatchString(s) {
		v := field(defaults, s)
		if !v.IsValid() {
			t.Fatalf("%s: %s is not a variable", r.Where, s)
		}
		return norm(v)
	}
	s = strings.ReplaceAll(s, ",", "")
	if f.IsValid() && f.Type() == reflect.TypeOf(time.Duration(0)) {
		d, err := time.ParseDuration(s)
		if err != nil && s == "0" {
			d, err = 0, nil
		}
		if err != nil {
			t.Fatalf("%s: %s: %q is not a duration", r.Where, name, s)
		}
		return d
	}
	switch kind {
	case reflect.Int, reflect.Int64:
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			t.Fatalf("%s: %s: %q is not an integer", r.Where, name, s)
		}
		return n
	case reflect.Float64:
		x, err := strconv.ParseFloat(s, 64)
		if err != nil {
			t.Fatalf("%s: %s: %q is not a number", r.Where, name, s)
		}
		return x
	}
	t.Fatalf("%s: %s is a %s: no bound to check", r.Where, name, kind)
	return nil
}

func norm(v reflect.Value) any {
	if v.Type() == reflect.TypeOf(time.Duration(0)) {
		return time.Duration(v.Int())
	}
	switch v.Kind() {
	case reflect.Int, reflect.Int64:
		return v.Int()
	case reflect.Float64:
		return v.Float()
	}
	return v.Interface()
}

// step returns the next value above (dir > 0) or below x.
func step(x any, dir int) any {
	switch x := x.(type) {
	case time.Duration:
		return x + time.Duration(dir)
	case int64:
		return x + int64(dir)
	case float64:
		return math.Nextafter(x, float64(dir)*math.Inf(1))
	}
	panic(fmt.Sprintf("step %T", x))
}

func format(x any) string {
	switch x := x.(type) {
	case time.Duration:
		return x.String()
	case int64:
		return strconv.FormatInt(x, 10)
	case float64:
		return strconv.FormatFloat(x, 'g', -1, 64)
	}
	panic(fmt.Sprintf("format %T", x))
}

// sameValue reports whether the documented default doc is f's value,
// durations and numbers compared as such ("10s" = "10000ms").
func sameValue(f reflect.Value, doc string) error {
	if f.Type() == reflect.TypeOf(time.Duration(0)) {
		d, err := time.ParseDuration(doc)
		if err != nil && doc == "0" {
			d, err = 0, nil
		}
		if err != nil {
			return err
		}
		if d != time.Duration(f.Int()) {
			return fmt.Errorf("%v ≠ %v", d, time.Duration(f.Int()))
		}
		return nil
	}
	doc = strings.ReplaceAll(doc, ",", "")
	switch f.Kind() {
	case reflect.String:
		if doc != f.String() {
			return fmt.Errorf("%q ≠ %q", doc, f.String())
		}
	case reflect.Bool:
		b, err := strconv.ParseBool(doc)
		if err != nil || b != f.Bool() {
			return fmt.Errorf("not %v", f.Bool())
		}
	case reflect.Int, reflect.Int64:
		n, err := strconv.ParseInt(doc, 10, 64)
		if err != nil || n != f.Int() {
			return fmt.Errorf("not %d", f.Int())
		}
	case reflect.Float64:
		x, err := strconv.ParseFloat(doc, 64)
		if err != nil || x != f.Float() {
			return fmt.Errorf("not %v", f.Float())
		}
	default:
		return fmt.Errorf("cannot compare a %s", f.Kind())
	}
	return nil
}

// field is the field of cfg (a pointer to a struct) that reads the
// variable name, or the zero Value.
func field(cfg any, name string) reflect.Value {
	var found reflect.Value
	var walk func(v reflect.Value)
	walk = func(v reflect.Value) {
		for v.Kind() == reflect.Pointer {
			v = v.Elem()
		}
		if v.Kind() != reflect.Struct {
			return
		}
		for i := 0; i < v.NumField(); i++ {
			tag, _, _ := strings.Cut(v.Type().Field(i).Tag.Get("env"), ",")
			if tag == name {
				found = v.Field(i)
				return
			}
			if tag == "" {
				walk(v.Field(i))
			}
		}
	}
	walk(reflect.ValueOf(cfg))
	return found
}
