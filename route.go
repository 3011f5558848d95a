package llmstream

import (
	"hash/maphash"
	"math"
	"math/rand/v2"
	"net/http"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"
)

// router finds the upstreams that serve a model. Exact names and rename
// sources are looked up in a map; only globs are matched one by one.
type router struct {
	all      []*Upstream
	byModel  map[string][]*Upstream
	globbed  []*Upstream // upstreams with glob patterns
	catchAll []*Upstream // upstreams without a models list
	names    []string    // exact and renamed names, for GET /v1/models
}

func newRouter(ups []*Upstream) *router {
	rt := &router{all: ups, byModel: map[string][]*Upstream{}}
	seen := map[string]bool{}
	add := func(name string, u *Upstream) {
		if !slices.Contains(rt.byModel[name], u) {
			rt.byModel[name] = append(rt.byModel[name], u)
		}
		if !seen[name] {
			seen[name] = true
			rt.names = append(rt.names, name)
		}
	}
	for _, u := range ups {
		for _, m := range u.Models {
			if u.exact[m] {
				add(m, u)
			}
		}
		for from := range u.Rename {
			add(from, u)
		}
		if len(u.globs) > 0 {
			rt.globbed = append(rt.globbed, u)
		}
		if u.servesAll() {
			rt.catchAll = append(rt.catchAll, u)
		}
	}
	sort.Strings(rt.names)
	return rt
}

// candidates returns the upstreams that serve model, in configuration
// order; all of them when the request names no model.
func (rt *router) candidates(model string) []*Upstream {
	if model == "" {
		return rt.all
	}
	exact := rt.byModel[model]
	if len(rt.globbed) == 0 && len(rt.catchAll) == 0 {
		return exact
	}
	out := make([]*Upstream, 0, len(exact)+len(rt.catchAll)+1)
	out = append(out, exact...)
	for _, u := range rt.globbed {
		if !slices.Contains(out, u) && u.serves(model) {
			out = append(out, u)
		}
	}
	for _, u := range rt.catchAll {
		if !slices.Contains(out, u) {
			out = append(out, u)
		}
	}
	return out
}

// order ranks candidates for one request: healthy before unhealthy, then
// by priority, then a weighted random order among equals (each upstream's
// chance to come first is its share of the weights).
func order(cands []*Upstream, healthy func(*Upstream) bool, rnd func() float64) []*Upstream {
	if len(cands) == 1 {
		return cands
	}
	type ranked struct {
		u       *Upstream
		down    bool
		weightK float64
	}
	rs := make([]ranked, len(cands))
	for i, u := range cands {
		// Efraimidis–Spirakis: sorting by r^(1/w) descending draws without
		// replacement with probabilities proportional to the weights.
		rs[i] = ranked{u: u, down: !healthy(u), weightK: math.Pow(rnd(), 1/float64(u.Weight))}
	}
	sort.SliceStable(rs, func(i, j int) bool {
		a, b := rs[i], rs[j]
		if a.down != b.down {
			return !a.down
		}
		if a.u.Priority != b.u.Priority {
			return a.u.Priority < b.u.Priority
		}
		return a.weightK > b.weightK
	})
	out := make([]*Upstream, len(rs))
	for i, r := range rs {
		out[i] = r.u
	}
	return out
}

// plan walks the ranked upstreams and their keys for one request.
type plan struct {
	ups      []*Upstream
	idx      int
	started  bool
	tried    []*apiKey // a handful at most: retries are few
	affinity uint64
	sticky   bool
	resting  func(*apiKey) bool
}

// attempt is one upstream and key to try; reused reports that this key was
// already tried in this request (the plan wrapped around), so the caller
// should back off first.
type attempt struct {
	up     *Upstream
	key    *apiKey
	reused bool
}

// next returns the attempt after a failure. sameUpstream asks for another
// key of the current upstream (after a 429 or 401/403), when it has one.
func (p *plan) next(sameUpstream bool) attempt {
	if !p.started {
		p.started = true
		return p.pick(p.ups[0], false)
	}
	if sameUpstream {
		if k := p.freshKey(p.ups[p.idx]); k != nil {
			p.tried = append(p.tried, k)
			return attempt{up: p.ups[p.idx], key: k}
		}
	}
	p.idx++
	if p.idx == len(p.ups) {
		p.idx = 0 // wrap around: everything was tried once
	}
	return p.pick(p.ups[p.idx], true)
}

func (p *plan) pick(u *Upstream, mayReuse bool) attempt {
	if k := p.freshKey(u); k != nil {
		p.tried = append(p.tried, k)
		return attempt{up: u, key: k}
	}
	return attempt{up: u, key: p.firstKey(u), reused: mayReuse}
}

// firstKey is where this request starts in the upstream's key list:
// fixed by affinity, else the next in rotation.
func (p *plan) start(u *Upstream) int {
	if p.sticky {
		return int(p.affinity % uint64(len(u.keys)))
	}
	return int(u.rr.Add(1) % uint64(len(u.keys)))
}

func (p *plan) firstKey(u *Upstream) *apiKey { return u.keys[p.start(u)] }

// freshKey returns an untried key, preferring keys that are not resting.
func (p *plan) freshKey(u *Upstream) *apiKey {
	n := len(u.keys)
	s := p.start(u)
	var spare *apiKey
	for i := 0; i < n; i++ {
		k := u.keys[(s+i)%n]
		if slices.Contains(p.tried, k) {
			continue
		}
		if !p.resting(k) {
			return k
		}
		if spare == nil {
			spare = k
		}
	}
	return spare
}

// newPlan ranks the candidates for one request.
func (h *Handler) newPlan(cands []*Upstream, affinity string) *plan {
	now := time.Now()
	p := &plan{
		ups:     order(cands, func(u *Upstream) bool { return h.state.usable(u, now) }, rand.Float64),
		resting: func(k *apiKey) bool { return h.state.resting(k, now) },
	}
	if affinity != "" {
		p.sticky = true
		p.affinity = maphash.String(affinitySeed, affinity)
	}
	return p
}

var affinitySeed = maphash.MakeSeed()

// affinityValue is what keeps a request on one key, per key_affinity.
func (h *Handler) affinityValue(hdrGet func(string) string, user string) string {
	switch {
	case h.KeyAffinity == "user":
		return user
	case strings.HasPrefix(h.KeyAffinity, "header:"):
		return hdrGet(strings.TrimPrefix(h.KeyAffinity, "header:"))
	}
	return ""
}

// route is the stage that finds the upstreams serving the request's model.
func (h *Handler) route(x *exchange) bool {
	x.cands = h.router.candidates(x.in.model)
	if len(x.cands) == 0 {
		_ = h.reject(x.w, x.in.model, &apiError{Status: http.StatusNotFound, Type: typeInvalidRequest, Code: "model_not_found",
			Message: "the model " + strconv.Quote(x.in.model) + " is not served here"})
		return false
	}
	return true
}
