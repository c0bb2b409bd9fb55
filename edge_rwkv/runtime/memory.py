"""A device-memory budget (`load(..., max_memory=...)`, `--max-memory`): the prefill chunk is chosen so that
what the runtime holds with the given number of decode slots stays inside it, or loading fails with the
figures (and how many slots would fit).

What is counted (torch's allocator on the model's device; a CUDA context and the interpreter are outside
it — `edge-rwkv plan` adds those for a Jetson):

* the weights as loaded, **measured** (bytes allocated on the device once the model is built);
* per decode slot: its recurrent state, twice (the engine's rows and a snapshot or prompt copy);
* a prefill chunk of T tokens: its activations (sizes.chunk_cost);
* the dequantization scratch of a quantized model's many-row products (quant/linear.py: one slab);
* DECODE_RESERVE for the decode step's buffers and graphs.

The chunk is the largest power of two from the runtime's default down to MIN_CHUNK that fits; a smaller
chunk costs prefill speed, never correctness (the chunked WKV gives the same state for any split).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import EdgeRWKVError
from ..quant.linear import quantized_linears
from .sizes import MIN_CHUNK, chunk_cost

DECODE_RESERVE = 64 << 20


class MemoryBudgetError(EdgeRWKVError):
    """The model, its states and the smallest prefill chunk do not fit the memory budget."""


@dataclass(frozen=True)
class MemoryPlan:
    budget: int
    weights: int  # measured after load
    state_per_slot: int
    slots: int
    chunk: int
    chunk_bytes: int
    scratch: int

    @property
    def planned(self) -> int:
        return self.weights + 2 * self.state_per_slot * self.slots + self.chunk_bytes + self.scratch + DECODE_RESERVE

    def describe(self) -> str:
        return (f"budget {gib(self.budget)}, planned {gib(self.planned)}: weights {gib(self.weights)} (measured), "
                f"{self.slots} slot(s) × {mib(2 * self.state_per_slot)} state, prefill chunk {self.chunk} tokens "
                f"({mib(self.chunk_bytes)}), scratch {mib(self.scratch)}, decode {mib(DECODE_RESERVE)}")


def gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Bytes from `4.5G`, `4500M`, `4.5GiB`, `4831838208` (K/M/G/T are powers of 1024)."""
    if isinstance(text, int):
        if text <= 0:
            raise MemoryBudgetError(f"memory budget must be positive, got {text}")
        return text
    m = _SIZE.match(str(text))
    if m is None:
        raise MemoryBudgetError(f"memory budget {text!r}: expected a size such as 4.5G, 4500M or a byte count")
    n = float(m.group(1)) * 1024 ** " kmgt".index(m.group(2).lower() or " ")
    if n <= 0:
        raise MemoryBudgetError(f"memory budget must be positive, got {text!r}")
    return int(n)


def plan_memory(budget: int, weights: int, width: int, state_per_slot: int, default_chunk: int,
                slots: int = 1, scratch: int = 0) -> MemoryPlan:
    """The largest prefill chunk (a power of two ≤ default_chunk, ≥ MIN_CHUNK) that fits with `slots`
    decode slots; MemoryBudgetError with the figures when none does."""
    if slots < 1:
        raise MemoryBudgetError(f"slots must be ≥ 1, got {slots}")
    fixed = weights + 2 * state_per_slot * slots + scratch + DECODE_RESERVE
    chunk = 1 << (max(default_chunk, MIN_CHUNK).bit_length() - 1)
    while chunk >= MIN_CHUNK:
        if fixed + chunk_cost(chunk, width) <= budget:
            return MemoryPlan(budget, weights, state_per_slot, slots, chunk, chunk_cost(chunk, width), scratch)
        chunk //= 2
    need = fixed + chunk_cost(MIN_CHUNK, width)
    fit = max(0, (budget - weights - scratch - DECODE_RESERVE - chunk_cost(MIN_CHUNK, width))
              // max(1, 2 * state_per_slot))
    hint = f"; {fit} slot(s) would fit" if 0 < fit < slots else ""
    raise MemoryBudgetError(
        f"the model does not fit a {gib(budget)} budget: weights {gib(weights)} (measured), {slots} slot(s) "
        f"{mib(2 * state_per_slot * slots)}, smallest prefill chunk {mib(chunk_cost(MIN_CHUNK, width))}, "
        f"scratch {mib(scratch)}, decode {mib(DECODE_RESERVE)} — {gib(need)} needed{hint}. "
        f"A smaller precision (edge-rwkv quantize --bits 4 --quantize-embedding) or fewer slots may fit.")


def device_weight_bytes(net) -> int:
    """Bytes allocated on the model's CUDA device now (measured: call it right after the model is built)."""
    if net.device.type != "cuda":
        raise MemoryBudgetError("a memory budget applies to a CUDA device (use it with --device cuda)")
    torch.cuda.synchronize(net.device)
    return torch.cuda.memory_allocated(net.device)


def scratch_bytes(net) -> int:
    """The largest dequantization slab a quantized product may allocate during prefill (0 when dense)."""
    lins = quantized_linears(net)
    if not lins:
        return 0
    return max(min(x.scratch_bytes, x.out_features * x.in_features * 2) for x in lins)
