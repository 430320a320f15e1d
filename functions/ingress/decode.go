package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"reflect"
	"slices"
	"strings"
	"unicode/utf8"

	"github.com/gin-gonic/gin"

	"github.com/wsrelay/wsrelay/shared/channel"
	"github.com/wsrelay/wsrelay/shared/jsondepth"
)

// publishBody is one message as POSTed: {"data": …, "event": "…"}.
type publishBody struct {
	Channel string          // batch items only
	Data    json.RawMessage // required, any JSON value but null
	Event   string
	From    string
}

// readBody checks the content type and reads at most limit bytes.
func readBody(c *gin.Context, limit int64) ([]byte, error) {
	ct := c.GetHeader("Content-Type")
	mt, params, err := mime.ParseMediaType(ct)
	if ct == "" || err != nil || (mt != "application/json" && !isJSONSuffix(mt)) {
		return nil, errf(http.StatusUnsupportedMediaType, "unsupported_media_type", "Content-Type must be application/json")
	}
	// The body is read as UTF-8 whatever the client says: a body declared
	// in another charset is refused rather than taken for UTF-8 (a Latin-1
	// body that happens to be valid UTF-8 would be stored as other text).
	if cs, ok := params["charset"]; ok && !strings.EqualFold(cs, "utf-8") && !strings.EqualFold(cs, "utf8") {
		return nil, errf(http.StatusUnsupportedMediaType, "unsupported_media_type", "the body must be UTF-8: send charset=utf-8 or no charset")
	}
	if len(c.Request.Header.Values("Content-Type")) > 1 {
		return nil, errf(http.StatusUnsupportedMediaType, "unsupported_media_type", "send one Content-Type header, not several")
	}
	for _, v := range c.Request.Header.Values("Content-Encoding") {
		for _, ce := range strings.Split(v, ",") {
			if ce = strings.TrimSpace(ce); ce != "" && !strings.EqualFold(ce, "identity") {
				// RFC 9110 §15.5.16: a content coding the server does not
				// take is a 415, and Accept-Encoding says what it takes.
				c.Header("Accept-Encoding", "identity")
				return nil, errf(http.StatusUnsupportedMediaType, "unsupported_media_type", "a Content-Encoding other than identity is not accepted: send the body uncompressed")
			}
		}
	}
	if c.Request.ContentLength > limit {
		// Refused unread: a client waiting on Expect: 100-continue is not
		// asked for a body that cannot fit (RFC 9110 §10.1.1).
		return nil, errTooLarge(limit)
	}
	body, err := io.ReadAll(http.MaxBytesReader(c.Writer, c.Request.Body, limit))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return nil, errTooLarge(limit)
		}
		return nil, errf(http.StatusBadRequest, "invalid_body", "could not read the request body")
	}
	return body, nil
}

// errTooLarge answers a body over limit bytes.
func errTooLarge(limit int64) *apiError {
	return errf(http.StatusRequestEntityTooLarge, "payload_too_large", fmt.Sprintf("body is larger than %d bytes", limit))
}

// isJSONSuffix reports an application/*+json media type (RFC 6839).
func isJSONSuffix(mt string) bool {
	sub, ok := strings.CutPrefix(mt, "application/")
	return ok && len(sub) > 5 && strings.HasSuffix(sub, "+json")
}

// jsonSpace is the whitespace JSON allows around a value (RFC 8259 §2);
// bytes.TrimSpace would also strip Unicode spaces such as U+00A0.
const jsonSpace = " \t\r\n"

