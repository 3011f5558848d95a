package llmstream

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"filippo.io/age"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"
)

// `caddy llm-stream`: the module's own subcommands, for whoever holds the
// identity (private key) that opens sealed prompt logs, on a machine other
// than the server.
func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "llm-stream",
		Short: "Tools for the llm_stream module: open sealed prompt logs, make keys",
		Long: `
open-log reads log lines (files, or standard input) and prints each sealed
"llm prompt" entry opened with the given age identities, as a JSON line with
the request id, time, identity, model, prompt and answer. Lines it cannot open
are reported on standard error and make it exit with status 1.

keygen prints a new age identity (keep it off the server) with its public key,
the recipient for log_prompts sealed.`,
		CobraFunc: func(cmd *cobra.Command) {
			open := &cobra.Command{
				Use:   "open-log --identity <file> [<log_file>...]",
				Short: "Print sealed prompt log entries opened with an age identity",
				RunE: func(cmd *cobra.Command, args []string) error {
					files, _ := cmd.Flags().GetStringSlice("identity")
					ids, err := readIdentities(files)
					if err != nil {
						return err
					}
					in := io.Reader(os.Stdin)
					if len(args) > 0 {
						var readers []io.Reader
						for _, a := range args {
							f, err := os.Open(a)
							if err != nil {
								return err
							}
							defer f.Close()
							readers = append(readers, f)
						}
						in = io.MultiReader(readers...)
					}
					opened, failed, err := openLog(in, cmd.OutOrStdout(), cmd.ErrOrStderr(), ids)
					if err != nil {
						return err
					}
					if failed > 0 {
						return fmt.Errorf("%d sealed entries could not be opened (%d opened)", failed, opened)
					}
					return nil
				},
			}
			open.Flags().StringSliceP("identity", "i", nil, "an age identity file (AGE-SECRET-KEY-1…), repeatable")
			keygen := &cobra.Command{
				Use:   "keygen",
				Short: "Print a new age identity and its recipient (public key)",
				RunE: func(cmd *cobra.Command, _ []string) error {
					id, err := age.GenerateX25519Identity()
					if err != nil {
						return err
					}
					_, err = fmt.Fprintf(cmd.OutOrStdout(), "# public key: %s\n%s\n", id.Recipient(), id)
					return err
				},
			}
			cmd.AddCommand(open, keygen)
		},
	})
}

func readIdentities(files []string) ([]age.Identity, error) {
	if len(files) == 0 {
		return nil, errors.New("--identity: an age identity file is required")
	}
	var ids []age.Identity
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			return nil, err
		}
		parsed, err := age.ParseIdentities(strings.NewReader(string(b)))
		if err != nil {
			return nil, fmt.Errorf("%s: %v", f, err)
		}
		ids = append(ids, parsed...)
	}
	return ids, nil
}

// openLog prints the sealed entries of a log, opened, as JSON lines to
// out; what it cannot open it reports to errs. Other lines are skipped.
func openLog(in io.Reader, out, errs io.Writer, ids []age.Identity) (opened, failed int, err error) {
	sc := bufio.NewScanner(in)
	sc.Buffer(make([]byte, 0, 64*1024), 64*1024*1024)
	enc := json.NewEncoder(out)
	for n := 1; sc.Scan(); n++ {
		var line struct {
			Msg       string  `json:"msg"`
			TS        any     `json:"ts"`
			RequestID string  `json:"request_id"`
			Identity  string  `json:"identity"`
			Model     string  `json:"model"`
			Sealed    *string `json:"sealed"`
		}
		if json.Unmarshal(sc.Bytes(), &line) != nil || line.Msg != "llm prompt" || line.Sealed == nil {
			continue
		}
		e, uerr := unseal(ids, *line.Sealed)
		if uerr != nil {
			failed++
			_, _ = fmt.Fprintf(errs, "line %d (request %s): cannot open: %v\n", n, line.RequestID, uerr)
			continue
		}
		opened++
		if err := enc.Encode(map[string]any{"ts": line.TS, "request_id": line.RequestID, "identity": line.Identity,
			"model": line.Model, "prompt": e.Prompt, "answer": e.Answer}); err != nil {
			return opened, failed, err
		}
	}
	return opened, failed, sc.Err()
}
