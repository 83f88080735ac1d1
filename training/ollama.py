"""An Ollama Modelfile for an exported GGUF: the chat template in Ollama's (Go text/template)
format, stop tokens, the system prompt and parameters.

Templates are not translated token by token (Jinja and Go templates differ too much); the
tokenizer's Jinja template is identified as a known family by rendering probe conversations with
it and with the family's Go template, and the family is used only when every probe renders to the
same text. Known: ChatML (SmolLM2, Qwen2/2.5, duet's tiny models) and Llama 3. Otherwise the
Modelfile has no TEMPLATE, and Ollama falls back to the template stored in the GGUF
(``tokenizer.chat_template``). That fallback is stated in the export's result.

``render`` is a small interpreter for the Go-template subset these templates use: ``range``,
``if``/``else``, ``eq``, ``.Field``, ``$.Field`` and the ``{{-``/``-}}`` trim markers.
"""

from __future__ import annotations

import re
from pathlib import Path

CHATML = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
          "{{ end }}<|im_start|>assistant\n")
LLAMA3 = ("{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
          "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n")
FAMILIES = {"chatml": (CHATML, ["<|im_start|>", "<|im_end|>"]),
            "llama3": (LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])}
PROBES = [
    [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Hi there!"},
     {"role": "assistant", "content": "Hello. What do you need?"}, {"role": "user", "content": "A haiku, please."}],
    [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "2+2?"}],
]


# -- a Go text/template subset ---------------------------------------------------------------------

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


def _tokens(template: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if m.group(1) == "-":
            text = text.rstrip()
        out.append(("text", text))
        out.append(("action", m.group(2)))
        pos = m.end()
        if m.group(3) == "-":
            rest = template[pos:]
            pos += len(rest) - len(rest.lstrip())
    out.append(("text", template[pos:]))
    return [t for t in out if t != ("text", "")]


def _parse(tokens: list, i: int = 0, stop=("end",)):
    nodes = []
    while i < len(tokens):
        kind, val = tokens[i]
        head = val.split()[0] if kind == "action" and val else ""
        if kind == "action" and (head in stop or val == "else"):
            return nodes, i
        if kind == "action" and head in ("range", "if"):
            body, j = _parse(tokens, i + 1, ("end", "else"))
            other = []
            if tokens[j][1] == "else":
                other, j = _parse(tokens, j + 1, ("end",))
            nodes.append((head, val[len(head):].strip(), body, other))
            i = j + 1
            continue
        nodes.append((kind, val))
        i += 1
    return nodes, i


def _value(expr: str, dot, root):
    expr = expr.strip()
    if expr.startswith("eq "):
        a, b = _split_args(expr[3:])
        return _value(a, dot, root) == _value(b, dot, root)
    if expr.startswith('"') and expr.endswith('"'):
        return expr[1:-1].encode().decode("unicode_escape")
    if expr == ".":
        return dot
    base, path = (root, expr[2:]) if expr.startswith("$.") else (dot, expr[1:])
    for part in filter(None, path.split(".")):
        base = base.get(part) if isinstance(base, dict) else getattr(base, part, None)
    return base


def _split_args(s: str) -> tuple[str, str]:
    m = re.match(r'\s*("(?:[^"\\]|\\.)*"|\S+)\s+(.*)$', s)
    if not m:
        raise ValueError(f"cannot read the arguments {s!r}")
    return m.group(1), m.group(2)


def _eval(nodes, dot, root, out: list[str]) -> None:
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "action":
            v = _value(node[1], dot, root)
            out.append("" if v is None else str(v))
        elif node[0] == "range":
            items = _value(node[1], dot, root) or []
            for item in items:
                _eval(node[2], item, root, out)
            if not items:
                _eval(node[3], dot, root, out)
        elif node[0] == "if":
            _eval(node[2] if _value(node[1], dot, root) else node[3], dot, root, out)


def render(template: str, messages: list[dict], system: str | None = None) -> str:
    """Render an Ollama template for a conversation (Role/Content as Ollama names them)."""
    msgs = [{"Role": m["role"], "Content": m["content"]} for m in messages]
    root = {"Messages": msgs, "System": system or "", "Prompt": msgs[-1]["Content"] if msgs else ""}
    nodes, _ = _parse(_tokens(template))
    out: list[str] = []
    _eval(nodes, root, root, out)
    return "".join(out)


# -- families and the Modelfile --------------------------------------------------------------------

def identify(tokenizer) -> tuple[str | None, str]:
    """(family, why): the family whose Go template renders every probe as the tokenizer's own chat
    template does (the BOS text a tokenizer puts first is left to the runtime, which adds BOS)."""
    if not getattr(tokenizer, "chat_template", None):
        return None, "the tokenizer has no chat template"
    bos = tokenizer.bos_token or ""
    for fam, (tmpl, _stops) in FAMILIES.items():
        ok = True
        for probe in PROBES:
            want = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
            got = render(tmpl, probe)
            if got != want and not (bos and want == bos + got):
                ok = False
                break
        if ok:
            return fam, f"the tokenizer's template renders like {fam} on {len(PROBES)} probe conversations"
    return None, "the tokenizer's chat template matches no known family (chatml, llama3)"


def default_system(tokenizer) -> str | None:
    """The system text a template inserts when a conversation has none (SmolLM2's does)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    m = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", text, re.S)
    return m.group(1) if m else None


def modelfile(gguf_name: str, tokenizer, *, system: str | None, num_ctx: int) -> tuple[str, dict]:
    """The Modelfile text and what it decided (family, stops, system)."""
    family, why = identify(tokenizer)
    stops = list(FAMILIES[family][1]) if family else []
    eos = tokenizer.eos_token
    if eos and eos not in stops:
        stops.append(eos)
    system = system or default_system(tokenizer)
    lines = [f"FROM ./{gguf_name}", ""]
    if family:
        lines += [f'TEMPLATE """{FAMILIES[family][0]}"""', ""]
    if system:
        lines += [f'SYSTEM """{system}"""', ""]
    for s in stops:
        lines.append(f'PARAMETER stop "{s}"')
    lines += ["PARAMETER temperature 0.7", "PARAMETER top_p 0.9", f"PARAMETER num_ctx {num_ctx}", ""]
    return "\n".join(lines), {"template_family": family, "template_basis": why, "stops": stops,
                              "system": system, "num_ctx": num_ctx}


def system_prompt_of(test_jsonl: Path) -> str | None:
    """The system prompt a dataset's conversations share, if they all start with the same one."""
    import json

    seen = set()
    for line in test_jsonl.read_text(encoding="utf-8").splitlines() if test_jsonl.is_file() else []:
        if not line.strip():
            continue
        msgs = json.loads(line).get("messages") or []
        seen.add(msgs[0]["content"] if msgs and msgs[0].get("role") == "system" else None)
    return next(iter(seen)) if len(seen) == 1 else None
