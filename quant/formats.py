"""Weight quantization formats: each one defined once, here.

A quantized linear weight W [out, K] (torch ``nn.Linear`` layout, y = x @ Wᵀ, K = in features) is
stored as up to three tensors, named from the weight's own name ``NAME``:

==========================  ==========================================================================
``NAME``                    the quantized values (int8 [out, K], or int4 packed as uint8 [out, K/2])
``NAME.scale``              fp16 scales (int8: [out]; int4: [out, K/group])
``NAME.input_scale``        optional fp16 [K]: multiplies the activation before the product
                            (activation-aware calibration, see ``quant/calibrate.py``)
==========================  ==========================================================================

so that ``y = (x * input_scale) @ dequantize(NAME, NAME.scale)ᵀ``. A lookup table kept int8 in memory
has its own row format, ``int8-rows`` (below).

Formats (version 1)
-------------------
``int8``  per-output-channel symmetric.
    ``scale[o] = max(max_k |W[o,k]| / 127, 2**-14)`` rounded to fp16, ``q = clip(round(W / scale),
    -127, 127)`` (round half to even) stored as int8 [out, K], row-major. Dequantized value
    ``q * scale`` (exact in fp32). ``-128`` never occurs.

``int4``  group-wise symmetric along K, group g ∈ {32, 64, 128} (K must be a multiple of g).
    ``scale[o, j] = max(max_{k in group j} |W[o,k]| / 7, 2**-14)`` rounded to fp16 (the reference
    quantizer uses the group's absolute maximum; calibration may store a smaller, clipped scale in
    the same layout), ``q = clip(round(W / scale), -8, 7)`` — the absmax scale makes the range
    [-7, 7], clipped scales can produce -8. Two's complement nibbles, two per byte: byte
    ``P[o, i] = (q[o, 2i] & 0xF) | ((q[o, 2i+1] & 0xF) << 4)`` — the low nibble holds the even k,
    the high nibble the odd k — stored as uint8 [out, K/2], row-major. This is byte for byte the raw
    data of an ONNX ``INT4`` tensor of shape [out, K] (first element of each pair in the low
    nibble), and ``scale`` [out, K/g] is exactly the scale input of opset-21 blocked
    ``DequantizeLinear(axis=1, block_size=g)`` with no zero point, so export does not re-quantize.

``int8-rows``  the in-memory form of a lookup table T [V, C] (``Int8Rows``: the ln0-folded embedding
    on CUDA). Never stored: an artifact's embedding is ``int8`` above, dequantized at load so that ln0
    can be folded in, and the folded table is rounded again into this form. Per-row symmetric:
    ``scale[v] = max_c |T[v,c]| / 127`` kept in fp32 [V, 1] (no floor; an all-zero row gets scale 1),
    ``q = clip(round(T / scale), -127, 127)`` (round half to even) int8 [V, C]; a lookup returns
    ``q * scale`` in fp32, cast to the model dtype. It differs from ``int8`` only in its scale (fp32
    and unfloored, as it is rebuilt at every load and never bound to fp16 storage): |T - dequant| is at
    most scale/2 up to fp32 rounding.

The scale floor 2**-14 (the smallest normal fp16) keeps the fp16 scale's relative rounding below
2**-11, so no value of a row/group is clipped by the reference quantizer: every element satisfies
the format's error limit ``|W - dequant| <= scale/2 * (1 + 2**-9)`` (``error_limit``).

Metadata: a ``QuantSpec`` serializes to ``{"format": "int4", "bits": 4, "group": 128, "version": 1,
"input_scale": false}``; a stored weight adds its logical ``"shape": [out, K]``
(``QuantizedWeight.metadata``). ``QuantizedWeight.from_stored`` checks the shapes, dtypes and sizes
of the stored tensors against that before anything is used, and raises ``CheckpointError``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from edge_rwkv.errors import CheckpointError

SCALE_FLOOR = 2.0**-14  # smallest normal fp16
INT4_GROUPS = (32, 64, 128)
DEFAULT_INT4_GROUP = 128
SCALE_SUFFIX = ".scale"
INPUT_SCALE_SUFFIX = ".input_scale"


# ----------------------------------------------------------------------------------------------
# format registry


@dataclass(frozen=True)
class _FormatDef:
    name: str
    bits: int
    qmax: int  # the largest positive level the absmax scale maps to
    qmin: int  # the smallest level stored
    versions: tuple[int, ...]
    grouped: bool


FORMATS: dict[str, _FormatDef] = {
    "int8": _FormatDef("int8", 8, 127, -127, (1,), False),
    "int4": _FormatDef("int4", 4, 7, -8, (1,), True),
}
CURRENT_VERSION = 1


@dataclass(frozen=True)
class QuantSpec:
    """How one weight is quantized: format name, bits, group (int4), version, input_scale flag."""

    format: str
    group: int | None = None
    version: int = CURRENT_VERSION
    input_scale: bool = False

    def __post_init__(self) -> None:
        fmt = FORMATS.get(self.format)
        if fmt is None:
            raise CheckpointError(
                f"unknown quantization format {self.format!r} (known: {', '.join(sorted(FORMATS))})")
        if self.version not in fmt.versions:
            raise CheckpointError(
                f"quantization format {self.format!r} version {self.version!r} is not supported "
                f"(supported: {list(fmt.versions)}); upgrade edge-rwkv or re-quantize")
        if fmt.grouped:
            if self.group not in INT4_GROUPS:
                raise CheckpointError(
                    f"{self.format}: group must be one of {INT4_GROUPS}, got {self.group!r}")
        elif self.group is not None:
            raise CheckpointError(f"{self.format} is per output channel: group must be None, "
                                  f"got {self.group!r}")

    @property
    def bits(self) -> int:
        return FORMATS[self.format].bits

    @property
    def qmin(self) -> int:
        return FORMATS[self.format].qmin

    @property
    def qmax(self) -> int:
        return FORMATS[self.format].qmax

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "bits": self.bits, "group": self.group,
                "version": self.version, "input_scale": bool(self.input_scale)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QuantSpec":
        if not isinstance(d, Mapping):
            raise CheckpointError(f"quantization spec must be a JSON object, got {type(d).__name__}")
        if "format" not in d:
            raise CheckpointError(f"quantization spec has no 'format': {dict(d)!r}")
        known = {"format", "bits", "group", "version", "input_scale", "shape"}
        extra = set(d) - known
        if extra:
            raise CheckpointError(f"quantization spec has unknown keys {sorted(extra)}")
        version = d.get("version", None)
        if not isinstance(version, int) or isinstance(version, bool):
            raise CheckpointError(f"quantization spec version must be an integer, got {version!r}")
        group = d.get("group")
        if group is not None and (not isinstance(group, int) or isinstance(group, bool)):
            raise CheckpointError(f"quantization spec group must be an integer or null, got {group!r}")
        spec = cls(format=str(d["format"]), group=group, version=version,
                   input_scale=bool(d.get("input_scale", False)))
        if "bits" in d and d["bits"] != spec.bits:
            raise CheckpointError(f"quantization spec {spec.format!r} has bits={d['bits']!r}, "
                                  f"expected {spec.bits}")
        return spec

    # --- stored layout -------------------------------------------------------------------------
    def check_shape(self, shape: tuple[int, ...], name: str = "weight") -> tuple[int, int]:
        """Validate a logical weight shape [out, K] for this format; return (out, K)."""
        if len(shape) != 2 or any((not isinstance(s, (int, np.integer))) or s <= 0 for s in shape):
            raise CheckpointError(f"{name}: quantized weights must be 2-D [out, K], got shape {tuple(shape)}")
        out, k = int(shape[0]), int(shape[1])
        if self.format == "int4" and k % self.group != 0:
            raise CheckpointError(f"{name}: int4 with group {self.group} needs K divisible by "
                                  f"{self.group}, got K={k}")
        return out, k

    def stored_shapes(self, shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], str]]:
        """Suffix -> (shape, numpy dtype name) of each stored tensor for logical shape [out, K]."""
        out, k = self.check_shape(shape)
        if self.format == "int8":
            d = {"": ((out, k), "int8"), SCALE_SUFFIX: ((out,), "float16")}
        else:
            d = {"": ((out, k // 2), "uint8"), SCALE_SUFFIX: ((out, k // self.group), "float16")}
        if self.input_scale:
            d[INPUT_SCALE_SUFFIX] = ((k,), "float16")
        return d

    def nbytes(self, shape: tuple[int, int]) -> int:
        return sum(int(np.prod(s)) * np.dtype(dt).itemsize for s, dt in self.stored_shapes(shape).values())


def int8_spec(input_scale: bool = False) -> QuantSpec:
    return QuantSpec("int8", None, CURRENT_VERSION, input_scale)


def int4_spec(group: int = DEFAULT_INT4_GROUP, input_scale: bool = False) -> QuantSpec:
    return QuantSpec("int4", group, CURRENT_VERSION, input_scale)


def error_limit(scale: np.ndarray, spec: QuantSpec, shape: tuple[int, int]) -> np.ndarray:
    """Per-element bound on |W - dequant(quant(W))| for the reference (absmax) quantizer, [out, K]."""
    out, k = spec.check_shape(shape)
    s = np.asarray(scale, dtype=np.float32)
    if spec.format == "int8":
        s = np.broadcast_to(s[:, None], (out, k))
    else:
        s = np.repeat(s, spec.group, axis=1)
    return 0.5 * s * (1.0 + 2.0**-9)


# ----------------------------------------------------------------------------------------------
# numpy reference (scalar semantics; slow-and-obvious on purpose)


def _fp16_scale(amax: np.ndarray, qmax: int) -> np.ndarray:
    return np.maximum(amax.astype(np.float32) / np.float32(qmax), np.float32(SCALE_FLOOR)).astype(np.float16)


def quantize_int8_ref(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """W [out, K] float -> (q int8 [out, K], scale fp16 [out])."""
    w = np.asarray(w, dtype=np.float32)
    int8_spec().check_shape(w.shape)
    scale = _fp16_scale(np.abs(w).max(axis=1), 127)
    q = np.clip(np.round(w / scale.astype(np.float32)[:, None]), -127, 127).astype(np.int8)
    return q, scale


def dequantize_int8_ref(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(q int8 [out, K], scale fp16 [out]) -> W fp32 [out, K] (exact products)."""
    return q.astype(np.float32) * np.asarray(scale).astype(np.float32)[:, None]


