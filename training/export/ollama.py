"""An Ollama Modelfile for an exported GGUF: the chat template in Ollama's (Go text/template)
format, stop tokens, the system prompt and parameters.

Templates are not translated token by token (Jinja and Go templates differ too much). The tokenizer's
Jinja template is rendered on probe conversations (with and without a system message, single and
multi-turn) and a Go template is kept only when it renders every probe to the same text, the way
Ollama renders it (the Modelfile's SYSTEM becomes the first message of a conversation that has none;
BOS is the runtime's, not the template's):

1. a known family's template (``FAMILIES``: ChatML, Llama 3, Llama 3.1/3.2 with its dated system
   header, Gemma 2/3, Phi-3/3.5, Phi-4-mini, Mistral v0.3), or else
2. one derived from the probes themselves (``derive``): the text the Jinja template puts before the
   first turn, between each pair of roles and after the last user turn, for templates that wrap each
   turn in fixed text. Most chat templates are of that kind.

Where neither renders every probe alike, the Modelfile has no TEMPLATE and Ollama uses the template
stored in the GGUF (``tokenizer.chat_template``); the export says so. tests/e2e/test_families.py
renders every family's TEMPLATE with Go's own text/template (what Ollama runs) against
``apply_chat_template``.

``render`` is a small interpreter for the Go-template subset these templates use: ``range`` (with
``$i, $m :=``), ``if``/``else if``/``else``, variables (``:=``, ``=``), ``eq``, ``ne``, ``and``, ``or``,
``not``, ``len``, ``slice``, ``index``, ``.Field``, ``$.Field``, string literals and the ``{{-``/``-}}``
trim markers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

# Llama 3.1/3.2's template dates its system header with the day it renders (strftime_now); Ollama's
# template language cannot format that date, so the Modelfile keeps the template's own fallback date.
LLAMA31_DATE = "26 Jul 2024"
CHATML = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
          "{{ end }}<|im_start|>assistant\n")
LLAMA3 = ("{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
          "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n")
LLAMA31 = ("<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: "
           + LLAMA31_DATE + "\n\n{{ range .Messages }}{{ if eq .Role \"system\" }}{{ .Content }}{{ end }}{{ end }}"
           "<|eot_id|>{{ range .Messages }}{{ if ne .Role \"system\" }}<|start_header_id|>{{ .Role }}<|end_header_id|>"
           "\n\n{{ .Content }}<|eot_id|>{{ end }}{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n")
GEMMA = ("{{- $system := \"\" }}{{- range .Messages }}{{ if eq .Role \"system\" }}{{ $system = .Content }}{{ end }}"
         "{{ end }}{{- $first := true }}{{- range .Messages }}{{ if ne .Role \"system\" }}<start_of_turn>"
         "{{ if eq .Role \"assistant\" }}model{{ else }}{{ .Role }}{{ end }}\n{{ if and $first $system }}{{ $system }}"
         "\n\n{{ end }}{{ $first = false }}{{ .Content }}<end_of_turn>\n{{ end }}{{ end }}<start_of_turn>model\n")
PHI3 = ("{{- range .Messages }}{{ if or (ne .Role \"system\") .Content }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n"
        "{{ end }}{{ end }}<|assistant|>\n")
PHI4 = "{{- range .Messages }}<|{{ .Role }}|>{{ .Content }}<|end|>{{ end }}<|assistant|>"
MISTRAL = ("{{- $system := \"\" }}{{- range .Messages }}{{ if eq .Role \"system\" }}{{ $system = .Content }}{{ end }}"
           "{{ end }}{{- range $i, $m := .Messages }}{{ if eq $m.Role \"user\" }}[INST] "
           "{{ if and $system (eq (len (slice $.Messages $i)) 1) }}{{ $system }}\n\n{{ end }}{{ $m.Content }}[/INST]"
           "{{ else if eq $m.Role \"assistant\" }} {{ $m.Content }}</s>{{ end }}{{ end }}")
FAMILIES = {"chatml": (CHATML, ["<|im_start|>", "<|im_end|>"]),
            "llama3": (LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
            "llama3.1": (LLAMA31, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
            "gemma": (GEMMA, ["<start_of_turn>", "<end_of_turn>"]),
            "phi3": (PHI3, ["<|end|>", "<|user|>", "<|assistant|>"]),
            "phi4": (PHI4, ["<|end|>", "<|user|>", "<|assistant|>"]),
            "mistral": (MISTRAL, ["[INST]", "[/INST]"])}
PROBES = [
    [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Hi there!"},
     {"role": "assistant", "content": "Hello. What do you need?"}, {"role": "user", "content": "A haiku, please."}],
    [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another one?"}, {"role": "assistant", "content": "Green."},
     {"role": "user", "content": "And a third?"}],
]


# -- a Go text/template subset ---------------------------------------------------------------------

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)
_ATOM = re.compile(r'\s*("(?:[^"\\]|\\.)*"|\(|\)|[^\s()]+)')


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
        if kind == "action" and (head in stop or head == "else"):
            return nodes, i
        if kind == "action" and head in ("range", "if"):
            node, i = _block(tokens, i, head, val[len(head):].strip())
            nodes.append(node)
            continue
        nodes.append((kind, val))
        i += 1
    return nodes, i


def _block(tokens: list, i: int, head: str, arg: str):
    """``if``/``range`` from token ``i``: (node, index after its ``end``); ``else if`` nests an ``if``."""
    body, j = _parse(tokens, i + 1, ("end",))
    other: list = []
    val = tokens[j][1] if j < len(tokens) else "end"
    if val.startswith("else if "):
        node, j = _block(tokens, j, "if", val[len("else if "):].strip())
        return (head, arg, body, [node]), j
    if val == "else":
        other, j = _parse(tokens, j + 1, ("end",))
    return (head, arg, body, other), j + 1


def _atoms(expr: str) -> list[str]:
    out, pos = [], 0
    while pos < len(expr):
        m = _ATOM.match(expr, pos)
        if not m or not m.group(1):
            break
        out.append(m.group(1))
        pos = m.end()
    return out


def _group(atoms: list[str]) -> list:
    """Atoms with parenthesized sub-expressions as nested lists."""
    stack: list[list] = [[]]
    for a in atoms:
        if a == "(":
            stack.append([])
        elif a == ")":
            inner = stack.pop()
            stack[-1].append(inner)
        else:
            stack[-1].append(a)
    return stack[0]


def _field(base, path: str):
    for part in filter(None, path.split(".")):
        base = base.get(part) if isinstance(base, dict) else getattr(base, part, None)
    return base


def _truth(v) -> bool:
    return bool(v) and v is not None


def _call(items: list, dot, root, env: dict):
    if not items:
        return None
    head = items[0]
    args = items[1:]
    if isinstance(head, str) and head in _FUNCS and args:
        return _FUNCS[head]([_term(a, dot, root, env) for a in args])
    return _term(head, dot, root, env)


def _term(a, dot, root, env: dict):
    if isinstance(a, list):
        return _call(a, dot, root, env)
    if a.startswith('"'):
        return json.loads(a)
    if a in ("true", "false"):
        return a == "true"
    if re.fullmatch(r"-?\d+", a):
        return int(a)
    if a == ".":
        return dot
    if a.startswith("$."):
        return _field(root, a[2:])
    if a.startswith("$"):
        name, _, rest = a.partition(".")
        return _field(env.get(name), rest)
    if a.startswith("."):
        return _field(dot, a[1:])
    raise ValueError(f"cannot evaluate {a!r}")


_FUNCS = {
    "eq": lambda a: a[0] == a[1], "ne": lambda a: a[0] != a[1], "not": lambda a: not _truth(a[0]),
    "and": lambda a: next((x for x in a if not _truth(x)), a[-1]),
    "or": lambda a: next((x for x in a if _truth(x)), a[-1]),
    "len": lambda a: len(a[0] or []), "index": lambda a: a[0][a[1]],
    "slice": lambda a: a[0][a[1]:a[2]] if len(a) > 2 else a[0][a[1]:],
}


def _eval(nodes, dot, root, env: dict, out: list[str]) -> None:
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "action":
            m = re.fullmatch(r"(\$\w+)\s*(:?=)\s*(.+)", node[1], re.S)
            if m:
                env[m.group(1)] = _call(_group(_atoms(m.group(3))), dot, root, env)
                continue
            v = _call(_group(_atoms(node[1])), dot, root, env)
            out.append("" if v is None else str(v).lower() if isinstance(v, bool) else str(v))
        elif node[0] == "range":
            m = re.fullmatch(r"(?:(\$\w+)\s*,\s*(\$\w+)\s*:=\s*)?(.+)", node[1], re.S)
            items = _call(_group(_atoms(m.group(3))), dot, root, env) or []
            for i, item in enumerate(items):
                if m.group(1):
                    env[m.group(1)], env[m.group(2)] = i, item
                _eval(node[2], item, root, env, out)
            if not items:
                _eval(node[3], dot, root, env, out)
        elif node[0] == "if":
            cond = _call(_group(_atoms(node[1])), dot, root, env)
            _eval(node[2] if _truth(cond) else node[3], dot, root, env, out)


def render(template: str, messages: list[dict], system: str | None = None) -> str:
    """Render an Ollama template for a conversation as Ollama does: the Modelfile's SYSTEM becomes the
    first message when the conversation has no system message; Role/Content as Ollama names them."""
    msgs = [{"Role": m["role"], "Content": m["content"]} for m in messages]
    if system and not any(m["Role"] == "system" for m in msgs):
        msgs.insert(0, {"Role": "system", "Content": system})
    sys_text = next((m["Content"] for m in msgs if m["Role"] == "system"), "")
    root = {"Messages": msgs, "System": sys_text, "Prompt": msgs[-1]["Content"] if msgs else ""}
    nodes, _ = _parse(_tokens(template))
    out: list[str] = []
    _eval(nodes, root, root, {"$": root}, out)
    return "".join(out)


# -- families, derivation and the Modelfile --------------------------------------------------------

def hf_render(tokenizer, conversation: list[dict]) -> str | None:
    """``apply_chat_template`` as the model saw it (None where the template refuses the conversation,
    e.g. Gemma 2's with a system message); a dated template gets ``LLAMA31_DATE``."""
    try:
        return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True,
                                             date_string=LLAMA31_DATE)
    except Exception:  # noqa: BLE001 - a template's raise_exception
        return None


