"""Reading, validating and naming RWKV-7 checkpoints: the one place that knows key names.

Files are told apart by their bytes (never their file names):
  * official BlinkDL `.pth` (a torch zip or legacy pickle) — read with `weights_only=True` only;
  * safetensors with the official key names;
  * the project's artifact: safetensors whose header metadata carries `edge_rwkv` JSON (see artifact.py).
A folder holding config.json is a Hugging Face / fla model (safetensors only; see load_hf_folder), and
RWKV-PEFT state-tuning files hold tuned initial states (see read_time_states).
"""
from __future__ import annotations

import json
import math
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
    (r"^blocks\.\d+\.qkv\.", "RWKV-7b (DeepEmbedAttention): its attention keeps every past token's keys and "
                              "values, so memory grows with the context — refused, this runtime keeps a "
                              "constant-size state"),
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
            artifact_meta = load_json(meta["edge_rwkv"])
        except SchemaError as e:
            raise CheckpointError(f"{path}: artifact metadata is {e}") from None
        if not isinstance(artifact_meta, dict) or not artifact_meta:
            raise CheckpointError(f"{path}: artifact metadata must be a non-empty JSON object")
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
    # RWKV-7a: DeepEmbed tensors in the FFN; their rank D comes from s1 [C, D]
    deep = _pair(shapes["blocks.0.ffn.s1"], "blocks.0.ffn.s1", path)[1] if "blocks.0.ffn.s1" in shapes else 0
    return ModelConfig(n_layer=n_layer, n_embd=C, head_size=N, vocab_size=vocab, dim_ffn=F,
                       decay_lora=ranks["w1"], aaa_lora=ranks["a1"], mv_lora=mv, gate_lora=ranks["g1"],
                       deep_embed=deep)


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
        if cfg.deep_embed:
            shapes.update(deep_embed_shapes(cfg, i))
    return shapes


def deep_embed_shapes(cfg: ModelConfig, i: int) -> dict[str, tuple[int, ...]]:
    """RWKV-7a's DeepEmbed tensors of layer i: a per-token D×D table (s_emb, plus s_emb_x applied to the
    ln0-normed embedding) and the FFN-key scale around it (s1 [C, D], s2 [D, F], s0 [1, 1, F])."""
    C, F, V, D = cfg.n_embd, cfg.dim_ffn, cfg.vocab_size, cfg.deep_embed
    f = f"blocks.{i}.ffn."
    return {f + "s_emb.weight": (V, D * D), f + "s_emb_x.weight": (D * D, C), f + "s0": (1, 1, F),
            f + "s1": (C, D), f + "s2": (D, F)}


def parameter_count(cfg: ModelConfig) -> int:
    """Logical parameters (layer-0 v0/v1/v2 excluded: unused), whatever the storage format."""
    return sum(math.prod(shape) for shape in expected_shapes(cfg).values())


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

    if Path(path).is_dir():
        if not is_hf_folder(path):
            raise CheckpointError(f"{path}: is a directory without {HF_CONFIG}, expected a model file or a "
                                  f"Hugging Face folder ({HF_CONFIG} + {HF_WEIGHTS})")
        return load_hf_folder(path, progress=progress)
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


