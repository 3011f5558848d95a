package llmstream

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-llm-stream/caddy-llm-stream/internal/wire"
)

// usage_endpoint: GET <usage_endpoint>/<id> answers what the handler
// measured of a request that ended: its usage by kind, what it cost, its
// time to first token and speed, whether the cache answered. The id is
// the request's X-Request-Id, or the answer's own id (`chatcmpl-…`, the
// only id a WebSocket client sees). Records are kept usageRecordTTL, in
// memory or with `store redis` for every instance; where client keys or
// identity are configured, only the caller that made a request may read
// its record.

// usageRecordTTL is how long a record can be read.
const usageRecordTTL = 10 * time.Minute

// usageRecord is what usage_endpoint answers.
type usageRecord struct {
	ID              string       `json:"id"`
	Object          string       `json:"object"` // "llm.usage"
	Model           string       `json:"model"`
	Usage           usageDetails `json:"usage"`
	CostUSD         *float64     `json:"cost_usd,omitempty"`
	TTFTMillis      int64        `json:"ttft_ms"`
	TokensPerSecond float64      `json:"tokens_per_second"`
	Cache           string       `json:"cache,omitempty"`
	Stopped         bool         `json:"stopped"`
	Owner           string       `json:"owner,omitempty"` // kept, never answered
}

type usageDetails struct {
	PromptTokens     int64  `json:"prompt_tokens"`
	CompletionTokens int64  `json:"completion_tokens"`
	TotalTokens      int64  `json:"total_tokens"`
	CachedTokens     int64  `json:"cached_tokens"`
	CacheWriteTokens int64  `json:"cache_write_tokens"`
	ReasoningTokens  int64  `json:"reasoning_tokens"`
	Status           string `json:"status"`
}

// provisionUsageEndpoint checks usage_endpoint and sets up where records
// are kept.
func (h *Handler) provisionUsageEndpoint() error {
	if h.UsageEndpoint == "" {
		return nil
	}
	if err := checkEndpointPath("usage_endpoint", h.UsageEndpoint); err != nil {
		return err
	}
	var err error
	h.usageRecords, err = h.recallStore("usage:")
	return err
}

// isUsagePath reports whether a request is for usage_endpoint.
func (h *Handler) isUsagePath(path string) bool {
	return h.UsageEndpoint != "" && strings.HasPrefix(path, h.UsageEndpoint+"/")
}

// keepUsageRecord keeps what the usage line says for usage_endpoint,
// under the request id and the answer's id.
func (h *Handler) keepUsageRecord(x *exchange, snap relaySnapshot, ttft time.Duration, tps float64, cacheResult string) {
	if h.usageRecords == nil {
		return
	}
	u := x.usage
	rec := usageRecord{ID: x.in.id, Object: "llm.usage", Model: x.in.model,
		Usage: usageDetails{PromptTokens: u.prompt, CompletionTokens: u.completion, TotalTokens: u.total(),
			CachedTokens: u.cached, CacheWriteTokens: u.cacheWrite, ReasoningTokens: u.reasoning, Status: u.status},
		TTFTMillis: ttft.Milliseconds(), TokensPerSecond: tps, Cache: cacheResult, Stopped: x.last.stopped, Owner: x.owner}
	if x.priced {
		c := usd(x.cost)
		rec.CostUSD = &c
	}
	b, _ := json.Marshal(rec)
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	for _, id := range []string{x.in.id, snap.answerID} {
		if id == "" {
			continue
		}
		if err := h.usageRecords.set(ctx, id, string(b), usageRecordTTL); err != nil {
			h.logger.Warn("keeping a usage record failed", zap.String("request_id", x.in.id), zap.Error(err))
			return
		}
	}
}

// serveUsage answers GET <usage_endpoint>/<id>.
func (h *Handler) serveUsage(w http.ResponseWriter, r *http.Request, owner string) error {
	id, aerr := endpointID(w, r, http.MethodGet, h.UsageEndpoint, "read a request's usage", "a request's X-Request-Id or its answer's id")
	if aerr != nil {
		return h.reject(w, "", aerr)
	}
	s, ok, err := h.usageRecords.get(r.Context(), id)
	if err != nil {
		h.logger.Warn("reading a usage record failed", zap.String("id", id), zap.Error(err))
		return h.reject(w, "", &apiError{Status: http.StatusServiceUnavailable, Type: typeUpstream, Code: "store_unavailable",
			Message: "usage records cannot be read now"})
	}
	var rec usageRecord
	if ok {
		ok = json.Unmarshal([]byte(s), &rec) == nil && (rec.Owner == "" || rec.Owner == owner)
	}
	if !ok {
		return h.reject(w, "", &apiError{Status: http.StatusNotFound, Type: typeInvalidRequest, Code: "usage_not_found",
			Message: "no finished request with id " + id + " is known here (records are kept " + usageRecordTTL.String() + ")"})
	}
	rec.Owner = ""
	wire.WriteJSON(w, rec)
	return nil
}
