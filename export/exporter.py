"""Write an export folder: decode.onnx, prefill.onnx, (weights.bin), manifest.json.

Large models (initializers over 1.5 GB) keep their weights in one external-data file, `weights.bin`,
shared by both graphs (each tensor is written once; both graphs point at the same bytes).
The manifest is written last: a folder with a manifest is a complete export.
"""
from __future__ import annotations

import hashlib
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import external_data_helper

from edge_rwkv.errors import InputError
from edge_rwkv.fileio import atomic_path

from .manifest import MANIFEST_NAME, make_manifest, write_manifest
from .onnx_graph import GraphSpec, build_graph
from .source import ExportSource, read_source

EXTERNAL_DATA_THRESHOLD = int(1.5 * (1 << 30))
WEIGHTS_FILE = "weights.bin"
MAX_CHUNK = 1024
MAX_BATCH = 1024
_EXTERNAL_MIN_BYTES = 1024  # smaller initializers (shape constants, norms) stay inline
DTYPE_ALIASES = {"float16": "float16", "fp16": "float16", "half": "float16",
                 "float32": "float32", "fp32": "float32", "float": "float32"}
OUR_FILES = ("decode.onnx", "prefill.onnx", WEIGHTS_FILE, MANIFEST_NAME, "decode.engine", "prefill.engine")


@dataclass
class ExportOptions:
    chunk: int = 32
    batch: int = 1
    dtype: str = "float16"
    external_data: str | bool = "auto"  # "auto" (> 1.5 GB), True, False
    force: bool = False
    progress: bool = True

    def checked(self) -> "ExportOptions":
        for what, v, hi in (("--chunk", self.chunk, MAX_CHUNK), ("--batch", self.batch, MAX_BATCH)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise InputError(f"{what} must be an integer, got {v!r}")
        if not 2 <= self.chunk <= MAX_CHUNK:
            raise InputError(f"--chunk must be between 2 and {MAX_CHUNK} tokens (the prefill graph is unrolled "
                             f"over the chunk; T=1 is the decode graph), got {self.chunk}")
        if not 1 <= self.batch <= MAX_BATCH:
            raise InputError(f"--batch must be between 1 and {MAX_BATCH}, got {self.batch}")
        dt = DTYPE_ALIASES.get(str(self.dtype).lower())
        if dt is None:
            raise InputError(f"--dtype must be float16 or float32, got {self.dtype!r}")
        if self.external_data not in ("auto", True, False):
            raise InputError(f"external_data must be 'auto', True or False, got {self.external_data!r}")
        return ExportOptions(self.chunk, self.batch, dt, self.external_data, self.force, self.progress)


def prepare_output_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise InputError(f"{out}: output folder is not empty (use --force to overwrite the export files in it)")
        for name in OUR_FILES:  # stale files from an earlier export must not mix with this one
            p = out / name
            if p.is_file():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


class _SharedWeights:
    """Appends initializer bytes to one file, once per tensor name, and points tensors at them."""

    def __init__(self, path: Path):
        self.path = path
        self.fh = open(path, "wb")
        self.index: dict[str, tuple[int, int, str]] = {}

    def externalize(self, model: onnx.ModelProto) -> None:
        for t in model.graph.initializer:
            raw = t.raw_data
            if len(raw) < _EXTERNAL_MIN_BYTES:
                continue
            digest = hashlib.sha1(raw).hexdigest()
            if t.name in self.index:
                offset, length, seen = self.index[t.name]
                if seen != digest:
                    raise RuntimeError(f"initializer '{t.name}' differs between graphs")
            else:
                pad = (-self.fh.tell()) % 64
                self.fh.write(b"\0" * pad)
                offset, length = self.fh.tell(), len(raw)
                self.fh.write(raw)
                self.index[t.name] = (offset, length, digest)
            external_data_helper.set_external_data(t, location=self.path.name, offset=offset, length=length)
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL

    def close(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()


def validate_graph(model: onnx.ModelProto, path: Path) -> None:
    """onnx.checker (full) and strict shape inference; raises with the file name on failure."""
    from onnx import shape_inference

    try:
        if model.ByteSize() < (1 << 31) - (1 << 20):
            onnx.checker.check_model(model, full_check=True)
        else:
            onnx.checker.check_model(str(path), full_check=True)
        shape_inference.infer_shapes(model, strict_mode=True, check_type=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise RuntimeError(f"{path.name}: ONNX validation failed: {e}") from None


def export_onnx(model_path: str | os.PathLike, out_dir: str | os.PathLike, options: ExportOptions | None = None,
                src: ExportSource | None = None, log=print) -> dict:
    """Export decode + prefill graphs and the manifest; returns the manifest."""
    from edge_rwkv.progress import progress_iter

    from .trt_lint import TARGETS, lint_model

    opt = (options or ExportOptions()).checked()
    out = Path(out_dir)
    src = src or read_source(model_path, progress=opt.progress)
    prepare_output_dir(out, opt.force)
    specs = [GraphSpec(opt.batch, 1, opt.dtype), GraphSpec(opt.batch, opt.chunk, opt.dtype)]
    # One graph in memory at a time (each holds a copy of the weights); only its skeleton is kept.
    skeletons, lint, shared, external = {}, {}, None, None
    try:
        for spec in specs:
            bar = (lambda it, s=spec: progress_iter(it, desc=f"{s.name} graph", enabled=opt.progress, unit="layer"))
            m = build_graph(src, spec, progress=bar)
            if external is None:
                total = _initializer_bytes(m)
                external = opt.external_data is True or (opt.external_data == "auto" and total > EXTERNAL_DATA_THRESHOLD)
                shared = _SharedWeights(out / WEIGHTS_FILE) if external else None
            if not external:
                validate_graph(m, out / f"{spec.name}.onnx")
            else:
                from onnx import shape_inference

                shape_inference.infer_shapes(m, strict_mode=True, check_type=True)
            lint[spec.name] = {t: [str(i) for i in lint_model(m, t) if i.level != "note"] for t in TARGETS}
            if shared:
                shared.externalize(m)
            with atomic_path(out / f"{spec.name}.onnx") as tmp:
                onnx.save_model(m, str(tmp))
            skel = onnx.ModelProto()
            skel.CopyFrom(m)
            del skel.graph.initializer[:]
            skeletons[spec.name] = skel
            del m
    finally:
        if shared:
            shared.close()
    models = skeletons
    if external:
        for spec in specs:
            onnx.checker.check_model(str(out / f"{spec.name}.onnx"), full_check=True)
    manifest = make_manifest(src, specs, models, external_data=WEIGHTS_FILE if external else None, lint=lint)
    write_manifest(out, manifest)
    for name, per_target in lint.items():
        for target, problems in per_target.items():
            for p in problems:
                log(f"lint [{name}, TensorRT {target}] {p}")
    return manifest


def tool_versions() -> dict:
    import numpy
    import torch

    import edge_rwkv

    v = {"edge_rwkv": edge_rwkv.__version__, "onnx": onnx.__version__, "torch": torch.__version__,
         "numpy": numpy.__version__, "python": platform.python_version()}
    try:
        import onnxruntime

        v["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        v["onnxruntime"] = None
    return v
