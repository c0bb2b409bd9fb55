"""The quantized implementation of the model's linear protocol (``edge_rwkv.model.Linear``; the dense
one is ``edge_rwkv.model.DenseLinear``): ``QuantLinear`` over an int8 / int4 ``QuantizedWeight``.

It takes x [..., K] and returns [..., out] in x's dtype. Its paths, chosen by capability:

* CPU: dequantize (to fp32) + matmul on every call; nothing large is cached unless
  ``cache_dequantized=True``.
* CUDA, at most ``gemv_max_rows`` rows of x (default 4, the measured crossover): our Numba GEMV
  kernels, reading the packed weight once. By default x is rounded to int8 in blocks of 32 and the
  products are integer dot products (cuda_kernels/gemv_a8.py, W4A8 / W8A8: several times fewer
  instructions a weight); ``int8_activations=False`` keeps x in fp32 (gemv_int8.py, gemv_int4.py,
  up to 16 rows). ``input_scale`` (activation-aware formats) is multiplied into x first.
* CUDA, more rows (prefill, batched decode): dequantize to fp16 slab by slab into one bounded
  scratch (``scratch_bytes``, 32 MiB default: a slab stays in L2 while cuBLAS reads it) and run a
  torch matmul on each slab. The dequantization is one Numba pass (cuda_kernels/dequant.py: 8
  weights a thread, one 16-byte store, no fp32 intermediate); torch ops where it cannot run.

If the kernels cannot run (no numba, K not a multiple of 16/32), the module uses the dequantize
path and logs it once; ``QuantLinear.path`` says which one is in use.
"""

from __future__ import annotations

import importlib
import logging
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from edge_rwkv.errors import CheckpointError
from edge_rwkv.model import DenseLinear, Linear

from .formats import QuantizedWeight, QuantSpec, dequantize_int4_torch, dequantize_int8_torch

log = logging.getLogger("edge_rwkv.quant")
DEFAULT_SCRATCH_BYTES = 32 << 20
GEMV_MAX_ROWS = 16  # what the kernels support
DEFAULT_GEMV_ROWS = 4  # measured crossover on H200 (benchmarks/NOTES.md, "GEMV kernels")
_warned: set = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg)


def _kernel_module(fmt: str):
    """edge_rwkv.cuda_kernels.gemv_int8 / gemv_int4, or None when numba is missing."""
    try:
        return importlib.import_module(f"edge_rwkv.cuda_kernels.gemv_{fmt}")
    except Exception as e:  # pragma: no cover - depends on the install
        _warn_once("import" + fmt, f"quantized GEMV kernels unavailable ({e}); using dequantize+matmul")
        return None


