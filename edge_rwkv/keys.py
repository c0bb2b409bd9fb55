"""The official RWKV-7 x070 weight names and shapes: the one place that says which tensors a model has.

Names are those of BlinkDL's checkpoints (`emb.weight`, `blocks.{i}.att.r_k`, …); every other spelling
(trainer wrappers, the Hugging Face / fla layout) is translated to these by checkpoint.py on reading.
The checks here look at names and shapes only — never at tensor data — so they run on a file's header
before any tensor is read.
"""
from __future__ import annotations

import math
import re

from .config import ModelConfig
from .errors import CheckpointError

# Per-layer tensors of RWKV-7 x070 under `blocks.{i}.`; v0/v1/v2 are unused (and optional) in layer 0.
ATT_VECTORS = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a")
ATT_LORA = (("w1", "w2"), ("a1", "a2"), ("v1", "v2"), ("g1", "g2"))
ATT_LINEARS = ("receptance", "key", "value", "output")
LAYER0_OPTIONAL = {"att.v0", "att.v1", "att.v2"}


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


def parameter_count(cfg: ModelConfig) -> int:
    """Logical parameters (layer-0 v0/v1/v2 excluded: unused), whatever the storage format."""
    return sum(math.prod(shape) for shape in expected_shapes(cfg).values())