// decodeMessage parses and validates one message object. withChannel
// requires a "channel" field (batch items).
func decodeMessage(b []byte, withChannel bool) (publishBody, *apiError) {
	// An absent member leaves its RawMessage empty, a null one "null";
	// plain RawMessages rather than pointers save an allocation each.
	var raw struct {
		Channel json.RawMessage `json:"channel"`
		Data    json.RawMessage `json:"data"`
		Event   json.RawMessage `json:"event"`
		From    json.RawMessage `json:"from"`
	}
	var p publishBody
	b = bytes.Trim(b, jsonSpace)
	if bytes.HasPrefix(b, utf8BOM) {
		return p, errBOM()
	}
	if len(b) == 0 || b[0] != '{' {
		if withChannel {
			// A batch item: "message i: " goes before it.
			return p, errf(400, "invalid_json", "must be a JSON object")
		}
		return p, errf(400, "invalid_json", "body must be a JSON object")
	}
	if err := json.Unmarshal(b, &raw); err != nil {
		return p, errInvalidJSON(err)
	}
	// encoding/json copies RawMessages unchecked: invalid UTF-8 in data
	// would reach WebSocket text frames, which a browser must answer by
	// dropping the connection (RFC 6455 §8.1), at every resume too.
	if !utf8.Valid(b) {
		return p, errf(400, "invalid_json", "body is not valid UTF-8")
	}
	if withChannel {
		if isNull(raw.Channel) {
			return p, errf(400, "invalid_channel", `"channel" is required`)
		}
		if json.Unmarshal(raw.Channel, &p.Channel) != nil || !channel.ValidName(p.Channel) {
			return p, errInvalidChannel()
		}
	}
	if isNull(raw.Data) {
		return p, errf(400, "missing_data", `"data" is required and must not be null`)
	}
	if jsondepth.Exceeds(raw.Data, maxDataDepth) {
		return p, errf(400, "invalid_json", fmt.Sprintf(`"data" nests arrays and objects more than %d levels deep`, maxDataDepth))
	}
	p.Data = compact(raw.Data)
	if !isNull(raw.Event) {
		if json.Unmarshal(raw.Event, &p.Event) != nil || !channel.ValidEvent(p.Event) {
			return p, errf(400, "invalid_event", `"event" must be a string of at most 64 printable ASCII characters without quotes or backslashes`)
		}
	}
	if !isNull(raw.From) {
		if json.Unmarshal(raw.From, &p.From) != nil || !channel.ValidUser(p.From) {
			return p, errf(400, "invalid_from", `"from" must be a user id of `+channel.UserRule)
		}
	}
	return p, nil
}

// utf8BOM is U+FEFF in UTF-8, the byte order mark some editors and
// Windows tools (PowerShell 5's Out-File, .NET's UTF8Encoding(true)) put
// before a text.
var utf8BOM = []byte{0xEF, 0xBB, 0xBF}

// errBOM answers a body that begins with a byte order mark: JSON text
// sent over a network must not (RFC 8259 §8.1), and Go's decoder takes it
// for a stray character, so that without this answer its sender was told
// that a body which looks like an object "must be a JSON object".
func errBOM() *apiError {
	return errf(400, "invalid_json", "body begins with a byte order mark (U+FEFF), which JSON does not allow: send UTF-8 without one")
}

// errInvalidJSON answers a body encoding/json could not decode: not
// JSON, or JSON nested past the 10,000 levels it takes (checked over the
// whole body before any field is read, so no batch item is named).
func errInvalidJSON(err error) *apiError {
	var se *json.SyntaxError
	if errors.As(err, &se) && strings.HasSuffix(se.Error(), "exceeded max depth") {
		return errf(400, "invalid_json", fmt.Sprintf(`body nests arrays and objects more than 10000 levels deep ("data" may nest at most %d)`, maxDataDepth))
	}
	return errf(400, "invalid_json", "body is not valid JSON")
}

// isNull reports a member that is absent or null.
func isNull(m json.RawMessage) bool { return len(m) == 0 || string(m) == "null" }

// maxDataDepth bounds how deeply data nests arrays and objects. Deeper
// data would be stored, then break its readers: a history page holds
// data three levels down, and common JSON decoders stop at some depth
// (Ruby's at 100; Go's at 10,000, so that the Go client's History failed
// on every read of a page holding such a message). The publisher
// refuses the same before sending (publisher.MaxDataDepth, counted with
// the same jsondepth.Exceeds; e2e TestPublisherIngressErrors holds the
// two bounds equal).
const maxDataDepth = 64

