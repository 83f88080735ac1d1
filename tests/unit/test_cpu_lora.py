"""LoRA's update added in fp32 under bf16 autocast (training/run/cpu_lora.py): what peft's bf16 forward
rounds away survives, the gradients are the fp32 ones, and merged/disabled adapters keep peft's path."""

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from training.run import cpu_lora  # noqa: E402


def _model(seed=0, b_scale=1e-3):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4)).to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))
    for m in model.modules():  # a small, non-zero update: an adapter a few steps into training
        if isinstance(m, peft.tuners.lora.layer.Linear):
            torch.nn.init.normal_(m.lora_B["default"].weight, std=b_scale)
    return model


def _layer(model):
    return next(m for m in model.modules() if type(m) is peft.tuners.lora.layer.Linear)


def _exact_delta(layer, x):
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    return (x.double() @ a.t() @ b.t()) * layer.scaling["default"]


def test_installs_on_every_vanilla_lora_linear_once():
    model = _model()
    n = sum(type(m) is peft.tuners.lora.layer.Linear for m in model.modules())
    assert n == 2 * 7  # q k v o gate up down, two layers
    assert cpu_lora.install(model) == n
    assert cpu_lora.install(model) == n  # idempotent: no double wrapping
    layer = _layer(model)
    assert layer.forward.__func__ is cpu_lora._forward
    cpu_lora.uninstall(model)
    assert not hasattr(layer, "_duet_peft_forward") and "forward" not in vars(layer)


def test_update_survives_where_bf16_rounds_it_away():
    model = _model(b_scale=1e-4)
    layer = _layer(model)
    torch.manual_seed(1)
    x = torch.randn(16, 64).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        base = layer.base_layer(x).double()
        peft_out = layer(x).double()
        cpu_lora.install(model)
        ours = layer(x)
    assert ours.dtype == torch.float32
    want = _exact_delta(layer, x)
    got_ours, got_peft = ours.double() - base, peft_out - base
    err_ours = (got_ours - want).norm() / want.norm()
    err_peft = (got_peft - want).norm() / want.norm()
    assert err_ours < 1e-3, err_ours
    assert err_peft > 50 * err_ours, (err_peft, err_ours)  # peft's bf16 sum loses a large part of the update


def test_gradients_are_the_fp32_ones():
    model = _model()
    layer = _layer(model)
    cpu_lora.install(model)
    torch.manual_seed(2)
    x = torch.randn(16, 64).to(torch.bfloat16)
    g = torch.randn(16, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    (out.float() * g).sum().backward()  # outside autocast, as Trainer runs it
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = layer.scaling["default"]
    xd, gd = x.double(), g.double()
    want_b = s * gd.t() @ (xd @ a.double().t())
    want_a = s * (gd @ b.double()).t() @ xd
    assert (b.grad.double() - want_b).norm() / want_b.norm() < 1e-4
    assert (a.grad.double() - want_a).norm() / want_a.norm() < 1e-4


def test_disabled_and_merged_adapters_keep_peft_forward():
    model = _model(b_scale=0.05)
    cpu_lora.install(model)
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        on = model(input_ids=ids).logits.float()
        with model.disable_adapter():
            off = model(input_ids=ids).logits.float()
    assert not torch.allclose(on, off)
    merged = model.merge_and_unload()
    with torch.no_grad():
        m = merged(input_ids=ids).logits.float()
    # the merge folds the update into bf16 weights: close to the unmerged output, far from the base's
    assert (m - on).abs().max() < 0.25 * (on - off).abs().max()


def test_dropout_drops_p_scales_the_rest_and_its_gradient_uses_the_same_mask():
    x = torch.randn(300, 500, requires_grad=True)
    torch.manual_seed(3)
    y = cpu_lora._Dropout.apply(x, 0.1)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - 0.1) < 0.005  # 150,000 draws: 5 standard deviations is 0.004
    scale = 65536 / (65536 - round(0.1 * 65536))
    assert torch.allclose(y[kept], x[kept] * scale)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad != 0, kept) and torch.allclose(x.grad[kept], torch.full_like(x.grad[kept], scale))
    torch.manual_seed(3)  # the default generator drives it: a resumed run (Trainer restores its state) redraws the same masks
    assert torch.equal(cpu_lora._Dropout.apply(x, 0.1), y)
    # columns and rows see the same rate (the mask's 16-bit words come from all three uniform words of each draw)
    rates = 1 - (y != 0).float().mean(0)
    assert rates.max() < 0.2 and rates.min() > 0.03


def test_dropout_only_in_training_mode():
    drop = torch.nn.Dropout(0.5)
    x = torch.randn(64, 64)
    drop.eval()
    assert torch.equal(cpu_lora._dropout(drop, x), x)
    drop.train()
    y = cpu_lora._dropout(drop, x)
    assert 0.4 < (y == 0).float().mean().item() < 0.6
    assert torch.equal(cpu_lora._dropout(torch.nn.Identity(), x), x)  # peft's lora_dropout when p is 0
    torch.manual_seed(5)
    slow = cpu_lora._dropout(drop, x, fast=False)  # train.cpu.fast_dropout false: torch's own draw
    torch.manual_seed(5)
    assert torch.equal(slow, drop(x))


def _dropout_model(seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.2, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))
    for m in model.modules():
        if isinstance(m, peft.tuners.lora.layer.Linear):
            torch.nn.init.normal_(m.lora_B["default"].weight, std=0.05)
    cpu_lora.install(model)
    return model.train()


def test_adapters_reading_one_input_share_its_dropped_copy():
    """q, k and v (and gate and up) read the same hidden states: one mask, as one adapter on a fused
    projection; o and down read their own inputs and draw their own."""
    model = _dropout_model()
    seen = {}
    layer = model.base_model.model.model.layers[0]
    mods = {"q": layer.self_attn.q_proj, "k": layer.self_attn.k_proj, "v": layer.self_attn.v_proj,
            "o": layer.self_attn.o_proj, "gate": layer.mlp.gate_proj, "up": layer.mlp.up_proj, "down": layer.mlp.down_proj}
    hooks = [m.lora_A["default"].register_forward_hook(lambda mod, inp, out, n=n: seen.__setitem__(n, inp[0]))
             for n, m in mods.items()]
    ids = torch.randint(1, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    for h in hooks:
        h.remove()
    assert seen["q"] is seen["k"] is seen["v"] and seen["gate"] is seen["up"]
    assert not torch.equal(seen["q"] == 0, seen["gate"] == 0)
    rate = torch.cat([(seen[n] == 0).flatten() for n in ("q", "o", "gate", "down")]).float().mean().item()
    assert 0.15 < rate < 0.25


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_layers_redraw_the_same_shared_masks(reentrant):
    """With gradient checkpointing each layer's forward runs again for the backward: it must drop what the
    first forward dropped (the loss and every gradient equal to a run without checkpointing)."""
    ids = torch.randint(1, 300, (2, 24), generator=torch.Generator().manual_seed(1))

    def run(ckpt):
        model = _dropout_model()
        if ckpt:
            model.gradient_checkpointing_enable({"use_reentrant": reentrant})
            model.enable_input_require_grads()
        torch.manual_seed(7)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    loss_a, grads_a = run(False)
    loss_b, grads_b = run(True)
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    for name, g in grads_a.items():
        assert torch.allclose(g, grads_b[name], atol=1e-6, rtol=1e-4), name
