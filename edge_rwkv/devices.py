"""Device profiles (memory, bandwidth) and a planner: which precision of a model fits, and how fast it can go.

Decoding one token reads every weight once (the embedding only one row) and reads + writes the
recurrent state, so on these memory-bound devices the speed limit is

    tok/s ≤ memory bandwidth / (weight bytes streamed per token + 2 × state bytes)

and real decoding reaches a fraction of it (EFFICIENCY, printed beside the bound).

Memory: a Jetson's CPU and GPU share one DRAM, and Linux sees less than the module's capacity (the
firmware carves out memory for the boot processors, the secure world and the display/camera engines).
From what Linux sees, the OS and its services take their share; the daemon then needs, at its worst,

    steady state: weights + allocator slack + CUDA context + Python/torch/tokenizer
                  + states (2 per decode slot: current and next, + one per hot session kept in memory)
                  + step activations (logits and sampling buffers per slot, a prefill chunk)
    load peak:    weights + the stored embedding (alive while its ln0-folded copy is built)
                  + chunk transients + CUDA context + Python/torch/tokenizer

(api.load reads tensors to the device one at a time, so no host copy of the weights is counted).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .config import ModelConfig
from .errors import InputError
from .quant.policy import QuantPolicy
from .runtime.sizes import MIN_CHUNK, chunk_cost, gpu_prefill_chunk
from .synthetic import HEAD_SIZE, VOCAB, lora_ranks
from .synthetic import PRESETS as RANDOM_PRESETS

GB = 1e9
GiB = 1 << 30
MiB = 1 << 20


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    title: str
    memory_bytes: int  # physical memory (shared CPU/GPU on Jetson)
    visible_bytes: int  # estimate: what Linux sees (MemTotal) after the firmware carve-outs
    bandwidth: float  # peak memory bandwidth, bytes/s
    reserved_bytes: int  # estimate: memory taken by a headless OS and its services before the model loads
    source: str  # where the memory and bandwidth figures come from


def _gib(x: float) -> int:
    return int(x * GiB)


_ORIN = ("NVIDIA Jetson Orin module data sheets / Jetson Orin module comparison: {mem}, {bw}. Visible memory "
         "{vis} GiB is an estimate (firmware carve-outs; check MemTotal in /proc/meminfo and pass --visible)")
_SUPER = " in the JetPack 6.2 'MAXN SUPER' power mode (memory clock raised; JetPack 6.2 release notes)"
DEVICES: dict[str, DeviceProfile] = {p.name: p for p in (
    DeviceProfile("orin-nano-4gb", "Jetson Orin Nano 4GB", _gib(4), _gib(3.4), 34 * GB, _gib(1.0),
                  _ORIN.format(mem="4 GB 64-bit LPDDR5", bw="34 GB/s", vis="3.4")),
    DeviceProfile("orin-nano-4gb-super", "Jetson Orin Nano 4GB (MAXN SUPER)", _gib(4), _gib(3.4), 51 * GB,
                  _gib(1.0), _ORIN.format(mem="4 GB 64-bit LPDDR5", bw="51 GB/s" + _SUPER, vis="3.4")),
    DeviceProfile("orin-nano-8gb", "Jetson Orin Nano 8GB", _gib(8), _gib(7.4), 68 * GB, _gib(1.0),
                  _ORIN.format(mem="8 GB 128-bit LPDDR5", bw="68 GB/s (102 GB/s in MAXN SUPER: "
                               "profile orin-nano-8gb-super)", vis="7.4")),
    DeviceProfile("orin-nano-8gb-super", "Jetson Orin Nano 8GB (MAXN SUPER)", _gib(8), _gib(7.4), 102 * GB,
                  _gib(1.0), _ORIN.format(mem="8 GB 128-bit LPDDR5", bw="102 GB/s" + _SUPER, vis="7.4")),
    DeviceProfile("orin-nx-8gb", "Jetson Orin NX 8GB", _gib(8), _gib(7.4), 102.4 * GB, _gib(1.0),
                  _ORIN.format(mem="8 GB 128-bit LPDDR5", bw="102.4 GB/s", vis="7.4")),
    DeviceProfile("orin-nx-16gb", "Jetson Orin NX 16GB", _gib(16), _gib(15.3), 102.4 * GB, _gib(1.0),
                  _ORIN.format(mem="16 GB 128-bit LPDDR5", bw="102.4 GB/s", vis="15.3")),
    DeviceProfile("agx-orin-32gb", "Jetson AGX Orin 32GB", _gib(32), _gib(30.5), 204.8 * GB, _gib(1.5),
                  _ORIN.format(mem="32 GB 256-bit LPDDR5", bw="204.8 GB/s", vis="30.5")),
    DeviceProfile("agx-orin-64gb", "Jetson AGX Orin 64GB", _gib(64), _gib(61.3), 204.8 * GB, _gib(1.5),
                  _ORIN.format(mem="64 GB 256-bit LPDDR5", bw="204.8 GB/s", vis="61.3")),
    DeviceProfile("thor-t4000", "Jetson T4000 (64GB)", _gib(64), _gib(61.0), 273 * GB, _gib(1.5),
                  "NVIDIA Jetson T4000 module announcement (JetPack 7.1, Jetson Linux 38.4): 64 GB 256-bit LPDDR5X, "
                  "273 GB/s. Visible memory 61 GiB is an estimate (check MemTotal and pass --visible)"),
    DeviceProfile("thor", "Jetson AGX Thor (T5000, 128GB)", _gib(128), _gib(122.0), 273 * GB, _gib(2.0),
                  "NVIDIA Jetson AGX Thor Developer Kit / Jetson T5000 module specifications: 128 GB 256-bit "
                  "LPDDR5X, 273 GB/s. Visible memory 122 GiB is an estimate (check MemTotal and pass --visible)"),
)}
ALIASES = {"thor-t5000": "thor", "agx-thor": "thor"}

# The runtime's own share (estimates are marked; "measured" figures come from benchmarks/load_peak.py on a CPU,
# torch 2.13): the CUDA context with cuBLAS and the kernels it loads is at least 1 GiB on a Jetson (not
# measured here: no Jetson in development; the figure reviewers report for JetPack 6); the interpreter with
# torch imported 0.22 GiB and the tokenizer's tables 0.24 GiB (measured).
CUDA_CONTEXT = _gib(1.0)
PROCESS_BASE = _gib(0.22 + 0.24)
# The load's transients beyond the stored embedding: row chunks of the ln0 fold (8192 rows, fp32) and the
# finiteness check's mask (2^24 elements), ≈0.1 GiB at the sizes measured.
LOAD_TRANSIENT = _gib(0.1)
# The CUDA caching allocator rounds a request up to 512 B, and one of 10 MiB or more up to 2 MiB (smaller
# ones share pooled segments), and keeps freed blocks for reuse: slack = the weights' rounding + this
# fraction of the other device allocations (states of the slots, step activations).
ALLOCATOR_LARGE = 10 * MiB
ALLOCATOR_SLACK = 0.10
# Share of the bandwidth bound decoding reaches. MLC's published int4 decode on an Orin Nano sits at
# 75-80 % of the bound (Llama-3.2-3B 27.7 tok/s, 43 with MAXN SUPER; Llama-3.1-8B 14 → 19): the top of
# the range. Half the bound is the bottom: this runtime has not yet been measured on a Jetson.
EFFICIENCY = (0.50, 0.80)
PRECISION_BITS = {"fp16": 16, "int8": 8, "int4": 4}  # the quantization policy's bits of each
PRECISIONS = tuple(PRECISION_BITS)
SERVE_SLOTS = 4  # `edge-rwkv serve` defaults, which the plan follows unless told otherwise
SERVE_HOT_SESSIONS = 64

# Released RWKV-7 "World" (x070) sizes, for planning without the file. LoRA ranks are those of the
# released checkpoints as far as they are known; they are < 2 % of the parameters either way.
PRESETS: dict[str, ModelConfig] = {
    "rwkv7-0.1b": ModelConfig(12, 768, 64, 65536, 3072, 64, 64, 32, 128),
    "rwkv7-0.4b": ModelConfig(24, 1024, 64, 65536, 4096, 64, 64, 32, 128),
    "rwkv7-1.5b": ModelConfig(24, 2048, 64, 65536, 8192, 96, 96, 64, 256),
    "rwkv7-2.9b": ModelConfig(32, 2560, 64, 65536, 10240, 96, 96, 64, 320),
    "rwkv7-7.2b": ModelConfig(32, 4096, 64, 65536, 16384, 128, 128, 96, 480),
}


def preset_config(name: str) -> ModelConfig | None:
    """A released size ("rwkv7-1.5b" or "1.5b"), or a random-weight shape `edge-rwkv bench --preset` knows."""
    key = name.lower().strip()
    for k in (key, f"rwkv7-{key}"):
        if k in PRESETS:
            return PRESETS[k]
    if key in RANDOM_PRESETS:  # e.g. "tiny": the shape bench draws random weights for
        n_layer, n_embd = RANDOM_PRESETS[key]
        r = lora_ranks(n_embd)
        return ModelConfig(n_layer, n_embd, HEAD_SIZE, VOCAB, 4 * n_embd, r["decay"], r["aaa"], r["mv"], r["gate"])
    return None


def get_device(name: str) -> DeviceProfile:
    key = name.lower().strip()
    key = ALIASES.get(key, key)
    if key not in DEVICES:
        raise InputError(f"unknown device {name!r}; known: {', '.join(DEVICES)}")
    return DEVICES[key]


def _shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    from .keys import expected_shapes

    return expected_shapes(cfg)


def _stored_bytes(spec, shape: tuple[int, ...]) -> int:
    """Bytes of one tensor stored under a quantization spec (None: fp16)."""
    return 2 * math.prod(shape) if spec is None else int(spec.nbytes(tuple(shape)))


def tensor_bytes(cfg: ModelConfig, precision: str, quantize_head: bool = False) -> dict[str, int]:
    """Stored bytes of each weight tensor at a precision, following the quantization policy's choices."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    policy = QuantPolicy(bits=PRECISION_BITS[precision], quantize_head=quantize_head)
    return {name: _stored_bytes(policy.format_for(name, shape), shape) for name, shape in _shapes(cfg).items()}


