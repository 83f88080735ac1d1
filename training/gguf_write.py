"""A Hugging Face folder (safetensors, config.json, tokenizer.json) -> one GGUF file, with the
``gguf`` library's own names and types, the way llama.cpp's converter writes it:

- architectures: ``llama`` (Llama 2/3, SmolLM2, Mistral's config family) and ``qwen2`` (Qwen2,
  Qwen2.5); anything else is refused before a byte is written;
- tokenizer: BPE from tokenizer.json: byte-level (``gpt2``: Llama 3, SmolLM2, Qwen2) or
  SentencePiece-style with byte fallback (``llama``: Llama 2, Mistral; scores ranked by id, the
  ``<0xNN>`` pieces as BYTE tokens); tokens by id, types, merges, BOS/EOS/UNK/PAD, the chat template;
- tensors: names from ``gguf.get_tensor_name_map``; llama's q/k projections permuted as llama.cpp
  expects (rotary halves interleaved); 1-D tensors (norms, biases) stay F32; matrices F16, BF16 or
  Q8_0 (a row of a length not divisible by 32 stays F16 in a Q8_0 file, as in llama.cpp);
- memory stays bounded: tensor infos are computed from the safetensors headers, then each tensor is
  read, converted and written in turn (one tensor in RAM at a time, never a second model).
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

SUPPORTED = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # HF model_type -> GGUF architecture
QUANTS = ("f16", "bf16", "q8_0")


class ExportError(ValueError):
    """An export refused or failed; the message says what and why (nothing is left half-written)."""


def gguf_arch(config: dict) -> str:
    mt = str(config.get("model_type", "?"))
    if mt not in SUPPORTED:
        raise ExportError(f"model_type {mt!r} cannot be exported to GGUF by duet; supported: "
                          f"{', '.join(sorted(SUPPORTED))} (the llama and qwen2 GGUF architectures)")
    rs, rp = config.get("rope_scaling") or {}, config.get("rope_parameters") or {}
    rope = rs.get("rope_type") or rs.get("type") or rp.get("rope_type") or "default"
    if rope != "default":
        raise ExportError(f"rope scaling {rope!r} (e.g. Llama 3.1/3.2's 'llama3') is not exported by duet yet: "
                          "only models with plain rotary embeddings are")
    return SUPPORTED[mt]


@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    model: str                  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style BPE, byte fallback)
    scores: list[float] | None
    special: dict[str, int]     # bos, eos, unk, pad -> id
    add_bos: bool
    chat_template: str | None


def _pre_tokenizer_name(tj: dict, model_type: str) -> str:
    """llama.cpp's name for the pre-tokenizer (its split regex), read from tokenizer.json."""
    pre = json.dumps(tj.get("pre_tokenizer") or {})
    if model_type == "qwen2":
        return "qwen2"
    if '"Digits"' in pre and '"individual_digits": true' in pre:
        return "smollm"  # SmolLM / SmolLM2: single digits, then byte-level
    if "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\\\r\\\\n\\\\p{L}\\\\p{N}]?\\\\p{L}+|\\\\p{N}{1,3}" in pre:
        return "llama-bpe"  # Llama 3
    return "gpt2"


def read_vocab(folder: Path, config: dict) -> Vocab:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"{folder}: no tokenizer.json (duet exports a fast tokenizer's vocabulary)")
    tj = json.loads(path.read_text(encoding="utf-8"))
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise ExportError(f"{path}: tokenizer model {model.get('type')!r} is not exported; duet writes BPE "
                          "vocabularies: byte-level (Llama 3, SmolLM2, Qwen2) or SentencePiece-style with byte "
                          "fallback (Llama 2, Mistral)")
    spm = bool(model.get("byte_fallback"))
    vocab: dict[str, int] = dict(model["vocab"])
    added = {a["content"]: a for a in tj.get("added_tokens", [])}
    for a in added.values():
        vocab[a["content"]] = a["id"]
    size = max(int(config.get("vocab_size") or 0), max(vocab.values()) + 1)
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(size):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(5)  # UNUSED: the config's vocabulary is larger than the tokenizer's
        else:
            tokens.append(t)
            if spm and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t):
                types.append(6)  # BYTE: SentencePiece's byte fallback pieces
            else:
                types.append(3 if t in added and added[t].get("special") else 4 if t in added else 1)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    tc = {}
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.is_file():
        tc = json.loads(cfg_path.read_text(encoding="utf-8"))
    template = tc.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")

    def tid(key: str) -> int | None:
        v = tc.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        return vocab.get(v) if isinstance(v, str) else None

    special = {k: v for k, v in (("bos", tid("bos_token")), ("eos", tid("eos_token")), ("unk", tid("unk_token")),
                                 ("pad", tid("pad_token"))) if v is not None}
    if "eos" not in special and isinstance(config.get("eos_token_id"), int):
        special["eos"] = config["eos_token_id"]
    if "bos" not in special and isinstance(config.get("bos_token_id"), int):
        special["bos"] = config["bos_token_id"]
    # SentencePiece BPE orders its pieces by score, best first: -id is the score llama.cpp's merge loop ranks by
    scores = [0.0 if ty in (3, 4, 5, 6) else -float(i) for i, ty in enumerate(types)] if spm else None
    # BOS as the tokenizer adds it: its config's flag, else whether its post-processor puts BOS first
    bos_text = tokens[special["bos"]] if "bos" in special else None
    add_bos = tc["add_bos_token"] if "add_bos_token" in tc else \
        bos_text is not None and json.dumps(bos_text) in json.dumps(tj.get("post_processor") or {})
    return Vocab(tokens, types, merges, "default" if spm else _pre_tokenizer_name(tj, str(config.get("model_type"))),
                 "llama" if spm else "gpt2", scores, special, bool(add_bos),
                 template if isinstance(template, str) else None)


