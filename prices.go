package llmstream

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path"
	"sort"
	"strings"

	"github.com/caddy-llm-stream/caddy-llm-stream/internal/memo"
)

// Price is what one model (or every model a glob matches) costs, in US
// dollars per million tokens.
type Price struct {
	// A model name, or a glob such as `gpt-4o*`. Matched against the model
	// sent upstream (after a rename), then the model the client asked for.
	Model string `json:"model"`

	// Every prompt token not read from or written to the provider's
	// prompt cache.
	Input float64 `json:"input"`

	// Every completion token, reasoning included.
	Output float64 `json:"output"`

	// Prompt tokens read from the provider's prompt cache. Default: the
	// input price.
	Cached *float64 `json:"cached,omitempty"`

	// Prompt tokens written to the provider's prompt cache (Anthropic's
	// cache_creation_input_tokens). Default: the input price.
	CacheWrite *float64 `json:"cache_write,omitempty"`
}

// rate is a price in nano-dollars per token (USD per 1M tokens × 1000),
// the unit costs are added up and limited in.
type rate struct {
	input, output, cached, cacheWrite float64
}

// nanoUSD is one US dollar in the unit costs are kept in.
const nanoUSD = 1e9

// priceList finds a model's rate: exact names first, then globs in the
// order given.
type priceList struct {
	exact map[string]rate
	globs []globRate
	// named remembers what prices a name (a glob match costs more than the
	// rest of the money path); names come from clients, so only the first
	// few hundred are remembered.
	named memo.Map[string, namePrice]
}

// namePrice is what prices one name: its exact price, else the first glob
// that matches it.
type namePrice struct {
	exact, glob     rate
	isExact, isGlob bool
	pattern         string // the glob
}

type globRate struct {
	pattern string
	rate
}

func newRate(p Price) rate {
	r := rate{input: p.Input * 1000, output: p.Output * 1000, cached: p.Input * 1000, cacheWrite: p.Input * 1000}
	if p.Cached != nil {
		r.cached = *p.Cached * 1000
	}
	if p.CacheWrite != nil {
		r.cacheWrite = *p.CacheWrite * 1000
	}
	return r
}

// add puts one price in the list; a name already priced keeps its first
// price (`price` lines come before `prices_file`).
func (pl *priceList) add(p Price) {
	if strings.ContainsAny(p.Model, "*?[") {
		pl.globs = append(pl.globs, globRate{p.Model, newRate(p)})
		return
	}
	if pl.exact == nil {
		pl.exact = map[string]rate{}
	}
	if _, ok := pl.exact[p.Model]; !ok {
		pl.exact[p.Model] = newRate(p)
	}
}

// lookup returns the rate of sent, the model as sent upstream, else of
// asked, the model the client asked for: an exact price of either before
// a glob's.
func (pl *priceList) lookup(sent, asked string) (rate, bool) {
	if pl == nil || (sent == "" && asked == "") {
		return rate{}, false
	}
	s := pl.of(sent)
	if s.isExact {
		return s.exact, true
	}
	if asked == sent || asked == "" { // not renamed: one name
		return s.glob, s.isGlob
	}
	a := pl.of(asked)
	switch {
	case a.isExact:
		return a.exact, true
	case s.isGlob:
		return s.glob, true
	}
	return a.glob, a.isGlob
}

// of is what prices name.
func (pl *priceList) of(name string) namePrice {
	if name == "" {
		return namePrice{}
	}
	if p, ok := pl.named.Get(name); ok {
		return p
	}
	var p namePrice
	p.exact, p.isExact = pl.exact[name]
	for _, g := range pl.globs {
		if ok, _ := path.Match(g.pattern, name); ok {
			p.glob, p.isGlob, p.pattern = g.rate, true, g.pattern
			break
		}
	}
	return pl.named.Put(name, p)
}

// cost is what the usage costs at the rate, in nano-dollars.
func (r rate) cost(u *usage) int64 {
	fresh := max(u.prompt-u.cached-u.cacheWrite, 0)
	c := float64(fresh)*r.input + float64(u.cached)*r.cached + float64(u.cacheWrite)*r.cacheWrite + float64(u.completion)*r.output
	return int64(math.Round(c))
}

// estimate is the most a request may cost before its answer: prompt
// tokens at the input price (none of them assumed cached) and the answer's
// cap at the output price.
func (r rate) estimate(promptTokens, completionTokens int64) int64 {
	return int64(math.Ceil(float64(promptTokens)*max(r.input, r.cached, r.cacheWrite) + float64(completionTokens)*r.output))
}

// defaultAnswerReserve is the completion tokens a spend limit reserves
// for a request that sets no max_tokens (or max_completion_tokens,
// max_output_tokens).
const defaultAnswerReserve = 4096

// loadPricesFile reads the widely used model_prices_and_context_window.json
// format: model → {input_cost_per_token, output_cost_per_token,
// cache_read_input_token_cost, cache_creation_input_token_cost}, in
// dollars per token. A key with a provider prefix (`anthropic/claude-…`)
// prices the name after the prefix too, unless that name has a price of
// its own. Entries without token prices (images, audio) are skipped.
func loadPricesFile(file string) ([]Price, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("%s: %v", file, err)
	}
	type entry struct {
		Input      *float64 `json:"input_cost_per_token"`
		Output     *float64 `json:"output_cost_per_token"`
		CacheRead  *float64 `json:"cache_read_input_token_cost"`
		CacheWrite *float64 `json:"cache_creation_input_token_cost"`
	}
	perMillion := func(v *float64) *float64 {
		if v == nil {
			return nil
		}
		p := *v * 1e6
		return &p
	}
	names := make([]string, 0, len(m))
	for name := range m {
		names = append(names, name)
	}
	sort.Strings(names)
	var prefixed, plain []Price
	for _, name := range names {
		raw := m[name]
		var e entry
		if name == "sample_spec" || json.Unmarshal(raw, &e) != nil || e.Input == nil || e.Output == nil {
			continue
		}
		p := Price{Model: name, Input: *perMillion(e.Input), Output: *perMillion(e.Output),
			Cached: perMillion(e.CacheRead), CacheWrite: perMillion(e.CacheWrite)}
		plain = append(plain, p)
		if i := strings.LastIndexByte(name, '/'); i >= 0 {
			p.Model = name[i+1:]
			prefixed = append(prefixed, p)
		}
	}
	return append(plain, prefixed...), nil
}

// provisionPrices builds the price list: `price` lines first, then
// `prices_file`.
func (h *Handler) provisionPrices() error {
	if len(h.Prices) == 0 && h.PricesFile == "" {
		return nil
	}
	pl := new(priceList)
	for _, p := range h.Prices {
		if err := checkPrice(p); err != nil {
			return err
		}
		pl.add(p)
	}
	if h.PricesFile != "" {
		ps, err := loadPricesFile(h.PricesFile)
		if err != nil {
			return fmt.Errorf("prices_file: %v", err)
		}
		for _, p := range ps {
			pl.add(p)
		}
	}
	h.prices = pl
	return nil
}
