"""The sizes the runtime picks for reading a prompt, as plain numbers: the prefill chunk and what one chunk's
activations take. The runner (runner.py), the memory budget (memory.py) and the device planner
(devices.py, which imports no torch) share them, so `edge-rwkv plan` counts what the runtime will hold.
"""
from __future__ import annotations

CPU_CHUNK = 256  # tokens per forward while reading a prompt on the CPU: bounds activation memory
GPU_CHUNK_ELEMENTS = 1 << 22  # on a GPU, tokens × width per forward (16 MB per fp32 activation)
GPU_CHUNK_MAX = 4096
# One prefill chunk's activations per token·channel (the LoRA, FFN and WKV intermediates), counted twice:
# a captured chunk keeps them in its graph's pool, an eager tail piece in the ordinary one. Measured on an
# H200 (benchmarks/NOTES.md, memory table): 7.2B int4, chunk 256 vs 128 → ~480 B per token·channel.
ACTIVATION_BYTES = 230
MIN_CHUNK = 16


def gpu_prefill_chunk(width: int, quantized: bool) -> int:
    """Tokens per prefill forward on a GPU: as many as keep one activation ≤ 16 MB (a power of two, ≤ 4096:
    4096 at width 768, 1024 at 4096), so per-launch costs are paid per thousands of tokens while memory
    stays O(chunk). A quantized model was chosen to fit a small device: a quarter of that (256 tokens at
    width 4096), since the chunk's activations would otherwise weigh ~25 % of an int4 7.2B model's weights."""
    n = GPU_CHUNK_ELEMENTS // width
    if quantized:
        n //= 4
    return max(CPU_CHUNK, min(GPU_CHUNK_MAX, 1 << (n.bit_length() - 1)))


def chunk_cost(chunk: int, width: int) -> int:
    """Device bytes a prefill chunk of `chunk` tokens holds at model width `width`."""
    return 2 * chunk * width * ACTIVATION_BYTES
