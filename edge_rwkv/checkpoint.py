"""Reading, validating and naming RWKV-7 checkpoints: the one place that knows key names.

Three inputs, told apart by their bytes (never their file names):
  * official BlinkDL `.pth` (a torch zip or legacy pickle) — read with `weights_only=True` only;
  * safetensors with the official key names;
  * the project's artifact: safetensors whose header metadata carries `edge_rwkv` JSON (see artifact.py).
"""
from __future__ import annotations

import json
import os
import pickle
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import CheckpointError

# Per-layer tensors of RWKV-7 x070 under `blocks.{i}.`; v0/v1/v2 are unused (and optional) in layer 0.
ATT_VECTORS = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a")
ATT_LORA = (("w1", "w2"), ("a1", "a2"), ("v1", "v2"), ("g1", "g2"))
ATT_LINEARS = ("receptance", "key", "value", "output")
LAYER0_OPTIONAL = {"att.v0", "att.v1", "att.v2"}

_STRIP_PREFIXES = ("_orig_mod.", "module.", "model.")


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
    return obj


def read_safetensors_header(path: Path) -> tuple[dict, dict]:
    """(tensor index, metadata) from a safetensors header, checked against the file size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors header")
        (hlen,) = struct.unpack("<Q", raw)
        if hlen > min(size - 8, 100 << 20):
            raise CheckpointError(f"{path}: safetensors header length {hlen} exceeds the file ({size} bytes)")
        try:
            header = json.loads(f.read(hlen))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not an object)")
    meta = header.pop("__metadata__", None) or {}
    data_len = size - 8 - hlen
    for name, info in header.items():
        try:
            begin, end = info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{path}: tensor '{name}' has no valid data offsets") from None
        if not (0 <= begin <= end <= data_len):
            raise CheckpointError(
                f"{path}: tensor '{name}' lies beyond the end of the file (truncated: needs {end} data bytes, has {data_len})"
            )
    return header, meta


def _read_safetensors(path: Path, device: torch.device) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError, safe_open

    _, meta = read_safetensors_header(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = to_device_one_by_one(((k, f.get_tensor(k)) for k in f.keys()), device)
    except (SafetensorError, RuntimeError, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors file: {e}") from None
    artifact_meta = {}
    if "edge_rwkv" in meta:
        try:
            artifact_meta = json.loads(meta["edge_rwkv"])
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: artifact metadata is not valid JSON ({e})") from None
    return tensors, artifact_meta


def to_device_one_by_one(named: Iterable[tuple[str, torch.Tensor]], device: torch.device) -> dict[str, torch.Tensor]:
    """{name: tensor on `device`}, moving one tensor at a time and dropping each host tensor once copied.

    On a Jetson the CPU and the GPU share one DRAM: reading every tensor to host memory and then copying
    the lot would hold the weights twice at the load's peak. Read from the file mapping one tensor at a
    time instead, so the host side never holds more than the tensor being copied."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in named:
        out[name] = tensor.to(device)
        del tensor  # the host tensor (a view of the file mapping) goes before the next one is read
    return out


def read_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Raw tensors under canonical names, placed on `device` one at a time, plus artifact metadata ({} if none)."""
    p = Path(path)
    device = torch.device(device)
    fmt = sniff_format(p)
    if fmt == "safetensors":
        tensors, meta = _read_safetensors(p, device)
    else:
        host = _read_torch(p, fmt)  # memory-mapped where the format allows (torch-zip)
        tensors = to_device_one_by_one(((k, host.pop(k)) for k in list(host)), device)
        meta = {}
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
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    n_layer = max(layers) + 1
    missing_layers = sorted(set(range(n_layer)) - layers)
    if missing_layers:
        raise CheckpointError(f"{path}: layer(s) {missing_layers} have no tensors (found up to blocks.{n_layer - 1})")

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
        if not t.is_floating_point():
            raise CheckpointError(f"{path}: tensor '{k}' has dtype {str(t.dtype).replace('torch.', '')}, expected a float type")
        if not all_finite(t):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{path}: tensor '{k}' contains {bad} NaN/Inf value(s)")


CHECK_CHUNK = 1 << 24  # elements checked at a time: bounds the check's transient (bool, or fp32 on a CPU)


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf, checked in chunks so the check adds little to the load's peak (an embedding of
    V=65536 × C=4096 would otherwise need a 268 MB mask — 1.3 GB on a CPU, which widens fp16 to fp32)."""
    return all(bool(torch.isfinite(chunk).all()) for chunk in t.reshape(-1).split(CHECK_CHUNK))


def load_checkpoint(path: str | os.PathLike, progress: bool = False, device: str | torch.device = "cpu") -> Checkpoint:
    """Read any supported model file, validate it fully, and return tensors under official names on `device`."""
    from . import artifact

    tensors, meta = read_tensors(path, device)
    p = str(path)
    if meta:
        cfg = artifact.config_from_metadata(meta, p)
        artifact.check_artifact(tensors, meta, cfg, p, progress=progress)
        return Checkpoint(p, tensors, cfg, meta)
    cfg = derive_config(tensors, p)
    check_keys_and_shapes({k: tuple(v.shape) for k, v in tensors.items()}, cfg, p)
    check_values(tensors, p, progress=progress)
    return Checkpoint(p, tensors, cfg, {})
