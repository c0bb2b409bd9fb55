"""The versions of the tools an export was made with, recorded in its manifest ("tools")."""
from __future__ import annotations

import platform

import numpy
import torch

import edge_rwkv


def tool_versions() -> dict:
    """{tool: version} of edge-rwkv, its ONNX stack, torch, numpy and Python (None: not installed)."""
    v = {"edge_rwkv": edge_rwkv.__version__, "onnx": _version_of("onnx"), "torch": torch.__version__,
         "numpy": numpy.__version__, "python": platform.python_version()}
    v["onnxruntime"] = _version_of("onnxruntime")
    return v


def _version_of(module: str) -> str | None:
    """The module's own __version__: a distribution's name differs by build (onnxruntime-gpu), the
    module's does not. Imported here only: onnx and onnxruntime are optional (the `export` extra)."""
    try:
        return __import__(module).__version__
    except ImportError:
        return None
