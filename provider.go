package llmstream

import "net/http"

// Defaults for the provider-specific version parameters.
const (
	defaultAzureAPIVersion  = "2024-10-21"
	defaultAnthropicVersion = "2023-06-01"
)

// authorize puts the key on an upstream request in the provider's style.
// Client credentials were removed before.
func (u *Upstream) authorize(req *http.Request, key string) {
	switch u.Provider {
	case "azure":
		if key != "" {
			req.Header.Set("Api-Key", key)
		}
		// Azure needs api-version; keep the client's, else the default.
		if q := req.URL.Query(); q.Get("api-version") == "" {
			v := u.APIVersion
			if v == "" {
				v = defaultAzureAPIVersion
			}
			q.Set("api-version", v)
			req.URL.RawQuery = q.Encode()
		}
	case "anthropic":
		if key != "" {
			req.Header.Set("X-Api-Key", key)
		}
		if req.Header.Get("Anthropic-Version") == "" {
			v := u.APIVersion
			if v == "" {
				v = defaultAnthropicVersion
			}
			req.Header.Set("Anthropic-Version", v)
		}
	case "gemini":
		if key != "" {
			req.Header.Set("X-Goog-Api-Key", key)
		}
	default:
		if key != "" {
			req.Header.Set("Authorization", "Bearer "+key)
		}
	}
}
