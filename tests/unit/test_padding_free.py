"""Padding-free CPU batches (training/run/padding_free.py): the same loss and gradients as padded rows
for the families users train, the model unchanged for every other call (generation), refused where
only a mask can express the attention, and wired into duet's trainer."""

import json

import pytest

torch = pytest.importorskip("torch")
import transformers  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling  # noqa: E402

from tests import families  # noqa: E402
from training.run import padding_free  # noqa: E402

VOCAB = 300


def _model(family: str):
    spec = families.FAMILIES[family]
    cfg = getattr(transformers, f"{spec['class']}Config")(vocab_size=VOCAB, pad_token_id=0, **spec["config"])
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = getattr(transformers, f"{spec['class']}ForCausalLM")(cfg)
    torch.manual_seed(1)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))


def _examples():
    g = torch.Generator().manual_seed(2)
    out = []
    for n, prompt in ((23, 9), (7, 3), (41, 12), (16, 5)):  # lengths that pad a lot
        ids = torch.randint(1, VOCAB, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["qwen3", "llama3.2", "phi4-mini", "mistral"])
def test_same_loss_and_gradients_as_padded_rows(family):
    model = _model(family)
    padded = DataCollatorForLanguageModeling(pad_token_id=0)
    batch = padded(_examples())
    assert (batch["attention_mask"] == 0).sum() > 40  # the padded batch really pads
    loss_a, grads_a = _loss_and_grads(model, batch)

    assert padding_free.install(model, seq_len=64) is None
    flat = padding_free.collator(padded)(_examples())
    assert flat["input_ids"].shape == (1, 23 + 7 + 41 + 16) and "attention_mask" not in flat
    loss_b, grads_b = _loss_and_grads(model, flat)

    assert torch.allclose(loss_a, loss_b, atol=1e-6), (loss_a, loss_b)
    for name, g in grads_a.items():
        assert torch.allclose(g, grads_b[name], atol=1e-6, rtol=1e-4), name


def test_positions_alone_mark_the_examples():
    """A padding-free row from a collator that gives positions but no boundaries is still split by example."""
    model = _model("qwen3")
    padded = DataCollatorForLanguageModeling(pad_token_id=0)
    loss_a, _ = _loss_and_grads(model, padded(_examples()))
    padding_free.install(model, seq_len=64)
    flat = padding_free.collator(padded)(_examples())
    for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx"):
        flat.pop(k)
    loss_b, _ = _loss_and_grads(model, flat)
    assert torch.allclose(loss_a, loss_b, atol=1e-6)


