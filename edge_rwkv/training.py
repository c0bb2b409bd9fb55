"""Train a small RWKV-7 from scratch: how the embedded default model is made (reproducible).

Corpus (edge_rwkv/corpus.py): docstrings extracted with `ast`, files in sorted order, from the Python
standard library of the interpreter running this script (PSF License 2.0) and from the installed numpy
and torch packages (both BSD-3-Clause; both are dependencies, so present wherever this runs). The last
5 % of the stdlib files form the held-out set; the tail of the training tokens validates (picks the step kept). Source
versions and the corpus digest go into the artifact metadata.

    python -m edge_rwkv.training -o default-fp16.safetensors --device cuda --minutes 4
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .artifact import make_metadata, write_artifact
from .checkpoint import derive_config
from .corpus import calibration_tokens, tokenized_corpus
from .model import build_model
from .state import State
from .synthetic import random_checkpoint
from .tokenizer import default_tokenizer


def trainable(sd: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device).float().requires_grad_(True) for k, v in sd.items()}


def sequence_loss(params, cfg, tokens: torch.Tensor, wkv) -> torch.Tensor:
    """Mean next-token cross-entropy of tokens [B, T+1] from a fresh state."""
    net = build_model(cfg, params, torch.float32, tokens.device, wkv=wkv)
    B = tokens.shape[0]
    state = State.zeros(cfg.n_layer, B, cfg.n_embd, cfg.n_head, cfg.head_size, tokens.device)
    logits, _ = net.forward(tokens[:, :-1], state)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


@torch.no_grad()
def heldout_perplexity(params, cfg, ids: torch.Tensor, ctx: int, wkv, batch: int = 16) -> float:
    n = (len(ids) - 1) // ctx
    windows = torch.stack([ids[i * ctx:(i + 1) * ctx + 1] for i in range(n)])
    total, count = 0.0, 0
    for i in range(0, n, batch):
        chunk = windows[i:i + batch]
        total += float(sequence_loss(params, cfg, chunk, wkv)) * chunk.numel()
        count += chunk.numel()
    return math.exp(total / count)


def pick_training_wkv(device: torch.device):
    if device.type == "cuda":
        from .cuda_kernels import wkv7

        return wkv7, "numba-cuda autograd kernel"
    from .wkv import wkv7_torch

    return wkv7_torch, "torch chunked (CPU)"


def _keep_best(best, params, cfg, val_ids, ctx, wkv, step):
    """(ppl, step, fp16 params) of whichever is better on the validation tokens: `best` or now."""
    ppl = heldout_perplexity(params, cfg, val_ids, ctx, wkv)
    print(f"step {step:5d}  validation ppl {ppl:.2f}", flush=True)
    if ppl < best[0]:
        return ppl, step, {k: v.detach().to(torch.float16).cpu() for k, v in params.items()}
    return best


def train(args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.corpus_file:
        # pre-tokenized corpus (see --dump-corpus): train on a machine other than the one that built it
        saved = torch.load(args.corpus_file, weights_only=True)
        train_ids, held_ids, corpus = saved["train"].long(), saved["heldout"].long(), json.loads(saved["info"])
    else:
        train_ids, held_ids, corpus = tokenized_corpus()
    print(f"corpus: {corpus['files']} files, {len(train_ids):,} train / {len(held_ids):,} held-out tokens", flush=True)

    # the tail of the training tokens validates (picks the step to keep); the held-out files stay unseen
    if len(train_ids) <= args.val_tokens + args.ctx + 1:
        raise SystemExit(f"--val-tokens {args.val_tokens} leaves too few of the {len(train_ids):,} training "
                         f"tokens for ctx {args.ctx}")
    val_ids, train_ids = train_ids[-args.val_tokens:], train_ids[:-args.val_tokens]
    sd = random_checkpoint(args.layers, args.embd, args.head_size, 65536, seed=args.seed)
    sd["emb.weight"] *= 0.1
    sd["head.weight"] *= 0.1
    cfg = derive_config(sd)
    params = trainable(sd, device)
    wkv, backend = pick_training_wkv(device)
    opt = torch.optim.AdamW(params.values(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)
    start, step, losses = time.time(), 0, []
    best = (math.inf, 0, None)  # validation ppl, step, fp16 params
    budget = args.minutes * 60
    while time.time() - start < budget and step < args.max_steps:
        frac = min(1.0, (time.time() - start) / budget)
        for group in opt.param_groups:
            group["lr"] = args.lr * (min(1.0, (step + 1) / 50)) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        starts = torch.randint(0, len(train_ids) - args.ctx - 1, (args.batch,), generator=g)
        batch = torch.stack([train_ids[s:s + args.ctx + 1] for s in starts]).to(device)
        loss = sequence_loss(params, cfg, batch, wkv)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 50 == 0:
            print(f"step {step:5d}  loss {sum(losses[-50:]) / 50:.3f}  {time.time() - start:.0f}s", flush=True)
        if step % args.val_every == 0:
            best = _keep_best(best, params, cfg, val_ids.to(device), args.ctx, wkv, step)
    best = _keep_best(best, params, cfg, val_ids.to(device), args.ctx, wkv, step)
    val_ppl, best_step, final = best
    params = trainable(final, device)
    ppl = heldout_perplexity(params, cfg, held_ids[: args.eval_tokens].to(device), args.ctx, wkv)
    result = {"steps": step, "kept_step": best_step, "validation_ppl": val_ppl, "validation_tokens": len(val_ids), "tokens_seen": step * args.batch * args.ctx, "final_train_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
              "heldout_ppl": ppl, "heldout_tokens": min(len(held_ids), args.eval_tokens), "ctx": args.ctx,
              "wkv": backend, "corpus": corpus, "seconds": time.time() - start, "seed": args.seed}
    print(json.dumps(result, indent=1), flush=True)
    meta = make_metadata(cfg, "float16")
    meta["training"] = result
    write_artifact(args.output, final, meta)
    return result


DEFAULT_NAME = "edge-rwkv default (RWKV-7 x070, L{n_layer} D{n_embd}, World tokenizer)"


def package_default(fp16_path: str, output: str, held_ids: torch.Tensor, device: str, how: str) -> dict:
    """Quantize a trained fp16 artifact the way the embedded default model ships, and record its quality.

    int4 g128 GPTQ for the layers and the head, int8 embedding, layer-0 attention output kept fp16;
    held-out perplexity of both at ctx 512, top-1 agreement and KL vs fp16.
    """
    from .api import load
    from .checkpoint import load_checkpoint
    from .fileio import sha256_file
    from .quality import compare
    from .quant.policy import QuantPolicy
    from .quant.transform import quantize_checkpoint

    ckpt = load_checkpoint(fp16_path)
    policy = QuantPolicy(bits=4, group=128, quantize_head=True, quantize_embedding=True,
                         keep_layer0_output=True, method="gptq")
    calib = calibration_tokens(default_tokenizer(), 8192)
    tensors, meta = quantize_checkpoint(ckpt, policy, calib, source_sha256=sha256_file(fp16_path))
    held = held_ids.tolist()
    tmp = Path(output).with_suffix(".unrated.safetensors")
    write_artifact(tmp, tensors, meta)
    q = compare(load(fp16_path, device=device, dtype="float32"), load(tmp, device=device, dtype="float32"), held, ctx=512)
    tmp.unlink()
    cfg = ckpt.config
    meta["training"] = ckpt.metadata.get("training")
    meta["default_model"] = {
        "name": DEFAULT_NAME.format(n_layer=cfg.n_layer, n_embd=cfg.n_embd), "how": how,
        "trained_on": f"{meta['training']['corpus']['source']}, {meta['training']['tokens_seen']:,} tokens seen",
        "quantization": "int4 g128 GPTQ (layers and head), int8 embedding, layer-0 attention output fp16",
        "heldout_ppl": round(q["ppl"], 3), "heldout_ppl_fp16": round(q["ppl_ref"], 3), "heldout_ctx": 512,
        "heldout_tokens": q["tokens"], "top1_agreement_vs_fp16_pct": round(q["top1_agreement_pct"], 2),
        "mean_kl_vs_fp16": round(q["mean_kl"], 4)}
    write_artifact(output, tensors, meta)
    print(json.dumps(meta["default_model"], indent=1), flush=True)
    return meta["default_model"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output", required=True, help="artifact to write (or the corpus file with --dump-corpus)")
    p.add_argument("--dump-corpus", action="store_true", help="only tokenize the corpus and save it to OUTPUT")
    p.add_argument("--corpus-file", help="pre-tokenized corpus written by --dump-corpus")
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--embd", type=int, default=128)
    p.add_argument("--head-size", type=int, default=32)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--minutes", type=float, default=4.0)
    p.add_argument("--max-steps", type=int, default=100000)
    p.add_argument("--eval-tokens", type=int, default=200000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--package", help="also write the shipped form (int4 GPTQ + quality metadata) here")
    p.add_argument("--val-tokens", type=int, default=16000, help="tail of the training tokens used to pick the step kept")
    p.add_argument("--val-every", type=int, default=250, help="steps between validation passes")
    args = p.parse_args(argv)
    for flag, value in (("--val-tokens", args.val_tokens), ("--val-every", args.val_every),
                        ("--minutes", args.minutes), ("--ctx", args.ctx), ("--batch", args.batch)):
        if value <= 0:
            p.error(f"{flag} must be positive, got {value}")
    if args.package and Path(args.package).resolve() == Path(args.output).resolve():
        p.error("--package must name a file other than --output")
    if args.dump_corpus:
        train_ids, held_ids, info = tokenized_corpus()
        torch.save({"train": train_ids.to(torch.int32), "heldout": held_ids.to(torch.int32), "info": json.dumps(info)}, args.output)
        print(f"saved {len(train_ids):,} + {len(held_ids):,} tokens to {args.output}")
        return
    train(args)
    if args.package:
        saved = torch.load(args.corpus_file, weights_only=True) if args.corpus_file else None
        held = saved["heldout"].long() if saved is not None else tokenized_corpus()[1]
        how = "python -m edge_rwkv.training " + " ".join(argv if argv is not None else sys.argv[1:])
        package_default(args.output, args.package, held, args.device, how)


if __name__ == "__main__":
    main()
