// Package redact masks personal data and secrets in text before it is
// logged: Chinese mobile numbers, Chinese resident ID numbers (with a valid
// check digit), e-mail addresses and anything shaped like an API key, in
// English and Chinese text, with half- or full-width digits.
package redact

import (
	"regexp"
	"strings"
)

// Kind is one kind of data to mask.
type Kind string

// The kinds, in the order they are applied (keys first: they contain
// digit runs that could look like phone numbers).
const (
	APIKey Kind = "api_key"
	Email  Kind = "email"
	IDCard Kind = "id_card"
	Phone  Kind = "phone"
)

// All is every kind.
var All = []Kind{APIKey, Email, IDCard, Phone}

// Valid reports whether k is a known kind.
func Valid(k string) bool {
	for _, v := range All {
		if string(v) == k {
			return true
		}
	}
	return false
}

const d = `[0-9０-９]` // a half- or full-width digit

var (
	apiKeyRe = regexp.MustCompile(`(?i:bearer)\s+[A-Za-z0-9._~+/=-]{16,}|sk-[A-Za-z0-9_-]{12,}|AIza[0-9A-Za-z_-]{20,}`)
	emailRe  = regexp.MustCompile(`[A-Za-z0-9._%+-]+[@＠][A-Za-z0-9-]+(?:[.．][A-Za-z0-9-]+)*[.．][A-Za-z]{2,}`)
	// 18 characters: 17 digits and a check digit or X; not glued to more
	// digits (the boundary characters are matched and put back).
	idCardRe = regexp.MustCompile(`(^|[^0-9０-９])([1-9１-９]` + d + `{16}[0-9０-９XxＸｘ])($|[^0-9０-９XxＸｘ])`)
	// 11 digits starting 1[3-9], optionally +86/86 and single spaces or
	// hyphens between the usual 3-4-4 groups.
	phoneRe = regexp.MustCompile(`(^|[^0-9０-９])((?:[+＋]?[8８][6６][ -]?)?[1１][3-9３-９]` + d + `[ -]?` + d + `{4}[ -]?` + d + `{4})($|[^0-9０-９])`)
)

var masks = map[Kind]string{APIKey: "[API_KEY]", Email: "[EMAIL]", IDCard: "[ID_CARD]", Phone: "[PHONE]"}

// Redactor masks the chosen kinds.
type Redactor struct {
	kinds map[Kind]bool
}

// New returns a Redactor for the kinds; none means all.
func New(kinds ...Kind) *Redactor {
	if len(kinds) == 0 {
		kinds = All
	}
	r := &Redactor{kinds: map[Kind]bool{}}
	for _, k := range kinds {
		r.kinds[k] = true
	}
	return r
}

// String returns s with every chosen kind masked.
func (r *Redactor) String(s string) string {
	if r.kinds[APIKey] {
		s = apiKeyRe.ReplaceAllString(s, masks[APIKey])
	}
	if r.kinds[Email] {
		s = emailRe.ReplaceAllString(s, masks[Email])
	}
	if r.kinds[IDCard] {
		s = replaceBounded(s, idCardRe, func(m string) bool { return validID(m) }, masks[IDCard])
	}
	if r.kinds[Phone] {
		s = replaceBounded(s, phoneRe, nil, masks[Phone])
	}
	return s
}

// replaceBounded replaces group 2 of each match (group 1 and 3 are the
// boundaries) when ok accepts it. Matching again from the end of group 2
// lets adjacent numbers share a boundary character.
func replaceBounded(s string, re *regexp.Regexp, ok func(string) bool, mask string) string {
	var b strings.Builder
	last := 0
	for pos := 0; pos <= len(s); {
		m := re.FindStringSubmatchIndex(s[pos:])
		if m == nil {
			break
		}
		start, end := pos+m[4], pos+m[5]
		if ok == nil || ok(s[start:end]) {
			b.WriteString(s[last:start])
			b.WriteString(mask)
			last = end
		}
		pos = end
	}
	if last == 0 {
		return s
	}
	b.WriteString(s[last:])
	return b.String()
}

// halfWidth maps full-width digits and X to ASCII.
func halfWidth(s string) string {
	return strings.Map(func(r rune) rune {
		switch {
		case r >= '０' && r <= '９':
			return r - '０' + '0'
		case r == 'Ｘ' || r == 'ｘ' || r == 'x':
			return 'X'
		}
		return r
	}, s)
}

// validID checks the GB 11643 check digit of an 18-character ID number.
func validID(s string) bool {
	s = halfWidth(s)
	if len(s) != 18 {
		return false
	}
	weights := [17]int{7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2}
	sum := 0
	for i := 0; i < 17; i++ {
		sum += int(s[i]-'0') * weights[i]
	}
	return "10X98765432"[sum%11] == s[17]
}
