"""Device memory of a quantized model over long prompts: allocated after load against the artifact's tensor
bytes, and the peak reserved while reading one sequence of 8K / 32K / 128K tokens, with the runtime's
default prefill chunk and under a `max_memory` budget (runtime/memory.py).

    python3 benchmarks/memory_prefill.py [--preset 7.2b] [--bits 4] [--budget 4.5G] [--contexts 8192,32768,131072]
                                         [--json PATH]

Random official-shape weights, quantized with the head and the embedding (`quantize --bits 4
--quantize-head --quantize-embedding`, round to nearest), written as an artifact and loaded as a deployment
loads it. Prints one table; tok/s is the prompt's reading speed (the chunk a budget picks costs speed).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from edge_rwkv.api import load
from edge_rwkv.artifact import write_artifact
from edge_rwkv.bench import PRESETS, bench_weights
from edge_rwkv.checkpoint import load_checkpoint
from edge_rwkv.quant.policy import QuantPolicy
from edge_rwkv.quantize import quantize_checkpoint
from edge_rwkv.runtime.memory import gib

GiB = 1 << 30


def make_artifact(preset: str, bits: int, folder: Path) -> tuple[Path, int]:
    L, D = PRESETS[preset]
    dev = torch.device("cuda")
    src = folder / "m.pth"
    torch.save(bench_weights(L, D, 0, dev, torch.float16), src)
    policy = QuantPolicy(bits=bits, quantize_head=True, quantize_embedding=True)
    tensors, meta = quantize_checkpoint(load_checkpoint(src), policy, device=dev)
    tensor_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    out = folder / f"q{bits}.safetensors"
    write_artifact(out, tensors, meta)
    src.unlink()
    return out, tensor_bytes


def measure(path: Path, tensor_bytes: int, contexts: list[int], budget: str | None) -> list[dict]:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    m = load(path, device="cuda", max_memory=budget)
    torch.cuda.synchronize()
    after_load = torch.cuda.memory_allocated()
    rows = []
    g = torch.Generator().manual_seed(0)
    for T in contexts:
        tokens = torch.randint(0, m.config.vocab_size, (T,), generator=g).tolist()
        torch.cuda.reset_peak_memory_stats()
        st = m.new_state(1)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            m.runner.prefill(tokens, st)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        rows.append(dict(budget=budget or "none", chunk=m.runner.chunk, context=T, tensor_bytes=tensor_bytes,
                         allocated_after_load=after_load, peak_allocated=torch.cuda.max_memory_allocated(),
                         peak_reserved=torch.cuda.max_memory_reserved(), tok_s=T / dt))
    del m
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="7.2b")
    ap.add_argument("--bits", type=int, choices=(4, 8), default=4)
    ap.add_argument("--budget", default="4.5G")
    ap.add_argument("--contexts", default="8192,32768,131072")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    contexts = [int(c) for c in a.contexts.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        path, tensor_bytes = make_artifact(a.preset, a.bits, Path(tmp))
        rows = measure(path, tensor_bytes, contexts, None)
        try:
            rows += measure(path, tensor_bytes, contexts, a.budget)
        except Exception as e:  # a budget that cannot fit is a result too
            print(f"budget {a.budget}: {type(e).__name__}: {e}")
    print(f"\n## {a.preset} int{a.bits} (head int{a.bits}, embedding int8): artifact tensors {gib(tensor_bytes)}")
    print("| budget | chunk | context | allocated after load | peak allocated | peak reserved | reserved / tensors | tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['budget']} | {r['chunk']} | {r['context']} | {gib(r['allocated_after_load'])} | "
              f"{gib(r['peak_allocated'])} | {gib(r['peak_reserved'])} | {r['peak_reserved'] / r['tensor_bytes']:.3f} | "
              f"{r['tok_s']:,.0f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