class QuantLinear(nn.Module):
    """Linear layer over a ``QuantizedWeight`` (format int8 or int4, see quant/formats.py)."""

    def __init__(self, qw: QuantizedWeight, cache_dequantized: bool = False,
                 scratch_bytes: int = DEFAULT_SCRATCH_BYTES, gemv_max_rows: int = DEFAULT_GEMV_ROWS,
                 int8_activations: bool = True):
        super().__init__()
        qw.validate()
        self.spec: QuantSpec = qw.spec
        self.out_features, self.in_features = qw.shape
        self.register_buffer("qweight", qw.qweight)
        self.register_buffer("scale", qw.scale)
        self.register_buffer("input_scale", qw.input_scale)
        self.cache_dequantized = cache_dequantized
        self.scratch_bytes = int(scratch_bytes)
        self.gemv_max_rows = min(int(gemv_max_rows), GEMV_MAX_ROWS)
        self.int8_activations = bool(int8_activations)
        self._cache = None
        self._prep = None  # prepared kernel views (CUDA)
        self._prep_key = None
        self._dq = self._dq_key = None  # cuda_kernels/dequant.Dequantizer (CUDA, many-row path)

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_stored(cls, name: str, meta: Mapping, tensors: Mapping, **kw) -> "QuantLinear":
        return cls(QuantizedWeight.from_stored(name, meta, tensors), **kw)

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.spec, (self.out_features, self.in_features), self.qweight,
                               self.scale, self.input_scale)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scale, self.input_scale)
                   if t is not None)

    def _apply(self, fn, *args, **kwargs):  # .to(device) etc.: drop device-bound caches
        self._cache = None
        self._prep = None
        self._prep_key = None
        self._dq = self._dq_key = None
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, format={self.spec.format}"
                + (f", group={self.spec.group}" if self.spec.group else "")
                + (", input_scale" if self.input_scale is not None else ""))

    # --- dequantization -----------------------------------------------------------------------
    def dequantize(self, dtype=torch.float32, rows: slice | None = None) -> torch.Tensor:
        """Effective weight [out, K] (or the row slice) with input_scale folded in."""
        rs = rows or slice(None)
        if self.spec.format == "int8":
            return dequantize_int8_torch(self.qweight[rs], self.scale[rs], dtype, self.input_scale)
        return dequantize_int4_torch(self.qweight[rs], self.scale[rs], self.spec.group, dtype,
                                     self.input_scale)

    @property
    def path(self) -> str:
        if self.qweight.device.type != "cuda":
            return "cpu-dequantize"
        if self._prepared() is None:
            return "cuda-dequantize"
        return "cuda-gemv-a8" if self._a8_ok(1) else "cuda-gemv"

    def _a8_ok(self, rows: int) -> bool:
        """Whether the int8-activation kernels take this call (cuda_kernels/gemv_a8.py)."""
        from edge_rwkv.cuda_kernels.gemv_a8 import BLOCK, MAX_ROWS

        return self.int8_activations and rows <= MAX_ROWS and self.in_features % BLOCK == 0

    def a8_views(self, rows: int):
        """The prepared weight views when the int8-activation GEMV takes ``rows`` rows of x here
        (CUDA, kernels usable, no input scale), else None — for callers that launch it themselves
        (the fused decode step: FFN key with relu² at the store)."""
        if self.qweight.device.type != "cuda" or self.input_scale is not None or not self._a8_ok(rows):
            return None
        return self._prepared()

    def _prepared(self):
        key = (self.qweight.data_ptr(), self.scale.data_ptr())
        if self._prep_key == key:
            return self._prep
        mod = _kernel_module(self.spec.format)
        prep = None
        if mod is not None:
            try:
                if self.spec.format == "int8":
                    prep = mod.PreparedInt8(self.qweight, self.scale)
                else:
                    prep = mod.PreparedInt4(self.qweight, self.scale, self.spec.group)
            except Exception as e:
                _warn_once(f"prep{self.spec.format}{self.in_features}",
                           f"{self.spec.format} GEMV kernel not usable for K={self.in_features} ({e}); "
                           "using dequantize+matmul")
        self._prep, self._prep_key = prep, key
        return prep

    # --- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantLinear: x has {x.shape[-1]} features, expected {self.in_features}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x.device.type == "cuda":
            y = self._forward_cuda(x2)
        else:
            y = self._forward_cpu(x2)
        return y.reshape(*lead, self.out_features)

    def _forward_cpu(self, x2: torch.Tensor) -> torch.Tensor:
        if self.cache_dequantized:
            if self._cache is None:
                self._cache = self.dequantize(torch.float32)
            w = self._cache
        else:
            w = self.dequantize(torch.float32)
        return F.linear(x2.float(), w).to(x2.dtype)

    def _forward_cuda(self, x2: torch.Tensor) -> torch.Tensor:
        M = x2.shape[0]
        if 0 < M <= self.gemv_max_rows:
            prep = self._prepared()
            if prep is not None:
                xk = x2 if self.input_scale is None else x2.float() * self.input_scale.float()
                if self._a8_ok(M):
                    from edge_rwkv.cuda_kernels.gemv_a8 import gemv_a8

                    y = gemv_a8(xk if xk.dtype == torch.float16 else xk.float(), prep)
                else:
                    mod = _kernel_module(self.spec.format)
                    fn = mod.gemv_int8 if self.spec.format == "int8" else mod.gemv_int4
                    y = fn(xk.float().contiguous(), prep)
                return y if y.dtype == x2.dtype else y.to(x2.dtype)
        cdt = x2.dtype if x2.dtype in (torch.float16, torch.bfloat16) else torch.float16
        if x2.dtype == torch.float32:
            cdt = torch.float32
        dq = self._dequantizer() if cdt == torch.float16 else None
        if self.cache_dequantized:
            if self._cache is None or self._cache.dtype != cdt:
                self._cache = dq.rows() if dq is not None else self.dequantize(cdt)
            return F.linear(x2.to(cdt), self._cache).to(x2.dtype)
        xc = x2.to(cdt)
        y = torch.empty((M, self.out_features), device=x2.device, dtype=cdt)
        slab = max(1, min(self.out_features, self.scratch_bytes // (self.in_features * xc.element_size())))
        buf = torch.empty(slab * self.in_features, device=x2.device, dtype=cdt) if dq is not None else None
        for r0 in range(0, self.out_features, slab):
            r1 = min(self.out_features, r0 + slab)
            w = dq.rows(r0, r1, buf) if dq is not None else self.dequantize(cdt, slice(r0, r1))
            cols = y[:, r0:r1]
            if cols.is_contiguous():
                torch.matmul(xc, w.t(), out=cols)
            else:
                cols.copy_(xc @ w.t())
        return y if y.dtype == x2.dtype else y.to(x2.dtype)

    def _dequantizer(self):
        """This weight's one-pass fp16 dequantizer (cuda_kernels/dequant.py: no fp32 scratch), made
        once per storage; None where the kernel does not take the weight or cannot run here."""
        key = (self.qweight.data_ptr(), self.scale.data_ptr(),
               None if self.input_scale is None else self.input_scale.data_ptr())
        if self._dq_key != key:
            from edge_rwkv.cuda_kernels._runtime import kernel_device_ok
            from edge_rwkv.cuda_kernels.dequant import Dequantizer, supported

            group = self.spec.group or 0
            ok = supported(self.spec.format, self.in_features, group) and kernel_device_ok(self.qweight)
            self._dq = Dequantizer(self.spec.format, self.qweight, self.scale, self.input_scale, group) if ok else None
            self._dq_key = key
        return self._dq


def quantized_linears(net) -> list[QuantLinear]:
    """The QuantLinear modules of a network (its layers' matrices and the head)."""
    mods = [m for L in net.layers for m in vars(L).values() if isinstance(m, QuantLinear)]
    return mods + ([net.head] if isinstance(net.head, QuantLinear) else [])


def dense_or_quant_linear(tensors: Mapping[str, torch.Tensor], name: str, spec: QuantSpec | Mapping | None,
                          shape=None, dtype: torch.dtype | None = None, device=None, **kw) -> Linear:
    """Linear for weight ``name`` from the artifact's tensors, on ``device`` (default: where it is):
    ``DenseLinear`` in ``dtype`` (default: as stored) when ``spec`` is None, else ``QuantLinear``
    (``spec`` a QuantSpec plus ``shape``, or the per-tensor metadata dict; ``kw`` go to QuantLinear)."""
    if spec is None:
        if name not in tensors:
            raise CheckpointError(f"{name}: missing from the artifact")
        return DenseLinear(tensors[name].to(device=device, dtype=dtype))
    if isinstance(spec, QuantSpec):
        if shape is None:
            raise CheckpointError(f"{name}: the logical shape [out, K] is needed with a QuantSpec")
        meta = dict(spec.to_dict(), shape=list(shape))
    else:
        meta = dict(spec)
    lin = QuantLinear.from_stored(name, meta, tensors, **kw)
    return lin if device is None else lin.to(device)
