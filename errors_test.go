package llmstream

import (
	"strings"
	"testing"
)

func TestScrub(t *testing.T) {
	s := newScrubber(testKey)
	tests := []struct{ in, want string }{
		{"key " + testKey + " rejected", "key [redacted] rejected"},
		{"Incorrect API key provided: sk-test-****************************b1a0.", "Incorrect API key provided: [redacted]."},
		{`{"k":"` + testKey[5:17] + `"}`, `{"k":"[redacted]"}`},
		{"sk-*** is not a key fragment", "sk-*** is not a key fragment"},
		{"nothing secret here", "nothing secret here"},
	}
	for _, tc := range tests {
		if got := s.scrubString(tc.in); got != tc.want {
			t.Errorf("scrub(%q): got %q, want %q", tc.in, got, tc.want)
		}
	}
}

func FuzzScrubNeverLeaks(f *testing.F) {
	f.Add("prefix", "suffix", 3)
	f.Fuzz(func(t *testing.T, before, after string, cut int) {
		s := newScrubber(testKey)
		if cut < 0 {
			cut = -cut
		}
		frag := testKey[cut%len(testKey):]
		if len(frag) > 12 {
			frag = frag[:12]
		}
		for _, secret := range []string{testKey, frag} {
			if len(secret) < fragmentLen {
				continue
			}
			got := s.scrubString(before + secret + after)
			if strings.Contains(got, secret) {
				t.Fatalf("%q leaked in %q", secret, got)
			}
		}
	})
}
