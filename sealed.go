package llmstream

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"filippo.io/age"
	"go.uber.org/zap"
)

// Sealed prompt logs: with `log_prompts sealed`, each prompt and answer is
// encrypted to the configured age recipients (X25519) before it is
// logged, so that whoever reads the log files, or breaks into the server,
// cannot read them; only the holders of an identity (a private key kept
// elsewhere) can, with `caddy llm-stream open-log` (open_log.go).

// SealConfig says who can open sealed prompt logs.
type SealConfig struct {
	// age recipients (`age1…` X25519 public keys), or files holding one
	// a line (`#` starts a comment), as `age-keygen -y` prints them. Every
	// entry is sealed to all of them, so a key can be rotated by adding
	// the new one before removing the old.
	Recipients []string `json:"recipients,omitempty"`
}

// sealedEntry is what a sealed log line holds once opened.
type sealedEntry struct {
	Prompt string `json:"prompt"`
	Answer string `json:"answer"`
}

// parseRecipients reads age recipients from keys and files.
func parseRecipients(list []string) ([]age.Recipient, error) {
	var out []age.Recipient
	for _, r := range list {
		text := r
		if !strings.HasPrefix(r, "age1") {
			b, err := os.ReadFile(r)
			if err != nil {
				return nil, fmt.Errorf("recipient %q is neither an age1… public key nor a readable file: %v", r, err)
			}
			text = string(b)
		}
		rs, err := age.ParseRecipients(strings.NewReader(text))
		if err != nil {
			return nil, fmt.Errorf("recipients: %v", err)
		}
		out = append(out, rs...)
	}
	if len(out) == 0 {
		return nil, errors.New("log_prompts sealed: at least one recipient is required")
	}
	return out, nil
}

// seal encrypts the entry to the recipients: base64 of the age file.
func seal(recipients []age.Recipient, e sealedEntry) (string, error) {
	plain, _ := json.Marshal(e)
	var buf bytes.Buffer
	w, err := age.Encrypt(&buf, recipients...)
	if err != nil {
		return "", err
	}
	if _, err := w.Write(plain); err != nil {
		return "", err
	}
	if err := w.Close(); err != nil {
		return "", err
	}
	return base64.StdEncoding.EncodeToString(buf.Bytes()), nil
}

// unseal opens what seal made, with any of the identities.
func unseal(identities []age.Identity, sealed string) (sealedEntry, error) {
	var e sealedEntry
	b, err := base64.StdEncoding.DecodeString(sealed)
	if err != nil {
		return e, fmt.Errorf("not a sealed entry: %v", err)
	}
	r, err := age.Decrypt(bytes.NewReader(b), identities...)
	if err != nil {
		return e, err
	}
	plain, err := io.ReadAll(r)
	if err != nil {
		return e, err
	}
	return e, json.Unmarshal(plain, &e)
}

// logSealed writes one sealed prompt log line.
func (h *Handler) logSealed(id, identity, model, prompt, answer string) {
	sealed, err := seal(h.recipients, sealedEntry{Prompt: prompt, Answer: answer})
	if err != nil {
		h.logger.Error("sealing a prompt log entry failed; nothing was logged", zap.String("request_id", id), zap.Error(err))
		return
	}
	h.logger.Info("llm prompt",
		zap.String("request_id", id),
		zap.String("identity", identity),
		zap.String("model", model),
		zap.String("sealed", sealed),
	)
}