# --------------------------------------------------------------------------- Hugging Face / fla layout
#
# The layout `fla-hub/rwkv7-*` and the `rwkv7-hf` package publish (flash-linear-attention's RWKV7 model):
# a folder with config.json and model.safetensors, or shards model-0000k-of-0000n.safetensors named by
# model.safetensors.index.json. Names and orientation differ from the official layout:
#   * LoRA pairs are nn.Linear modules, so `w1` [C, r] is stored as `w_lora.lora.0.weight` [r, C] and
#     `w2` [r, C] as `w_lora.lora.2.weight` [C, r] (both transposed); the additive vector `w0` is that
#     second Linear's bias `w_lora.lora.2.bias` [C] (same for a/v; the gate LoRA has no bias, and
#     layer 0 has no value LoRA);
#   * k_k, k_a and ffn.x_k are flat [C] vectors, the six attention x_* mixes stay [1, 1, C]; models
#     converted before fla's "version 2" hold the six mixes as one `attn.x_x` [6, C] (r, w, k, v, a, g);
#   * ln0/ln1/ln2/ln_x/ln_out are pre_norm/attn_norm/ffn_norm/g_norm/model.norm.

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
HF_MIX_ORDER = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")  # rows of the old fused `attn.x_x`
HF_LORA = {"w": "w_lora", "a": "a_lora", "v": "v_lora", "g": "g_lora"}
HF_PROJ = {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj"}
# Config fields a folder must carry; the LoRA ranks and intermediate size may be absent (read from shapes).
HF_REQUIRED_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")

# How a tensor changes between layouts: "same", "t" (transposed matrix), "flat" ([1,1,C] official, [C] hf).
_SAME, _T, _FLAT = "same", "t", "flat"


def hf_name_map(n_layer: int) -> dict[str, tuple[str, str]]:
    """official name → (Hugging Face name, how the tensor changes) for every tensor of an n_layer model."""
    m = {"emb.weight": ("model.embeddings.weight", _SAME), "ln_out.weight": ("model.norm.weight", _SAME),
         "ln_out.bias": ("model.norm.bias", _SAME), "head.weight": ("lm_head.weight", _SAME)}
    for i in range(n_layer):
        b, hb = f"blocks.{i}.", f"model.layers.{i}."
        a, ha = b + "att.", hb + "attn."
        for wb in ("weight", "bias"):
            m[f"{b}ln1.{wb}"] = (f"{hb}attn_norm.{wb}", _SAME)
            m[f"{b}ln2.{wb}"] = (f"{hb}ffn_norm.{wb}", _SAME)
            m[f"{a}ln_x.{wb}"] = (f"{ha}g_norm.{wb}", _SAME)
            if i == 0:
                m[f"{b}ln0.{wb}"] = (f"{hb}pre_norm.{wb}", _SAME)
        for x in HF_MIX_ORDER:
            m[a + x] = (ha + x, _SAME)
        for letter in HF_LORA:
            if letter != "v" or i > 0:  # the first layer's value LoRA is unused, and fla has none
                m.update(_hf_lora(i, letter))
        for n in ("k_k", "k_a"):
            m[a + n] = (ha + n, _FLAT)
        m[a + "r_k"] = (ha + "r_k", _SAME)
        for official, proj in HF_PROJ.items():
            m[f"{a}{official}.weight"] = (f"{ha}{proj}.weight", _SAME)
        m[b + "ffn.x_k"] = (hb + "ffn.x_k", _FLAT)
        for n in ("key", "value"):
            m[f"{b}ffn.{n}.weight"] = (f"{hb}ffn.{n}.weight", _SAME)
    return m


def _hf_lora(i: int, letter: str) -> dict[str, tuple[str, str]]:
    a, ha = f"blocks.{i}.att.", f"model.layers.{i}.attn.{HF_LORA[letter]}.lora."
    m = {f"{a}{letter}1": (ha + "0.weight", _T), f"{a}{letter}2": (ha + "2.weight", _T)}
    if letter != "g":
        m[f"{a}{letter}0"] = (ha + "2.bias", _FLAT)
    return m


# Older fla builds made a value LoRA in layer 0 too (unused there, as in official files): read, not required.
HF_LAYER0_VALUE = _hf_lora(0, "v")


def to_hf_tensor(t: torch.Tensor, how: str) -> torch.Tensor:
    if how == _T:
        return t.t().contiguous()
    if how == _FLAT:
        return t.reshape(-1).contiguous()
    return t


def from_hf_tensor(t: torch.Tensor, how: str) -> torch.Tensor:
    if how == _T:
        return t.t().contiguous()
    if how == _FLAT:
        return t.reshape(1, 1, -1)
    return t


def _hf_shape(official_shape: tuple, how: str) -> tuple:
    if how == _T:
        return tuple(reversed(official_shape))
    if how == _FLAT:
        return (official_shape[-1],)
    return tuple(official_shape)


def is_hf_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / HF_CONFIG).is_file()


