// Package smooth cuts the text of streamed events into small pieces, so a
// burst of model output can be written at a steady pace. It works on the
// raw bytes of a JSON string literal: a piece never ends inside a UTF-8
// character or an escape sequence, and the pieces joined are the input.
package smooth

import (
	"bytes"
	"unicode/utf8"
)

// charLen is the length of the character at the start of lit, a JSON string
// literal's content: one UTF-8 character, or one escape sequence (a
// `\uXXXX\uXXXX` surrogate pair is one character). Invalid bytes count one
// each.
func charLen(lit []byte) int {
	if lit[0] != '\\' {
		if lit[0] < utf8.RuneSelf {
			return 1
		}
		_, n := utf8.DecodeRune(lit)
		return n
	}
	if len(lit) < 2 {
		return 1
	}
	if lit[1] != 'u' || len(lit) < 6 {
		return 2
	}
	if isSurrogate(lit[2:6], '8', 'b') && len(lit) >= 12 && lit[6] == '\\' && lit[7] == 'u' && isSurrogate(lit[8:12], 'c', 'f') {
		return 12
	}
	return 6
}

// isSurrogate reports whether the 4 hex digits are in D<lo>00–D<hi>FF
// (high surrogates: D800–DBFF, low: DC00–DFFF).
func isSurrogate(hex []byte, lo, hi byte) bool {
	if hex[0] != 'd' && hex[0] != 'D' {
		return false
	}
	c := hex[1] | 0x20 // lower case
	return c >= lo && c <= hi
}

// Cuts returns where lit, a JSON string literal's content, is cut into
// pieces of at most max characters: the end offset of every piece but the
// last. It returns nil when lit is one piece.
func Cuts(lit []byte, max int) []int {
	if max <= 0 {
		return nil
	}
	var cuts []int
	chars := 0
	for i := 0; i < len(lit); {
		if chars == max {
			cuts = append(cuts, i)
			chars = 0
		}
		i += charLen(lit[i:])
		chars++
	}
	return cuts
}

// Chars counts the characters of a JSON string literal's content as Cuts
// does.
func Chars(lit []byte) int {
	n := 0
	for i := 0; i < len(lit); i += charLen(lit[i:]) {
		n++
	}
	return n
}

// The text members of streamed chunks: OpenAI's delta `content`, and the
// `text` of Anthropic's text_delta and Gemini's parts.
var (
	contentKey = []byte(`"content":"`)
	textKey    = []byte(`"text":"`)
)

// Members that mark a chunk as more than text (an end, a usage report):
// such a chunk is never cut, so they are not repeated in every piece.
var notTextOnly = [][]byte{
	[]byte(`"finish_reason":"`), []byte(`"finishReason"`), []byte(`"usage":{`),
	[]byte(`"usageMetadata"`), []byte(`"stop_reason":"`), []byte(`"tool_calls"`),
}

// TextField locates the text of one event's JSON data: the content of its
// only text string member, as offsets into data. It reports false for data
// that holds no text, more than one text member, or members that must not
// be repeated in every piece.
func TextField(data []byte) (start, end int, ok bool) {
	key := contentKey
	i := bytes.Index(data, key)
	if i < 0 {
		key = textKey
		if i = bytes.Index(data, key); i < 0 {
			return 0, 0, false
		}
	}
	start = i + len(key)
	if bytes.Contains(data[start:], key) || (bytes.Equal(key, contentKey) && bytes.Contains(data, textKey)) {
		return 0, 0, false
	}
	for _, m := range notTextOnly {
		if bytes.Contains(data, m) {
			return 0, 0, false
		}
	}
	for end = start; end < len(data); end++ {
		switch data[end] {
		case '\\':
			end++
		case '"':
			return start, end, end > start
		}
	}
	return 0, 0, false
}