def renders_alike(tokenizer, want: str, got: str | None) -> bool:
    """A Go rendering equals the Jinja one; the BOS text a Jinja template writes first is the runtime's
    (llama.cpp adds BOS), so it may be missing from the Go side."""
    bos = tokenizer.bos_token or ""
    return got is not None and (got == want or (bool(bos) and want == bos + got))


def _matches(tokenizer, template: str, system: str | None, probes=PROBES) -> bool:
    seen = 0
    for probe in probes:
        want = hf_render(tokenizer, probe)
        if want is None:
            continue
        try:
            got = render(template, probe, system)
        except Exception:  # noqa: BLE001 - a template this subset cannot run is no match
            return False
        if not renders_alike(tokenizer, want, got):
            return False
        seen += 1
    return seen >= 2


def derive(tokenizer, system: str | None = None) -> str | None:
    """A Go template for a chat template that wraps each turn in fixed text: the text before the
    first turn, between each pair of roles, and after the last user turn, read off renderings of
    marker conversations. None when the renderings do not have that shape."""
    s, u1, a1, u2 = "SYSMARK1", "USERMARK1", "ASSTMARK1", "USERMARK2"
    three = hf_render(tokenizer, [{"role": "user", "content": u1}, {"role": "assistant", "content": a1},
                                  {"role": "user", "content": u2}])
    if not three or not all(three.count(x) == 1 for x in (u1, a1, u2)):
        return None
    bos = tokenizer.bos_token or ""
    if bos and three.startswith(bos):
        three = three[len(bos):]
    pre, rest = three.split(u1)
    u_a, rest = rest.split(a1)
    a_u, tail = rest.split(u2)
    with_sys = hf_render(tokenizer, [{"role": "system", "content": s}, {"role": "user", "content": u1}])
    sys_lines = ""
    if with_sys and with_sys.count(s) == 1 and with_sys.count(u1) == 1:
        if bos and with_sys.startswith(bos):
            with_sys = with_sys[len(bos):]
        pre_sys, rest = with_sys.split(s)
        s_u = rest.split(u1)[0]
        sys_lines = (f'{{{{- if eq $m.Role "system" }}}}{{{{ {json.dumps(pre_sys)} }}}}{{{{ $m.Content }}}}'
                     f'{{{{ $prev = "system" }}}}{{{{- else if eq $m.Role "user" }}}}'
                     f'{{{{ if eq $prev "system" }}}}{{{{ {json.dumps(s_u)} }}}}{{{{ else if eq $prev "" }}}}')
    else:
        sys_lines = '{{- if eq $m.Role "user" }}{{ if eq $prev "" }}'
    template = ('{{- $prev := "" }}{{- range $i, $m := .Messages }}' + sys_lines +
                f'{{{{ {json.dumps(pre)} }}}}{{{{ else }}}}{{{{ {json.dumps(a_u)} }}}}{{{{ end }}}}'
                '{{ $m.Content }}{{ $prev = "user" }}'
                f'{{{{- else if eq $m.Role "assistant" }}}}{{{{ {json.dumps(u_a)} }}}}{{{{ $m.Content }}}}'
                '{{ $prev = "assistant" }}{{- end }}{{- end }}' + f'{{{{ {json.dumps(tail)} }}}}')
    return template if _matches(tokenizer, template, system) else None


