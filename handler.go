package llmstream

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strconv"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

// maxErrorBody bounds how much of an upstream error body is read (and
// scrubbed) before it is passed on.
const maxErrorBody = 1 << 20

// ServeHTTP proxies one request: read the body once, send it upstream with
// the configured key, and relay the answer as it arrives.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	in, aerr := readRequest(r, h.MaxRequestBody)
	if aerr != nil {
		aerr.write(w)
		return nil
	}

	// One context for the upstream request: cancelled when the client
	// leaves, and with a cause when a timeout of ours fires.
	ctx, cancel := context.WithCancelCause(r.Context())
	defer cancel(nil)

	rl := newRelay(w, h, in.stream, cancel)
	defer rl.stop()

	req, err := h.newUpstreamRequest(ctx, r, in)
	if err != nil {
		return caddyhttpError(err)
	}
	start := time.Now()
	resp, err := h.roundTrip(req, cancel)
	if err != nil {
		return h.failBeforeBody(w, r, rl, err)
	}
	defer resp.Body.Close()

	if resp.StatusCode >= 400 {
		h.passError(w, rl, resp)
		return nil
	}

	body, err := decodedBody(resp)
	if err != nil {
		return h.failBeforeBody(w, r, rl, err)
	}
	rl.begin(resp, in.stream)
	out := rl.copyBody(body)
	rl.stop()

	logFields := []zap.Field{
		zap.String("upstream", h.Upstream),
		zap.String("key", fingerprint(h.apiKey)),
		zap.Int("status", resp.StatusCode),
		zap.Int64("bytes", out.bytes),
		zap.Duration("duration", time.Since(start)),
	}
	switch {
	case out.err == nil:
		h.logger.Debug("relayed", logFields...)
	case out.clientGone || r.Context().Err() != nil:
		// The client left: the deferred cancel stops the upstream now.
		h.logger.Debug("client disconnected", logFields...)
	default:
		cause := context.Cause(ctx)
		if cause == nil {
			cause = out.err
		}
		h.logger.Warn("upstream stream broke", append(logFields, zap.String("error", h.secrets.scrubString(cause.Error())))...)
		if !rl.fail(brokenStreamError(cause)) {
			// A plain body cut short must not look complete.
			panic(http.ErrAbortHandler)
		}
	}
	return nil
}

// failBeforeBody answers a request whose upstream gave no response.
func (h *Handler) failBeforeBody(w http.ResponseWriter, r *http.Request, rl *relay, err error) error {
	if r.Context().Err() != nil {
		// The client left while we waited; nobody to answer.
		h.logger.Debug("client disconnected before the upstream answered", zap.String("upstream", h.Upstream))
		return nil
	}
	e := h.upstreamFailure(err)
	h.logger.Warn("upstream request failed",
		zap.String("upstream", h.Upstream),
		zap.String("key", fingerprint(h.apiKey)),
		zap.String("error", e.Message))
	rl.stop()
	if rl.isCommitted() {
		rl.fail(e) // heartbeats already started an event stream
		return nil
	}
	e.write(w)
	return nil
}

// passError relays an upstream error status with its body, scrubbed of the
// key, and its headers (Retry-After among them).
func (h *Handler) passError(w http.ResponseWriter, rl *relay, resp *http.Response) {
	rl.stop()
	raw, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorBody))
	body := h.secrets.scrub(raw)
	h.logger.Warn("upstream answered with an error",
		zap.String("upstream", h.Upstream),
		zap.String("key", fingerprint(h.apiKey)),
		zap.Int("status", resp.StatusCode))
	if rl.isCommitted() {
		rl.fail(upstreamStatusError(resp.StatusCode, body))
		return
	}
	hdr := w.Header()
	copyResponseHeaders(hdr, resp.Header)
	hdr.Del("Content-Encoding")
	hdr.Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(resp.StatusCode)
	_, _ = w.Write(body)
}

// upstreamStatusError turns an upstream error answer into an in-band error,
// keeping the upstream's own message, type and code when it used the OpenAI
// (or Anthropic) error shape.
func upstreamStatusError(status int, body []byte) *apiError {
	e := &apiError{Status: status, Type: typeUpstream, Code: "upstream_status_" + strconv.Itoa(status),
		Message: "the upstream answered " + strconv.Itoa(status) + " " + http.StatusText(status)}
	var shaped struct {
		Error struct {
			Message string `json:"message"`
			Type    string `json:"type"`
			Code    any    `json:"code"`
		} `json:"error"`
	}
	if json.Unmarshal(body, &shaped) == nil && shaped.Error.Message != "" {
		e.Message = shaped.Error.Message
		if shaped.Error.Type != "" {
			e.Type = shaped.Error.Type
		}
		if c, ok := shaped.Error.Code.(string); ok && c != "" {
			e.Code = c
		}
	}
	return e
}

func caddyhttpError(err error) error {
	return caddyhttp.Error(http.StatusInternalServerError, errors.New("building the upstream request: "+err.Error()))
}
