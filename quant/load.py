"""The load-time module swap (the second of quantization's two steps; the first is quant/transform.py).

An artifact's quantized matrices stay quantized behind QuantLinear (GEMV kernels on CUDA,
dequantize+matmul on CPU); its other matrices become plain DenseLinears in the model dtype.
"""
from __future__ import annotations

import math

import torch

from edge_rwkv.artifact import load_quantized
from edge_rwkv.checkpoint import Checkpoint
from edge_rwkv.errors import CheckpointError

from .linear import dense_or_quant_linear

CPU_DEQUANT_CACHE_BYTES = 1 << 30  # on a CPU, keep dequantized fp32 matrices when they all fit in this


def quantized_build_inputs(ckpt: Checkpoint, specs: dict, dtype: torch.dtype, device: torch.device):
    """(tensors with lookup tables dequantized, make_linear) for build_model from a quantized artifact.

    The embedding is a lookup table, so an int8 embedding is dequantized once here (fp32, on the CPU)
    for build_model to fold ln0 into (fp32, on the tensors' device); on CUDA the folded table is stored
    int8 again (keeps_int8_embedding).
    On a CPU, a model whose matrices dequantize to at most CPU_DEQUANT_CACHE_BYTES keeps them
    dequantized (decoding re-unpacked every int4 matrix per token: the default model ran 12 tok/s
    instead of hundreds); bigger models dequantize per call and keep the small footprint.
    """
    tensors = dict(ckpt.tensors)
    if "emb.weight" in specs:
        tensors["emb.weight"] = load_quantized("emb.weight", specs["emb.weight"], ckpt.tensors,
                                               ckpt.path).dequantize(torch.float32)

    fp32_bytes = sum(4 * math.prod(spec["shape"]) for n, spec in specs.items() if n != "emb.weight")
    cache = device.type == "cpu" and fp32_bytes <= CPU_DEQUANT_CACHE_BYTES

    def make_linear(name: str):
        try:
            return dense_or_quant_linear(tensors, name, specs.get(name), dtype=dtype, device=device,
                                         cache_dequantized=cache)
        except CheckpointError as e:
            raise CheckpointError(f"{ckpt.path}: {e}") from None

    return tensors, make_linear


def keeps_int8_embedding(specs: dict, device: torch.device) -> bool:
    """Whether the embedding stays int8 in memory: the artifact stores it as int8 and the model runs on
    CUDA (memory-bound deployments). A CPU keeps the dense fp32 table it always had."""
    spec = specs.get("emb.weight")
    return device.type == "cuda" and isinstance(spec, dict) and spec.get("format") == "int8"
