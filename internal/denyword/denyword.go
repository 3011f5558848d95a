// Package denyword finds forbidden words in text, including text that
// arrives piece by piece: an Aho–Corasick automaton over normalized runes
// (case folded, full-width forms mapped to half-width), so a word split
// across two streamed chunks is still found, and the cost per character
// does not grow with the number of words.
package denyword

import "unicode"

// Normalize folds a rune: lower case, full-width ASCII forms and the
// ideographic space to their half-width forms.
func Normalize(r rune) rune {
	switch {
	case r >= 0xFF01 && r <= 0xFF5E:
		r -= 0xFEE0
	case r == 0x3000:
		r = ' '
	}
	return unicode.ToLower(r)
}

type node struct {
	next map[rune]int32
	fail int32
	out  int32 // length in runes of the longest word ending here, 0 if none
}

// Matcher is an immutable automaton, safe for concurrent use; each stream
// keeps its own State.
type Matcher struct {
	nodes  []node
	maxLen int
}

// New builds a matcher; empty words are ignored. It returns nil when no
// word is left.
func New(words []string) *Matcher {
	m := &Matcher{nodes: []node{{next: map[rune]int32{}}}}
	for _, w := range words {
		n, length := int32(0), 0
		for _, r := range w {
			r = Normalize(r)
			next, ok := m.nodes[n].next[r]
			if !ok {
				next = int32(len(m.nodes))
				m.nodes = append(m.nodes, node{next: map[rune]int32{}})
				m.nodes[n].next[r] = next
			}
			n = next
			length++
		}
		if length == 0 {
			continue
		}
		if int32(length) > m.nodes[n].out {
			m.nodes[n].out = int32(length)
		}
		if length > m.maxLen {
			m.maxLen = length
		}
	}
	if m.maxLen == 0 {
		return nil
	}
	// failure links, breadth first
	queue := []int32{}
	for _, c := range m.nodes[0].next {
		queue = append(queue, c)
	}
	for len(queue) > 0 {
		n := queue[0]
		queue = queue[1:]
		for r, c := range m.nodes[n].next {
			f := m.nodes[n].fail
			for f != 0 {
				if _, ok := m.nodes[f].next[r]; ok {
					break
				}
				f = m.nodes[f].fail
			}
			if t, ok := m.nodes[f].next[r]; ok && t != c {
				m.nodes[c].fail = t
			}
			if o := m.nodes[m.nodes[c].fail].out; o > m.nodes[c].out {
				m.nodes[c].out = o
			}
			queue = append(queue, c)
		}
	}
	return m
}

// MaxLen is the longest word's length in runes.
func (m *Matcher) MaxLen() int { return m.maxLen }

// State is a position in the automaton: the zero value is the start.
type State struct{ n int32 }

// Feed advances over s and reports whether a word ended in it.
func (m *Matcher) Feed(st *State, s string) bool {
	n := st.n
	found := false
	for _, r := range s {
		r = Normalize(r)
		for {
			if next, ok := m.nodes[n].next[r]; ok {
				n = next
				break
			}
			if n == 0 {
				break
			}
			n = m.nodes[n].fail
		}
		if m.nodes[n].out > 0 {
			found = true
		}
	}
	st.n = n
	return found
}

// Contains reports whether s holds a word.
func (m *Matcher) Contains(s string) bool {
	var st State
	return m.Feed(&st, s)
}
