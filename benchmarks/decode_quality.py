"""What int8 activations cost in the decode path: perplexity of a quantized model read one token at a
time through the CUDA-graph step, with the int8-activation GEMVs (W4A8 / W8A8, the default) and with
fp32 activations, on held-out text.

    python3 benchmarks/decode_quality.py [MODEL] [--tokens 4096] [--json OUT.json]

Without MODEL: the embedded default model (int4 g128 GPTQ layers + head). Text: the held-out
standard-library docstrings the default model never saw in training (edge_rwkv.corpus.build_corpus).
Needs a CUDA GPU (the GEMV kernels). Prints one table.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import torch


def decode_logprobs(model, tokens: list[int]) -> torch.Tensor:
    """log-softmax [T-1, V] of each next token, fed one token at a time through the graph step."""
    tok = torch.zeros(1, 1, dtype=torch.long, device=model.device)
    live = torch.ones(1, dtype=torch.int32, device=model.device)
    g = model.runner.decode_graph(1, model.new_state(1), tok, live)
    out = []
    ids = torch.tensor(tokens, device=model.device)
    with torch.inference_mode():
        for i in range(len(tokens) - 1):
            tok.fill_(ids[i])
            out.append(torch.log_softmax(g.step().float(), -1).cpu())
    return torch.cat(out), g.how


def set_int8_activations(net, on: bool) -> int:
    from edge_rwkv.quant.linear import quantized_linears

    mods = quantized_linears(net)
    for m in mods:
        m.int8_activations = on
    return len(mods)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2

    import edge_rwkv
    from edge_rwkv.default_model import default_model_path
    from edge_rwkv.tokenizer import default_tokenizer
    from edge_rwkv.corpus import build_corpus

    path = a.model or str(default_model_path())
    m = edge_rwkv.load(path, device="cuda")
    _, held, _ = build_corpus(extra=())
    tokens = default_tokenizer().encode(held)[:a.tokens + 1]
    tgt = torch.tensor(tokens[1:])
    n = set_int8_activations(m.net, False)
    ref, how = decode_logprobs(m, tokens)
    set_int8_activations(m.net, True)
    got, how8 = decode_logprobs(m, tokens)
    nll = lambda lp: -float(lp.gather(1, tgt[:, None]).mean())  # noqa: E731
    res = {"model": path, "tokens": len(tgt), "quantized_linears": n, "how": how8,
           "ppl_fp32_x": math.exp(nll(ref)), "ppl_int8_x": math.exp(nll(got)),
           "mean_kl": float((ref.exp() * (ref - got)).sum(-1).mean()),
           "top1_agreement_pct": 100 * float((ref.argmax(-1) == got.argmax(-1)).float().mean())}
    res["delta_ppl_pct"] = 100 * (res["ppl_int8_x"] / res["ppl_fp32_x"] - 1)
    print(f"# {path}: {res['tokens']} next-token predictions, decode step: {how8} ({n} quantized linears)")
    print("| activations | perplexity | Δ ppl | mean KL vs fp32 x | top-1 agreement |")
    print("|---|---|---|---|---|")
    print(f"| fp32 | {res['ppl_fp32_x']:.3f} | | | |")
    print(f"| int8 (blocks of 32) | {res['ppl_int8_x']:.3f} | {res['delta_ppl_pct']:+.3f} % | "
          f"{res['mean_kl']:.2e} | {res['top1_agreement_pct']:.2f} % |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
