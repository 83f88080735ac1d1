"""The merge criterion (training/run/merge_check.py) on logits made to order."""

import pytest

torch = pytest.importorskip("torch")

from training.run.merge_check import compare, judge  # noqa: E402


def logits(seed: int, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 40, 500, generator=g) * scale]


def test_bf16_rounding_passes_where_max_abs_alone_would_fail():
    ref = logits(0)
    got = [x.to(torch.bfloat16).float() + 0.02 * torch.randn_like(x) for x in ref]  # bf16-size noise
    m = compare(ref, got)
    assert m["max_abs"] > 0.05  # the old fixed tolerance would have failed this merge
    ok, why = judge("bf16", m, compare(ref, logits(1)))
    assert ok, why


def test_a_merge_that_lost_the_adapter_fails_even_in_bf16():
    ref, base = logits(0), logits(1, scale=3.0)
    mixed = [0.9 * b + 0.1 * r for r, b in zip(ref, base)]  # mostly the base: the adapter did not land
    ok, why = judge("bf16", compare(ref, mixed), compare(ref, base))
    assert not ok and ("mean KL" in why)


def test_fp32_is_judged_by_max_abs():
    ref = logits(0)
    assert judge("fp32", compare(ref, [x + 1e-5 for x in ref]))[0]
    ok, why = judge("fp32", compare(ref, [x + 1e-2 for x in ref]))
    assert not ok and "max |logit diff|" in why


def test_near_ties_do_not_count_against_the_merge():
    a = torch.zeros(1, 10, 4)
    a[..., 0] = 1.0
    a[..., 1] = 0.999  # every position a near-tie between tokens 0 and 1
    b = a.clone()
    b[..., 1] = 1.001  # rounding flips them all
    m = compare([a], [b])
    assert m["top1_agreement"] == 0.0 and m["decided_positions"] == 0
    assert judge("bf16", m)[0]


def _flipped(n_flips: int, positions: int = 60):
    """Reference logits decided at every position (token 0 leads by 3), and a copy where ``n_flips``
    positions have token 1 on top instead."""
    ref = torch.zeros(1, positions, 50)
    ref[..., 0] = 3.0
    got = ref.clone()
    got[0, :n_flips, 1] = 3.2
    return [ref], [got]


def test_two_flips_on_a_short_probe_pass_in_bf16_and_more_fail():
    # on an AMX CPU a correct bf16 merge of SmolLM2 flipped 2 of 66 decided positions (KL 5e-3)
    ok, why = judge("bf16", compare(*_flipped(2), "bf16"))
    assert ok and "2 decided position(s) flipped" in why, why
    ok, why = judge("bf16", compare(*_flipped(5), "bf16"))  # 0.917 of 60, more than 2: not rounding
    assert not ok, why
    assert not judge("fp32", compare(*_flipped(1), "fp32"))[0]
