package e2e

import (
	"go/ast"
	"go/parser"
	"go/token"
	"go/types"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
)

// TestLogCatalogue: the table of docs/metrics.md's "## Logs" is every
// message the functions log at WARN or ERROR and every line of their
// episodes, at the level the code logs it and from the functions that
// log it; an INFO or DEBUG line it lists is logged at that level too.
// Operators alert on these messages (SCF's log service, Loki,
// CloudWatch): a message renamed in the code, and not in the table,
// would leave an alert that never fires. The messages are read from the
// functions' Go source (their packages and the shared ones they import,
// test files left out), so a message built at run time, which no alert
// can name, fails the test too.
func TestLogCatalogue(t *testing.T) {
	t.Parallel()
	root := repoRoot(t)
	code := sourceLogLines(t, root)
	doc := docLogTable(t, filepath.Join(root, "docs", "metrics.md"))
	// LOGCAT_DUMP=1 go test -v -run TestLogCatalogue lists what the code
	// logs, for writing the table.
	if os.Getenv("LOGCAT_DUMP") != "" {
		for _, l := range sortedLines(code) {
			t.Logf("%s\t%s\t%s\t%v\t%s", l.msg, l.level, strings.Join(l.functions(), ","), l.episode, l.pos)
		}
	}
	if len(code) == 0 || len(doc) == 0 {
		t.Fatalf("found %d messages in the code and %d in the table", len(code), len(doc))
	}
	for _, l := range sortedLines(code) {
		must := l.level == "WARN" || l.level == "ERROR" || l.episode
		d, ok := doc[l.msg]
		switch {
		case !ok && must:
			t.Errorf("%s: %q (%s, %s) is not in the table of docs/metrics.md's Logs", l.pos, l.msg, l.level, strings.Join(l.functions(), ", "))
		case !ok:
		case !d.levels[l.level]:
			t.Errorf("%s: %q is logged at %s; the table says %s", l.pos, l.msg, l.level, d.levelCell)
		case !slices.Equal(d.functions, l.functions()):
			t.Errorf("%s: %q is logged by %s; the table says %s", l.pos, l.msg, strings.Join(l.functions(), ", "), d.funcCell)
		}
	}
	for msg, d := range doc {
		for lvl := range d.levels {
			if code[msg+"\x00"+lvl] == nil {
				t.Errorf("docs/metrics.md lists %q at %s, which the code does not log", msg, lvl)
			}
		}
	}
}

// logLine is one message at one level.
type logLine struct {
	msg, level string
	episode    bool            // a line of a logging.Episode
	funcs      map[string]bool // "ingress", "egress"
	pos        string          // where it is logged (the first place found)
}

func (l *logLine) functions() []string {
	var fs []string
	for f := range l.funcs {
		fs = append(fs, f)
	}
	sort.Strings(fs)
	return fs
}

func sortedLines(m map[string]*logLine) []*logLine {
	var ls []*logLine
	for _, l := range m {
		ls = append(ls, l)
	}
	sort.Slice(ls, func(i, j int) bool { return ls[i].pos < ls[j].pos })
	return ls
}

const modulePrefix = "github.com/wsrelay/wsrelay/"

// goPkg is a parsed package of the repository (its non-test files, every
// build tag's).
type goPkg struct {
	path, dir string
	files     map[string]*ast.File // by file name relative to the root
	consts    map[string]string    // its string constants
}

// imports is the file's imports by the name they are used under.
func imports(f *ast.File) map[string]string {
	m := map[string]string{}
	for _, is := range f.Imports {
		p, _ := strconv.Unquote(is.Path.Value)
		name := p[strings.LastIndex(p, "/")+1:]
		if is.Name != nil {
			name = is.Name.Name
		}
		m[name] = p
	}
	return m
}