def pack_int4_ref(q: np.ndarray) -> np.ndarray:
    """q int [out, K] in [-8, 7] -> uint8 [out, K/2]; low nibble = even k, high nibble = odd k."""
    q = np.asarray(q)
    if q.ndim != 2 or q.shape[1] % 2:
        raise CheckpointError(f"int4 packing needs a 2-D array with even K, got shape {q.shape}")
    if q.size and (q.min() < -8 or q.max() > 7):
        raise CheckpointError("int4 values must lie in [-8, 7]")
    out, k = q.shape
    packed = np.zeros((out, k // 2), dtype=np.uint8)
    for i in range(k // 2):  # scalar definition, column pair by column pair
        lo = q[:, 2 * i].astype(np.int64) & 0xF
        hi = q[:, 2 * i + 1].astype(np.int64) & 0xF
        packed[:, i] = (lo | (hi << 4)).astype(np.uint8)
    return packed


def unpack_int4_ref(packed: np.ndarray) -> np.ndarray:
    """uint8 [out, K/2] -> int8 [out, K] in [-8, 7]."""
    p = np.asarray(packed, dtype=np.uint8).astype(np.int16)
    lo = p & 0xF
    hi = p >> 4
    lo = np.where(lo >= 8, lo - 16, lo)
    hi = np.where(hi >= 8, hi - 16, hi)
    out = np.empty((p.shape[0], p.shape[1] * 2), dtype=np.int8)
    out[:, 0::2] = lo
    out[:, 1::2] = hi
    return out


def quantize_int4_ref(w: np.ndarray, group: int = DEFAULT_INT4_GROUP) -> tuple[np.ndarray, np.ndarray]:
    """W [out, K] float -> (packed uint8 [out, K/2], scale fp16 [out, K/group]) with absmax scales."""
    w = np.asarray(w, dtype=np.float32)
    out, k = int4_spec(group).check_shape(w.shape)
    wg = w.reshape(out, k // group, group)
    scale = _fp16_scale(np.abs(wg).max(axis=2), 7)
    q = np.clip(np.round(wg / scale.astype(np.float32)[:, :, None]), -8, 7).astype(np.int8)
    return pack_int4_ref(q.reshape(out, k)), scale


def dequantize_int4_ref(packed: np.ndarray, scale: np.ndarray, group: int = DEFAULT_INT4_GROUP) -> np.ndarray:
    """(packed uint8 [out, K/2], scale fp16 [out, K/group]) -> W fp32 [out, K] (exact products)."""
    q = unpack_int4_ref(packed).astype(np.float32)
    return q * np.repeat(np.asarray(scale).astype(np.float32), group, axis=1)


def quantize_int8_rows_ref(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Table T [V, C] float -> (q int8 [V, C], scale fp32 [V, 1]) in the ``int8-rows`` format."""
    t = np.asarray(t, dtype=np.float32)
    if t.ndim != 2:
        raise CheckpointError(f"int8-rows: a lookup table must be 2-D [V, C], got shape {t.shape}")
    scale = np.abs(t).max(axis=1, keepdims=True) / np.float32(127)
    scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
    q = np.clip(np.round(t / scale), -127, 127).astype(np.int8)
    return q, scale


def dequantize_int8_rows_ref(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(q int8 [V, C], scale fp32 [V, 1]) -> T fp32 [V, C]."""
    return q.astype(np.float32) * np.asarray(scale, dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# torch implementations used by the runtime (tested equal to the reference)


def quantize_int8_torch(w, scale=None):
    """W [out, K] -> (q int8, scale fp16 [out]). ``scale`` (fp16 [out]) overrides the absmax scale."""
    w = w.float()
    if scale is None:
        amax = w.abs().amax(dim=1)
        scale = torch.clamp_min(amax / 127.0, SCALE_FLOOR).to(torch.float16)
    q = torch.clamp(torch.round(w / scale.float()[:, None]), -127, 127).to(torch.int8)
    return q, scale


def dequantize_int8_torch(q, scale, dtype=None, input_scale=None):
    """-> effective W [out, K] in ``dtype`` (fp32 default); input_scale [K] folded in if given."""
    w = q.float() * scale.float()[:, None]
    if input_scale is not None:
        w = w * input_scale.float()[None, :]
    return w.to(dtype or torch.float32)


def pack_int4_torch(q):
    qi = q.to(torch.int16) & 0xF
    return (qi[:, 0::2] | (qi[:, 1::2] << 4)).to(torch.uint8)


def unpack_int4_torch(packed):
    p = packed.to(torch.int16)
    lo = ((p & 0xF) ^ 8) - 8
    hi = ((p >> 4) ^ 8) - 8
    return torch.stack((lo, hi), dim=-1).reshape(p.shape[0], p.shape[1] * 2).to(torch.int8)


def int4_absmax_scale_torch(w, group: int = DEFAULT_INT4_GROUP):
    out, k = w.shape
    amax = w.float().reshape(out, k // group, group).abs().amax(dim=2)
    return torch.clamp_min(amax / 7.0, SCALE_FLOOR).to(torch.float16)


def quantize_int4_torch(w, group: int = DEFAULT_INT4_GROUP, scale=None):
    """W [out, K] -> (packed uint8 [out, K/2], scale fp16 [out, K/group]).

    ``scale`` overrides the absmax scale (e.g. a clipped scale chosen by calibration)."""
    out, k = int4_spec(group).check_shape(tuple(w.shape))
    if scale is None:
        scale = int4_absmax_scale_torch(w, group)
    wg = w.float().reshape(out, k // group, group)
    q = torch.clamp(torch.round(wg / scale.float()[:, :, None]), -8, 7).to(torch.int8).reshape(out, k)
    return pack_int4_torch(q), scale


def dequantize_int4_torch(packed, scale, group: int = DEFAULT_INT4_GROUP, dtype=None, input_scale=None):
    """-> effective W [out, K] in ``dtype`` (fp32 default); input_scale [K] folded in if given."""
    q = unpack_int4_torch(packed).float()
    out, k = q.shape
    w = (q.reshape(out, k // group, group) * scale.float()[:, :, None]).reshape(out, k)
    if input_scale is not None:
        w = w * input_scale.float()[None, :]
    return w.to(dtype or torch.float32)


def quantize_rows(t):
    """T [V, C] -> (int8 [V, C], fp32 scale [V, 1]) in the ``int8-rows`` format; |error| ≤ scale / 2."""
    t = t.float()
    scale = t.abs().amax(dim=1, keepdim=True) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale, no 0/0
    q = torch.round(t / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Int8Rows:
    """A lookup table [V, C] held in the ``int8-rows`` format; `table[idx]` gives the dequantized rows
    [*idx.shape, C] in `dtype`.

    For the embedding on a GPU: a quarter of its fp32 (half of its fp16) footprint — 0.27 GB instead of
    0.54 GB at V=65536, C=4096 — while a token reads one row either way. Indexing is plain torch (no host
    sync), so it is captured in a CUDA graph like the dense table it replaces.
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        if q.dtype != torch.int8 or q.dim() != 2:
            raise ValueError(f"Int8Rows: values must be int8 [V, C], got {q.dtype} {tuple(q.shape)}")
        if scale.dtype != torch.float32 or tuple(scale.shape) != (q.shape[0], 1):
            raise ValueError(f"Int8Rows: scale must be fp32 [{q.shape[0]}, 1], got {scale.dtype} {tuple(scale.shape)}")
        if scale.device != q.device:
            raise ValueError(f"Int8Rows: values on {q.device} but scales on {scale.device}")
        self.q, self.scale, self.dtype = q, scale, dtype

    @classmethod
    def quantize(cls, table: torch.Tensor, dtype: torch.dtype) -> "Int8Rows":
        return cls(*quantize_rows(table), dtype)

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        return (self.q[idx].float() * self.scale[idx]).to(self.dtype)

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.scale.numel() * self.scale.element_size()

    @property
    def row_bytes(self) -> int:
        """Bytes one lookup reads: a row of values and its scale."""
        return self.q.shape[1] * self.q.element_size() + self.scale.element_size()


# ----------------------------------------------------------------------------------------------
# a stored quantized weight


def _shape_dtype(t) -> tuple[tuple[int, ...], str]:
    shape = tuple(int(s) for s in t.shape)
    dt = t.dtype
    name = str(dt).replace("torch.", "")
    return shape, name


@dataclass
class QuantizedWeight:
    """One quantized weight: spec, logical shape [out, K] and its stored tensors (torch)."""

    spec: QuantSpec
    shape: tuple[int, int]
    qweight: Any  # int8 [out, K] | uint8 [out, K/2]
    scale: Any  # fp16
    input_scale: Any = None  # fp16 [K] or None

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        self.validate()

    def validate(self, name: str = "weight") -> None:
        expected = self.spec.stored_shapes(self.shape)
        got = {"": self.qweight, SCALE_SUFFIX: self.scale}
        if self.input_scale is not None:
            got[INPUT_SCALE_SUFFIX] = self.input_scale
        for suffix in sorted(set(expected) | set(got)):
            tname = name + suffix
            if suffix not in got:
                raise CheckpointError(f"{tname}: missing (spec {self.spec.to_dict()} needs it)")
            if suffix not in expected:
                raise CheckpointError(f"{tname}: present but spec {self.spec.to_dict()} has no {suffix!r}")
            (eshape, edt), (gshape, gdt) = expected[suffix], _shape_dtype(got[suffix])
            if gdt != edt:
                raise CheckpointError(f"{tname}: dtype {gdt}, expected {edt} for {self.spec.format}")
            if gshape != eshape:
                what = "truncated or mis-sized packed data" if suffix == "" else "wrong scale shape"
                raise CheckpointError(f"{tname}: {what}: shape {gshape}, expected {eshape} for "
                                      f"{self.spec.format} weight of shape {list(self.shape)}"
                                      + (f" group {self.spec.group}" if self.spec.group else ""))

    # --- artifact I/O --------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        d = self.spec.to_dict()
        d["shape"] = list(self.shape)
        return d

    def stored_tensors(self, name: str) -> dict[str, Any]:
        d = {name: self.qweight, name + SCALE_SUFFIX: self.scale}
        if self.input_scale is not None:
            d[name + INPUT_SCALE_SUFFIX] = self.input_scale
        return d

    @classmethod
    def from_stored(cls, name: str, meta: Mapping[str, Any], tensors: Mapping[str, Any]) -> "QuantizedWeight":
        """Rebuild from artifact metadata (``metadata()``) and a name -> tensor mapping; validated."""
        spec = QuantSpec.from_dict(meta)
        shape = meta.get("shape")
        if not isinstance(shape, (list, tuple)) or len(shape) != 2:
            raise CheckpointError(f"{name}: quantization metadata needs 'shape': [out, K], got {shape!r}")
        spec.check_shape(tuple(shape), name)
        for suffix in spec.stored_shapes(tuple(shape)):
            if name + suffix not in tensors:
                raise CheckpointError(f"{name}{suffix}: missing from the artifact")

        def get(s):
            t = tensors.get(name + s)
            if t is not None and not isinstance(t, torch.Tensor):
                t = torch.from_numpy(np.ascontiguousarray(t))
            return t

        qw = cls.__new__(cls)
        qw.spec, qw.shape = spec, (int(shape[0]), int(shape[1]))
        qw.qweight, qw.scale = get(""), get(SCALE_SUFFIX)
        qw.input_scale = get(INPUT_SCALE_SUFFIX) if spec.input_scale else None
        if not spec.input_scale and (name + INPUT_SCALE_SUFFIX) in tensors:
            raise CheckpointError(f"{name}{INPUT_SCALE_SUFFIX}: present but the spec says input_scale=false")
        qw.validate(name)
        return qw

    def dequantize(self, dtype=None, fold_input_scale: bool = True):
        """Effective W [out, K] (input_scale folded in unless told not to)."""
        ins = self.input_scale if fold_input_scale else None
        if self.spec.format == "int8":
            return dequantize_int8_torch(self.qweight, self.scale, dtype, ins)
        return dequantize_int4_torch(self.qweight, self.scale, self.spec.group, dtype, ins)

    @property
    def nbytes(self) -> int:
        return sum(int(t.numel()) * t.element_size() for t in (self.qweight, self.scale, self.input_scale)
                   if t is not None)


def quantize_rtn(w, spec: QuantSpec) -> QuantizedWeight:
    """Round-to-nearest with absmax scales (the reference quantizer, in torch)."""
    w = torch.as_tensor(w).float()
    if spec.input_scale:
        raise CheckpointError("round-to-nearest produces no input_scale; use calibrate.awq")
    if spec.format == "int8":
        q, s = quantize_int8_torch(w)
    else:
        q, s = quantize_int4_torch(w, spec.group)
    return QuantizedWeight(spec, tuple(w.shape), q, s)
