"""Quantization, end to end, in two steps (DESIGN.md): an offline transform of a checkpoint's tensors
(transform.py: policy.py says which tensors and how, calibrate.py chooses the stored values) into the
formats defined once in formats.py; then, at load, the swap of the model's linears for quantized ones
(load.py, linear.py). cli.py is the `quantize` command."""

from .formats import (FORMATS, Int8Rows, QuantizedWeight, QuantSpec, dequantize_int4_ref, dequantize_int4_torch,
                      dequantize_int8_ref, dequantize_int8_rows_ref, dequantize_int8_torch, error_limit,
                      int4_spec, int8_spec, pack_int4_ref, quantize_int4_ref, quantize_int4_torch,
                      quantize_int8_ref, quantize_int8_rows_ref, quantize_int8_torch, quantize_rows,
                      quantize_rtn, unpack_int4_ref)
from .policy import QuantPolicy

__all__ = [
    "FORMATS", "QuantSpec", "QuantizedWeight", "int8_spec", "int4_spec", "error_limit",
    "quantize_int8_ref", "dequantize_int8_ref", "quantize_int4_ref", "dequantize_int4_ref",
    "pack_int4_ref", "unpack_int4_ref", "quantize_int8_torch", "dequantize_int8_torch",
    "quantize_int4_torch", "dequantize_int4_torch", "quantize_rtn",
    "Int8Rows", "quantize_rows", "quantize_int8_rows_ref", "dequantize_int8_rows_ref",
    "QuantPolicy",
]
