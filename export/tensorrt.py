"""TensorRT engines from the exported ONNX graphs (optional: needs the `tensorrt` package and a GPU).

Engines are built strongly typed: every tensor keeps the type the ONNX graph gives it, so norms,
decay and state stay fp32 and matrices run in the weight dtype (fp16 / int8 / int4 weight-only).
Where TensorRT is missing, `TensorRTUnavailable` carries the `trtexec` lines to run on the target.
"""
from __future__ import annotations

import shlex
from pathlib import Path

from edge_rwkv.errors import EdgeRWKVError, InputError
from edge_rwkv.extras import install_hint
from edge_rwkv.fileio import atomic_write_bytes

from .manifest import load_manifest, write_manifest

WORKSPACE_BYTES = 2 << 30


class TensorRTUnavailable(EdgeRWKVError):
    """TensorRT (or a GPU for it) is not present here; the message says what to run on the target."""


def engine_name(graph: str) -> str:
    return f"{graph}.engine"


def trtexec_commands(folder: str | Path, graphs=("decode", "prefill")) -> list[str]:
    """The trtexec line per graph, run from anywhere on the target (paths as given)."""
    folder = Path(folder)
    lines = []
    for g in graphs:
        args = ["trtexec", f"--onnx={folder / (g + '.onnx')}", f"--saveEngine={folder / engine_name(g)}",
                "--stronglyTyped", f"--memPoolSize=workspace:{WORKSPACE_BYTES >> 20}M", "--skipInference"]
        lines.append(" ".join(shlex.quote(a) for a in args))
    return lines


def tensorrt_available() -> tuple[bool, str]:
    """(usable, reason) — TensorRT importable and a CUDA GPU visible."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, f"TensorRT's Python package is not installed ({install_hint('tensorrt')})"
    try:
        import torch

        if not torch.cuda.is_available():
            return False, "TensorRT is installed but no CUDA GPU is visible"
    except ImportError:
        pass
    return True, ""


def build_engines(folder: str | Path, graphs=None, workspace: int = WORKSPACE_BYTES, log=print) -> dict[str, str]:
    """Parse each exported graph with TensorRT's ONNX parser and build a strongly-typed engine."""
    folder = Path(folder)
    manifest = load_manifest(folder)
    graphs = list(graphs or manifest["graphs"])
    if manifest.get("target", "onnxruntime") != "tensorrt":
        raise InputError(f"{folder}: these graphs are laid out for {manifest.get('target', 'onnxruntime')}; "
                         "export with --format tensorrt (target tensorrt) to build TensorRT engines")
    ok, why = tensorrt_available()
    if not ok:
        raise TensorRTUnavailable(
            f"cannot build TensorRT engines here: {why}. The ONNX graphs are in {folder}; "
            "build the engines on the target (JetPack 6: TensorRT 10.3, JetPack 7: TensorRT 10.13+) with:\n  "
            + "\n  ".join(trtexec_commands(folder, graphs)))
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    built = {}
    for g in graphs:
        onnx_path = folder / manifest["graphs"][g]["file"]
        builder = trt.Builder(logger)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        # TensorRT >= 10.15 lets a registered `wkv7` plugin replace the rwkv7.wkv7 local function only with
        # this flag (10.7-10.14 prefer the plugin unasked; older parsers expand the function body).
        if hasattr(trt.OnnxParserFlag, "ENABLE_PLUGIN_OVERRIDE"):
            parser.set_flag(trt.OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EdgeRWKVError(f"{onnx_path.name}: TensorRT could not parse the graph: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
        log(f"building {engine_name(g)} (TensorRT {trt.__version__}, strongly typed)…")
        blob = builder.build_serialized_network(network, config)
        if blob is None:
            raise EdgeRWKVError(f"{onnx_path.name}: TensorRT engine build failed (see the TensorRT log above)")
        out = folder / engine_name(g)
        atomic_write_bytes(out, bytes(blob))
        built[g] = out.name
    manifest.setdefault("engines", {}).update(built)
    manifest["tools"]["tensorrt"] = trt.__version__
    write_manifest(folder, manifest)
    return built
