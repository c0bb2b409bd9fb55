"""The torch runtime on exactly the weights an export reads: quantized ones dequantized from storage.

`edge_rwkv.load` is the reference for dense models; for quantized artifacts this builds the same
`edge_rwkv.model.RWKV7` with dense linears over the dequantized matrices (the stored levels times
their scales, AWQ's input scale folded in), so ONNX and torch compute from the same stored values.
"""
from __future__ import annotations

import torch

from edge_rwkv.api import model_fingerprint, parse_dtype
from edge_rwkv.model import RWKV7, build_model

from .source import ExportSource


def reference_model(src: ExportSource, dtype: str = "float32") -> tuple[RWKV7, str]:
    """(torch network, model fingerprint) on CPU, weights in `dtype` as the export would use them."""
    dt = parse_dtype(dtype)
    tensors = dict(src.tensors)
    tensors.update({name: q.dequantize() for name, q in src.quant.items()})
    with torch.inference_mode():
        net = build_model(src.config, tensors, dt, torch.device("cpu"))
    return net, reference_fingerprint(src)


def reference_fingerprint(src: ExportSource) -> str:
    """The runtime's model fingerprint (states made by either side belong to the same model)."""
    return model_fingerprint(src.config, src.tensors)
