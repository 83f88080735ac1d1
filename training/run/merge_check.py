"""Is a merged model the model that was trained? A check that is right in every dtype.

The reference is the adapter on its base (the model as trained), the candidate the merged weights;
both forwards run in the plan's dtype and their logits are compared in fp32:

- fp32: max |logit difference| <= 1e-3 (the merge is exact up to summation order);
- bf16 / fp16: a merge rounds W + BA to 8 (fp16: 11) mantissa bits, so max-abs differences near 1
  are normal on a 30k-vocabulary model. The criterion is on the distributions: mean KL(reference ||
  merged) per position below a per-dtype bound, top-1 agreement where the reference is decided (its
  top token leads the next by 5 points of probability, 10 in bf16: near-ties flip under any rounding), and - when the adapter changes the
  base measurably - the merged model closer to the reference than the base is (a merge that lost
  the adapter, or applied it twice, fails this even when its KL is small in absolute terms).

For QLoRA the adapter was trained on the nf4 base, not on the 16-bit weights it is merged into;
``drift`` measures the merged model against the nf4 model + adapter and is reported (run.json,
report.md), not judged: it is what the user gets from the 16-bit merge.
"""

from __future__ import annotations
from infra.lazy import lazy

torch = lazy("torch", extra="executor")

KL_BOUND = {"fp32": 1e-5, "bf16": 2e-2, "fp16": 5e-3}   # mean KL(reference || merged), nats per position
TOP1_MIN = {"fp32": 0.999, "bf16": 0.98, "fp16": 0.99}  # same argmax, over positions the reference decides
DECIDED_MARGIN = {"fp32": 0.05, "fp16": 0.05, "bf16": 0.10}  # a position is decided when its top-1 probability
# leads the second by this much. bf16 keeps 8 mantissa bits: a bf16 merge of SmolLM2 after duet's bf16 CPU
# training moved logits by up to 1.2 and flipped 2 of 80 positions whose lead was 5-10 points.
TOP1_FLIPS_ALLOWED = {"fp32": 0, "bf16": 2, "fp16": 1}  # decided positions that may flip whatever the share: a
# probe has a few dozen decided positions, and on an AMX CPU a correct bf16 merge of SmolLM2 flipped 2 of 66
# (top-1 0.970, mean KL 5e-3 against an adapter effect of 0.72): a share alone fails it on a short probe.
MAX_ABS_FP32 = 1e-3
CLOSER_THAN_BASE = 0.5  # merged-vs-reference KL at most this fraction of base-vs-reference KL


def compare(ref: list, got: list, dtype: str = "fp32") -> dict:
    """Distances between two lists of logits tensors [1, seq, vocab] (computed in fp32)."""
    kls, agree, n, max_abs = [], 0, 0, 0.0
    decided = agree_decided = 0
    for a, b in zip(ref, got):
        a, b = a.float().reshape(-1, a.shape[-1]), b.float().reshape(-1, b.shape[-1])
        la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
        kl = (la.exp() * (la - lb)).sum(-1).clamp_min(0)
        kls.append(kl)
        same = a.argmax(-1) == b.argmax(-1)
        agree += int(same.sum())
        top2 = la.exp().topk(min(2, a.shape[-1]), -1).values
        clear = (top2[:, 0] - top2[:, -1]) >= DECIDED_MARGIN[dtype]  # near-ties may flip under any rounding
        decided += int(clear.sum())
        agree_decided += int((same & clear).sum())
        n += a.shape[0]
        max_abs = max(max_abs, float((a - b).abs().max()))
    if not n:
        return {"positions": 0, "kl_mean": 0.0, "kl_max": 0.0, "top1_agreement": 1.0, "top1_agreement_decided": 1.0,
                "decided_positions": 0, "flips_decided": 0, "max_abs": 0.0}
    kl = torch.cat(kls)
    return {"positions": n, "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1_agreement": agree / n, "decided_positions": decided,
            "top1_agreement_decided": agree_decided / decided if decided else 1.0,
            "flips_decided": decided - agree_decided, "max_abs": max_abs}


def judge(dtype: str, merged_vs_ref: dict, base_vs_ref: dict | None = None) -> tuple[bool, str]:
    """(ok, why) for a merge in ``dtype`` ("fp32", "bf16", "fp16")."""
    m = merged_vs_ref
    if not m["positions"]:
        return True, "no probe tokens (empty test split)"
    if dtype == "fp32":
        ok = m["max_abs"] <= MAX_ABS_FP32
        return ok, f"fp32: max |logit diff| {m['max_abs']:.2e} {'<=' if ok else '>'} {MAX_ABS_FP32}"
    bound, top1 = KL_BOUND[dtype], TOP1_MIN[dtype]
    why = [f"{dtype}: mean KL {m['kl_mean']:.2e} (bound {bound:.0e}), top-1 agreement "
           f"{m['top1_agreement_decided']:.3f} on {m['decided_positions']} decided positions (min {top1}; "
           f"{m['top1_agreement']:.3f} on all {m['positions']}), max |logit diff| {m['max_abs']:.2f} "
           f"(not judged in {dtype})"]
    flips = m.get("flips_decided", round(m["decided_positions"] * (1 - m["top1_agreement_decided"])))
    ok = m["kl_mean"] <= bound and (m["top1_agreement_decided"] >= top1 or flips <= TOP1_FLIPS_ALLOWED[dtype])
    why[0] += f", {flips} decided position(s) flipped (allowed: {TOP1_FLIPS_ALLOWED[dtype]} or the share)"
    if base_vs_ref is not None:
        effect = base_vs_ref["kl_mean"]
        why.append(f"adapter effect (base vs adapter+base) mean KL {effect:.2e}")
        if effect > bound and m["kl_mean"] > CLOSER_THAN_BASE * effect:
            ok = False
            why.append(f"the merged model is not closer to the trained model than the base is "
                       f"({m['kl_mean']:.2e} > {CLOSER_THAN_BASE} x {effect:.2e}): the adapter was not merged as trained")
    return ok, "; ".join(why)
