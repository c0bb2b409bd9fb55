"""Reading, validating and naming RWKV-7 checkpoints: the one place that knows key names.

Three inputs, told apart by their bytes (never their file names):
  * official BlinkDL `.pth` (a torch zip or legacy pickle) — read with `weights_only=True` only;
  * safetensors with the official key names;
  * the project's artifact: safetensors whose header metadata carries `edge_rwkv` JSON (see artifact.py).
"""
from __future__ import annotations

import math
import os
import pickle
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import CheckpointError
from .schema import Int, List, Obj, Opt, SchemaError, Str, load_json

# Per-layer tensors of RWKV-7 x070 under `blocks.{i}.`; v0/v1/v2 are unused (and optional) in layer 0.
ATT_VECTORS = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a")
ATT_LORA = (("w1", "w2"), ("a1", "a2"), ("v1", "v2"), ("g1", "g2"))
ATT_LINEARS = ("receptance", "key", "value", "output")
LAYER0_OPTIONAL = {"att.v0", "att.v1", "att.v2"}

_STRIP_PREFIXES = ("_orig_mod.", "module.", "model.")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def layer_keys(i: int) -> list[str]:
    """All tensor names of layer i in the official layout."""
    keys = ["ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias"]
    if i == 0:
        keys += ["ln0.weight", "ln0.bias"]
    keys += [f"att.{n}" for n in ATT_VECTORS]
    keys += [f"att.{n}" for pair in ATT_LORA for n in pair]
    keys += [f"att.{n}.weight" for n in ATT_LINEARS]
    keys += ["att.r_k", "att.ln_x.weight", "att.ln_x.bias", "ffn.x_k", "ffn.key.weight", "ffn.value.weight"]
    return [f"blocks.{i}.{k}" for k in keys]


def expected_keys(n_layer: int) -> set[str]:
    keys = {"emb.weight", "ln_out.weight", "ln_out.bias", "head.weight"}
    for i in range(n_layer):
        keys.update(layer_keys(i))
    return keys


def canonical_name(name: str) -> str:
    """Translate the spellings trainers leave behind (compile/DDP/HF wrappers) to official names."""
    for p in _STRIP_PREFIXES:
        if name.startswith(p):
            name = name[len(p):]
    return name


# --------------------------------------------------------------------------- version detection

_OTHER_VERSIONS = (
    # (marker regex on key names, message)
    (r"\.ffn\.(s_emb|s0|s1|s2)\b|deepemb|\.s_emb\.", "RWKV-7a (DeepEmbed) — only plain RWKV-7 x070 is supported"),
    (r"\.att\.time_maa_x$|\.att\.time_decay_w1$", "RWKV-6 (x060)"),
    (r"\.att\.time_faaaa$", "RWKV-5 (x052/x060 family)"),
    (r"\.att\.time_first$", "RWKV-4"),
)


def detect_other_version(keys) -> str | None:
    for pattern, label in _OTHER_VERSIONS:
        rx = re.compile(pattern)
        hit = next((k for k in keys if rx.search(k)), None)
        if hit:
            return f"{label} (tensor '{hit}')"
    return None


# --------------------------------------------------------------------------- reading

@dataclass
class Checkpoint:
    """Tensors under official names, the config derived from them, and the artifact metadata if any."""

    path: str
    tensors: dict[str, torch.Tensor]
    config: ModelConfig
    metadata: dict = field(default_factory=dict)  # the artifact's `edge_rwkv` JSON, {} for raw checkpoints

    @property
    def quant(self) -> dict:
        return self.metadata.get("quant", {})


