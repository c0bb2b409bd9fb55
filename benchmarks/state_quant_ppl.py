"""Effect of int8 state storage on next-token perplexity: the state round-trips through int8 every K tokens.

    python3 benchmarks/state_quant_ppl.py [MODEL] [--text FILE] [--every 16,64,256] [--tokens 2048]
                                          [--granularity head_row,row] [--device cpu] [--json OUT.json]

Without MODEL: a tiny random model (L2 D128; what CI can afford: the figure only shows the
mechanism). The real figure needs the trained default model. Without --text, the source of a
stdlib module is the text. Baseline: the same K-token blocks with the state kept in fp32.
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--text", default=None)
    ap.add_argument("--every", default="16,64,256")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--granularity", default="head_row,row")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    import edge_rwkv
    from edge_rwkv.state_quant import perplexity_with_roundtrip
    from edge_rwkv.tokenizer import default_tokenizer

    if a.model:
        m = edge_rwkv.load(a.model, device=a.device)
        net, name = m.net, a.model
    else:
        from edge_rwkv.checkpoint import derive_config
        from edge_rwkv.model import build_model
        from edge_rwkv.synthetic import random_checkpoint

        sd = random_checkpoint(2, 128, 64, vocab_size=65536, seed=0)
        net, name = build_model(derive_config(sd), sd, torch.float32, a.device), "tiny random (L2 D128)"
    if a.text:
        text = open(a.text, encoding="utf-8").read()
    else:
        import json as mod

        text = inspect.getsource(mod.decoder) + inspect.getsource(mod.encoder)
    tokens = default_tokenizer().encode(text)[:a.tokens + 1]
    rows = []
    print(f"# {name}, {len(tokens) - 1} predictions, text {'--text ' + a.text if a.text else 'stdlib json source'}")
    print("| every K tokens | granularity | ppl fp32 state | ppl int8 state | Δ ppl | Δ nll (nats/token) | max |Δ logprob| |")
    print("|---|---|---|---|---|---|---|")
    for k in [int(x) for x in a.every.split(",")]:
        base = perplexity_with_roundtrip(net, tokens, every=k, quantize=False)
        for g in a.granularity.split(","):
            q = perplexity_with_roundtrip(net, tokens, every=k, quantize=True, granularity=g)
            d = float((q["logprobs"] - base["logprobs"]).abs().max())
            rows.append({"every": k, "granularity": g, "ppl_fp32": base["ppl"], "ppl_int8": q["ppl"],
                         "dnll": q["nll"] - base["nll"], "max_abs_dlogprob": d, "n": q["n"]})
            print(f"| {k} | {g} | {base['ppl']:.2f} | {q['ppl']:.2f} | {100 * (q['ppl'] / base['ppl'] - 1):+.3f}% | "
                  f"{q['nll'] - base['nll']:+.2e} | {d:.2e} |", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": name, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
