"""What one `edge-rwkv bench` run measures: its options, the precisions and their order, repeats."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

FLOAT_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
QUANT_BITS = {"int8": 8, "int4": 4}
E2E_PROMPT = 120  # end-to-end rows, both runtimes: tokens generated after a prompt of this length


@dataclass
class BenchOptions:
    model: str | None = None
    preset: str = "tiny"
    device: str = "cpu"
    precisions: list[str] = field(default_factory=lambda: ["fp16", "int8", "int4"])  # decode B=1 rows
    batch_precisions: list[str] | None = None  # batched decode rows; None: the base (first float) precision
    memory_precisions: list[str] | None = None  # prefill + peak memory at memory_ctx; None: the base precision
    batch: list[int] = field(default_factory=lambda: [1, 8, 64, 256])
    prefill: list[int] = field(default_factory=lambda: [1024, 8192, 32768])
    memory_ctx: list[int] = field(default_factory=lambda: [8192, 32768, 131072])
    peer: bool = True
    chunk: int | None = None  # None: our default for the model (runtime.runner.prefill_chunk_for), both runtimes
    quality: bool = False
    decode_steps: int = 100
    warmup: int = 20
    peer_warmup: int = 60
    item_limit_s: float = 60.0  # skip a prefill length whose estimated time exceeds this
    seed: int = 0
    log_dir: str | None = None
    e2e_tokens: int = 256  # Model.stream rows: tokens after a 120-token prompt (0: no such rows)


def prefill_reps(n: int) -> int:
    """Timed prefills of n tokens (median of 3 up to 8K; longer ones once)."""
    return 3 if n <= 8192 else 1


def base_precision(precisions: list[str], device_type: str) -> str:
    """The first float precision asked for, else fp16 on CUDA and fp32 elsewhere."""
    return next((p for p in precisions if p in FLOAT_PRECISIONS), "fp16" if device_type == "cuda" else "fp32")


def precision_plan(o: BenchOptions, base: str) -> list[str]:
    """Every precision some row needs, each once: the base first (its model is loaded already)."""
    out = [base]
    for p in [*o.precisions, *o.batch_precisions, *o.memory_precisions]:
        if p not in out:
            out.append(p)
    return out
