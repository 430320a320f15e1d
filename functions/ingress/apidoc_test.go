package main

import (
	"go/ast"
	"go/parser"
	"go/token"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// TestErrorCodesDocumented: the table of docs/api.md's "## Errors" lists
// every status and error code the ingress answers with, and nothing it
// does not. Clients switch on these codes: one added to the code and
// not to the table, or renamed in one of them, would be a code no client
// was told of. The codes are read from the package's source (its non-test
// files): errf, unauthorized, forbidden and queryOnce calls and
// apiError literals.
func TestErrorCodesDocumented(t *testing.T) {
	t.Parallel()
	fromDoc := docErrorCodes(t, filepath.Join("..", "..", "docs", "api.md"))
	fromCode := sourceErrorCodes(t)
	for pair := range fromCode {
		if !fromDoc[pair] {
			t.Errorf("the ingress answers %s, which docs/api.md's Errors table does not list", pair)
		}
	}
	for pair := range fromDoc {
		if !fromCode[pair] {
			t.Errorf("docs/api.md's Errors table lists %s, which the ingress never answers", pair)
		}
	}
}

// docErrorCodes reads "<status> <code>" pairs from the rows of the table
// under "## Errors" (a row may name several codes).
func docErrorCodes(t *testing.T, path string) map[string]bool {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(b), "\n## Errors\n")
	if !ok {
		t.Fatalf("%s: no \"## Errors\" section", path)
	}
	section, _, _ = strings.Cut(section, "\n## ")
	row := regexp.MustCompile(`(?m)^\| ([0-9]{3}) \| ([^|]+) \|`)
	code := regexp.MustCompile("`([a-z_]+)`")
	out := map[string]bool{}
	for _, m := range row.FindAllStringSubmatch(section, -1) {
		for _, c := range code.FindAllStringSubmatch(m[2], -1) {
			out[m[1]+" "+c[1]] = true
		}
	}
	if len(out) == 0 {
		t.Fatalf("%s: no error code in the Errors table", path)
	}
	return out
}

// sourceErrorCodes reads "<status> <code>" pairs from this package's
// non-test source.
func sourceErrorCodes(t *testing.T) map[string]bool {
	t.Helper()
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	// The net/http status names the package uses; a new one fails below.
	statuses := map[string]int{
		"StatusBadRequest":            http.StatusBadRequest,
		"StatusUnauthorized":          http.StatusUnauthorized,
		"StatusForbidden":             http.StatusForbidden,
		"StatusNotFound":              http.StatusNotFound,
		"StatusMethodNotAllowed":      http.StatusMethodNotAllowed,
		"StatusConflict":              http.StatusConflict,
		"StatusRequestEntityTooLarge": http.StatusRequestEntityTooLarge,
		"StatusUnsupportedMediaType":  http.StatusUnsupportedMediaType,
		"StatusUnprocessableEntity":   http.StatusUnprocessableEntity,
		"StatusTooManyRequests":       http.StatusTooManyRequests,
		"StatusInternalServerError":   http.StatusInternalServerError,
		"StatusServiceUnavailable":    http.StatusServiceUnavailable,
	}
	fset := token.NewFileSet()
	out := map[string]bool{}
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		file, err := parser.ParseFile(fset, f, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		str := func(e ast.Expr) (string, bool) {
			lit, ok := e.(*ast.BasicLit)
			if !ok || lit.Kind != token.STRING {
				return "", false
			}
			s, err := strconv.Unquote(lit.Value)
			return s, err == nil
		}
		status := func(e ast.Expr) (int, bool) {
			switch e := e.(type) {
			case *ast.BasicLit:
				n, err := strconv.Atoi(e.Value)
				return n, err == nil
			case *ast.SelectorExpr:
				if x, ok := e.X.(*ast.Ident); ok && x.Name == "http" {
					n, ok := statuses[e.Sel.Name]
					return n, ok
				}
			}
			return 0, false
		}
		add := func(n ast.Node, st int, stOK bool, code string, codeOK bool) {
			if !stOK || !codeOK {
				// A status or code computed at run time: the parameters
				// of the helpers read above, in their own bodies.
				if fn := enclosingFunc(file, n); fn == "errf" || fn == "unauthorized" || fn == "queryOnce" {
					return
				}
				t.Errorf("%s: an error whose status or code is not a constant: the table cannot be checked", fset.Position(n.Pos()))
				return
			}
			out[strconv.Itoa(st)+" "+code] = true
		}
		ast.Inspect(file, func(n ast.Node) bool {
			switch n := n.(type) {
			case *ast.CallExpr:
				fn, ok := n.Fun.(*ast.Ident)
				if !ok {
					return true
				}
				switch {
				case fn.Name == "errf" && len(n.Args) == 3:
					st, stOK := status(n.Args[0])
					code, codeOK := str(n.Args[1])
					add(n, st, stOK, code, codeOK)
				case fn.Name == "unauthorized" && len(n.Args) == 2:
					code, codeOK := str(n.Args[0])
					add(n, http.StatusUnauthorized, true, code, codeOK)
				case fn.Name == "queryOnce" && len(n.Args) == 3:
					code, codeOK := str(n.Args[2])
					add(n, http.StatusBadRequest, true, code, codeOK)
				case fn.Name == "forbidden" && len(n.Args) == 1:
					add(n, http.StatusForbidden, true, "forbidden", true)
				}
			case *ast.CompositeLit:
				typ, ok := n.Type.(*ast.Ident)
				if !ok || typ.Name != "apiError" {
					return true
				}
				var st int
				var code string
				var stOK, codeOK bool
				for _, el := range n.Elts {
					kv, ok := el.(*ast.KeyValueExpr)
					if !ok {
						continue
					}
					switch k, _ := kv.Key.(*ast.Ident); {
					case k == nil:
					case k.Name == "Status":
						st, stOK = status(kv.Value)
					case k.Name == "Code":
						code, codeOK = str(kv.Value)
					}
				}
				add(n, st, stOK, code, codeOK)
			}
			return true
		})
	}
	if !out["404 not_found"] {
		t.Fatalf("read no 404 not_found from the source: %v", out)
	}
	return out
}

// enclosingFunc is the name of the function declaration of file that
// holds n.
func enclosingFunc(file *ast.File, n ast.Node) string {
	for _, d := range file.Decls {
		if fd, ok := d.(*ast.FuncDecl); ok && fd.Pos() <= n.Pos() && n.End() <= fd.End() {
			return fd.Name.Name
		}
	}
	return ""
}