def sniff_format(path: str | os.PathLike) -> str:
    """'torch-zip', 'torch-pickle' or 'safetensors', from the file's first bytes."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file")
    if p.is_dir():
        raise CheckpointError(f"{p}: is a directory, expected a model file")
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(16)
    # safetensors first: its 8-byte header length may begin with any byte, 0x80 included
    if len(head) >= 9:
        (hlen,) = struct.unpack("<Q", head[:8])
        if 2 <= hlen <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if head[:1] == b"\x80":
        return "torch-pickle"
    raise CheckpointError(f"{p}: not a recognised model file (neither a torch checkpoint nor safetensors; {size} bytes)")


def _read_torch(path: Path, fmt: str) -> dict[str, torch.Tensor]:
    try:
        if path.name.endswith(".safetensors"):
            # torch.load picks its safetensors reader from this file name, but the bytes say torch:
            # hand it an open file so the bytes decide (as everywhere else in this module).
            with open(path, "rb") as f:
                obj = torch.load(f, map_location="cpu", weights_only=True)
        else:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=(fmt == "torch-zip"))
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's first line is boilerplate that suggests weights_only=False (i.e. running the code);
        # the line naming the refused global is the one that says what is in the file.
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        first = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[0] if lines else type(e).__name__)
        raise CheckpointError(
            f"{path}: refused to unpickle — the file holds objects or code beyond plain tensors ({first})"
        ) from None
    except Exception as e:  # noqa: BLE001 — torch and its zip/safetensors readers raise many types for bad bytes
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: unreadable torch checkpoint (truncated or corrupt?): {detail}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    bad = next((k for k in obj if not isinstance(k, str)), None)
    if bad is not None:
        raise CheckpointError(f"{path}: tensor names must be strings, found {type(bad).__name__} {bad!r:.40}")
    return obj


# One entry of a safetensors header; sizes are checked against the file before any tensor is read.
_TENSOR_ENTRY = Obj({"dtype": Str(16), "shape": List(Int(0, 1 << 40), 8), "data_offsets": List(Int(0), 2)})
_ST_METADATA = Opt(Obj({}, extra=Str(1 << 26)))
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
             "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}


def read_safetensors_header(path: Path) -> tuple[dict, dict]:
    """(tensor index, metadata) from a safetensors header, every entry checked against the file size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors header")
        (hlen,) = struct.unpack("<Q", raw)
        if hlen > min(size - 8, 100 << 20):
            raise CheckpointError(f"{path}: safetensors header length {hlen} exceeds the file ({size} bytes)")
        try:
            header = load_json(f.read(hlen))
        except SchemaError as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not an object)")
    meta = header.pop("__metadata__", None)
    try:
        _ST_METADATA.check(meta, "__metadata__")
    except SchemaError as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    data_len = size - 8 - hlen
    for name, info in header.items():
        try:
            _TENSOR_ENTRY.check(info, f"tensor '{name}'")
        except SchemaError as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
        begin, end = info["data_offsets"] if len(info["data_offsets"]) == 2 else (-1, -1)
        if begin < 0:
            raise CheckpointError(f"{path}: tensor '{name}' has no valid data offsets")
        if not (begin <= end <= data_len):
            raise CheckpointError(
                f"{path}: tensor '{name}' lies beyond the end of the file (truncated: needs {end} data bytes, has {data_len})"
            )
        itemsize = _ITEMSIZE.get(info["dtype"])
        if itemsize is None:
            raise CheckpointError(f"{path}: tensor '{name}' has unknown dtype {info['dtype']!r}")
        if math.prod(info["shape"]) * itemsize != end - begin:
            raise CheckpointError(f"{path}: tensor '{name}' has shape {info['shape']} ({info['dtype']}) but "
                                  f"{end - begin} data bytes")
    return header, meta or {}


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _, meta = read_safetensors_header(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, RuntimeError, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors file: {e}") from None
    artifact_meta = {}
    if "edge_rwkv" in meta:
        try:
            artifact_meta = load_json(meta["edge_rwkv"])
        except SchemaError as e:
            raise CheckpointError(f"{path}: artifact metadata is {e}") from None
        if not isinstance(artifact_meta, dict) or not artifact_meta:
            raise CheckpointError(f"{path}: artifact metadata must be a non-empty JSON object")
    return tensors, artifact_meta


def read_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Raw tensors under canonical names plus artifact metadata ({} if none)."""
    p = Path(path)
    fmt = sniff_format(p)
    if fmt == "safetensors":
        tensors, meta = _read_safetensors(p)
    else:
        tensors, meta = _read_torch(p, fmt), {}
    out: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        name = canonical_name(k)
        if name in out:
            raise CheckpointError(f"{p}: tensor '{name}' appears twice (as '{k}' and another spelling)")
        out[name] = v
    return out, meta


# --------------------------------------------------------------------------- config + validation

def _shape(tensors, name, path) -> tuple[int, ...]:
    if name not in tensors:
        raise CheckpointError(f"{path}: missing tensor '{name}'")
    return tuple(tensors[name].shape)


def derive_config(tensors: dict[str, torch.Tensor], path: str = "<memory>", shapes: dict | None = None) -> ModelConfig:
    """n_layer, widths, head size and LoRA ranks from tensor shapes alone."""
    shapes = shapes or {k: tuple(v.shape) for k, v in tensors.items()}
    other = detect_other_version(shapes)
    if other:
        raise CheckpointError(f"{path}: this is {other}, not RWKV-7 x070")
    if "blocks.0.att.r_k" not in shapes:
        raise CheckpointError(f"{path}: not an RWKV-7 x070 checkpoint (missing tensor 'blocks.0.att.r_k')")
    n_layer = max(layer_indices(shapes, path)) + 1
    check_layer_count(shapes, n_layer, path)

    def get(name):
        if name not in shapes:
            raise CheckpointError(f"{path}: missing tensor '{name}'")
        return shapes[name]

    vocab, C = _pair(get("emb.weight"), "emb.weight", path)
    H, N = _pair(get("blocks.0.att.r_k"), "blocks.0.att.r_k", path)
    F, _ = _pair(get("blocks.0.ffn.key.weight"), "blocks.0.ffn.key.weight", path)
    # Layer 0 may lack v0/v1/v2 (unused there), so the value-residual rank comes from layer 1 when it exists.
    ranks = {a: _pair(get(f"blocks.0.att.{a}"), f"blocks.0.att.{a}", path)[1] for a in ("w1", "a1", "g1")}
    if n_layer > 1:
        mv = _pair(get("blocks.1.att.v1"), "blocks.1.att.v1", path)[1]
    elif "blocks.0.att.v1" in shapes:
        mv = _pair(shapes["blocks.0.att.v1"], "blocks.0.att.v1", path)[1]
    else:
        mv = 0  # a one-layer model without the (unused) layer-0 value LoRA
    if H * N != C:
        raise CheckpointError(f"{path}: r_k shape {H}x{N} does not match embedding width {C}")
    return ModelConfig(n_layer=n_layer, n_embd=C, head_size=N, vocab_size=vocab, dim_ffn=F,
                       decay_lora=ranks["w1"], aaa_lora=ranks["a1"], mv_lora=mv, gate_lora=ranks["g1"])


def layer_indices(names, path: str) -> set[int]:
    """The layer numbers that tensor names `blocks.{i}.…` mention (bounded: no huge numbers parsed)."""
    out = set()
    for k in names:
        m = re.match(r"blocks\.(\d+)\.", k)
        if m:
            digits = m.group(1)
            if len(digits) > 9:
                raise CheckpointError(f"{path}: tensor '{k[:60]}' names layer {digits[:12]}…, beyond any model")
            out.add(int(digits))
    return out


def check_layer_count(names, n_layer: int, path: str) -> None:
    """The tensors hold layers 0 … n_layer-1, each with at least one tensor: checked before anything is
    built or walked per layer, so a claimed or implied layer count can never exceed what the file holds."""
    layers = layer_indices(names, path)
    beyond = sorted(i for i in layers if i >= n_layer)[:5]
    if beyond:
        raise CheckpointError(f"{path}: tensors of layer(s) {beyond} but the model has {n_layer} layers")
    if len(layers) < n_layer:  # the first few holes, found without building range(n_layer)
        missing, i = [], 0
        while len(missing) < 5 and i < n_layer:
            if i not in layers:
                missing.append(i)
            i += 1
        more = f" (+{n_layer - len(layers) - len(missing)} more)" if n_layer - len(layers) > len(missing) else ""
        raise CheckpointError(f"{path}: layer(s) {missing}{more} have no tensors (found up to blocks.{max(layers, default=-1)})")


def _pair(shape, name, path):
    if len(shape) != 2:
        raise CheckpointError(f"{path}: tensor '{name}' has shape {list(shape)}, expected 2 dimensions")
    return shape


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    C, F, V = cfg.n_embd, cfg.dim_ffn, cfg.vocab_size
    vec = (1, 1, C)
    lora = {"w": cfg.decay_lora, "a": cfg.aaa_lora, "v": cfg.mv_lora, "g": cfg.gate_lora}
    shapes = {"emb.weight": (V, C), "head.weight": (V, C), "ln_out.weight": (C,), "ln_out.bias": (C,)}
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        for k in layer_keys(i):
            short = k[len(p):]
            if short.startswith(("ln", "att.ln_x")):
                shapes[k] = (C,)
            elif short in ("att.r_k",):
                shapes[k] = (cfg.n_head, cfg.head_size)
            elif short.startswith("att.") and short[4:] in ATT_VECTORS or short == "ffn.x_k":
                shapes[k] = vec
            elif short.startswith("att.") and short[4:6] in ("w1", "a1", "v1", "g1"):
                shapes[k] = (C, lora[short[4]])
            elif short.startswith("att.") and short[4:6] in ("w2", "a2", "v2", "g2"):
                shapes[k] = (lora[short[4]], C)
            elif short in ("att.receptance.weight", "att.key.weight", "att.value.weight", "att.output.weight"):
                shapes[k] = (C, C)
            elif short == "ffn.key.weight":
                shapes[k] = (F, C)
            elif short == "ffn.value.weight":
                shapes[k] = (C, F)
    return shapes


def _same_shape(actual, expected) -> bool:
    # Vectors are [1,1,C] officially; [C] is accepted too (some exporters squeeze them).
    if tuple(actual) == tuple(expected):
        return True
    return len(expected) == 3 and expected[:2] == (1, 1) and tuple(actual) == (expected[2],)


def check_keys_and_shapes(shapes: dict[str, tuple], cfg: ModelConfig, path: str, extra_ok=lambda k: False) -> None:
    want = expected_shapes(cfg)
    missing = sorted(set(want) - set(shapes) - {f"blocks.0.{k}" for k in LAYER0_OPTIONAL})
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{path}: missing tensor(s) {missing[:5]}{more}")
    optional0 = {f"blocks.0.{k}" for k in LAYER0_OPTIONAL}
    unexpected = sorted(k for k in shapes if k not in want and not extra_ok(k))
    if unexpected:
        more = f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise CheckpointError(f"{path}: unexpected tensor(s) {unexpected[:5]}{more} — not part of RWKV-7 x070")
    for k, shp in shapes.items():
        if k in want and not _same_shape(shp, want[k]) and not (k in optional0 and len(shp) in (2, 3)):
            raise CheckpointError(f"{path}: tensor '{k}' has shape {list(shp)}, expected {list(want[k])}")


def check_values(tensors: dict[str, torch.Tensor], path: str, names=None, progress: bool = False) -> None:
    """Floating dtype and finite values, tensor by tensor (names default to all)."""
    from .progress import progress_iter

    names = list(names if names is not None else tensors)
    for k in progress_iter(names, desc="validating", enabled=progress):
        t = tensors[k]
        if t.is_floating_point() and t.dtype not in FLOAT_DTYPES:  # float8 and the like: no kernel reads them
            raise CheckpointError(f"{path}: tensor '{k}' has dtype {str(t.dtype).replace('torch.', '')}, "
                                  f"expected float32, float16 or bfloat16")
        if not t.is_floating_point():
            raise CheckpointError(f"{path}: tensor '{k}' has dtype {str(t.dtype).replace('torch.', '')}, expected a float type")
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{path}: tensor '{k}' contains {bad} NaN/Inf value(s)")


def load_checkpoint(path: str | os.PathLike, progress: bool = False) -> Checkpoint:
    """Read any supported model file, validate it fully, and return tensors under official names."""
    from . import artifact

    tensors, meta = read_tensors(path)
    p = str(path)
    if meta:
        cfg = artifact.config_from_metadata(meta, p)
        artifact.check_artifact(tensors, meta, cfg, p, progress=progress)
        return Checkpoint(p, tensors, cfg, meta)
    cfg = derive_config(tensors, p)
    check_keys_and_shapes({k: tuple(v.shape) for k, v in tensors.items()}, cfg, p)
    check_values(tensors, p, progress=progress)
    return Checkpoint(p, tensors, cfg, {})
