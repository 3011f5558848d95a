package llmstream

import (
	"math"
	"math/rand/v2"
	"net/http"
	"slices"
	"sort"
	"strconv"
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
func order(cands []*Upstream, healthy func(*Upstream) bool, rnd func() float64, conv uint64) []*Upstream {
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
		rs[i] = ranked{u: u, down: !healthy(u)}
		if rnd != nil {
			rs[i].weightK = math.Pow(rnd(), 1/float64(u.Weight))
		} else {
			rs[i].weightK = weight(conv, u.urlHash, u.Weight) // rendezvous: the same order for the same conversation
		}
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
	ups     []*Upstream
	idx     int
	started bool
	tried   []*apiKey // a handful at most: retries are few
	conv    uint64    // the conversation's hash, with key affinity
	sticky  bool
	pinned  *pin // the first attempt's upstream and key, when known
	resting func(*apiKey) bool
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
		if p.pinned != nil {
			p.tried = append(p.tried, p.pinned.key)
			return attempt{up: p.pinned.up, key: p.pinned.key}
		}
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
	return attempt{up: u, key: u.keys[p.start(u)], reused: mayReuse}
}

// start is where this request starts in the upstream's key list: the
// conversation's first choice with affinity, else the next in rotation.
func (p *plan) start(u *Upstream) int {
	if p.sticky {
		best, top := 0, uint64(0)
		for i, k := range u.keys {
			if s := score(p.conv, k.idHash); i == 0 || s > top {
				best, top = i, s
			}
		}
		return best
	}
	return int(u.rr.Add(1) % uint64(len(u.keys)))
}

// freshKey returns an untried key, preferring keys that are not resting:
// in rotation order, or with affinity the conversation's highest-scoring
// key.
func (p *plan) freshKey(u *Upstream) *apiKey {
	if p.sticky {
		var best, spare *apiKey
		var top, spareTop uint64
		for _, k := range u.keys {
			if slices.Contains(p.tried, k) {
				continue
			}
			s := score(p.conv, k.idHash)
			switch {
			case !p.resting(k):
				if best == nil || s > top {
					best, top = k, s
				}
			case spare == nil || s > spareTop:
				spare, spareTop = k, s
			}
		}
		if best != nil {
			return best
		}
		return spare
	}
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

// firstChoice reports whether the attempt is the conversation's first
// choice of upstream and key (an affinity hit), as if every upstream and
// key were healthy and free.
func (p *plan) firstChoice(cands []*Upstream, at attempt) bool {
	best := at.up // the only candidate
	if len(cands) > 1 {
		top := -1.0
		for _, u := range cands {
			if u.Priority != at.up.Priority {
				continue
			}
			if s := weight(p.conv, u.urlHash, u.Weight); s > top {
				best, top = u, s
			}
		}
	}
	return best == at.up && at.up.keys[p.start(at.up)] == at.key
}

// pin is an upstream and key a request must try first: where its previous
// response was produced.
type pin struct {
	up  *Upstream
	key *apiKey
}

// pin makes the plan start at pn (nil: as ranked), moving its upstream to
// the front.
func (p *plan) pin(pn *pin) {
	if pn == nil {
		return
	}
	p.pinned = pn
	if i := slices.Index(p.ups, pn.up); i > 0 {
		ups := append([]*Upstream{pn.up}, p.ups[:i]...)
		p.ups = append(ups, p.ups[i+1:]...)
	}
}

// newPlan ranks the candidates for one request. With a conversation (its
// hash; 0 for none), upstreams of one priority are ranked by their
// rendezvous score with it (weighted) instead of at random.
func (h *Handler) newPlan(cands []*Upstream, conv uint64) *plan {
	now := time.Now()
	p := &plan{resting: func(k *apiKey) bool { return h.state.resting(k, now) }}
	rnd := rand.Float64
	if conv != 0 {
		p.sticky = true
		p.conv = conv
		p.ups = order(cands, func(u *Upstream) bool { return h.state.usable(u, now) }, nil, p.conv)
		return p
	}
	p.ups = order(cands, func(u *Upstream) bool { return h.state.usable(u, now) }, rnd, 0)
	return p
}

// route is the stage that finds the upstreams serving the request's model
// and, with key_affinity, names its conversation (now, while the body just
// read is at hand, rather than after the limits' round trip).
func (h *Handler) route(x *exchange) bool {
	h.chooseModel(x)
	x.cands = h.router.candidates(x.in.model)
	if len(x.cands) == 0 {
		_ = h.reject(x.w, x.in.model, &apiError{Status: http.StatusNotFound, Type: typeInvalidRequest, Code: "model_not_found",
			Message: "the model " + strconv.Quote(x.in.model) + " is not served here"})
		return false
	}
	x.conv = h.conversation(x)
	// Named: let go of where the conversation begins in the body read, or
	// that body would be kept, beside its rewrite (a model renamed,
	// include_usage asked), for as long as the answer streams.
	x.in.system, x.in.turns, x.in.input = [3][]byte{}, nil, nil
	return true
}
