package smooth

import (
	"bytes"
	"encoding/json"
	"math/rand/v2"
	"strings"
	"testing"
	"unicode/utf8"
)

// randomText mixes ASCII, 2-, 3- and 4-byte characters and everything JSON
// escapes (quotes, backslashes, control characters, HTML characters,
// U+2028).
func randomText(rng *rand.Rand, n int) string {
	pool := []string{"a", "b", " ", "é", "ß", "中", "文", "😀", "👍🏽", "\"", "\\", "\n", "\t", "\x01", "<", ">", "&", "\u2028", "𝄞"}
	var sb strings.Builder
	for i := 0; i < n; i++ {
		sb.WriteString(pool[rng.IntN(len(pool))])
	}
	return sb.String()
}

// literal is the JSON string literal content of s, as encoders write it.
func literal(s string) []byte {
	b, _ := json.Marshal(s)
	return b[1 : len(b)-1]
}

// checkCuts verifies the properties of cutting lit into max-character
// pieces.
func checkCuts(t *testing.T, lit []byte, max int) {
	t.Helper()
	cuts := Cuts(lit, max)
	if len(lit) == 0 {
		if cuts != nil {
			t.Fatalf("cuts %v in an empty literal", cuts)
		}
		return
	}
	var joined []byte
	prev := 0
	for i, c := range append(cuts, len(lit)) {
		if c <= prev {
			t.Fatalf("cut %d at %d does not advance past %d", i, c, prev)
		}
		piece := lit[prev:c]
		joined = append(joined, piece...)
		chars := Chars(piece)
		if chars > max || (i < len(cuts) && chars != max) {
			t.Fatalf("piece %q has %d characters, max %d", piece, chars, max)
		}
		// Every piece is a valid JSON string on its own: no escape and no
		// UTF-8 character was cut.
		var s string
		if err := json.Unmarshal(append(append([]byte{'"'}, piece...), '"'), &s); err != nil {
			t.Fatalf("piece %q of %q is not a whole JSON string: %v", piece, lit, err)
		}
		if !utf8.Valid(piece) {
			t.Fatalf("piece %q cuts a UTF-8 character", piece)
		}
		prev = c
	}
	if !bytes.Equal(joined, lit) {
		t.Fatalf("pieces joined %q differ from the input %q", joined, lit)
	}
}

func TestCutsProperty(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 5000; i++ {
		lit := literal(randomText(rng, rng.IntN(40)))
		checkCuts(t, lit, 1+rng.IntN(8))
	}
}

func TestCutsEscapes(t *testing.T) {
	// A surrogate pair as some encoders write non-BMP characters, and raw
	// invalid bytes: both stay whole or count one each.
	for _, lit := range []string{`\ud83d\ude00\ud83d\ude00x`, `a\u00e9\\\"\/b`, "\xff\xfe\xfd"} {
		cuts := Cuts([]byte(lit), 1)
		if got := len(cuts) + 1; got != Chars([]byte(lit)) {
			t.Errorf("%q: %d pieces for %d characters", lit, got, Chars([]byte(lit)))
		}
	}
	if n := Chars([]byte(`\ud83d\ude00`)); n != 1 {
		t.Errorf("a surrogate pair counts %d characters", n)
	}
	if Cuts([]byte("short"), 5) != nil || Cuts([]byte("short"), 0) != nil {
		t.Error("a literal that fits is one piece")
	}
}

func FuzzCuts(f *testing.F) {
	for _, s := range []string{"", "hello", "中文😀", `quote " and \ backslash`, "\u2028\n\x01"} {
		f.Add(s, 2)
	}
	f.Fuzz(func(t *testing.T, s string, max int) {
		if max <= 0 || max > 64 || !utf8.ValidString(s) {
			return
		}
		checkCuts(t, literal(s), max)
	})
}

func TestTextField(t *testing.T) {
	for _, tc := range []struct {
		name, data, text string
	}{
		{"openai delta", `data: {"id":"c","choices":[{"index":0,"delta":{"content":"Hello \"you\""},"finish_reason":null}]}`, `Hello \"you\"`},
		{"anthropic text_delta", `data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi 中文"}}`, `Hi 中文`},
		{"gemini part", `data: {"candidates":[{"content":{"parts":[{"text":"Hey"}],"role":"model"},"index":0}]}`, `Hey`},
		{"role chunk", `data: {"choices":[{"delta":{"role":"assistant","content":""},"finish_reason":null}]}`, ""},
		{"finish chunk", `data: {"choices":[{"delta":{"content":"end"},"finish_reason":"stop"}]}`, ""},
		{"usage chunk", `data: {"choices":[],"usage":{"prompt_tokens":1}}`, ""},
		{"two texts", `data: {"parts":[{"text":"a"},{"text":"b"}]}`, ""},
		{"no text", `data: [DONE]`, ""},
		{"unterminated", `data: {"delta":{"content":"abc`, ""},
	} {
		s, e, ok := TextField([]byte(tc.data))
		got := ""
		if ok {
			got = tc.data[s:e]
		}
		if got != tc.text || ok != (tc.text != "") {
			t.Errorf("%s: got %q (%v), want %q", tc.name, got, ok, tc.text)
		}
	}
}
