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

from .checkpoint import check_keys_and_shapes, check_values
from .config import ModelConfig
from .errors import CheckpointError
from .fileio import atomic_path

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


def config_from_metadata(meta: dict, path: str) -> ModelConfig:
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: artifact metadata names format {meta.get('format')!r}, expected {FORMAT!r}")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: artifact format version {version!r} is not supported (this runtime reads {FORMAT_VERSION})")
    if meta.get("tokenizer", TOKENIZER) != TOKENIZER:
        raise CheckpointError(f"{path}: artifact uses tokenizer {meta.get('tokenizer')!r}; only {TOKENIZER} is supported")
    try:
        return ModelConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: artifact config is invalid ({e})") from None


def quantized_names(meta: dict) -> dict[str, dict]:
    q = meta.get("quant") or {}
    specs = q.get("tensors") or {}
    if not isinstance(specs, dict):
        raise CheckpointError("artifact quant.tensors must be an object")
    return specs


def quantized_parts(name: str, tensors: dict) -> list[str]:
    """Stored tensor names of quantized weight `name` (values, scale, optional input scale)."""
    from .quant.formats import INPUT_SCALE_SUFFIX, SCALE_SUFFIX

    return [k for k in (name, name + SCALE_SUFFIX, name + INPUT_SCALE_SUFFIX) if k in tensors]


def load_quantized(name: str, spec: dict, tensors: dict, path: str):
    """The validated QuantizedWeight for `name` (errors name the file)."""
    from .quant.formats import QuantizedWeight

    try:
        return QuantizedWeight.from_stored(name, spec, tensors)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


def check_artifact(tensors: dict[str, torch.Tensor], meta: dict, cfg: ModelConfig, path: str, progress=False) -> None:
    """Keys and shapes against the config; quantized parts against their format; floats finite."""
    from .checkpoint import expected_shapes

    specs = quantized_names(meta)
    want = expected_shapes(cfg)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    float_names = set(shapes)
    for name, spec in specs.items():
        if name not in want:
            raise CheckpointError(f"{path}: quantized tensor '{name}' is not part of the model")
        if not isinstance(spec, dict):
            raise CheckpointError(f"{path}: quantization spec of '{name}' must be an object")
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
    check_values({k: tensors[k] for k in float_names if k in tensors}, path, progress=progress)


def write_artifact(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Atomically write tensors + metadata (the file appears complete or not at all)."""
    from safetensors.torch import save_file

    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata={"edge_rwkv": json.dumps(meta, sort_keys=True)})
