"""Device profiles (memory, bandwidth) and a planner: which precision of a model fits, and how fast it can go.

Decoding one token reads every weight once (the embedding only one row) and reads + writes the
recurrent state, so on these memory-bound devices the speed limit is

    tok/s ≤ memory bandwidth / (weight bytes streamed per token + 2 × state bytes)

and the model fits when weights + states (one per slot) + runtime overhead ≤ memory left by the
system. Jetsons share one LPDDR memory between CPU and GPU, so the operating system's share
comes off the same budget. The bound is a ceiling: real decoding reaches some fraction of it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .config import ModelConfig
from .errors import InputError

GB = 1e9
GiB = 1 << 30


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    title: str
    memory_bytes: int  # physical memory (shared CPU/GPU on Jetson)
    bandwidth: float  # peak memory bandwidth, bytes/s
    reserved_bytes: int  # estimate: memory taken by the OS and services before the model loads
    source: str  # where the memory and bandwidth figures come from


DEVICES: dict[str, DeviceProfile] = {p.name: p for p in (
    DeviceProfile(
        "orin-nano-8gb", "Jetson Orin Nano 8GB", 8 * GiB, 68 * GB, int(1.5 * GiB),
        "NVIDIA Jetson Orin Nano Series datasheet / Jetson Orin module comparison: 8 GB 128-bit LPDDR5, "
        "68 GB/s (102 GB/s in the JetPack 6.2 'Super' MAXN mode: profile orin-nano-8gb-super)"),
    DeviceProfile(
        "orin-nano-8gb-super", "Jetson Orin Nano 8GB (Super / MAXN SUPER)", 8 * GiB, 102 * GB, int(1.5 * GiB),
        "NVIDIA Jetson Orin Nano Super Developer Kit announcement and JetPack 6.2 release notes: "
        "memory clock raised, 102 GB/s"),
    DeviceProfile(
        "orin-nx-16gb", "Jetson Orin NX 16GB", 16 * GiB, 102.4 * GB, int(1.5 * GiB),
        "NVIDIA Jetson Orin NX Series datasheet / Jetson Orin module comparison: 16 GB 128-bit LPDDR5, 102.4 GB/s"),
    DeviceProfile(
        "agx-orin-64gb", "Jetson AGX Orin 64GB", 64 * GiB, 204.8 * GB, 2 * GiB,
        "NVIDIA Jetson AGX Orin Series datasheet / Jetson Orin module comparison: 64 GB 256-bit LPDDR5, 204.8 GB/s"),
    DeviceProfile(
        "thor", "Jetson AGX Thor (T5000, 128GB)", 128 * GiB, 273 * GB, 3 * GiB,
        "NVIDIA Jetson AGX Thor Developer Kit / Jetson T5000 module specifications: 128 GB 256-bit LPDDR5X, 273 GB/s"),
)}

# Reserved memory is an estimate (a headless JetPack image with its services uses roughly 1-1.5 GB on the
# small modules; a desktop session adds more). Runtime overhead (CUDA context, allocator slack, kernels,
# activations and the logits of a step) is an estimate too:
RUNTIME_OVERHEAD = int(0.6 * GiB)
PRECISIONS = ("fp16", "int8", "int4")

# Released RWKV-7 "World" (x070) sizes, for planning without the file. LoRA ranks are those of the
# released checkpoints as far as they are known; they are < 2 % of the parameters either way.
PRESETS: dict[str, ModelConfig] = {
    "rwkv7-0.1b": ModelConfig(12, 768, 64, 65536, 3072, 64, 64, 32, 128),
    "rwkv7-0.4b": ModelConfig(24, 1024, 64, 65536, 4096, 64, 64, 32, 128),
    "rwkv7-1.5b": ModelConfig(24, 2048, 64, 65536, 8192, 96, 96, 64, 256),
    "rwkv7-2.9b": ModelConfig(32, 2560, 64, 65536, 10240, 96, 96, 64, 320),
    "rwkv7-7.2b": ModelConfig(32, 4096, 64, 65536, 16384, 128, 128, 96, 480),
}


def get_device(name: str) -> DeviceProfile:
    key = name.lower().strip()
    if key not in DEVICES:
        raise InputError(f"unknown device {name!r}; known: {', '.join(DEVICES)}")
    return DEVICES[key]


def _shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    from .checkpoint import expected_shapes

    return expected_shapes(cfg)


def _quant_bytes(name: str, shape: tuple[int, ...], precision: str, quantize_head: bool) -> int:
    """Stored bytes of one tensor at a precision, following the quantization policy's choices."""
    n = math.prod(shape)
    if precision == "fp16" or len(shape) != 2:
        return 2 * n
    bits = 8 if precision == "int8" else 4
    try:
        from .quant.policy import quant_format_for

        spec = quant_format_for(name, shape, bits, quantize_head=quantize_head)
        return 2 * n if spec is None else int(spec.nbytes(tuple(shape)))
    except ImportError:  # the quant subpackage is absent: the policy's defaults, estimated
        import re

        big = re.match(r"^blocks\.(\d+)\.(att\.(receptance|key|value|output)|ffn\.(key|value))\.weight$", name)
        if not (big and not (big.group(1) == "0" and big.group(3) == "output")) and not (
                quantize_head and name == "head.weight"):
            return 2 * n
        out, k = shape
        return out * k + 2 * out if bits == 8 else out * k // 2 + 2 * out * (k // 128)


