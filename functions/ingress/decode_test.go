package main

import (
	"errors"
	"runtime"
	"strings"
	"testing"
)

// TestDecodeMessage: what a publish body becomes, and which error each bad
// one gets.
func TestDecodeMessage(t *testing.T) {
	for _, tc := range []struct {
		body        string
		withChannel bool
		data, event string // accepted: what they become
		channel     string
		code, msg   string // refused: the error
	}{
		{body: `{"data":{"a":[1,"x y"]},"event":"e"}`, data: `{"a":[1,"x y"]}`, event: "e"},
		{body: ` { "data" : { "a" : [ 1 , "x y" ] } } `, data: `{"a":[1,"x y"]}`},
		{body: "{\"data\":[1,\t2]}", data: `[1,2]`},
		{body: "{\"data\":[1,\r\n2]}", data: `[1,2]`},
		{body: `{"data":"tab\there"}`, data: `"tab\there"`},
		{body: `{"data":1,"event":null,"from":null}`, data: `1`},
		{body: `{"data":1,"event":""}`, data: `1`}, // as absent: frames omit an empty event
		{body: `{"channel":"c:1","data":1}`, withChannel: true, data: `1`, channel: "c:1"},
		{body: `{"data":1}`, withChannel: true, code: "invalid_channel", msg: `"channel" is required`},
		{body: `{"channel":null,"data":1}`, withChannel: true, code: "invalid_channel", msg: `"channel" is required`},
		{body: `{"channel":"a b","data":1}`, withChannel: true, code: "invalid_channel"},
		{body: `{"data":null}`, code: "missing_data"},
		{body: `{}`, code: "missing_data"},
		{body: `[1]`, code: "invalid_json"},
		{body: `{"data":1,"event":5}`, code: "invalid_event"},
		// Not UTF-8, in data or anywhere else: browsers drop a socket
		// that receives it in a text frame.
		{body: "{\"data\":\"a\xff\xfe\"}", code: "invalid_json", msg: "body is not valid UTF-8"},
		{body: "{\"data\":1,\"x\":\"\xc3\"}", code: "invalid_json", msg: "body is not valid UTF-8"},
		{body: `{"data":"\udc00 é"}`, data: `"\udc00 é"`},
		{body: "\u00a0{\"data\":1}", code: "invalid_json"}, // not JSON whitespace
		{body: " \t\r\n{\"data\":1}\n", data: `1`},
	} {
		p, ae := decodeMessage([]byte(tc.body), tc.withChannel)
		if tc.code != "" {
			if ae == nil || ae.Code != tc.code || (tc.msg != "" && ae.Message != tc.msg) {
				t.Errorf("%s: got %+v, %v; want %s %q", tc.body, p, ae, tc.code, tc.msg)
			}
			continue
		}
		if ae != nil || string(p.Data) != tc.data || p.Event != tc.event || p.Channel != tc.channel {
			t.Errorf("%s: got data %s event %q channel %q, %v; want %s %q %q", tc.body, p.Data, p.Event, p.Channel, ae, tc.data, tc.event, tc.channel)
		}
	}
}

// TestDecodeBatchItemNotObject: a batch item that is not an object is
// named as the item, not as the body (which is an object).
func TestDecodeBatchItemNotObject(t *testing.T) {
	_, err := decodeBatch([]byte(`{"messages":[{"channel":"a","data":1},[1]]}`), 10, 1024, nil)
	var ie *indexedError
	if !errors.As(err, &ie) || ie.Index != 1 || ie.Message != "message 1: must be a JSON object" {
		t.Fatalf("got %#v, want message 1: must be a JSON object", err)
	}
}

// TestDecodeBatchOverLimitCheap: a batch body of MAX_BATCH_BYTES can hold
// about two million tiny items; one over the item limit is refused
// having read one item past it, not all of them (decoded in full first,
// a 4 MiB body took some 230 MB). Measured in bytes allocated, which
// do not depend on the machine's speed; not parallel, so that no other
// test allocates meanwhile.
func TestDecodeBatchOverLimitCheap(t *testing.T) {
	body := []byte(`{"messages":[0` + strings.Repeat(",0", 2<<20-10) + `]}`)
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	_, err := decodeBatch(body, 1000, 1<<20, nil)
	runtime.ReadMemStats(&after)
	var ae *apiError
	if !errors.As(err, &ae) || ae.Code != "invalid_batch" {
		t.Fatalf("error %v, want invalid_batch", err)
	}
	if n := after.TotalAlloc - before.TotalAlloc; n > 8*uint64(len(body)) {
		t.Fatalf("refusing a %d-byte body allocated %d bytes", len(body), n)
	}
}

// TestDecodeBatchMessagesShapes: the "messages" key is read as any field
// is: null or absent is missing, the last of a repeated key counts, and
// the key's case does not matter.
func TestDecodeBatchMessagesShapes(t *testing.T) {
	t.Parallel()
	item := `{"channel":"a","data":1}`
	for _, tc := range []struct {
		body string
		code string // "" accepted
		n    int
	}{
		{`{"messages":null}`, "invalid_batch", 0},
		{`{"x":1}`, "invalid_batch", 0},
		{`{"messages":5}`, "invalid_batch", 0},
		{`{"messages":"x"}`, "invalid_batch", 0},
		{`{"messages":{}}`, "invalid_batch", 0},
		{`{"messages":[` + item + `],"messages":null}`, "invalid_batch", 0},
		{`{"messages":[1,2,3,4],"messages":[` + item + `]}`, "", 1},
		{`{"messages":[` + item + `],"messages":[1,2,3,4]}`, "invalid_batch", 0},
		{`{"Messages":[` + item + `,` + item + `]}`, "", 2},
		{`{"messages":[` + item + `,` + item + `,` + item + `]}`, "", 3},
		{`{"messages":[` + item + `,` + item + `,` + item + `,` + item + `]}`, "invalid_batch", 0},
		{`{"messages":[` + item + `,` + item + `,` + item + `,]}`, "invalid_json", 0},
	} {
		got, err := decodeBatch([]byte(tc.body), 3, 1024, nil)
		var ae *apiError
		switch {
		case tc.code == "" && (err != nil || len(got) != tc.n):
			t.Errorf("%s: %d items, error %v; want %d items", tc.body, len(got), err, tc.n)
		case tc.code != "" && (!errors.As(err, &ae) || ae.Code != tc.code):
			t.Errorf("%s: error %v, want %s", tc.body, err, tc.code)
		}
	}
}
