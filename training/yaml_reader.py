"""The strict YAML reader of configs: a size cap, no duplicate keys, no anchors or tags beyond plain
YAML, no non-finite numbers, and validation errors that name file:line and field."""

from __future__ import annotations

import math
import os
from pathlib import Path

import yaml
from pydantic import ValidationError


class PlanError(ValueError):
    """A preset or config that does not validate; the message names file, field and what is allowed."""


def _union_tag(part: object) -> bool:
    """A loc element pydantic adds for one member of a union (``constrained-int``, ``literal['auto']``,
    ``list[str]``, ``bool``): not a key of the YAML (field names are snake_case words)."""
    p = str(part)
    return "[" in p or "-" in p or p in ("int", "float", "str", "bool", "none", "dict", "list")


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def format_validation(err: ValidationError, source: str, lines: dict[str, int],
                       overridden: dict | None = None, override_source: str = "overrides", prefix: str = "") -> str:
    """One line a field: ``file:line: field 'x': what is wrong (allowed: ...)``; a union's members'
    complaints (``workers: 0`` is neither a number >= 1 nor 'auto') are one line with the value given."""
    groups: dict[str, dict] = {}
    for e in err.errors():
        locs = [x for x in e["loc"] if not _union_tag(x)]
        loc = ".".join(str(x) for x in locs)
        top = str(locs[0]) if locs else ""
        parts = [str(x) for x in locs]
        line = None
        while parts and line is None:  # the deepest key the YAML has a line for
            line = lines.get(prefix + ".".join(parts))
            parts.pop()
        line = line or lines.get(prefix.rstrip("."))
        where = f"{source}:{line}" if line else source
        if overridden and top in overridden:
            where = f"{override_source} (over {source})"
        allowed = ""
        if e.get("ctx", {}).get("expected"):
            allowed = f" (allowed: {e['ctx']['expected']})"
        g = groups.setdefault(loc, {"where": where, "msgs": [], "union": False, "input": e.get("input")})
        g["union"] = g["union"] or len(locs) < len(e["loc"])
        if e["msg"] + allowed not in g["msgs"]:
            g["msgs"].append(e["msg"] + allowed)
    out = []
    for loc, g in groups.items():
        msg = "; or ".join(g["msgs"])
        if g["union"] and not isinstance(g["input"], (dict, list)):
            msg += f" (got {_shown(g['input'])})"
        out.append(f"{g['where']}: field {loc!r}: {msg}")
    return "\n".join(out)


def key_lines(text: str) -> dict[str, int]:
    """Line number of every mapping key in a YAML text, by dotted path ("train.lora.r"), for error
    messages; {} when the text does not compose."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except Exception:  # only for messages: an unparsable text has its own error
        return {}
    out: dict[str, int] = {}
    stack = [(root, "")]
    while stack:
        node, prefix = stack.pop()
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                path = f"{prefix}{k.value}" if isinstance(k, yaml.ScalarNode) else prefix.rstrip(".")
                out.setdefault(path, k.start_mark.line + 1)
                stack.append((v, path + "."))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                stack.append((v, f"{prefix.rstrip('.')}.{i}."))
    return out


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key written twice in one mapping (YAML says keys are unique;
    PyYAML keeps the last one silently)."""


def _mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError as exc:
            raise yaml.constructor.ConstructorError(None, None, f"a mapping key must be a plain value, got {key!r}",
                                                    key_node.start_mark) from exc
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice (first on line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)

MAX_YAML_BYTES = 4 << 20


def load_yaml(text: str, source: str) -> object:
    """Parse a config's YAML strictly: duplicate keys, anchors that expand beyond reason and
    non-finite numbers (.nan, .inf) are errors naming the line. PlanError otherwise."""
    if len(text) > MAX_YAML_BYTES:
        raise PlanError(f"{source}: {len(text):,} characters; a config is at most {MAX_YAML_BYTES:,}")
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise PlanError(f"{source}{line}: invalid YAML: {getattr(exc, 'problem', None) or exc}") from exc
    except RecursionError as exc:
        raise PlanError(f"{source}: nested too deeply") from exc
    try:
        bad = _bad_value(data)
    except PlanError as exc:
        raise PlanError(f"{source}: {exc}") from exc
    if bad:
        path, why = bad
        line = key_lines(text).get(path)
        raise PlanError(f"{source}{f':{line}' if line else ''}: field {path!r}: {why}")
    return data


def _bad_value(v: object, path: str = "") -> tuple[str, str] | None:
    """(field, why) of the first value no config may hold: a non-finite number, a text that is not
    valid Unicode; PlanError for a document with more than 100,000 values (an alias bomb)."""
    stack = [(v, path)]
    seen = 0
    while stack:
        x, p = stack.pop()
        seen += 1
        if seen > 100_000:
            raise PlanError("a config with more than 100,000 values (an alias bomb?) is refused")
        if isinstance(x, float) and not math.isfinite(x):
            return p or "<document>", "not a finite number (.nan and .inf are refused)"
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                return p or "<document>", "not valid Unicode (a lone surrogate escape)"
        if isinstance(x, dict):
            for k, val in x.items():
                if isinstance(k, str):
                    stack.append((k, f"{p} (a key)" if p else "<a key>"))
                stack.append((val, f"{p}.{k}" if p else str(k)))
        elif isinstance(x, list):
            stack.extend((val, f"{p}[{i}]") for i, val in enumerate(x))
    return None


def read_yaml_file(path: str | os.PathLike) -> tuple[object, str]:
    """(document, text) of a YAML config file; PlanError naming the file otherwise."""
    p = Path(path)
    try:
        if not p.is_file():
            raise PlanError(f"{p}: no such file (or not a regular file)")
        raw = p.read_bytes()
    except OSError as exc:
        raise PlanError(f"{p}: {exc.strerror}") from exc
    if len(raw) > MAX_YAML_BYTES:
        raise PlanError(f"{p}: {len(raw):,} bytes; a config is at most {MAX_YAML_BYTES:,}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PlanError(f"{p}: not UTF-8 (byte {exc.start})") from exc
    return load_yaml(text, str(p)), text