def weight_bytes(cfg: ModelConfig, precision: str, quantize_head: bool = False) -> tuple[int, int]:
    """(bytes resident in memory, bytes streamed per decoded token)."""
    sizes = tensor_bytes(cfg, precision, quantize_head)
    resident = sum(sizes.values())
    streamed = resident - sizes["emb.weight"] + sizes["emb.weight"] // cfg.vocab_size  # one embedding row
    return resident, streamed


def _allocations(shape: tuple[int, ...], stored: int) -> list[int]:
    """The device allocations behind one stored tensor: a quantized matrix is its values plus its scales."""
    n = math.prod(shape)
    if stored == 2 * n:
        return [stored]
    values = n if stored >= n else n // 2  # int8, or int4 (the policy stores some int4 requests as int8)
    return [values, stored - values]


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


def memory_rows(cfg: ModelConfig, precision: str, slots: int, hot_sessions: int, quantize_head: bool,
                chunk: int | None = None) -> dict:
    """The memory model of the module docstring for one precision, in bytes; `chunk`: the prefill chunk
    (default: the one the runtime picks for this model)."""
    sizes = tensor_bytes(cfg, precision, quantize_head)
    weights = sum(sizes.values())
    state = cfg.state_bytes(1)
    states = (2 * slots + hot_sessions) * state
    # logits fp32 + sampling buffers (probabilities, sorted copy, indices) per slot; the prefill chunk the
    # runtime picks for this model (runtime/sizes.py: what a captured chunk holds, measured on an H200)
    chunk = chunk or default_chunk(cfg, precision)
    activations = 4 * slots * cfg.vocab_size * 4 + chunk_cost(chunk, cfg.n_embd)
    slack = (sum(_round_up(b, 2 * MiB if b >= ALLOCATOR_LARGE else 512) - b
                 for name, shape in _shapes(cfg).items() for b in _allocations(shape, sizes[name]))
             + int(ALLOCATOR_SLACK * (slots * 2 * state + activations)))
    runtime = CUDA_CONTEXT + PROCESS_BASE
    steady = weights + slack + runtime + states + activations
    load_peak = weights + sizes["emb.weight"] + LOAD_TRANSIENT + runtime
    return {"weights_bytes": weights, "state_bytes": state, "states_bytes": states, "prefill_chunk": chunk,
            "activation_bytes": activations, "slack_bytes": slack, "runtime_bytes": runtime,
            "steady_bytes": steady, "load_peak_bytes": load_peak, "total_bytes": max(steady, load_peak)}


