package llmstream

import (
	"context"
	"net/http"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
)

// Responses API follow-ups. A request with previous_response_id only
// works on the provider account that produced that response, so the
// handler remembers which upstream and key (by its fingerprint, never the
// key) answered each response, and sends the follow-up there. With
// `store redis` every instance knows what any of them learnt.

// defaultResponseTTL is how long a response id is remembered: providers
// keep stored responses for 30 days.
const defaultResponseTTL = 30 * 24 * time.Hour

// responseRoute is where a response was produced: the upstream's URL and
// its key's fingerprint.
type responseRoute struct {
	upstream, key string
}

func (r responseRoute) String() string { return r.key + " " + r.upstream }

func parseResponseRoute(s string) (responseRoute, bool) {
	key, up, ok := strings.Cut(s, " ")
	return responseRoute{upstream: up, key: key}, ok
}

// provisionResponseRoutes sets up where routes are kept.
func (h *Handler) provisionResponseRoutes() error {
	if h.ResponseTTL == 0 {
		h.ResponseTTL = caddy.Duration(defaultResponseTTL)
	}
	var err error
	h.responses, err = h.recallStore("resp:")
	return err
}

// followUp pins a Responses API follow-up to the upstream and key that
// produced its previous response, when known and still configured.
func (h *Handler) followUp(x *exchange) *pin {
	if x.in.previousResponse == "" || h.responses == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(x.r.Context(), time.Second)
	defer cancel()
	s, ok, err := h.responses.get(ctx, x.in.previousResponse)
	if err != nil {
		h.logger.Warn("looking up a previous response failed; routing as usual", zap.Error(err))
	}
	rt, parsed := parseResponseRoute(s)
	if !ok || !parsed {
		return nil
	}
	for _, u := range x.cands {
		if u.URL != rt.upstream {
			continue
		}
		for _, k := range u.keys {
			if k.id == rt.key {
				return &pin{up: u, key: k}
			}
		}
	}
	return nil
}

// rememberResponse records where a Responses API answer was produced.
func (h *Handler) rememberResponse(x *exchange, snap relaySnapshot) {
	if h.responses == nil || x.at.up == nil || x.at.key == nil || snap.answerID == "" ||
		x.last.cached || x.last.code != http.StatusOK || !strings.HasSuffix(x.r.URL.Path, "/responses") {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	rt := responseRoute{upstream: x.at.up.URL, key: x.at.key.id}
	if err := h.responses.set(ctx, snap.answerID, rt.String(), time.Duration(h.ResponseTTL)); err != nil {
		h.logger.Warn("remembering a response's upstream failed", zap.Error(err))
	}
}
