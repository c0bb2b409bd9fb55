"""int8 / int4 weight formats, reference quantizers, calibration and quantized linear modules."""

from .formats import (FORMATS, QuantizedWeight, QuantSpec, dequantize_int4_ref, dequantize_int4_torch,
                      dequantize_int8_ref, dequantize_int8_torch, error_limit, int4_spec, int8_spec,
                      pack_int4_ref, quantize_int4_ref, quantize_int4_torch, quantize_int8_ref,
                      quantize_int8_torch, quantize_rtn, unpack_int4_ref)
from .policy import QuantPolicy

__all__ = [
    "FORMATS", "QuantSpec", "QuantizedWeight", "int8_spec", "int4_spec", "error_limit",
    "quantize_int8_ref", "dequantize_int8_ref", "quantize_int4_ref", "dequantize_int4_ref",
    "pack_int4_ref", "unpack_int4_ref", "quantize_int8_torch", "dequantize_int8_torch",
    "quantize_int4_torch", "dequantize_int4_torch", "quantize_rtn",
    "QuantPolicy",
]
