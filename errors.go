package llmstream

import (
	"encoding/json"
	"net/http"
	"strconv"
	"time"
)

// Error types and codes sent to clients, in the OpenAI error shape.
const (
	typeInvalidRequest = "invalid_request_error"
	typeUpstream       = "upstream_error"
	typeTimeout        = "timeout_error"
)

// apiError is an error a client can act on, rendered in the OpenAI error
// shape: {"error":{"message":…,"type":…,"code":…}}.
type apiError struct {
	Status  int    `json:"-"`
	Message string `json:"message"`
	Type    string `json:"type"`
	Code    string `json:"code"`

	retryAfter time.Duration // sent as Retry-After when set
}

func (e *apiError) Error() string { return e.Message }

// body renders the error as JSON.
func (e *apiError) body() []byte {
	b, _ := json.Marshal(struct {
		Error *apiError `json:"error"`
	}{e})
	return b
}

// write sends the error as a complete JSON response.
func (e *apiError) write(w http.ResponseWriter) {
	b := e.body()
	hdr := w.Header()
	hdr.Set("Content-Type", "application/json")
	hdr.Set("Content-Length", strconv.Itoa(len(b)))
	hdr.Del("Content-Encoding")
	if e.retryAfter > 0 {
		hdr.Set("Retry-After", strconv.Itoa(int((e.retryAfter+time.Second-1)/time.Second)))
	}
	w.WriteHeader(e.Status)
	_, _ = w.Write(b)
}

// errNotPriced refuses a request for a model without a price while a
// spend limit applies: its cost could not be counted.
func errNotPriced(model string) *apiError {
	return &apiError{Status: http.StatusForbidden, Type: typeInvalidRequest, Code: "model_not_priced",
		Message: "the model '" + model + "' has no price, and spending is limited here"}
}
