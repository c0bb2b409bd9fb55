"""The project's model artifact: one safetensors file whose header metadata holds `edge_rwkv` JSON.

Metadata (format_version 1):
    {"format": "edge-rwkv-model", "format_version": 1,
     "config": ModelConfig fields, "dtype": "float16" | "bfloat16" | "float32",
     "tokenizer": "rwkv_vocab_v20230424", "source_sha256": hex or null,
     "quant": {"policy": {...}, "tensors": {official_name: format spec}}}
Dense tensors keep their official names. A quantized tensor `X` is stored as `X.<part>` for each part
its format defines (see edge_rwkv.quant.formats); `X` itself is absent.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from .config import ModelConfig
from .errors import CheckpointError
from .fileio import atomic_path
from .keys import check_keys_and_shapes, check_layer_count, expected_shapes
from .quant.formats import INPUT_SCALE_SUFFIX, SCALE_SUFFIX, QuantizedWeight
from .schema import ANY, Int, Num, Obj, Opt, SchemaError, Str

FORMAT = "edge-rwkv-model"
FORMAT_VERSION = 1
TOKENIZER = "rwkv_vocab_v20230424"


def make_metadata(cfg: ModelConfig, dtype: str, source_sha256: str | None = None, quant: dict | None = None) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": cfg.to_dict(),
        "dtype": dtype,
        "tokenizer": TOKENIZER,
        "source_sha256": source_sha256,
        "quant": quant or {"policy": None, "tensors": {}},
    }


# Ranges wide enough for any RWKV-7 yet small enough that no check loops or allocates without bound
# (the layer count is further checked against the tensors the file holds before anything is built).
CONFIG_SCHEMA = Obj({
    "n_layer": Int(1, 1 << 12), "n_embd": Int(1, 1 << 16), "head_size": Int(1, 1 << 10),
    "vocab_size": Int(1, 1 << 24), "dim_ffn": Int(1, 1 << 20), "decay_lora": Int(1, 1 << 14),
    "aaa_lora": Int(1, 1 << 14), "mv_lora": Int(0, 1 << 14), "gate_lora": Int(1, 1 << 14),
})
METADATA_SCHEMA = Obj({
    "format": Str(), "format_version": Int(), "config": CONFIG_SCHEMA,
    "dtype": Str(choices=("float16", "bfloat16", "float32")),
    "tokenizer": Str(), "source_sha256": Opt(Str(64, pattern="[0-9a-f]{64}")),
    "quant": Obj({"policy": Opt(Obj({})), "tensors": Obj({}, extra=Obj({}))}, optional=frozenset({"policy"})),
    "default_model": Obj({"name": Str(), "trained_on": Str(), "heldout_ppl": Num(), "quantization": Str()}),
    "training": ANY,
}, optional=frozenset({"dtype", "tokenizer", "source_sha256", "quant", "default_model", "training"}))


def config_from_metadata(meta: dict, path: str) -> ModelConfig:
    """The model config of an artifact, after its whole metadata passed METADATA_SCHEMA."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: artifact metadata must be a JSON object, found {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: artifact metadata names format {meta.get('format')!r}, expected {FORMAT!r}")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: artifact format version {version!r} is not supported (this runtime reads {FORMAT_VERSION})")
    if meta.get("tokenizer", TOKENIZER) != TOKENIZER:
        raise CheckpointError(f"{path}: artifact uses tokenizer {meta.get('tokenizer')!r}; only {TOKENIZER} is supported")
    try:
        METADATA_SCHEMA.check(meta, "")
    except SchemaError as e:
        raise CheckpointError(f"{path}: artifact metadata is invalid: {e}") from None
    cfg = ModelConfig.from_dict(meta["config"])
    if cfg.n_embd % cfg.head_size:
        raise CheckpointError(f"{path}: artifact config is invalid: n_embd {cfg.n_embd} is not a multiple of "
                              f"head_size {cfg.head_size}")
    return cfg


def quantized_names(meta: dict) -> dict[str, dict]:
    """Quantization spec per tensor name (the metadata passed METADATA_SCHEMA)."""
    return (meta.get("quant") or {}).get("tensors") or {}


def quantized_parts(name: str, tensors: dict) -> list[str]:
    """Stored tensor names of quantized weight `name` (values, scale, optional input scale)."""
    return [k for k in (name, name + SCALE_SUFFIX, name + INPUT_SCALE_SUFFIX) if k in tensors]


def load_quantized(name: str, spec: dict, tensors: dict, path: str):
    """The validated QuantizedWeight for `name` (errors name the file)."""
    try:
        return QuantizedWeight.from_stored(name, spec, tensors)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


def check_artifact_layout(tensors: dict[str, torch.Tensor], meta: dict, cfg: ModelConfig, path: str) -> list[str]:
    """Keys and shapes against the config, quantized parts against their format; returns the names of
    the float tensors (dense weights, scales) whose values the reader then checks (float, finite)."""
    specs = quantized_names(meta)
    check_layer_count(tensors, cfg.n_layer, path)  # before expected_shapes walks n_layer layers
    want = expected_shapes(cfg)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    float_names = set(shapes)
    for name, spec in specs.items():
        if name not in want:
            raise CheckpointError(f"{path}: quantized tensor '{name}' is not part of the model")
        qw = load_quantized(name, spec, tensors, path)
        if tuple(qw.shape) != tuple(want[name]):
            raise CheckpointError(f"{path}: quantized tensor '{name}' has logical shape {list(qw.shape)}, "
                                  f"expected {list(want[name])}")
        for part in quantized_parts(name, tensors):
            shapes.pop(part, None)
            float_names.discard(part)
        shapes[name] = tuple(want[name])
        float_names.update(k for k in quantized_parts(name, tensors) if k != name)  # scales must be finite
    check_keys_and_shapes(shapes, cfg, path)
    return [k for k in tensors if k in float_names]


def write_artifact(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Atomically write tensors + metadata (the file appears complete or not at all)."""
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata={"edge_rwkv": json.dumps(meta, sort_keys=True)})