def default_chunk(cfg: ModelConfig, precision: str) -> int:
    return gpu_prefill_chunk(cfg.n_embd, quantized=precision != "fp16")


def fitting_memory_rows(cfg: ModelConfig, precision: str, slots: int, hot_sessions: int, quantize_head: bool,
                        budget: int) -> dict:
    """memory_rows with the runtime's prefill chunk, or — where that does not fit — the largest smaller one
    that does (what `--max-memory` makes the runtime pick), down to MIN_CHUNK."""
    chunk = default_chunk(cfg, precision)
    mem = memory_rows(cfg, precision, slots, hot_sessions, quantize_head, chunk)
    while mem["total_bytes"] > budget and chunk > MIN_CHUNK:
        chunk //= 2
        mem = memory_rows(cfg, precision, slots, hot_sessions, quantize_head, chunk)
    return mem


def plan(cfg: ModelConfig, device: str | DeviceProfile, slots: int = SERVE_SLOTS,
         hot_sessions: int = SERVE_HOT_SESSIONS, quantize_head: bool = False,
         visible_bytes: int | None = None) -> dict:
    dev = device if isinstance(device, DeviceProfile) else get_device(device)
    if slots < 1:
        raise InputError("slots must be ≥ 1")
    if hot_sessions < 0:
        raise InputError("hot sessions must be ≥ 0")
    visible = dev.visible_bytes if visible_bytes is None else visible_bytes
    if not 0 < visible <= dev.memory_bytes:
        raise InputError(f"visible memory must lie in (0, {dev.memory_bytes / GiB:.1f}] GiB for {dev.title}")
    budget = visible - dev.reserved_bytes
    state = cfg.state_bytes(1)
    rows = []
    for p in PRECISIONS:
        _, streamed = weight_bytes(cfg, p, quantize_head)
        mem = fitting_memory_rows(cfg, p, slots, hot_sessions, quantize_head, budget)
        per_token = streamed + 2 * state
        bound = dev.bandwidth / per_token
        rows.append({
            "precision": p, **mem, "fits": mem["total_bytes"] <= budget,
            "needs_max_memory": mem["prefill_chunk"] < default_chunk(cfg, p),
            # what torch may allocate on the device (the runtime's --max-memory): the budget less the process,
            # the allocator's slack and the hot sessions' states (held by the daemon, outside the engine)
            "max_memory_bytes": budget - mem["runtime_bytes"] - mem["slack_bytes"] - hot_sessions * state,
            "headroom_bytes": budget - mem["total_bytes"], "bytes_per_token": per_token,
            "tok_s_bound": bound, "tok_s_expected": [bound * e for e in EFFICIENCY],
            "tok_s_bound_batch": slots * dev.bandwidth / (streamed + 2 * slots * state),
        })
    fitting = [r["precision"] for r in rows if r["fits"]]
    return {"device": asdict(dev), "config": cfg.to_dict(), "slots": slots, "hot_sessions": hot_sessions,
            "visible_bytes": visible, "budget_bytes": budget, "efficiency": list(EFFICIENCY),
            "rows": rows, "recommended": fitting[0] if fitting else None}


