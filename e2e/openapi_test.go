package e2e

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"

	"github.com/wsrelay/wsrelay/shared/redistest"
)

// openAPI is docs/openapi.yaml, read generically.
type openAPI struct {
	Paths      map[string]map[string]any `yaml:"paths"`
	Components map[string]map[string]any `yaml:"components"`
}

// resolve follows a local $ref ("#/components/<kind>/<name>").
func (d *openAPI) resolve(t *testing.T, v any) map[string]any {
	t.Helper()
	m, _ := v.(map[string]any)
	ref, ok := m["$ref"].(string)
	if !ok {
		return m
	}
	parts := strings.Split(strings.TrimPrefix(ref, "#/components/"), "/")
	if len(parts) != 2 || d.Components[parts[0]][parts[1]] == nil {
		t.Fatalf("openapi: unresolvable $ref %q", ref)
	}
	return d.resolve(t, d.Components[parts[0]][parts[1]])
}

var httpMethods = []string{"get", "post", "put", "patch", "delete"}

// TestOpenAPI checks docs/openapi.yaml against the ingress: its operations
// are exactly the routes functions/ingress/routes.go registers (HEAD
// aside: registered wherever GET is, and documented once, in api.md and
// in openapi.yaml's description), every $ref resolves, and the real
// ingress answers a request to each operation with a status the
// operation documents, carrying the fields its schema requires.
func TestOpenAPI(t *testing.T) {
	root := repoRoot(t)
	b, err := os.ReadFile(filepath.Join(root, "docs", "openapi.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var doc openAPI
	if err := yaml.Unmarshal(b, &doc); err != nil {
		t.Fatal(err)
	}
	for _, ref := range regexp.MustCompile(`\$ref: "([^"]+)"`).FindAllStringSubmatch(string(b), -1) {
		doc.resolve(t, map[string]any{"$ref": ref[1]})
	}

	// The routes, from the source that registers them.
	src, err := os.ReadFile(filepath.Join(root, "functions", "ingress", "routes.go"))
	if err != nil {
		t.Fatal(err)
	}
	var routes, gets, heads []string
	for _, m := range regexp.MustCompile(`(?m)^\s*(r|v1)\.(GET|HEAD|POST|PUT|PATCH|DELETE)\("([^"]+)"`).FindAllStringSubmatch(string(src), -1) {
		path := m[3]
		if m[1] == "v1" {
			path = "/v1" + path
		}
		path = regexp.MustCompile(`:([a-z]+)`).ReplaceAllString(path, "{$1}")
		switch m[2] {
		case "HEAD":
			heads = append(heads, path)
			continue
		case "GET":
			gets = append(gets, path)
		}
		routes = append(routes, m[2]+" "+path)
	}
	// HEAD wherever GET (RFC 9110 §9.3.2; docs/api.md).
	slices.Sort(gets)
	slices.Sort(heads)
	if !slices.Equal(gets, heads) {
		t.Errorf("routes.go registers GET on\n  %v\nand HEAD on\n  %v\nwant HEAD wherever GET", gets, heads)
	}
	var ops []string
	for path, item := range doc.Paths {
		for _, method := range httpMethods {
			if item[method] != nil {
				ops = append(ops, strings.ToUpper(method)+" "+path)
			}
		}
	}
	slices.Sort(routes)
	slices.Sort(ops)
	if len(routes) < 10 || !slices.Equal(routes, ops) {
		t.Fatalf("routes.go registers\n  %v\nopenapi.yaml describes\n  %v", routes, ops)
	}

	e := env{"REDIS_URL": redistest.URL(t), "REDIS_KEY_PREFIX": redistest.Prefix(t), "ALLOW_ANONYMOUS": "true"}
	in := start(t, "ingress", e)
	msg := `{"data":{"text":"hi"},"event":"chat"}`
	for _, tc := range []struct {
		method, path, opPath, body string
	}{
		{"POST", "/v1/channels/room/messages", "/v1/channels/{channel}/messages", msg},
		{"POST", "/v1/channels/room/messages", "/v1/channels/{channel}/messages", `{}`},
		{"GET", "/v1/channels/room/messages", "/v1/channels/{channel}/messages", ""},
		{"GET", "/v1/channels/room/messages?after=0&limit=10", "/v1/channels/{channel}/messages", ""},
		{"GET", "/v1/channels/room/messages?before=0&limit=10", "/v1/channels/{channel}/messages", ""},
		{"GET", "/v1/channels/room/messages?before=1-0&after=0", "/v1/channels/{channel}/messages", ""},
		{"GET", "/v1/channels/room/messages?limit=0", "/v1/channels/{channel}/messages", ""},
		{"DELETE", "/v1/channels/room/messages", "/v1/channels/{channel}/messages", ""},
		{"POST", "/v1/messages", "/v1/messages", `{"messages":[{"channel":"a","data":1},{"channel":"b","data":2}]}`},
		{"GET", "/v1/channels/room/connections", "/v1/channels/{channel}/connections", ""},
		{"GET", "/v1/connections/nobody", "/v1/connections/{id}", ""},
		{"DELETE", "/v1/connections/nobody", "/v1/connections/{id}", ""},
		{"POST", "/v1/connections/nobody/messages", "/v1/connections/{id}/messages", msg},
		{"POST", "/v1/users/alice/messages", "/v1/users/{user}/messages", msg},
		{"GET", "/v1/users/alice/connections", "/v1/users/{user}/connections", ""},
		{"GET", "/v1/users/a%20b/connections", "/v1/users/{user}/connections", ""},
		{"DELETE", "/v1/users/alice/connections", "/v1/users/{user}/connections", ""},
		{"GET", "/healthz", "/healthz", ""},
		{"GET", "/readyz", "/readyz", ""},
		{"GET", "/metrics", "/metrics", ""},
	} {
		var body io.Reader
		if tc.body != "" {
			body = strings.NewReader(tc.body)
		}
		req, _ := http.NewRequest(tc.method, in.URL+tc.path, body)
		if tc.body != "" {
			req.Header.Set("Content-Type", "application/json")
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		rb, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		what := tc.method + " " + tc.path
		op, _ := doc.Paths[tc.opPath][strings.ToLower(tc.method)].(map[string]any)
		responses, _ := op["responses"].(map[string]any)
		documented := doc.resolve(t, responses[strconv.Itoa(resp.StatusCode)])
		if documented == nil {
			t.Errorf("%s: %d %s is not a response openapi.yaml documents", what, resp.StatusCode, rb)
			continue
		}
		content, _ := documented["content"].(map[string]any)
		media, _ := content["application/json"].(map[string]any)
		if media == nil {
			continue
		}
		schema := doc.resolve(t, media["schema"])
		var got map[string]any
		if err := json.Unmarshal(bytes.TrimSpace(rb), &got); err != nil {
			t.Errorf("%s: %d, body %q is not a JSON object", what, resp.StatusCode, rb)
			continue
		}
		required, _ := schema["required"].([]any)
		for _, f := range required {
			if _, ok := got[f.(string)]; !ok {
				t.Errorf("%s: %d %s lacks %q, which the schema requires", what, resp.StatusCode, rb, f)
			}
		}
	}
}