def test_short_examples_attend_in_fp32_under_bf16_autocast(monkeypatch):
    """Under CPU bf16 autocast an example up to FP32_UP_TO tokens is attended in fp32 (torch's bf16 CPU kernel
    is the slower one there) and a longer one in bf16 as SDPA does; each is causal on its own slice only."""
    import torch.nn.functional as F

    monkeypatch.setattr(padding_free, "FP32_UP_TO", 20)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, 35, 16, generator=g) for _ in range(3))  # examples of 12 and 23 tokens
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups, module.training = True, 1, False
    cu = torch.tensor([0, 12, 35], dtype=torch.int32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = padding_free.attention(module, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    assert out.dtype == torch.float32 and out.shape == (1, 35, 4, 16)
    short = F.scaled_dot_product_attention(q[:, :, :12], k[:, :, :12], v[:, :, :12], is_causal=True).transpose(1, 2)
    assert torch.allclose(out[:, :12], short, atol=1e-6)  # fp32, exactly as unmixed SDPA
    bf = [t[:, :, 12:].bfloat16() for t in (q, k, v)]
    long = F.scaled_dot_product_attention(*bf, is_causal=True).transpose(1, 2).float()
    assert torch.allclose(out[:, 12:], long, atol=1e-6)  # bf16, as autocast runs SDPA
    assert not torch.allclose(out[:, 12:], F.scaled_dot_product_attention(
        q[:, :, 12:], k[:, :, 12:], v[:, :, 12:], is_causal=True).transpose(1, 2), atol=1e-4)


def test_generation_is_unchanged():
    """Left-padded prompts with their mask, and a KV cache: the installed model generates what SDPA did."""
    model = _model("llama3.2").eval()
    ids = torch.tensor([[0, 0, 0, 5, 17, 33, 2], [4, 9, 81, 12, 7, 66, 3]])
    mask = (ids != 0).long()
    with torch.no_grad():
        before = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        padding_free.install(model, seq_len=64)
        after = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(before, after)


def test_refused_where_only_a_mask_expresses_the_attention():
    gemma3 = transformers.Gemma3TextConfig(vocab_size=VOCAB, **families.FAMILIES["gemma3"]["config"])
    gemma3._attn_implementation = "sdpa"
    assert "sliding window (32 tokens) is shorter than seq_len (64)" in padding_free.unsupported(gemma3, 64)
    assert padding_free.unsupported(gemma3, 32) is None
    eager = transformers.LlamaConfig(vocab_size=VOCAB)
    eager._attn_implementation = "eager"
    assert "not SDPA" in padding_free.unsupported(eager, 64)
    qwen = transformers.Qwen3Config(vocab_size=VOCAB, sliding_window=16, use_sliding_window=False)
    qwen._attn_implementation = "sdpa"
    assert padding_free.unsupported(qwen, 64) is None  # Qwen3 names a window it does not use
    model = _model("llama3.2")
    model.base_model.model.config._attn_implementation = "eager"
    assert padding_free.install(model, 64) and model.config._attn_implementation == "eager"  # left as it was


def test_duet_trainer_trains_padding_free_with_the_same_eval_loss(tmp_path):
    """build_trainer on CPU: the collator is padding-free when train.cpu.padding_free is on, padded when off,
    and evaluation agrees between the two."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.config import TrainConfig
    from training.run.model_load import build_trainer

    path = families.build("qwen3", tmp_path)
    tok = AutoTokenizer.from_pretrained(path)
    rows = [{"messages": [{"role": "user", "content": f"question {i} " + "word " * (i * 7 % 23)},
                          {"role": "assistant", "content": "answer " * (1 + i % 5)}]} for i in range(12)]
    ds = Dataset.from_list(rows)
    losses = {}
    for on in (True, False):
        cfg = TrainConfig(name="pf", micro_batch=4, grad_accum=1, seq_len=64, max_steps=2, warmup_steps=0, packing=False,
                          cpu={"padding_free": on})
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
        tr = build_trainer(model, tok, cfg, phase="sft", device="cpu", dtype="fp32", out=tmp_path / f"o{on}", max_steps=1,
                           evaluate=True, save=False, train_ds=ds, eval_ds=ds)
        assert tr.data_collator.padding_free is on
        assert (model.config._attn_implementation == padding_free.NAME) is on
        losses[on] = tr.evaluate()["eval_loss"]
    assert abs(losses[True] - losses[False]) < 1e-5, json.dumps(losses)


@pytest.mark.parametrize("extra,seq_len,on", [
    ({}, 1024, True),                                                        # full attention
    ({"sliding_window": 512}, 1024, False),                                  # Gemma 3 / Mistral v0.1 style
    ({"sliding_window": 512}, 256, True),                                    # the window never bites
    ({"sliding_window": 512, "use_sliding_window": False}, 1024, True),      # Qwen names a window it does not use
    ({"attn_logit_softcapping": 50.0}, 256, False),                          # Gemma 2
])
def test_the_plan_says_whether_a_run_trains_padding_free(extra, seq_len, on):
    """The planner and the trainer apply one rule; a plan that rules padding-free out says why and turns
    train.cpu.padding_free off, so run.json says what trained."""
    from training.config import load_config
    from training.plan.memory_model import GIB, ModelProfile
    from training.plan.planner import make_plan

    m = ModelProfile.from_config({"model_type": "mistral", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
                                  "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, **extra})
    plan = make_plan(load_config("demo", {"seq_len": seq_len, "packing": False}), m, device="cpu", bf16=False,
                     budget_bytes=8 * GIB)
    said = [d for d in plan.decisions if d.startswith("padding-free batches")]
    assert plan.config.cpu.padding_free is on and len(said) == 1
    assert said[0].startswith("padding-free batches on CPU" if on else "padding-free batches off: its ")
    cfg = transformers.MistralConfig(vocab_size=VOCAB, **{"sliding_window": None, **extra})
    cfg._attn_implementation = "sdpa"
    assert (padding_free.unsupported(cfg, seq_len) is None) is on  # the trainer's check agrees
