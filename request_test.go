package llmstream

import (
	"io"
	"net/http/httptest"
	"strings"
	"testing"
)

// The members routing needs are read from the body's top level only, as
// the provider will read them: escaped names count, the last of repeated
// members wins, values of another type are refused (model, stream) or
// name nothing (the conversation keys), and nested members are not taken.
func TestReadRequestFields(t *testing.T) {
	type fields struct {
		model                                                string
		stream                                               bool
		maxTokens                                            int64
		user, promptCacheKey, metadataUser, previousResponse string
	}
	for _, tc := range []struct {
		name, body string
		want       fields
		errCode    string
	}{
		{name: "plain", body: `{"model":"gpt-4o","stream":true,"max_tokens":100,"user":"u1"}`,
			want: fields{model: "gpt-4o", stream: true, maxTokens: 100, user: "u1"}},
		{name: "escaped name and value", body: `{"mod\u0065l":"gpt\u002d4o","stream":false}`,
			want: fields{model: "gpt-4o"}},
		{name: "last repeated wins", body: `{"model":"a","model":"b"}`, want: fields{model: "b"}},
		{name: "largest answer cap", body: `{"max_tokens":10,"max_completion_tokens":300,"max_output_tokens":20}`,
			want: fields{maxTokens: 300}},
		{name: "cap of another type ignored", body: `{"max_tokens":"many"}`, want: fields{}},
		{name: "nested members are not the request's", body: `{"messages":[{"model":"x","stream":true,"user":"v"}]}`,
			want: fields{}},
		{name: "conversation keys", body: ` { "prompt_cache_key" : "c1", "metadata": {"user_id":"m1"}, "previous_response_id":"resp_1" } `,
			want: fields{promptCacheKey: "c1", metadataUser: "m1", previousResponse: "resp_1"}},
		{name: "conversation key of another type names nothing", body: `{"user":42,"prompt_cache_key":null}`, want: fields{}},
		{name: "null model", body: `{"model":null,"stream":null}`, want: fields{}},
		{name: "model not a string", body: `{"model":4}`, errCode: "invalid_type"},
		{name: "stream not a boolean", body: `{"stream":"yes"}`, errCode: "invalid_type"},
		{name: "an array is no request object", body: `[{"model":"m"}]`, want: fields{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := httptest.NewRequest("POST", "/v1/chat/completions", strings.NewReader(tc.body))
			r.Header.Set("Content-Type", "application/json")
			in, err := readRequest(r, 1<<20)
			if tc.errCode != "" {
				if err == nil || err.Code != tc.errCode {
					t.Fatalf("error %v, want code %s", err, tc.errCode)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			got := fields{model: in.model, stream: in.stream, maxTokens: in.maxTokens, user: in.user,
				promptCacheKey: in.promptCacheKey, metadataUser: in.metadataUser, previousResponse: in.previousResponse}
			if got != tc.want {
				t.Errorf("got %+v\nwant %+v", got, tc.want)
			}
		})
	}
}

// The body is kept while the answer streams: read to its declared length it
// holds no spare capacity; a body that ends before its declared length, or
// one without a length that passes the limit, is refused.
func TestReadRequestBody(t *testing.T) {
	body := `{"model":"m","messages":[{"role":"user","content":"` + strings.Repeat("x", 3000) + `"}]}`
	r := httptest.NewRequest("POST", "/v1/chat/completions", strings.NewReader(body))
	r.Header.Set("Content-Type", "application/json")
	in, err := readRequest(r, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if string(in.body) != body || cap(in.body) != len(body) {
		t.Errorf("body of %d bytes kept in %d (want exactly its length)", len(in.body), cap(in.body))
	}

	// Read whole, the body is closed at once: HTTP/2 keeps the frame data
	// of a body not read to its end (1 KiB for a short prompt) until it
	// is closed, which would otherwise be when a long answer ends.
	closed := &closeRecorder{Reader: strings.NewReader(body)}
	r = httptest.NewRequest("POST", "/v1/chat/completions", closed)
	r.ContentLength = int64(len(body))
	if _, err := readRequest(r, 1<<20); err != nil || !closed.closed {
		t.Errorf("body read whole: closed %v (error %v), want closed", closed.closed, err)
	}

	r = httptest.NewRequest("POST", "/v1/chat/completions", strings.NewReader(`{"model":"m"}`))
	r.ContentLength = 100 // the client promised more than it sent
	if _, err := readRequest(r, 1<<20); err == nil || err.Code != "body_unreadable" || err.Status != 400 {
		t.Errorf("short body: %+v, want 400 body_unreadable", err)
	}

	r = httptest.NewRequest("POST", "/v1/chat/completions", strings.NewReader(body))
	r.ContentLength = -1 // chunked: the limit is found while reading
	if _, err := readRequest(r, 1000); err == nil || err.Status != 413 {
		t.Errorf("unlimited body over the limit: %+v, want 413", err)
	}
}

// closeRecorder is a request body that records whether it was closed.
type closeRecorder struct {
	io.Reader
	closed bool
}

func (c *closeRecorder) Close() error { c.closed = true; return nil }
