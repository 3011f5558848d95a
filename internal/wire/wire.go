// Package wire writes the JSON answers the handler and the stand-in model
// both give: a JSON body, and an OpenAI model list.
package wire

import (
	"encoding/json"
	"net/http"
	"strconv"
)

// WriteJSON answers 200 with v as JSON.
func WriteJSON(w http.ResponseWriter, v any) {
	b, _ := json.Marshal(v)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	_, _ = w.Write(b)
}

// WriteModelList answers 200 with an OpenAI model list of names.
func WriteModelList(w http.ResponseWriter, names []string, owner string, created int64) {
	type model struct {
		ID      string `json:"id"`
		Object  string `json:"object"`
		Created int64  `json:"created"`
		OwnedBy string `json:"owned_by"`
	}
	list := struct {
		Object string  `json:"object"`
		Data   []model `json:"data"`
	}{Object: "list", Data: []model{}}
	for _, name := range names {
		list.Data = append(list.Data, model{ID: name, Object: "model", Created: created, OwnedBy: owner})
	}
	WriteJSON(w, list)
}
