"""How much a quantized model departs from its full-precision original, on held-out text.

Metrics over windows of `ctx` tokens, each read from a fresh state: perplexity of both models,
top-1 agreement of their next-token predictions, and mean KL(reference ‖ candidate) per token.
"""
from __future__ import annotations

import math

import torch


@torch.inference_mode()
def window_logits(model, tokens: list[int], ctx: int):
    """Yield (logits [T,V] fp32, targets [T]) for consecutive windows of ctx+1 tokens."""
    for s in range(0, len(tokens) - ctx, ctx):
        ids = tokens[s:s + ctx + 1]
        logits, _ = model.forward(ids[:-1])
        yield logits.float().cpu(), torch.tensor(ids[1:])


@torch.inference_mode()
def compare(reference, candidate, tokens: list[int], ctx: int = 512) -> dict:
    nll_ref = nll_cand = kl = 0.0
    agree = count = 0
    for (lr, tgt), (lc, _) in zip(window_logits(reference, tokens, ctx), window_logits(candidate, tokens, ctx)):
        pr, pc = torch.log_softmax(lr, -1), torch.log_softmax(lc, -1)
        nll_ref -= float(pr.gather(1, tgt[:, None]).sum())
        nll_cand -= float(pc.gather(1, tgt[:, None]).sum())
        kl += float((pr.exp() * (pr - pc)).sum())
        agree += int((lr.argmax(-1) == lc.argmax(-1)).sum())
        count += len(tgt)
    if not count:
        raise ValueError(f"need more than {ctx} tokens of text")
    ppl_ref, ppl_cand = math.exp(nll_ref / count), math.exp(nll_cand / count)
    return {"tokens": count, "ctx": ctx, "ppl_ref": ppl_ref, "ppl": ppl_cand,
            "delta_ppl_pct": 100 * (ppl_cand / ppl_ref - 1), "top1_agreement_pct": 100 * agree / count,
            "mean_kl": kl / count}
