// Renders an Ollama Modelfile TEMPLATE with Go's own text/template, the way Ollama renders a chat:
// the template gets .Messages (Role, Content), .System and .Prompt; the Modelfile's SYSTEM becomes the
// first message of a conversation that has none. duet checks its Modelfiles with it
// (training/ollama.py, go_render).
//
// stdin: {"template": "...", "system": "...", "conversations": [[{"role": "...", "content": "..."}]]}
// stdout: {"rendered": ["..." per conversation], "errors": ["" or the error per conversation]}
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
	"time"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Values struct {
	Messages []Message
	System   string
	Prompt   string
	Response string
	Tools    []any
}

// The functions Ollama's template package adds (template/template.go); the templates duet writes use none.
var funcs = template.FuncMap{
	"json": func(v any) string { b, _ := json.Marshal(v); return string(b) },
	"currentDate": func(args ...string) string { return time.Now().Format("2006-01-02") },
}

func main() {
	var req struct {
		Template      string      `json:"template"`
		System        string      `json:"system"`
		Conversations [][]Message `json:"conversations"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		panic(err)
	}
	out := struct {
		Rendered []string `json:"rendered"`
		Errors   []string `json:"errors"`
	}{}
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(req.Template)
	for _, conv := range req.Conversations {
		if err != nil {
			out.Rendered, out.Errors = append(out.Rendered, ""), append(out.Errors, err.Error())
			continue
		}
		msgs := conv
		hasSystem := false
		for _, m := range conv {
			hasSystem = hasSystem || m.Role == "system"
		}
		if req.System != "" && !hasSystem {
			msgs = append([]Message{{Role: "system", Content: req.System}}, conv...)
		}
		v := Values{Messages: msgs}
		for _, m := range msgs {
			if m.Role == "system" && v.System == "" {
				v.System = m.Content
			}
		}
		if len(msgs) > 0 {
			v.Prompt = msgs[len(msgs)-1].Content
		}
		var b strings.Builder
		e := tmpl.Execute(&b, v)
		msg := ""
		if e != nil {
			msg = e.Error()
		}
		out.Rendered, out.Errors = append(out.Rendered, b.String()), append(out.Errors, msg)
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
