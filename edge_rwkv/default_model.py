"""The small model shipped inside the package, used when a command is given no model file."""
from __future__ import annotations

from pathlib import Path

from .errors import EdgeRWKVError

ASSET = Path(__file__).parent / "assets" / "default.safetensors"


def default_model_path() -> Path:
    if not ASSET.is_file():
        raise EdgeRWKVError("no model given and the embedded default model is not installed; pass a model file")
    return ASSET


def resolve_model(path) -> str:
    """The given path, or the embedded default model when none is given."""
    return str(path) if path else str(default_model_path())
