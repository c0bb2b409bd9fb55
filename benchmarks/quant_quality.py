"""Quantization quality table: int8, int4 round-to-nearest and int4 calibrated vs the fp16 model.

    python benchmarks/quant_quality.py MODEL [--text heldout.txt | --corpus corpus.pt] [--ctx 512] [--json out.json]

Each variant is made with the real `edge-rwkv quantize` path (quantize_checkpoint → artifact → load),
then compared with the fp16 model on held-out text (edge_rwkv.quality). Calibration text, when used,
is the built-in offline text (Python stdlib docstrings), never the held-out text.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import edge_rwkv
from edge_rwkv.artifact import write_artifact
from edge_rwkv.checkpoint import load_checkpoint
from edge_rwkv.quality import compare
from edge_rwkv.quant.policy import QuantPolicy
from edge_rwkv.corpus import calibration_tokens
from edge_rwkv.quant.transform import quantize_checkpoint

VARIANTS = [  # name, policy
    ("int8 (rtn)", QuantPolicy(bits=8)),
    ("int4 g128 rtn", QuantPolicy(bits=4, group=128)),
    ("int4 g128 awq", QuantPolicy(bits=4, group=128, method="awq")),
    ("int4 g128 gptq", QuantPolicy(bits=4, group=128, method="gptq")),
    ("int4 g64 gptq", QuantPolicy(bits=4, group=64, method="gptq")),
]


def heldout_tokens(args, tok) -> list[int]:
    if args.text:
        return tok.encode(Path(args.text).read_text(encoding="utf-8"))
    saved = torch.load(args.corpus, weights_only=True)
    return saved["heldout"].tolist()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="held-out text file")
    src.add_argument("--corpus", help="pre-tokenized corpus (python -m edge_rwkv.training --dump-corpus)")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument("--json")
    args = p.parse_args(argv)

    ref = edge_rwkv.load(args.model, dtype="float32")
    tokens = heldout_tokens(args, ref.tokenizer)[: args.max_tokens]
    ckpt = load_checkpoint(args.model)
    fp16_bytes = sum(t.numel() for t in ckpt.tensors.values()) * 2
    calib = calibration_tokens(ref.tokenizer, args.calib_tokens)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, policy in VARIANTS:
            t0 = time.time()
            tensors, meta = quantize_checkpoint(ckpt, policy, calib if policy.method != "rtn" else None)
            path = Path(tmp) / "q.safetensors"
            write_artifact(path, tensors, meta)
            cand = edge_rwkv.load(path, dtype="float32")
            r = compare(ref, cand, tokens, args.ctx)
            r.update(variant=name, size_vs_fp16=path.stat().st_size / fp16_bytes, seconds=time.time() - t0)
            rows.append(r)
            print(f"{name}: Δppl {r['delta_ppl_pct']:+.2f}%  top-1 {r['top1_agreement_pct']:.1f}%  "
                  f"KL {r['mean_kl']:.4f}", file=sys.stderr, flush=True)
    print(f"\nquality vs fp16 — {args.model}: {rows[0]['tokens']} held-out tokens, ctx {args.ctx}, "
          f"fp16 ppl {rows[0]['ppl_ref']:.3f}\n")
    print("| variant | ppl | Δppl | top-1 agreement | mean KL | size vs fp16 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['ppl']:.3f} | {r['delta_ppl_pct']:+.2f}% | {r['top1_agreement_pct']:.1f}% | "
              f"{r['mean_kl']:.4f} | {r['size_vs_fp16']:.2f}× |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
