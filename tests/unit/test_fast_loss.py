"""duet's CPU loss head (training/run/fast_loss.py) against TRL's own fused LM head: the same per-token
log-probabilities, metrics and gradients, and only the labelled positions scored."""

import pytest

torch = pytest.importorskip("torch")
from trl.kernels import ChunkedLogProbFunction  # noqa: E402

from training.run import fast_loss  # noqa: E402

OUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _run(fn, h0, w, targets, g, dtype, scale=1.0, temperature=1.0):
    h = h0.clone().to(dtype).requires_grad_(True)
    wt = w.clone().to(dtype).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        lp, ent, sq, mean, top = fn.apply(h, wt, None, targets, temperature, 32768, None, scale, OUTS)
    (lp * g).sum().backward()
    return lp.detach(), ent, sq, mean, top, h.grad.float(), wt.grad.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [300, 70_000])  # one chunk; several chunks (70k vocab: 479-token chunks)
def test_matches_trl_values_and_gradients(dtype, vocab):
    torch.manual_seed(0)
    n = 1000
    h0, w = torch.randn(n, 32), torch.randn(vocab, 32) * 0.3
    targets, g = torch.randint(0, vocab, (n,)), torch.randn(n)
    a = _run(ChunkedLogProbFunction, h0, w, targets, g, dtype, scale=0.7, temperature=0.9)
    b = _run(fast_loss.CpuLogProb, h0, w, targets, g, dtype, scale=0.7, temperature=0.9)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for x, y in zip(a[:4], b[:4]):
        assert torch.allclose(x, y, atol=tol, rtol=tol), (x - y).abs().max()
    assert (a[4] == b[4]).float().mean() > 0.99  # top-1 (ties in bf16 may differ)
    for x, y in zip(a[5:], b[5:]):  # d/dhidden, d/dweight
        assert (x - y).norm() / x.norm() < (1e-5 if dtype == torch.float32 else 2e-2)


def test_installed_head_scores_only_labelled_positions():
    """Through TRL's fused head: the same loss and gradient as TRL's path, with the CPU head seeing
    only the positions whose label is not -100 (TRL's CPU fallback scores them all)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    ids = torch.randint(0, 500, (3, 20))
    labels = ids.clone()
    labels[:, :8] = -100  # a prompt
    labels[2, 12:] = -100  # padding
    seen = []
    real = fast_loss.CpuLogProb.apply

    def spy(*a):
        seen.append(a[0].shape[0])
        return real(*a)

    out = {}
    for on in (False, True):
        fast_loss.set_enabled(on)
        model.zero_grad()
        fast_loss.CpuLogProb.apply = spy
        try:
            r = model(input_ids=ids, labels=labels, fused_lm_head=True)
        finally:
            fast_loss.CpuLogProb.apply = real
        r.loss.backward()
        out[on] = (r.loss.detach(), model.model.layers[0].mlp.up_proj.weight.grad.clone(), r.entropy.detach())
    fast_loss.set_enabled(True)
    assert seen == [int((labels[:, 1:] != -100).sum())]  # once, with the labelled positions only
    assert torch.allclose(out[False][0], out[True][0], atol=1e-5)
    assert torch.allclose(out[False][1], out[True][1], atol=1e-5, rtol=1e-4)
    assert torch.allclose(out[False][2], out[True][2], atol=1e-4)
