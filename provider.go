package llmstream

import (
	"net/http"
	"sort"
	"strings"
)

// Provider dialects: how each provider style is called. Adding a provider
// is one entry here (plus a fixture of what it really sends in
// providers_test.go); the usage and text readers (usage.go, content.go)
// recognise every answer shape below by its fields, so an
// OpenAI-compatible provider needs nothing more.
type dialect struct {
	// The request header the key goes in, and whether it is sent as
	// "Bearer <key>".
	keyHeader string
	bearer    bool
	// The API version the provider requires, sent when the client sent
	// none: as a query parameter or a header, with this default.
	versionQuery, versionHeader string
	defaultVersion              string
	// Its gen_ai.provider.name in OpenTelemetry spans (telemetry.go).
	genAIName string
}

var dialects = map[string]dialect{
	"openai":    {keyHeader: "Authorization", bearer: true, genAIName: "openai"}, // and OpenAI-compatible providers
	"azure":     {keyHeader: "Api-Key", versionQuery: "api-version", defaultVersion: "2024-10-21", genAIName: "azure.ai.openai"},
	"anthropic": {keyHeader: "X-Api-Key", versionHeader: "Anthropic-Version", defaultVersion: "2023-06-01", genAIName: "anthropic"},
	"gemini":    {keyHeader: "X-Goog-Api-Key", genAIName: "gcp.gemini"},
}

// providerNames lists the dialects, for messages.
func providerNames() string {
	names := make([]string, 0, len(dialects))
	for n := range dialects {
		names = append(names, n)
	}
	sort.Strings(names)
	return strings.Join(names, ", ")
}

// authorize puts the key on an upstream request in the provider's style,
// with the API version it requires. Client credentials were removed
// before.
func (u *Upstream) authorize(req *http.Request, key string) {
	d := dialects[u.Provider]
	if key != "" {
		if d.bearer {
			key = "Bearer " + key
		}
		req.Header.Set(d.keyHeader, key)
	}
	version := u.APIVersion
	if version == "" {
		version = d.defaultVersion
	}
	switch {
	case d.versionQuery != "":
		// Keep the client's version, else ours.
		if q := req.URL.Query(); q.Get(d.versionQuery) == "" {
			q.Set(d.versionQuery, version)
			req.URL.RawQuery = q.Encode()
		}
	case d.versionHeader != "" && req.Header.Get(d.versionHeader) == "":
		req.Header.Set(d.versionHeader, version)
	}
}

// API shapes: how an answer of each API ends, by the request path. A
// stopped stream gets this end so that clients finish as after a complete
// answer; the Responses API and Gemini streams simply end.
var streamFinales = []struct{ pathSuffix, finale string }{
	{"/messages", "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"}, // Anthropic
	{"/completions", "data: [DONE]\n\n"},                                        // OpenAI chat and text completions
}

// streamFinale is the clean end of a stream answering path, or "".
func streamFinale(path string) string {
	for _, f := range streamFinales {
		if strings.HasSuffix(path, f.pathSuffix) {
			return f.finale
		}
	}
	return ""
}