def weight_bytes(cfg: ModelConfig, precision: str, quantize_head: bool = False) -> tuple[int, int]:
    """(bytes resident in memory, bytes streamed per decoded token)."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    resident = streamed = 0
    for name, shape in _shapes(cfg).items():
        b = _quant_bytes(name, shape, precision, quantize_head)
        resident += b
        streamed += b if name != "emb.weight" else b // shape[0]  # one embedding row per token
    return resident, streamed


def plan(cfg: ModelConfig, device: str | DeviceProfile, slots: int = 1, quantize_head: bool = False) -> dict:
    dev = device if isinstance(device, DeviceProfile) else get_device(device)
    if slots < 1:
        raise InputError("slots must be ≥ 1")
    state = cfg.state_bytes(1)
    budget = dev.memory_bytes - dev.reserved_bytes
    rows = []
    for p in PRECISIONS:
        resident, streamed = weight_bytes(cfg, p, quantize_head)
        need = resident + slots * state + RUNTIME_OVERHEAD
        per_token = streamed + 2 * state
        rows.append({
            "precision": p, "weights_bytes": resident, "state_bytes": slots * state,
            "overhead_bytes": RUNTIME_OVERHEAD, "total_bytes": need, "fits": need <= budget,
            "headroom_bytes": budget - need, "bytes_per_token": per_token,
            "tok_s_bound": dev.bandwidth / per_token,
            "tok_s_bound_batch": slots * dev.bandwidth / (streamed + 2 * slots * state),
        })
    fitting = [r["precision"] for r in rows if r["fits"]]
    return {"device": asdict(dev), "config": cfg.to_dict(), "slots": slots, "budget_bytes": budget,
            "rows": rows, "recommended": fitting[0] if fitting else None}


def config_of(model: str) -> ModelConfig:
    """A preset name (rwkv7-1.5b, …) or a model file (safetensors header only when possible)."""
    if model.lower() in PRESETS:
        return PRESETS[model.lower()]
    from pathlib import Path

    from .checkpoint import derive_config, is_hf_folder, load_checkpoint, read_safetensors_header
    from .errors import CheckpointError

    path = Path(model)
    if is_hf_folder(path):
        return load_checkpoint(path).config
    if not path.is_file():
        raise InputError(f"{model}: no such model file (or use a preset: {', '.join(PRESETS)})")
    if path.suffix == ".safetensors":
        try:
            header, meta = read_safetensors_header(path)
            if "config" in meta or any(k.endswith(".scale") for k in header):
                raise CheckpointError("artifact: read fully")
            return derive_config({}, str(path), shapes={k: tuple(v["shape"]) for k, v in header.items()})
        except CheckpointError:
            pass
    return load_checkpoint(path).config


def plan_model(model: str, device: str, slots: int = 1, quantize_head: bool = False) -> dict:
    result = plan(config_of(model), device, slots, quantize_head)
    result["model"] = model
    return result


def _h(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def format_plan(r: dict) -> str:
    d, c = r["device"], r["config"]
    lines = [
        f"{d['title']}: {_h(d['memory_bytes'])} shared memory, {d['bandwidth'] / GB:.1f} GB/s peak bandwidth",
        f"  source: {d['source']}",
        f"  budget for the model: {_h(r['budget_bytes'])} (≈{_h(d['reserved_bytes'])} reserved for the system, estimate)",
        f"model {r.get('model', '')}: {c['n_layer']} layers, width {c['n_embd']}, vocab {c['vocab_size']}; "
        f"{r['slots']} slot(s)",
        "",
        f"{'precision':9s} {'weights':>10s} {'state':>10s} {'overhead':>9s} {'total':>10s} {'fits':>5s} "
        f"{'tok/s bound':>12s}" + (f" {'batch tok/s':>12s}" if r["slots"] > 1 else ""),
    ]
    for row in r["rows"]:
        lines.append(
            f"{row['precision']:9s} {_h(row['weights_bytes']):>10s} {_h(row['state_bytes']):>10s} "
            f"{_h(row['overhead_bytes']):>9s} {_h(row['total_bytes']):>10s} {'yes' if row['fits'] else 'NO':>5s} "
            f"{row['tok_s_bound']:>12.1f}" + (f" {row['tok_s_bound_batch']:>12.1f}" if r["slots"] > 1 else ""))
    rec = r["recommended"]
    lines.append("")
    lines.append(f"recommended: {rec} (the most precise that fits)" if rec else
                 "recommended: none — the model does not fit this device at any precision")
    lines.append("tok/s bound = bandwidth / (weight bytes read per token + 2 × state); real decoding reaches a "
                 "fraction of it")
    return "\n".join(lines)
