package llmstream

import (
	"bytes"
	"errors"
	"fmt"
	"slices"
	"sync"

	"cel.dev/cel-go/cel"
	"cel.dev/cel-go/common/types"
	"cel.dev/cel-go/interpreter"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

// Content-aware routing: `route` rules choose the model from what the
// request asks, before the normal routing (rename, priority, failover,
// key affinity) takes the chosen model. The rules are CEL expressions, as
// in Caddy's `expression` matcher, compiled and type-checked when the
// config loads, over facts computed once from the body already read.

// RouteRules choose a request's model.
type RouteRules struct {
	// Rules in order: the first whose expression is true chooses its
	// model.
	Rules []RouteRule `json:"rules,omitempty"`

	// The model when no rule matched. Default: the model asked for.
	Default string `json:"default,omitempty"`
}

// RouteRule is one `if <expression> model <name>`.
type RouteRule struct {
	// A CEL expression over the request: model, prompt_tokens (the size
	// estimate the limits use), messages (how many), has_tools,
	// has_images, has_audio, stream, user, identity, max_tokens and text
	// (the request's text, e.g. `text.matches("(?i)contract")`).
	If string `json:"if"`

	// The model chosen when it is true.
	Model string `json:"model"`
}

// routeEnv declares the facts expressions may use.
var routeEnv = sync.OnceValues(func() (*cel.Env, error) {
	return cel.NewEnv(
		cel.Variable("model", cel.StringType),
		cel.Variable("prompt_tokens", cel.IntType),
		cel.Variable("messages", cel.IntType),
		cel.Variable("has_tools", cel.BoolType),
		cel.Variable("has_images", cel.BoolType),
		cel.Variable("has_audio", cel.BoolType),
		cel.Variable("stream", cel.BoolType),
		cel.Variable("user", cel.StringType),
		cel.Variable("identity", cel.StringType),
		cel.Variable("max_tokens", cel.IntType),
		cel.Variable("text", cel.StringType),
	)
})

// compileRouteExpr compiles and type-checks one rule's expression.
func compileRouteExpr(expr string) (cel.Program, error) {
	env, err := routeEnv()
	if err != nil {
		return nil, err
	}
	ast, iss := env.Compile(expr)
	if iss.Err() != nil {
		return nil, fmt.Errorf("route: %v", iss.Err())
	}
	if ast.OutputType() != cel.BoolType {
		return nil, fmt.Errorf("route: `%s` is %v, not a bool", expr, ast.OutputType())
	}
	return env.Program(ast, cel.EvalOptions(cel.OptOptimize))
}

// modelRules are the compiled rules: one program for all of them, a
// chain of conditionals that yields the index of the first rule that
// holds (-1: none), so that a request costs one evaluation, not one per
// rule.
type modelRules struct {
	first    cel.Program
	models   []string
	fallback string
	counters sync.Map // routedKey → prometheus.Counter: the label lookup once per pair
}

type routedKey struct{ asked, chosen string }

func (h *Handler) provisionRouteRules() error {
	if h.Route == nil {
		if len(h.RouteModels) > 0 {
			return errors.New("route_models: no route rules")
		}
		return nil
	}
	r := &modelRules{fallback: h.Route.Default}
	chain := "-1"
	for i := len(h.Route.Rules) - 1; i >= 0; i-- {
		rule := h.Route.Rules[i]
		if rule.Model == "" {
			return fmt.Errorf("route: rule %d chooses no model", i+1)
		}
		if _, err := compileRouteExpr(rule.If); err != nil { // each checked alone, for its message
			return err
		}
		// (The line end closes a // comment the expression may end with.)
		chain = fmt.Sprintf("(%s\n) ? %d : (%s)", rule.If, i, chain)
	}
	for _, rule := range h.Route.Rules {
		r.models = append(r.models, rule.Model)
	}
	if len(r.models) == 0 && r.fallback == "" {
		return errors.New("route: no rule and no default")
	}
	env, err := routeEnv()
	if err != nil {
		return err
	}
	ast, iss := env.Compile(chain)
	if iss.Err() != nil {
		return fmt.Errorf("route: %v", iss.Err())
	}
	if r.first, err = env.Program(ast, cel.EvalOptions(cel.OptOptimize)); err != nil {
		return err
	}
	h.rules = r
	return nil
}

// chooseModel applies the route rules to a request whose model they
// cover: the chosen model replaces the asked one in the body, and the
// asked one is kept for the usage line.
func (h *Handler) chooseModel(x *exchange) {
	if h.rules == nil || !x.in.isJSON || len(h.RouteModels) > 0 && !slices.Contains(h.RouteModels, x.in.model) {
		return // (a request without a JSON body, such as GET /v1/models, asks nothing to route by)
	}
	f := requestFacts{in: x.in, identity: x.identity}
	chosen := h.rules.fallback
	v, _, err := h.rules.first.Eval(&f)
	if err != nil {
		h.logger.Debug("the route rules failed to evaluate; the default applies", zap.Error(err))
	} else if i, ok := v.Value().(int64); ok && i >= 0 {
		chosen = h.rules.models[i]
	}
	if chosen == "" || chosen == x.in.model {
		return
	}
	x.asked = x.in.model
	x.in.model = chosen
	if x.in.isJSON {
		x.in.body = withModel(x.in.body, chosen)
	}
	h.rules.routed(h.modelLabel(x.asked), h.modelLabel(chosen)).Inc()
}

// routed is the decision counter of one asked and chosen model label.
func (r *modelRules) routed(asked, chosen string) prometheus.Counter {
	k := routedKey{asked, chosen}
	if c, ok := r.counters.Load(k); ok {
		return c.(prometheus.Counter)
	}
	c := metrics.routed.WithLabelValues(asked, chosen)
	r.counters.Store(k, c)
	return c
}

// requestFacts are what route expressions see, computed from the body on
// first use (an interpreter.Activation: no map is built per request).
type requestFacts struct {
	in       *inbound
	identity string
	scanned  bool
	messages int64
	tools    bool
	images   bool
	audio    bool
	text     *string
}

// ResolveName implements interpreter.Activation. The values are CEL's
// own types, so nothing is converted per access.
func (f *requestFacts) ResolveName(name string) (any, bool) {
	switch name {
	case "model":
		return types.String(f.in.model), true
	case "prompt_tokens":
		return types.Int(int64(len(f.in.body)) / 3), true
	case "stream":
		return types.Bool(f.in.stream), true
	case "user":
		return types.String(f.in.user), true
	case "identity":
		return types.String(f.identity), true
	case "max_tokens":
		return types.Int(f.in.maxTokens), true
	case "text":
		if f.text == nil {
			t := requestText(f.in.body)
			f.text = &t
		}
		return types.String(*f.text), true
	}
	f.scan()
	switch name {
	case "messages":
		return types.Int(f.messages), true
	case "has_tools":
		return types.Bool(f.tools), true
	case "has_images":
		return types.Bool(f.images), true
	case "has_audio":
		return types.Bool(f.audio), true
	}
	return nil, false
}

// Parent implements interpreter.Activation.
func (f *requestFacts) Parent() interpreter.Activation { return nil }

// scan reads the body's shape once: how many messages (OpenAI messages,
// Responses input, Gemini contents), whether tools are offered, and
// whether images or audio are sent (OpenAI image_url/input_image and
// input_audio parts, Anthropic image blocks, Gemini inline data by MIME
// type).
func (f *requestFacts) scan() {
	if f.scanned {
		return
	}
	f.scanned = true
	b := f.in.body
	if !f.in.isJSON {
		return
	}
	forEachMember(b, func(key, v []byte) {
		switch string(key) {
		case "messages", "contents", "input":
			if len(v) > 0 && v[0] == '[' {
				f.messages = countElements(v)
			} else if len(v) > 0 {
				f.messages = 1
			}
		case "tools", "functions":
			f.tools = len(v) > 0 && v[0] == '[' && countElements(v) > 0
		}
	})
	f.images = mentions(b, imageWord, imageKeys)
	f.audio = mentions(b, audioWord, audioKeys)
}

var (
	imageWord = []byte("image")
	audioWord = []byte("audio")
	// what may stand around the word in a part that carries media: a
	// member name (image_url, input_image, input_audio), a part type
	// ("image", "audio") or a MIME type (image/png)
	imageKeys = [][2]string{{"", "_url\""}, {"input_", "\""}, {"\"", "\""}, {"\"", "/"}}
	audioKeys = [][2]string{{"input_", "\""}, {"\"", "\""}, {"\"", "/"}}
)

// mentions reports whether word occurs in b with one of the contexts
// (what comes right before it, what right after): one pass over b.
func mentions(b, word []byte, contexts [][2]string) bool {
	for i := 0; ; {
		j := bytes.Index(b[i:], word)
		if j < 0 {
			return false
		}
		at := i + j
		before, after := b[:at], b[at+len(word):]
		for _, c := range contexts {
			if bytes.HasSuffix(before, []byte(c[0])) && bytes.HasPrefix(after, []byte(c[1])) {
				return true
			}
		}
		i = at + len(word)
	}
}

// countElements counts the elements of a JSON array.
func countElements(arr []byte) int64 {
	var n int64
	for i := skipSpace(arr, 1); i < len(arr) && arr[i] != ']'; n++ {
		end := skipValue(arr, i)
		if end <= i {
			break
		}
		if i = skipSpace(arr, end); i < len(arr) && arr[i] == ',' {
			i = skipSpace(arr, i+1)
		}
	}
	return n
}
