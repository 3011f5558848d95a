package llmstream

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-llm-stream/caddy-llm-stream/internal/stop"
	"github.com/caddy-llm-stream/caddy-llm-stream/internal/wire"
)

// errStopped is the cause of a generation stopped through stop_endpoint or
// a WebSocket stop message.
var errStopped = errors.New("the generation was stopped")

// stopWait is how long a stop request waits for another instance to
// acknowledge that it stopped the generation.
const stopWait = time.Second

// stopped reports whether r's generation was stopped: its context ends
// with errStopped. A stop cancels that context, which ends the waits before
// an attempt and the attempt itself (try cancels an attempt that outlives
// the request context, while draining or sharing a cache flight, when the
// cause is a stop), and no further attempt starts.
func stopped(r *http.Request) bool {
	return errors.Is(context.Cause(r.Context()), errStopped)
}

// stoppable registers r's generation with stop_endpoint, when set,
// returning the request to use from now on and the release to call when
// it ends. (A WebSocket message's request is stopped by the bridge, which
// cancels its context with errStopped itself.)
func (h *Handler) stoppable(r *http.Request, id, owner string) (*http.Request, func()) {
	if h.StopEndpoint == "" {
		return r, func() {}
	}
	ctx, cancel := context.WithCancelCause(r.Context())
	remove := stop.Add(id, owner, func() { cancel(errStopped) })
	return r.WithContext(ctx), func() {
		remove()
		cancel(nil)
	}
}

// provisionStop checks stop_endpoint and, with store redis, subscribes to
// the stops of other instances.
func (h *Handler) provisionStop() error {
	p := h.StopEndpoint
	if p == "" {
		return nil
	}
	if err := checkStopEndpoint(p); err != nil {
		return err
	}
	if h.redis != nil {
		h.stops = stop.NewRedis(h.redis.Client(), h.redisPrefix(), 250*time.Millisecond)
	}
	return nil
}

// isStopPath reports whether a request is for stop_endpoint.
func (h *Handler) isStopPath(path string) bool {
	return h.StopEndpoint != "" && strings.HasPrefix(path, h.StopEndpoint+"/")
}

// endpointID is the id in the path of a request to <endpoint>/<id>, or
// the error to answer: a wrong method (with Allow set) or a bad id.
func endpointID(w http.ResponseWriter, r *http.Request, method, endpoint, what, idIs string) (string, *apiError) {
	id := strings.TrimPrefix(r.URL.Path, endpoint+"/")
	if r.Method != method {
		w.Header().Set("Allow", method)
		return "", &apiError{Status: http.StatusMethodNotAllowed, Type: typeInvalidRequest, Code: "method_not_allowed",
			Message: what + " with " + method + " " + endpoint + "/<id>"}
	}
	if id == "" || strings.Contains(id, "/") || len(id) > 200 {
		return "", &apiError{Status: http.StatusBadRequest, Type: typeInvalidRequest, Code: "invalid_request_id",
			Message: "the path must be " + endpoint + "/<id>, with " + idIs}
	}
	return id, nil
}

// serveStop answers POST <stop_endpoint>/<request_id>: the generation is
// stopped here or, with a shared store, on the instance running it.
func (h *Handler) serveStop(w http.ResponseWriter, r *http.Request, owner string) error {
	id, aerr := endpointID(w, r, http.MethodPost, h.StopEndpoint, "stop a generation", "the X-Request-Id of the generation")
	if aerr != nil {
		return h.reject(w, "", aerr)
	}
	found := stop.Local(id, owner)
	if !found && h.stops != nil {
		ctx, cancel := context.WithTimeout(r.Context(), stopWait)
		var err error
		found, err = h.stops.Stop(ctx, id, owner)
		cancel()
		if err != nil && !found {
			h.logger.Warn("stop could not reach the other instances", zap.String("request_id", id), zap.Error(err))
			return h.reject(w, "", &apiError{Status: http.StatusServiceUnavailable, Type: typeUpstream, Code: "store_unavailable",
				Message: "the stop could not be passed to the other instances"})
		}
	}
	if !found {
		return h.reject(w, "", &apiError{Status: http.StatusNotFound, Type: typeInvalidRequest, Code: "generation_not_found",
			Message: "no generation with id " + id + " is in progress"})
	}
	wire.WriteJSON(w, struct {
		ID      string `json:"id"`
		Object  string `json:"object"`
		Stopped bool   `json:"stopped"`
	}{id, "generation.stop", true})
	return nil
}