// sourceLogLines parses the functions and the shared packages they use
// and returns what they log, by message and level.
func sourceLogLines(t *testing.T, root string) map[string]*logLine {
	t.Helper()
	fset := token.NewFileSet()
	pkgs := map[string]*goPkg{}
	for _, dir := range []string{"functions/ingress", "functions/egress", "shared"} {
		err := filepath.WalkDir(filepath.Join(root, dir), func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if d.IsDir() && d.Name() == "testdata" {
				return filepath.SkipDir
			}
			if d.IsDir() || !strings.HasSuffix(p, ".go") || strings.HasSuffix(p, "_test.go") {
				return nil
			}
			rel, _ := filepath.Rel(root, p)
			f, err := parser.ParseFile(fset, rel, readFile(t, p), parser.SkipObjectResolution)
			if err != nil {
				return err
			}
			ip := modulePrefix + filepath.ToSlash(filepath.Dir(rel))
			pk := pkgs[ip]
			if pk == nil {
				pk = &goPkg{path: ip, dir: filepath.Dir(rel), files: map[string]*ast.File{}, consts: map[string]string{}}
				pkgs[ip] = pk
			}
			pk.files[rel] = f
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	// String constants, in as many passes as constants defined from
	// others take.
	for range 4 {
		for _, pk := range pkgs {
			for _, f := range pk.files {
				for _, d := range f.Decls {
					gd, ok := d.(*ast.GenDecl)
					if !ok || gd.Tok != token.CONST {
						continue
					}
					for _, s := range gd.Specs {
						vs := s.(*ast.ValueSpec)
						for i, n := range vs.Names {
							if i < len(vs.Values) {
								if v, ok := constString(vs.Values[i], pk, imports(f), pkgs); ok {
									pk.consts[n.Name] = v
								}
							}
						}
					}
				}
			}
		}
	}
	// Which function uses each package: the packages its main package
	// imports, and theirs.
	users := map[string]map[string]bool{}
	for _, fn := range []string{"ingress", "egress"} {
		queue := []string{modulePrefix + "functions/" + fn}
		for len(queue) > 0 {
			p := queue[0]
			queue = queue[1:]
			if users[p][fn] || pkgs[p] == nil {
				continue
			}
			if users[p] == nil {
				users[p] = map[string]bool{}
			}
			users[p][fn] = true
			for _, f := range pkgs[p].files {
				for _, ip := range imports(f) {
					queue = append(queue, ip)
				}
			}
		}
	}

	lines := map[string]*logLine{}
	add := func(pos token.Pos, msg, level string, episode bool, funcs map[string]bool) {
		k := msg + "\x00" + level
		l := lines[k]
		if l == nil {
			l = &logLine{msg: msg, level: level, funcs: map[string]bool{}, pos: fset.Position(pos).String()}
			lines[k] = l
		}
		l.episode = l.episode || episode
		for f := range funcs {
			l.funcs[f] = true
		}
	}
	for _, pk := range pkgs {
		funcs := users[pk.path]
		if len(funcs) == 0 {
			continue // not in either function (test helpers, client libraries)
		}
		for name, f := range pk.files {
			imp := imports(f)
			episodes := map[string]*episodeLit{} // by the name it is kept under
			keptAs := map[ast.Expr]string{}      // a literal assigned, its name
			var abandoned []string
			ast.Inspect(f, func(n ast.Node) bool {
				switch n := n.(type) {
				case *ast.AssignStmt:
					for i, rhs := range n.Rhs {
						if u, ok := rhs.(*ast.UnaryExpr); ok && u.Op == token.AND {
							rhs = u.X
						}
						if i < len(n.Lhs) {
							keptAs[rhs] = lastName(n.Lhs[i])
						}
					}
				case *ast.CompositeLit:
					if e := episodeOf(t, fset, n, pk, imp, pkgs); e != nil {
						if name, ok := keptAs[n]; ok {
							episodes[name] = e
						}
						lvl := "WARN"
						if e.isError {
							lvl = "ERROR"
						}
						add(n.Pos(), e.msg, lvl, true, funcs)
						add(n.Pos(), e.back, "INFO", true, funcs)
						if e.gone != "" {
							add(n.Pos(), e.gone, "INFO", true, funcs)
						}
					}
				case *ast.CallExpr:
					logCall(t, fset, n, name, pk, imp, pkgs, funcs, add, &abandoned)
				}
				return true
			})
			for _, a := range abandoned {
				// Abandon without Gone logs Msg + " (given up)".
				if e := episodes[a]; e != nil && e.gone == "" {
					add(e.pos, e.msg+" (given up)", "INFO", true, funcs)
				}
			}
		}
	}
	return lines
}

func readFile(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// constString is the value of a string constant expression: a literal,
// a constant of the package or of another of the repository's, or a sum
// of them.
func constString(e ast.Expr, pk *goPkg, imp map[string]string, pkgs map[string]*goPkg) (string, bool) {
	switch e := e.(type) {
	case *ast.BasicLit:
		if e.Kind == token.STRING {
			s, err := strconv.Unquote(e.Value)
			return s, err == nil
		}
	case *ast.ParenExpr:
		return constString(e.X, pk, imp, pkgs)
	case *ast.Ident:
		s, ok := pk.consts[e.Name]
		return s, ok
	case *ast.SelectorExpr:
		if x, ok := e.X.(*ast.Ident); ok && pkgs[imp[x.Name]] != nil {
			s, ok := pkgs[imp[x.Name]].consts[e.Sel.Name]
			return s, ok
		}
	case *ast.BinaryExpr:
		if e.Op == token.ADD {
			a, ok1 := constString(e.X, pk, imp, pkgs)
			b, ok2 := constString(e.Y, pk, imp, pkgs)
			return a + b, ok1 && ok2
		}
	}
	return "", false
}

// episodeLit is a logging.Episode literal's lines.
type episodeLit struct {
	msg, back, gone string
	isError         bool
	pos             token.Pos
}

// episodeOf reads cl if it is a logging.Episode literal.
func episodeOf(t *testing.T, fset *token.FileSet, cl *ast.CompositeLit, pk *goPkg, imp map[string]string, pkgs map[string]*goPkg) *episodeLit {
	sel, ok := cl.Type.(*ast.SelectorExpr)
	if !ok || sel.Sel.Name != "Episode" {
		return nil
	}
	if x, ok := sel.X.(*ast.Ident); !ok || imp[x.Name] != modulePrefix+"shared/logging" {
		return nil
	}
	ep := &episodeLit{pos: cl.Pos()}
	for _, el := range cl.Elts {
		kv, ok := el.(*ast.KeyValueExpr)
		if !ok {
			t.Errorf("%s: an Episode literal without field names", fset.Position(el.Pos()))
			continue
		}
		field := kv.Key.(*ast.Ident).Name
		switch field {
		case "Msg", "Back", "Gone":
			s, ok := constString(kv.Value, pk, imp, pkgs)
			if !ok {
				t.Errorf("%s: the episode's %s is built at run time: make it a constant, with what varies in attributes", fset.Position(kv.Pos()), field)
			}
			switch field {
			case "Msg":
				ep.msg = s
			case "Back":
				ep.back = s
			case "Gone":
				ep.gone = s
			}
		case "Error":
			id, ok := kv.Value.(*ast.Ident)
			if !ok || (id.Name != "true" && id.Name != "false") {
				t.Errorf("%s: the episode's Error is not a constant true or false", fset.Position(kv.Pos()))
			}
			ep.isError = ok && id.Name == "true"
		}
	}
	return ep
}

// slogLevels are the slog methods by the level they log at.
var slogLevels = map[string]string{
	"Debug": "DEBUG", "Info": "INFO", "Warn": "WARN", "Error": "ERROR",
	"DebugContext": "DEBUG", "InfoContext": "INFO", "WarnContext": "WARN", "ErrorContext": "ERROR",
	"Log": "", "LogAttrs": "", // the level is an argument
}

// lastName is the last name of x: log, s.log, c.s.log all end in "log".
func lastName(x ast.Expr) string {
	switch x := x.(type) {
	case *ast.Ident:
		return x.Name
	case *ast.SelectorExpr:
		return x.Sel.Name
	}
	return ""
}

// logCall records what call logs, if it is a log call: a method of a
// logger (named log, Log or logger, as every one is in these packages)
// or a function of log/slog itself.
func logCall(t *testing.T, fset *token.FileSet, call *ast.CallExpr, file string, pk *goPkg, imp map[string]string, pkgs map[string]*goPkg,
	funcs map[string]bool, add func(token.Pos, string, string, bool, map[string]bool), abandoned *[]string) {
	sel, ok := call.Fun.(*ast.SelectorExpr)
	if !ok {
		return
	}
	where := fset.Position(call.Pos())
	if sel.Sel.Name == "Abandon" {
		if x, ok := sel.X.(*ast.SelectorExpr); ok {
			*abandoned = append(*abandoned, x.Sel.Name)
		}
		return
	}
	pkgFunc := false
	if x, ok := sel.X.(*ast.Ident); ok && imp[x.Name] == "log/slog" {
		if sel.Sel.Name == "NewLogLogger" {
			t.Errorf("%s: slog.NewLogLogger logs each line written to it as its message, built at run time: use a writer that logs a constant message with the line in an attribute", where)
			return
		}
		pkgFunc = true
	}
	lvl, isLog := slogLevels[sel.Sel.Name]
	if !isLog || len(call.Args) == 0 {
		return
	}
	name := strings.ToLower(lastName(sel.X))
	if !pkgFunc && name != "log" && name != "logger" {
		// Another type's method of the same name (err.Error()); a logger
		// under another name with a constant message would be missed, so
		// it fails.
		if _, ok := constString(call.Args[0], pk, imp, pkgs); ok {
			t.Errorf("%s: %s looks like a log call on %q, not a logger named log: name the logger log so that this test reads its messages", where, sel.Sel.Name, lastName(sel.X))
		}
		return
	}
	msgArg := 0
	if strings.HasSuffix(sel.Sel.Name, "Context") {
		msgArg = 1
	}
	// The episode's own lines: their messages are the literals' fields,
	// read above.
	inEpisode := pk.path == modulePrefix+"shared/logging" && filepath.Base(file) == "episode.go"
	if lvl == "" {
		msgArg = 2
		lsel, ok := call.Args[1].(*ast.SelectorExpr)
		if lx, ok2 := lselX(lsel); ok && ok2 && imp[lx] == "log/slog" && strings.HasPrefix(lsel.Sel.Name, "Level") {
			lvl = strings.ToUpper(strings.TrimPrefix(lsel.Sel.Name, "Level"))
		} else if !inEpisode {
			t.Errorf("%s: a log call whose level is not a slog.Level constant", where)
			return
		}
	}
	if len(call.Args) <= msgArg {
		return
	}
	msg, ok := constString(call.Args[msgArg], pk, imp, pkgs)
	if !ok {
		if !inEpisode {
			t.Errorf("%s: a log message built at run time (%s): make it a constant, with what varies in attributes", where, types.ExprString(call.Args[msgArg]))
		}
		return
	}
	add(call.Pos(), msg, lvl, false, funcs)
}

func lselX(s *ast.SelectorExpr) (string, bool) {
	if s == nil {
		return "", false
	}
	x, ok := s.X.(*ast.Ident)
	if !ok {
		return "", false
	}
	return x.Name, true
}

// docEntry is a row of the table.
type docEntry struct {
	levels              map[string]bool
	functions           []string
	levelCell, funcCell string
}

var (
	tableMsg   = regexp.MustCompile("^`([^`]+)`$")
	levelWords = regexp.MustCompile(`\b(DEBUG|INFO|WARN|ERROR)\b`)
)

// docLogTable reads the table of the "## Logs" section of path: message,
// level, function, meaning.
func docLogTable(t *testing.T, path string) map[string]docEntry {
	t.Helper()
	text := string(readFile(t, path))
	start := strings.Index(text, "\n## Logs\n")
	if start < 0 {
		t.Fatalf("%s: no \"## Logs\" section", path)
	}
	section := text[start+1:]
	if end := strings.Index(section[1:], "\n## "); end >= 0 {
		section = section[:end+1]
	}
	doc := map[string]docEntry{}
	header := false
	for _, line := range strings.Split(section, "\n") {
		if !strings.HasPrefix(line, "|") {
			continue
		}
		cells := strings.Split(strings.Trim(line, "|"), "|")
		for i := range cells {
			cells[i] = strings.TrimSpace(cells[i])
		}
		if !header {
			if len(cells) < 4 || cells[0] != "message" || cells[1] != "level" || cells[2] != "function" {
				t.Fatalf("%s: the Logs table's header is %q, want message | level | function | …", path, line)
			}
			header = true
			continue
		}
		if strings.Trim(cells[0], "-: ") == "" {
			continue // the separator row
		}
		if len(cells) < 4 {
			t.Errorf("%s: a Logs table row with %d cells: %s", path, len(cells), line)
			continue
		}
		m := tableMsg.FindStringSubmatch(cells[0])
		if m == nil {
			t.Errorf("%s: a Logs table row whose message is not one `code span`: %s", path, line)
			continue
		}
		e := docEntry{levels: map[string]bool{}, levelCell: cells[1], funcCell: cells[2]}
		for _, l := range levelWords.FindAllString(cells[1], -1) {
			e.levels[l] = true
		}
		switch cells[2] {
		case "both":
			e.functions = []string{"egress", "ingress"}
		case "ingress", "egress":
			e.functions = []string{cells[2]}
		default:
			t.Errorf("%s: %q: function %q is not ingress, egress or both", path, m[1], cells[2])
		}
		if len(e.levels) == 0 {
			t.Errorf("%s: %q: no level (DEBUG, INFO, WARN, ERROR) in %q", path, m[1], cells[1])
		}
		if _, dup := doc[m[1]]; dup {
			t.Errorf("%s: %q is in the Logs table twice", path, m[1])
		}
		doc[m[1]] = e
	}
	return doc
}