class Safetensors:
    """A safetensors file read with plain file reads, one tensor at a time. safe_open's mmap would keep
    every page it touched resident (and counted in RSS) until the kernel reclaims it."""

    DTYPES = {"F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2)}

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        self.base = 8 + n
        header.pop("__metadata__", None)
        self.meta = header

    def keys(self) -> list[str]:
        return list(self.meta)

    def shape(self, key: str) -> list[int]:
        return list(self.meta[key]["shape"])

    def get(self, key: str):
        """The tensor as float32 numpy."""
        import numpy as np

        m = self.meta[key]
        if m["dtype"] not in self.DTYPES:
            raise ExportError(f"{self.path.name}: tensor {key!r} is {m['dtype']}; duet exports F32, F16 and BF16 weights")
        code, _size = self.DTYPES[m["dtype"]]
        start, end = m["data_offsets"]
        with open(self.path, "rb") as fh:
            fh.seek(self.base + start)
            raw = np.frombuffer(fh.read(end - start), dtype=code)
        if m["dtype"] == "BF16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        return raw.astype(np.float32, copy=False).reshape(m["shape"])


def tensor_shapes(folder: Path) -> list[list[int]]:
    """The shape of every tensor of a folder's safetensors files, from their headers."""
    return [st.shape(k) for f in sorted(folder.glob("*.safetensors")) for st in [Safetensors(f)] for k in st.keys()]


@contextlib.contextmanager
def _partial(out: Path, arch: str):
    """A GGUFWriter on ``out``.partial, renamed to ``out`` when the block ends, removed if it fails."""
    import gguf

    tmp = out.with_name(out.name + ".partial")
    w = gguf.GGUFWriter(str(tmp), arch)
    try:
        yield w
        w.close()
        tmp.replace(out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise


def _rotary_heads(module: str, arch: str, config: dict) -> int | None:
    """The head count a llama q/k projection's rows are permuted by (None: not permuted)."""
    if arch != "llama" or not module.endswith(("q_proj", "k_proj")):
        return None
    heads = int(config["num_attention_heads"])
    return int(config.get("num_key_value_heads") or heads) if module.endswith("k_proj") else heads


def _permute(w, n_head: int):
    """llama.cpp's q/k layout: HF keeps the rotary halves apart, GGUF interleaves them per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_plan(folder: Path, arch: str, config: dict):
    """(gguf name, hf name, file) for every tensor to write, in file order (tied lm_head skipped)."""
    import gguf

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{folder}: no *.safetensors weights")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN2,
                                     int(config["num_hidden_layers"]))
    out = []
    for f in files:
        st = Safetensors(f)
        for hf in st.keys():
            if hf == "lm_head.weight" and config.get("tie_word_embeddings"):
                continue
            if hf.endswith("rotary_emb.inv_freq"):
                continue
            g = names.get_name(hf, try_suffixes=(".weight", ".bias"))
            if g is None:
                raise ExportError(f"{f.name}: tensor {hf!r} has no GGUF name for architecture {arch}")
            out.append((g, hf, st))
    return out


def _qtype(shape: list[int], quant: str):
    """The GGML type a tensor of this shape gets in a file of this quantization."""
    import gguf

    q = gguf.GGMLQuantizationType
    if len(shape) == 1:
        return q.F32
    if quant == "q8_0" and shape[-1] % 32 == 0:
        return q.Q8_0
    return q.BF16 if quant == "bf16" else q.F16


def _info(shape: list[int], qtype):
    """(numpy dtype, stored shape, bytes) of a tensor once converted, from its shape alone."""
    import gguf
    import numpy as np

    q = gguf.GGMLQuantizationType
    n = int(np.prod(shape))
    if qtype == q.F32:
        return np.float32, tuple(shape), n * 4
    if qtype == q.F16:
        return np.float16, tuple(shape), n * 2
    byte_shape = gguf.quants.quant_shape_to_byte_shape(tuple(shape), qtype)
    return np.uint8, byte_shape, int(np.prod(byte_shape))


def _convert(a, hf: str, qtype, arch: str, config: dict):
    """One tensor (float32 numpy), converted to its GGML type."""
    import gguf
    import numpy as np

    q = gguf.GGMLQuantizationType
    heads = _rotary_heads(hf.removesuffix(".weight"), arch, config)
    if heads:
        a = _permute(a, heads)
    if qtype == q.F32:
        return a.astype(np.float32)
    if qtype == q.F16:
        return a.astype(np.float16)
    return gguf.quants.quantize(a, qtype)


def _add_metadata(w, config: dict, vocab: Vocab, quant: str, name: str) -> None:
    """The model's architecture keys and its tokenizer, as llama.cpp's converter writes them."""
    import gguf

    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    w.add_name(name)
    w.add_context_length(int(config.get("max_position_embeddings", 2048)))
    w.add_embedding_length(hidden)
    w.add_block_count(int(config["num_hidden_layers"]))
    w.add_feed_forward_length(int(config["intermediate_size"]))
    w.add_head_count(heads)
    w.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    w.add_rope_freq_base(float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta")
                               or 10000.0))
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    w.add_rope_dimension_count(int(config.get("head_dim") or hidden // heads))
    w.add_vocab_size(len(vocab.tokens))
    ftype = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]
    w.add_file_type(int(ftype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model(vocab.model)
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
        w.add_add_space_prefix(True)
    w.add_token_merges(vocab.merges)
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                     ("pad", w.add_pad_token_id)):
        if key in vocab.special:
            add(vocab.special[key])
    w.add_add_bos_token(vocab.add_bos)
    if vocab.chat_template:
        w.add_chat_template(vocab.chat_template)


def write_gguf(folder: Path, out: Path, quant: str, *, name: str) -> dict:
    """Write ``out`` (through ``out``.partial, renamed at the end); returns what was written."""
    if quant not in QUANTS:
        raise ExportError(f"--quant {quant!r}: use one of {', '.join(QUANTS)}")
    config = json.loads((folder / "config.json").read_text())
    arch = gguf_arch(config)
    vocab = read_vocab(folder, config)
    plan = _tensor_plan(folder, arch, config)
    with _partial(out, arch) as w:
        _add_metadata(w, config, vocab, quant, name)
        qtypes = {}
        for gname, hf, st in plan:  # every tensor's info first, from the safetensors header alone
            shape = st.shape(hf)
            qtypes[gname] = _qtype(shape, quant)
            dtype, stored, nbytes = _info(shape, qtypes[gname])
            w.add_tensor_info(gname, stored, dtype, nbytes, raw_dtype=qtypes[gname])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for gname, hf, st in plan:  # then the data, one tensor in memory at a time
            data = _convert(st.get(hf), hf, qtypes[gname], arch, config)
            w.write_tensor_data(data)
            del data
    return {"path": str(out), "bytes": out.stat().st_size, "architecture": arch, "quant": quant,
            "tensors": len(plan), "tokenizer": vocab.model, "tokenizer_pre": vocab.pre, "vocab": len(vocab.tokens),
            "chat_template": vocab.chat_template is not None}


def write_lora_gguf(adapter_dir: Path, base_config: dict, out: Path, *, name: str) -> dict:
    """The LoRA adapter alone as a GGUF LoRA file (llama.cpp: ``llama-cli -m BASE.gguf --lora FILE``),
    as llama.cpp's convert_lora_to_gguf.py writes it: ``general.type`` adapter, ``adapter.type`` lora,
    ``adapter.lora.alpha``; each adapted matrix as ``<gguf name>.lora_a`` [r, in] and ``.lora_b``
    [out, r] in F32 (B's rows permuted like the weight's for llama's q/k)."""
    import gguf
    import numpy as np

    arch = gguf_arch(base_config)
    acfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN2,
                                     int(base_config["num_hidden_layers"]))
    src = adapter_dir / "adapter_model.safetensors"
    tensors = []
    st = Safetensors(src)
    for key in sorted(st.keys()):
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", key)
        if not m:
            raise ExportError(f"{src.name}: tensor {key!r} is not a LoRA A/B matrix (only plain LoRA is exported)")
        g = names.get_name(m.group(1) + ".weight", try_suffixes=(".weight",))
        if g is None:
            raise ExportError(f"{src.name}: {m.group(1)} has no GGUF name for architecture {arch}")
        a = st.get(key)
        heads = _rotary_heads(m.group(1), arch, base_config)
        if m.group(2) == "B" and heads:  # B's rows are the projection's output rows
            a = _permute(a, heads)
        tensors.append((f"{g}.lora_{m.group(2).lower()}", a.astype(np.float32)))
    with _partial(out, arch) as w:
        w.add_name(name)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(acfg["lora_alpha"]))
        for tname, a in tensors:
            w.add_tensor(tname, a)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    return {"path": str(out), "bytes": out.stat().st_size, "tensors": len(tensors), "r": acfg.get("r"),
            "alpha": acfg["lora_alpha"]}