def config_of(model: str) -> ModelConfig:
    """A preset name (rwkv7-1.5b, 1.5b, …) or a model file (safetensors header only when possible)."""
    preset = preset_config(model)
    if preset is not None:
        return preset
    from pathlib import Path

    from .checkpoint import derive_config, is_hf_folder, load_checkpoint, read_header
    from .errors import CheckpointError

    path = Path(model)
    if is_hf_folder(path):
        return load_checkpoint(path).config
    if not path.is_file():
        names = ", ".join(PRESETS) + " (or without the rwkv7- prefix)"
        raise InputError(f"{model}: no such model file (or use a preset: {names})")
    if path.suffix == ".safetensors":
        try:
            header = read_header(path)
            if "config" in header.metadata or any(k.endswith(".scale") for k in header.tensors):
                raise CheckpointError("artifact: read fully")
            return derive_config({}, str(path), shapes={k: tuple(v["shape"]) for k, v in header.tensors.items()})
        except CheckpointError:
            pass
    return load_checkpoint(path).config


def plan_model(model: str, device: str, slots: int = SERVE_SLOTS, hot_sessions: int = SERVE_HOT_SESSIONS,
               quantize_head: bool = False, visible_bytes: int | None = None) -> dict:
    result = plan(config_of(model), device, slots, hot_sessions, quantize_head, visible_bytes)
    result["model"] = model
    return result


