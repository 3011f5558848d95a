package redact

import "testing"

func TestRedact(t *testing.T) {
	all := New()
	tests := []struct{ in, want string }{
		{"call me at 13812345678 please", "call me at [PHONE] please"},
		{"我的手机号是13912345678，谢谢", "我的手机号是[PHONE]，谢谢"},
		{"全角：１３８１２３４５６７８。", "全角：[PHONE]。"},
		{"grouped 138 1234 5678 and 139-1234-5678", "grouped [PHONE] and [PHONE]"},
		{"+86 13812345678 / 8613812345678", "[PHONE] / [PHONE]"},
		{"12812345678 is not mobile", "12812345678 is not mobile"},
		{"order 1381234567890 is longer", "order 1381234567890 is longer"},
		{"身份证号：11010519491231002X", "身份证号：[ID_CARD]"},
		{"ID 110105194912310021 has a bad check digit", "ID 110105194912310021 has a bad check digit"},
		{"全角身份证１１０１０５１９４９１２３１００２Ｘ", "全角身份证[ID_CARD]"},
		{"mail alice.w@example.co.uk today", "mail [EMAIL] today"},
		{"邮箱：张三@例子 bob＠example．com", "邮箱：张三@例子 [EMAIL]"},
		{"key sk-proj-AbCdEf0123456789xyz here", "key [API_KEY] here"},
		{"Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.payload.sig", "Authorization: [API_KEY]"},
		{"gemini AIzaSyA1234567890abcdefghijk", "gemini [API_KEY]"},
		{"plain numbers 2024 and 100 stay", "plain numbers 2024 and 100 stay"},
	}
	for _, tc := range tests {
		if got := all.String(tc.in); got != tc.want {
			t.Errorf("String(%q): got %q, want %q", tc.in, got, tc.want)
		}
	}
	onlyEmail := New(Email)
	if got := onlyEmail.String("13812345678 a@b.io"); got != "13812345678 [EMAIL]" {
		t.Errorf("kinds not honoured: %q", got)
	}
}

func TestValidID(t *testing.T) {
	for id, want := range map[string]bool{"11010519491231002X": true, "110105194912310021": false, "440524188001010014": true} {
		if validID(id) != want {
			t.Errorf("validID(%s) = %v", id, !want)
		}
	}
}
