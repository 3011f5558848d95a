package denyword

import (
	"strings"
	"testing"
	"unicode/utf8"
)

func TestMatcher(t *testing.T) {
	m := New([]string{"违禁词", "Secret Plan", "ab", "abc"})
	for s, want := range map[string]bool{
		"这里有违禁词。":         true,
		"the SECRET plan": true,
		"ｓｅｃｒｅｔ　ｐｌａｎ":     true, // full-width letters and ideographic space
		"xaby":            true,
		"a b":             false,
		"违禁":              false,
	} {
		if got := m.Contains(s); got != want {
			t.Errorf("Contains(%q) = %v, want %v", s, got, want)
		}
	}
	if m.MaxLen() != 11 {
		t.Errorf("MaxLen %d", m.MaxLen())
	}
	var st State
	if m.Feed(&st, "前面违") || !m.Feed(&st, "禁词后面") {
		t.Error("a word split across two pieces was not found")
	}
}

// FuzzMatcher checks the automaton against strings.Contains on normalized
// text, fed in two pieces.
func FuzzMatcher(f *testing.F) {
	f.Add("abcab", "ab", "bca", 2)
	f.Add("ＡＢ违禁", "ab", "禁", 1)
	f.Fuzz(func(t *testing.T, text, w1, w2 string, cut int) {
		if !utf8.ValidString(text) || !utf8.ValidString(w1) || !utf8.ValidString(w2) {
			return
		}
		m := New([]string{w1, w2})
		if m == nil {
			return
		}
		norm := func(s string) string { return strings.Map(Normalize, s) }
		want := (norm(w1) != "" && strings.Contains(norm(text), norm(w1))) || (norm(w2) != "" && strings.Contains(norm(text), norm(w2)))
		if cut < 0 {
			cut = -cut
		}
		cut %= len(text) + 1
		for cut > 0 && !utf8.RuneStart(text[cut%len(text)]) {
			cut--
		}
		var st State
		got := m.Feed(&st, text[:cut])
		got = m.Feed(&st, text[cut:]) || got
		if got != want {
			t.Fatalf("text %q words %q %q: got %v, want %v", text, w1, w2, got, want)
		}
	})
}