def _h(n: float) -> str:
    """Binary units, named as such (GiB, not GB)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def format_plan(r: dict) -> str:
    d, c = r["device"], r["config"]
    lo, hi = r["efficiency"]
    lines = [
        f"{d['title']}: {_h(d['memory_bytes'])} shared CPU/GPU memory, ≈{_h(r['visible_bytes'])} visible to Linux "
        f"(firmware carve-outs), {d['bandwidth'] / GB:.1f} GB/s peak bandwidth",
        f"  source: {d['source']}",
        f"  budget: {_h(r['budget_bytes'])} (visible − ≈{_h(d['reserved_bytes'])} for a headless OS and its "
        f"services, estimate)",
        f"model {r.get('model', '')}: {c['n_layer']} layers, width {c['n_embd']}, vocab {c['vocab_size']}; "
        f"state {_h(r['rows'][0]['state_bytes'])} per sequence; {r['slots']} slot(s), {r['hot_sessions']} hot "
        f"session(s)",
        "",
        f"{'precision':9s} {'weights':>10s} {'states':>10s} {'runtime':>10s} {'slack':>10s} {'steady':>10s} "
        f"{'load peak':>10s} {'fits':>5s} {'tok/s bound':>11s} {'expected':>13s}",
    ]
    for row in r["rows"]:
        exp = row["tok_s_expected"]
        lines.append(
            f"{row['precision']:9s} {_h(row['weights_bytes']):>10s} {_h(row['states_bytes']):>10s} "
            f"{_h(row['runtime_bytes'] + row['activation_bytes']):>10s} {_h(row['slack_bytes']):>10s} "
            f"{_h(row['steady_bytes']):>10s} {_h(row['load_peak_bytes']):>10s} {'yes' if row['fits'] else 'NO':>5s} "
            f"{row['tok_s_bound']:>11.1f} {exp[0]:>6.1f}–{exp[1]:<6.1f}"
            + (f"  (with --max-memory {row['max_memory_bytes'] / GiB:.2f}G: prefill chunk {row['prefill_chunk']})"
               if row["fits"] and row["needs_max_memory"] else ""))
    rec = r["recommended"]
    lines += [
        "",
        f"recommended: {rec} (the most precise that fits)" if rec else
        "recommended: none — the model does not fit this device at any precision (try fewer --hot-sessions "
        "or --slots, or a smaller model)",
        f"states = (2 per slot + 1 per hot session) × state; runtime = CUDA context ≈{_h(CUDA_CONTEXT)} "
        f"(estimate) + interpreter, torch and tokenizer {_h(PROCESS_BASE)} + step activations (logits, "
        "sampling, one prefill chunk: the runtime's, or the smaller one a --max-memory budget picks);",
        "load peak = weights + the stored embedding + chunk transients + runtime (tensors go to the GPU one at "
        "a time); fits = max(steady, load peak) ≤ budget",
        f"tok/s bound = bandwidth / (weight bytes read per token + 2 × state), one sequence; expected = bound × "
        f"{lo:.2f}–{hi:.2f} (MLC's int4 decode on an Orin Nano reaches 75–80 % of its bound; this runtime is "
        "not yet measured on a Jetson)",
    ]
    if r["slots"] > 1:
        lines.append(f"all {r['slots']} slots decoding together: ≤ "
                     + ", ".join(f"{row['precision']} {row['tok_s_bound_batch']:.0f}" for row in r["rows"])
                     + " tok/s in total (bound)")
    return "\n".join(lines)