def read_hf_config(folder: Path) -> dict:
    path = folder / HF_CONFIG
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable config ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: config must be a JSON object")
    return cfg


def _config_int(cfg: dict, key: str, where: Path, required: bool = True) -> int | None:
    v = cfg.get(key)
    if v is None:
        if required:
            raise CheckpointError(f"{where}: config field '{key}' is missing")
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise CheckpointError(f"{where}: config field '{key}' must be a positive integer, got {v!r}")
    return v


def _check_hf_architecture(cfg: dict, where: Path) -> None:
    """Refuse configs that describe something other than a plain RWKV-7 (x070) in the fla layout."""
    for key in HF_REQUIRED_FIELDS:
        if cfg.get(key) is None:
            raise CheckpointError(f"{where}: config field '{key}' is missing")
    model_type = cfg["model_type"]
    if not isinstance(model_type, str) or "rwkv7" not in model_type.lower():
        raise CheckpointError(f"{where}: model_type {model_type!r} is not RWKV-7 (expected 'rwkv7')")
    if cfg.get("attn"):
        raise CheckpointError(f"{where}: config 'attn' puts softmax-attention layers in the model (a hybrid): "
                              "refused, attention breaks the constant-memory state")
    if cfg.get("norm_first", True) is not True or cfg.get("norm_bias", True) is not True:
        raise CheckpointError(f"{where}: norm_first/norm_bias must be true for an RWKV-7 x070 model")
    if cfg.get("hidden_act", "sqrelu") != "sqrelu":
        raise CheckpointError(f"{where}: hidden_act {cfg['hidden_act']!r} is not RWKV-7's 'sqrelu'")
    eps = cfg.get("norm_eps", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or abs(eps - 1e-5) > 1e-12:
        raise CheckpointError(f"{where}: norm_eps {eps!r} differs from RWKV-7's 1e-5 (this runtime's layer norms)")


def hf_shard_files(folder: str | os.PathLike) -> tuple[list[Path], dict[str, str] | None]:
    """(weight files, the index's tensor → file map or None) of a Hugging Face folder."""
    folder = Path(folder)
    single, index = folder / HF_WEIGHTS, folder / HF_INDEX
    if single.is_file():
        return [single], None
    if not index.is_file():
        pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
        hint = f" (found {', '.join(pickled[:3])}: pickled weights are not read; save them as safetensors)" if pickled else ""
        raise CheckpointError(f"{folder}: no {HF_WEIGHTS} and no {HF_INDEX}{hint}")
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{index}: 'weight_map' must map tensor names to file names")
    files = []
    for name in dict.fromkeys(weight_map.values()):
        if Path(name).name != name or not name.endswith(".safetensors"):
            raise CheckpointError(f"{index}: shard {name!r} must be a .safetensors file inside the folder")
        if not (folder / name).is_file():
            raise CheckpointError(f"{index}: shard {name} is missing from {folder}")
        files.append(folder / name)
    return files, weight_map


def _hf_headers(folder: Path) -> tuple[dict[str, Path], dict[str, tuple], dict[str, str]]:
    """(hf name → shard, hf name → shape, hf name → dtype) from the shard headers, checked against the index."""
    files, weight_map = hf_shard_files(folder)
    where, shapes, dtypes = {}, {}, {}
    for f in files:
        fmt = sniff_format(f)
        if fmt != "safetensors":
            raise CheckpointError(f"{f}: holds a torch pickle, not safetensors; a Hugging Face folder is read "
                                  "only from safetensors (nothing was unpickled)")
        header, _ = read_safetensors_header(f)
        for name, info in header.items():
            if name in where:
                raise CheckpointError(f"{folder}: tensor '{name}' is in both {where[name].name} and {f.name}")
            where[name], shapes[name], dtypes[name] = f, tuple(info.get("shape", ())), str(info.get("dtype"))
    if weight_map is not None:
        for name, fname in weight_map.items():
            if where.get(name, folder / fname).name != fname:
                raise CheckpointError(f"{folder}: the index puts tensor '{name}' in {fname}, "
                                      f"but it is in {where[name].name}")
            if name not in where:
                raise CheckpointError(f"{folder / fname}: tensor '{name}' named by the index is missing")
        stray = sorted(set(where) - set(weight_map))
        if stray:
            raise CheckpointError(f"{folder}: tensor(s) {stray[:5]} are in the shards but not in {HF_INDEX}")
    return where, shapes, dtypes


def _hf_config_to_model_config(cfg: dict, shapes: dict[str, tuple], where: Path) -> ModelConfig:
    """ModelConfig from config.json; fields fla lets default (ranks, intermediate size) come from shapes."""
    C = _config_int(cfg, "hidden_size", where)
    L = _config_int(cfg, "num_hidden_layers", where)
    V = _config_int(cfg, "vocab_size", where)
    N = _config_int(cfg, "head_dim", where, required=False)
    H = _config_int(cfg, "num_heads", where, required=False)
    if N is None and H is None:
        raise CheckpointError(f"{where}: config field 'head_dim' (or 'num_heads') is missing")
    N = N or C // H
    if C % N or (H is not None and H * N != C):
        raise CheckpointError(f"{where}: hidden_size {C} does not split into heads of head_dim {N}")

    def from_shape(field, hf_name, axis):
        v = _config_int(cfg, field, where, required=False)
        if v is not None:
            return v
        shape = shapes.get(hf_name)
        if shape is None or len(shape) != 2:
            raise CheckpointError(f"{where}: config field '{field}' is missing and tensor '{hf_name}' "
                                  "(which would give it) is absent or not a matrix")
        return shape[axis]

    F = from_shape("intermediate_size", "model.layers.0.ffn.key.weight", 0)
    ranks = {f: from_shape(f"{f}_low_rank_dim", f"model.layers.0.attn.{m}.lora.0.weight", 0)
             for f, m in (("decay", "w_lora"), ("a", "a_lora"), ("gate", "g_lora"))}
    if L > 1:
        mv = from_shape("v_low_rank_dim", "model.layers.1.attn.v_lora.lora.0.weight", 0)
    else:
        mv = _config_int(cfg, "v_low_rank_dim", where, required=False) or 0
    return ModelConfig(n_layer=L, n_embd=C, head_size=N, vocab_size=V, dim_ffn=F, decay_lora=ranks["decay"],
                       aaa_lora=ranks["a"], mv_lora=mv, gate_lora=ranks["gate"])


def _check_hf_shapes(shapes: dict[str, tuple], cfg: ModelConfig, table: dict, tied: bool, where: Path) -> None:
    want = {}
    for official, shape in expected_shapes(cfg).items():
        if official in table:
            hf, how = table[official]
            want[hf] = _hf_shape(shape, how)
    old_mix = {f"model.layers.{i}.attn.x_x" for i in range(cfg.n_layer)}
    for i in range(cfg.n_layer):
        if f"model.layers.{i}.attn.x_x" in shapes:  # the old fused mix replaces the six x_* tensors
            for x in HF_MIX_ORDER:
                want.pop(f"model.layers.{i}.attn.{x}", None)
            want[f"model.layers.{i}.attn.x_x"] = (len(HF_MIX_ORDER), cfg.n_embd)
    if tied:
        want.pop("lm_head.weight")
    missing = sorted(set(want) - set(shapes))
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{where}: missing tensor(s) {missing[:5]}{more}")
    unused = {hf for hf, _ in HF_LAYER0_VALUE.values()}
    unexpected = sorted(set(shapes) - set(want) - old_mix - unused)
    if unexpected:
        more = f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise CheckpointError(f"{where}: unexpected tensor(s) {unexpected[:5]}{more} — not part of RWKV-7 x070 "
                              "in the fla layout")
    for name, shape in want.items():
        if tuple(shapes[name]) != shape:
            raise CheckpointError(f"{where}: tensor '{name}' has shape {list(shapes[name])}, expected {list(shape)}")


def _read_hf_tensors(where: dict[str, Path]) -> dict[str, torch.Tensor]:
    """Every tensor of the folder, shard by shard through safetensors (memory-mapped; no pickle)."""
    from safetensors import SafetensorError, safe_open

    out: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name, f in where.items():
        by_file.setdefault(f, []).append(name)
    for f, names in by_file.items():
        try:
            with safe_open(str(f), framework="pt", device="cpu") as handle:
                for name in names:
                    out[name] = handle.get_tensor(name)
        except (SafetensorError, RuntimeError, ValueError, OSError) as e:
            raise CheckpointError(f"{f}: corrupt safetensors file: {e}") from None
    return out


def load_hf_folder(path: str | os.PathLike, progress: bool = False) -> Checkpoint:
    """Read, validate and rename a Hugging Face / fla folder to the official layout.

    Shapes and config are checked from the headers before any tensor data is read; values (float dtype,
    finite) are checked under their Hugging Face names, so errors name what the user's files hold."""
    folder = Path(path)
    hf_cfg = read_hf_config(folder)
    _check_hf_architecture(hf_cfg, folder / HF_CONFIG)
    where, shapes, _ = _hf_headers(folder)
    cfg = _hf_config_to_model_config(hf_cfg, shapes, folder / HF_CONFIG)
    table = hf_name_map(cfg.n_layer)
    tied = bool(hf_cfg.get("tie_word_embeddings")) and "lm_head.weight" not in shapes
    _check_hf_shapes(shapes, cfg, table, tied, folder)
    hf_tensors = _read_hf_tensors(where)
    check_values(hf_tensors, str(folder), progress=progress)
    tensors = {}
    for official, (hf, how) in {**table, **HF_LAYER0_VALUE}.items():
        if hf in hf_tensors:
            tensors[official] = from_hf_tensor(hf_tensors[hf], how)
    for i in range(cfg.n_layer):
        fused = hf_tensors.get(f"model.layers.{i}.attn.x_x")
        if fused is not None:
            for row, x in enumerate(HF_MIX_ORDER):
                tensors[f"blocks.{i}.att.{x}"] = fused[row].reshape(1, 1, -1)
    if tied:
        tensors["head.weight"] = tensors["emb.weight"]
    check_keys_and_shapes({k: tuple(v.shape) for k, v in tensors.items()}, cfg, str(folder))
    return Checkpoint(str(folder), tensors, cfg, {})


def hf_config(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """config.json for a model written in the fla layout (the field names fla's RWKV7Config reads)."""
    return {
        "architectures": ["RWKV7ForCausalLM"], "model_type": "rwkv7",
        "hidden_size": cfg.n_embd, "num_hidden_layers": cfg.n_layer, "head_dim": cfg.head_size,
        "num_heads": cfg.n_head, "intermediate_size": cfg.dim_ffn, "hidden_ratio": cfg.dim_ffn / cfg.n_embd,
        "vocab_size": cfg.vocab_size, "decay_low_rank_dim": cfg.decay_lora, "a_low_rank_dim": cfg.aaa_lora,
        "v_low_rank_dim": cfg.mv_lora, "gate_low_rank_dim": cfg.gate_lora,
        "value_dim": [cfg.n_embd] * cfg.n_layer, "norm_eps": 1e-5, "norm_first": True, "norm_bias": True,
        "hidden_act": "sqrelu", "attn": None, "attn_mode": "chunk", "fuse_norm": True,
        "tie_word_embeddings": False, "use_cache": True, "bos_token_id": 0, "eos_token_id": 0,
        "torch_dtype": str(dtype).replace("torch.", ""),
    }


def to_hf_tensors(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Official-name tensors renamed and reshaped to the fla layout (layer-0 v0/v1/v2 dropped: unused)."""
    table = hf_name_map(cfg.n_layer)
    return {hf: to_hf_tensor(tensors[official], how) for official, (hf, how) in table.items()}


def write_hf_folder(path: str | os.PathLike, tensors: dict[str, torch.Tensor], cfg: ModelConfig,
                    dtype: torch.dtype) -> None:
    """Write config.json + model.safetensors into a new folder: built beside it, then renamed into place,
    so the folder appears complete or not at all."""
    import shutil
    import tempfile

    from safetensors.torch import save_file

    from .fileio import _umask as umask
    from .fileio import atomic_write_bytes, fsync_dir

    dest = Path(path)
    if cfg.deep_embed:
        raise CheckpointError(f"{dest}: the fla layout has no RWKV-7a DeepEmbed tensors; keep this model as an "
                              "official file or an edge-rwkv artifact")
    if dest.exists() and not (dest.is_dir() and not any(dest.iterdir())):
        raise CheckpointError(f"{dest}: already exists; choose a new folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        hf = {k: v.detach().to(dtype).contiguous().cpu() for k, v in to_hf_tensors(tensors, cfg).items()}
        save_file(hf, str(tmp / HF_WEIGHTS), metadata={"format": "pt"})
        with open(tmp / HF_WEIGHTS, "rb+") as f:
            os.fsync(f.fileno())
        atomic_write_bytes(tmp / HF_CONFIG, (json.dumps(hf_config(cfg, dtype), indent=2) + "\n").encode())
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700; give the folder the permissions mkdir would
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def source_sha256(path: str | os.PathLike) -> str:
    """Digest of a model's bytes: the file, or a Hugging Face folder's config and weight files in order."""
    import hashlib

    from .fileio import sha256_file

    p = Path(path)
    if not p.is_dir():
        return sha256_file(p)
    h = hashlib.sha256()
    for f in [p / HF_CONFIG] + hf_shard_files(p)[0]:
        h.update(f.name.encode() + b"\0" + bytes.fromhex(sha256_file(f)))
    return h.hexdigest()


# --------------------------------------------------------------------------- tuned initial states
#
# RWKV-PEFT "state tuning" trains one tensor per layer, `blocks.{i}.att.time_state` [H, N, N], and saves
# them alone (or merged into a model file). The orientation is the official x070 state's: rows index
# values, columns index keys (S ← S·diag(w) + … + v kᵀ) — RWKV-PEFT hands it to fla's kernels as
# `time_state.transpose(1, 2)`, because fla's initial_state is [H, K, V]. So it is read here as it is, no
# transpose. (The `.transpose(1, 2)` older loaders apply is for RWKV-6, whose state is [H, K, V].)

TIME_STATE = "blocks.{}.att.time_state"


def read_time_states(path: str | os.PathLike, cfg: ModelConfig) -> torch.Tensor:
    """The tuned WKV states [L, H, N, N] (fp32) of a state-tuning file (.pth or safetensors) for this model.

    Other tensors in the file are ignored (a file RWKV-PEFT merged into a model holds the weights too)."""
    from .errors import StateError

    try:
        tensors, _ = read_tensors(path)
    except CheckpointError as e:
        raise StateError(str(e)) from None
    found = {k for k in tensors if k.endswith(".att.time_state")}
    if not found:
        raise StateError(f"{path}: no '{TIME_STATE.format('N')}' tensors — not a state-tuning file")
    names = [TIME_STATE.format(i) for i in range(cfg.n_layer)]
    missing = [n for n in names if n not in tensors]
    extra = sorted(found - set(names))
    if missing or extra:
        raise StateError(f"{path}: holds time_state for {len(found)} layer(s) ({sorted(found)[:3]}…), "
                         f"this model has {cfg.n_layer} layers")
    want = (cfg.n_head, cfg.head_size, cfg.head_size)
    for n in names:
        t = tensors[n]
        if tuple(t.shape) != want:
            raise StateError(f"{path}: tensor '{n}' has shape {list(t.shape)}, this model needs {list(want)} "
                             f"(heads × head size × head size)")
        if not t.is_floating_point():
            raise StateError(f"{path}: tensor '{n}' has dtype {str(t.dtype).replace('torch.', '')}, expected a float type")
        if not bool(torch.isfinite(t).all()):
            raise StateError(f"{path}: tensor '{n}' contains NaN/Inf values")
    return torch.stack([tensors[n].float() for n in names])