// compact removes insignificant whitespace so a frame is one line. Most
// bodies have none (JSON.stringify, json.Marshal), and one without any
// whitespace byte has nothing to remove: it is returned as it is.
func compact(b json.RawMessage) json.RawMessage {
	if !bytes.ContainsAny(b, " \t\r\n") {
		return b
	}
	var buf bytes.Buffer
	buf.Grow(len(b))
	if json.Compact(&buf, b) != nil {
		return b
	}
	return buf.Bytes()
}

// batchItems is a batch's "messages" array, read item by item up to one
// past its limit: a body of MAX_BATCH_BYTES holds up to about two million
// items (`[0,0,…]`), and decoding them all before counting them took 60
// times the body's size in memory, for a request refused anyway.
type batchItems struct {
	max   int
	seen  bool // the key was present and not null
	over  bool // more than max items
	items []json.RawMessage
}

func (m *batchItems) UnmarshalJSON(b []byte) error {
	m.seen, m.over, m.items = false, false, nil // a repeated key: the last one counts, as for any field
	if string(b) == "null" {
		return nil
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	if t, err := dec.Token(); err != nil || t != json.Delim('[') {
		return &json.UnmarshalTypeError{Value: "non-array", Type: reflect.TypeFor[[]json.RawMessage]()}
	}
	m.seen = true
	for dec.More() {
		if len(m.items) == m.max {
			m.over = true
			return nil
		}
		var it json.RawMessage
		if err := dec.Decode(&it); err != nil {
			return err // not reached: Unmarshal checked the whole body first
		}
		m.items = append(m.items, it)
	}
	return nil
}

// decodeBatch parses {"messages": [...]}, validating every item; the
// first bad item's index is reported and nothing is written.
func decodeBatch(b []byte, maxItems int, maxItemBytes int64, check func(p *publishBody) *apiError) ([]publishBody, error) {
	raw := struct {
		Messages batchItems `json:"messages"`
	}{Messages: batchItems{max: maxItems}}
	b = bytes.Trim(b, jsonSpace)
	if bytes.HasPrefix(b, utf8BOM) {
		return nil, errBOM()
	}
	if len(b) == 0 || b[0] != '{' {
		return nil, errf(400, "invalid_json", "body must be a JSON object")
	}
	if err := json.Unmarshal(b, &raw); err != nil {
		var ute *json.UnmarshalTypeError
		if errors.As(err, &ute) {
			return nil, errf(400, "invalid_batch", `"messages" must be an array of message objects`)
		}
		return nil, errInvalidJSON(err)
	}
	if !raw.Messages.seen {
		return nil, errf(400, "invalid_batch", `"messages" is required`)
	}
	items := raw.Messages.items
	if len(items) == 0 || raw.Messages.over {
		return nil, errf(400, "invalid_batch", fmt.Sprintf(`"messages" must hold 1–%d items`, maxItems))
	}
	// Not UTF-8 outside the items (a field the ingress does not read) is
	// the body's fault, as in a single publish's body; inside an item, the
	// loop reports that item, in its turn.
	if !utf8.Valid(b) && !slices.ContainsFunc(items, func(it json.RawMessage) bool { return !utf8.Valid(it) }) {
		return nil, errf(400, "invalid_json", "body is not valid UTF-8")
	}
	out := make([]publishBody, len(items))
	for i, it := range items {
		if int64(len(it)) > maxItemBytes {
			return nil, &indexedError{errf(413, "payload_too_large", fmt.Sprintf("message %d is larger than %d bytes", i, maxItemBytes)), i}
		}
		p, ae := decodeMessage(it, true)
		if ae == nil && check != nil {
			ae = check(&p)
		}
		if ae != nil {
			ae.Message = fmt.Sprintf("message %d: %s", i, ae.Message)
			return nil, &indexedError{ae, i}
		}
		out[i] = p
	}
	return out, nil
}
