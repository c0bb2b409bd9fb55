"""Optional dependencies: which install brings each one, and the one-line error when one is missing.

The base install runs the model, the CLI and the daemon; export, the CUDA kernels and the bench peer are
extras (pyproject.toml). A command that needs a missing one ends with
`edge-rwkv: error: export needs onnx: pip install 'edge-rwkv[export]'`.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from .errors import EdgeRWKVError

# top-level module → (what to call it, how to get it)
OPTIONAL = {
    "onnx": ("onnx", "pip install 'edge-rwkv[export]'"),
    "onnxruntime": ("onnxruntime", "pip install 'edge-rwkv[export]'"),
    "numba": ("numba-cuda", "pip install 'edge-rwkv[cuda]'"),
    "matplotlib": ("matplotlib", "pip install 'edge-rwkv[bench]'"),
    "rwkv": ("the rwkv package", "pip install 'edge-rwkv[bench]'"),
    # pip's tensorrt wheels target x86_64 servers; a Jetson's TensorRT is JetPack's own
    "tensorrt": ("TensorRT", "on a Jetson it comes with JetPack (python3-libnvinfer; a venv made with "
                             "--system-site-packages sees it)"),
}


class MissingDependency(EdgeRWKVError):
    """An optional dependency is not installed; the message says how to install it."""


def missing_dependency(purpose: str, module: str) -> MissingDependency | None:
    """The error for `purpose` lacking `module` (a dotted name is fine), or None if it is not optional."""
    known = OPTIONAL.get(module.partition(".")[0])
    if known is None:
        return None
    name, how = known
    return MissingDependency(f"{purpose} needs {name}: {how}")


def install_hint(module: str) -> str:
    return OPTIONAL[module.partition(".")[0]][1]


def require(module: str, purpose: str) -> ModuleType:
    """Import an optional module, or raise the one-line error naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        err = missing_dependency(purpose, e.name or module)
        if err is None:  # a module the optional one needs is absent: a broken install, not a missing extra
            raise
        raise err from None
