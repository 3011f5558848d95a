package llmstream

import "testing"

// A renamed model's price: an exact price of the name sent upstream, else
// of the name asked for, before any glob's; globs of the sent name first.
func TestPriceLookupOrder(t *testing.T) {
	pl := new(priceList)
	for _, p := range []Price{
		{Model: "sent-exact", Input: 1}, {Model: "asked-exact", Input: 2},
		{Model: "sent-*", Input: 3}, {Model: "asked-*", Input: 4}, {Model: "*", Input: 5},
	} {
		pl.add(p)
	}
	for _, tc := range []struct {
		sent, asked string
		want        float64
	}{
		{"sent-exact", "asked-exact", 1},
		{"sent-glob", "asked-exact", 2}, // an exact price before a glob
		{"sent-glob", "asked-glob", 3},
		{"other", "asked-glob", 5}, // the sent name's glob ("*") first
		{"asked-glob", "", 4},
		{"asked-glob", "asked-glob", 4},
	} {
		for range 2 { // found, then remembered
			r, ok := pl.lookup(tc.sent, tc.asked)
			if !ok || r.input != tc.want*1000 {
				t.Errorf("lookup(%q, %q) = %v %v, want input %v", tc.sent, tc.asked, r.input/1000, ok, tc.want)
			}
		}
	}
	none := new(priceList)
	none.add(Price{Model: "gpt-4o*", Input: 1})
	if _, ok := none.lookup("claude", "llama"); ok {
		t.Error("an unpriced model found a price")
	}
	if _, ok := none.lookup("", ""); ok {
		t.Error("no model found a price")
	}
}