def identify(tokenizer, system: str | None = None) -> tuple[str | None, str, str | None]:
    """(family, why, Go template): the first of ``FAMILIES``, else a derived template, that renders
    every probe as the tokenizer's own chat template does; ``system``: the Modelfile's SYSTEM (the
    template's default system prompt by default, which Ollama then puts first as HF's template does)."""
    if not getattr(tokenizer, "chat_template", None):
        return None, "the tokenizer has no chat template", None
    system = system if system is not None else default_system(tokenizer)
    for fam, (tmpl, _stops) in FAMILIES.items():
        if _matches(tokenizer, tmpl, system):
            return fam, f"the tokenizer's template renders like {fam} on {len(PROBES)} probe conversations", tmpl
    derived = derive(tokenizer, system)
    if derived:
        return "derived", (f"derived from the tokenizer's template: each turn wrapped in fixed text, equal on "
                           f"{len(PROBES)} probe conversations"), derived
    return None, ("the tokenizer's chat template matches no known family (" + ", ".join(FAMILIES) +
                  ") and does not wrap each turn in fixed text"), None


def default_system(tokenizer) -> str | None:
    """The system text a template inserts when a conversation has none (Qwen2.5's and SmolLM2's do):
    what it renders before the first user turn, when a system message of that text renders the same."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    bare = hf_render(tokenizer, [{"role": "user", "content": "USERMARK1"}])
    marked = hf_render(tokenizer, [{"role": "system", "content": "SYSMARK1"}, {"role": "user", "content": "USERMARK1"}])
    if not bare or not marked or marked.count("SYSMARK1") != 1:
        return None
    before, after = marked.split("SYSMARK1")
    head = bare.split("USERMARK1")[0]
    if not head.startswith(before):
        return None
    rest = head[len(before):]
    sys_end = after.split("USERMARK1")[0]
    if not sys_end or not rest.endswith(sys_end) or len(rest) == len(sys_end):
        return None
    text = rest[:-len(sys_end)]
    probe = hf_render(tokenizer, [{"role": "system", "content": text}, {"role": "user", "content": "USERMARK1"}])
    return text if probe == bare else None


def go_renderer() -> Path | None:
    """Go's text/template as a program (infra/ollama_template/main.go), built once into the cache dir;
    None where Go is not installed."""
    import hashlib
    import os
    import shutil
    import subprocess

    src = Path(__file__).resolve().parents[2] / "infra" / "ollama_template"
    go = shutil.which("go")
    if go is None or not (src / "main.go").is_file():
        return None
    from training.models import cache_dir

    digest = hashlib.sha256((src / "main.go").read_bytes()).hexdigest()[:16]
    exe = cache_dir() / "bin" / f"ollama-render-{digest}"
    if not exe.is_file():
        exe.parent.mkdir(parents=True, exist_ok=True)
        tmp = exe.with_name(exe.name + f".{os.getpid()}")
        env = {**os.environ, "GOPROXY": "off", "GOFLAGS": "-mod=mod", "CGO_ENABLED": "0",
               "GOCACHE": str(cache_dir() / "go-build")}
        r = subprocess.run([go, "build", "-o", str(tmp), "."], cwd=src, capture_output=True, text=True, env=env,
                           timeout=300)
        if r.returncode != 0:
            return None
        tmp.replace(exe)
    return exe


def go_render(template: str, conversations: list[list[dict]], system: str | None = None) -> list[str | None] | None:
    """Each conversation rendered by Go's own text/template as Ollama renders it (None where the
    template fails on it); None where Go is not installed."""
    import subprocess

    exe = go_renderer()
    if exe is None:
        return None
    r = subprocess.run([str(exe)], input=json.dumps({"template": template, "system": system or "",
                                                     "conversations": conversations}),
                       capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        return [None] * len(conversations)
    doc = json.loads(r.stdout)
    return [None if err else text for text, err in zip(doc["rendered"], doc["errors"])]


def go_check(tokenizer, template: str, system: str | None) -> tuple[bool | None, str]:
    """(whether Go's text/template renders every probe as apply_chat_template does, or None without
    Go; what was checked)."""
    got = go_render(template, PROBES, system)
    if got is None:
        return None, "not checked by Go (not installed); duet's Go-template subset renders every probe alike"
    for probe, text in zip(PROBES, got):
        want = hf_render(tokenizer, probe)
        if want is not None and not renders_alike(tokenizer, want, text):
            return False, f"Go's text/template renders {[m['role'] for m in probe]} differently"
    return True, f"Go's text/template renders all {len(PROBES)} probe conversations as apply_chat_template"


def modelfile(gguf_name: str, tokenizer, *, system: str | None, num_ctx: int) -> tuple[str, dict]:
    """The Modelfile text and what it decided (family, template, stops, system, and whether Go's own
    text/template agreed)."""
    default = default_system(tokenizer)
    family, why, template = identify(tokenizer, default)
    go_ok, go_why = go_check(tokenizer, template, default) if template else (None, "no TEMPLATE")
    if go_ok is False:
        family, why, template = None, f"{why}, but {go_why}: no TEMPLATE", None
    stops = list(FAMILIES[family][1]) if family in FAMILIES else []
    eos = tokenizer.eos_token
    if eos and eos not in stops:
        stops.append(eos)
    system = system or default
    lines = [f"FROM ./{gguf_name}", ""]
    if template:
        lines += [f'TEMPLATE """{template}"""', ""]
    if system:
        lines += [f'SYSTEM """{system}"""', ""]
    for s in stops:
        lines.append(f'PARAMETER stop "{s}"')
    lines += ["PARAMETER temperature 0.7", "PARAMETER top_p 0.9", f"PARAMETER num_ctx {num_ctx}", ""]
    return "\n".join(lines), {"template_family": family, "template_basis": why, "template": template, "stops": stops,
                              "system": system, "default_system": default, "num_ctx": num_ctx, "go_check": go_why}


def system_prompt_of(test_jsonl: Path) -> str | None:
    """The system prompt a dataset's conversations share, if they all start with the same one."""
    seen = set()
    for line in test_jsonl.read_text(encoding="utf-8").splitlines() if test_jsonl.is_file() else []:
        if not line.strip():
            continue
        msgs = json.loads(line).get("messages") or []
        seen.add(msgs[0]["content"] if msgs and msgs[0].get("role") == "system" else None)
    return next(iter(seen)) if len(seen) == 1 else None
