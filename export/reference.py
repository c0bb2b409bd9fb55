"""The torch runtime on exactly the weights an export reads: quantized ones dequantized from storage.

`edge_rwkv.load` is the reference for dense models; for quantized artifacts this builds the same
`edge_rwkv.model.RWKV7` with linears that compute (x * input_scale) @ dequant(W)ᵀ from the stored
levels and scales, so ONNX and torch see identical weights.
"""
from __future__ import annotations

import torch

from edge_rwkv.api import model_fingerprint, parse_dtype
from edge_rwkv.model import DenseLinear, RWKV7, build_model

from .source import ExportSource


class _DequantLinear:
    def __init__(self, w: torch.Tensor, input_scale: torch.Tensor | None):
        self.weight, self.input_scale = w, input_scale
        self.out_features, self.in_features = w.shape

    def __call__(self, x):
        if self.input_scale is not None:
            x = x.float() * self.input_scale
        return torch.nn.functional.linear(x.to(self.weight.dtype), self.weight)


def reference_model(src: ExportSource, dtype: str = "float32") -> tuple[RWKV7, str]:
    """(torch network, model fingerprint) on CPU, weights in `dtype` as the export would use them."""
    dt = parse_dtype(dtype)
    tensors = dict(src.tensors)
    if "emb.weight" in src.quant:
        tensors["emb.weight"] = src.quant["emb.weight"].dequantize()

    def make_linear(name):
        q = src.quant.get(name)
        if q is None or name == "emb.weight":
            return DenseLinear(tensors[name].to(dt))
        ins = None if q.input_scale is None else torch.from_numpy(q.input_scale.astype("float32"))
        return _DequantLinear(q.dequantize(fold_input_scale=False).to(dt), ins)

    with torch.inference_mode():
        net = build_model(src.config, tensors, dt, torch.device("cpu"), make_linear=make_linear)
    return net, reference_fingerprint(src)


def reference_fingerprint(src: ExportSource) -> str:
    """The runtime's model fingerprint (states made by either side belong to the same model)."""
    return model_fingerprint(src.config, src.tensors)
