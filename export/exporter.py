"""Write an export folder: decode.onnx, prefill.onnx, weights.bin, the tokenizer's vocabulary, manifest.json.

Both graphs keep their large initializers in one external-data file, `weights.bin`, each tensor
written once (the graphs point at the same bytes) while the graphs are built: export holds the
source model and one tensor in flight, never a graph's weights. The manifest is written last: a
folder with a manifest is a complete export.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import onnx

from edge_rwkv.errors import InputError
from edge_rwkv.fileio import atomic_path
from edge_rwkv.progress import progress_iter
from edge_rwkv.tokenizer import VOCAB_SIZE

from .manifest import MANIFEST_NAME, make_manifest, write_manifest
from .onnx_graph import GraphSpec, build_graph
from .source import ExportSource, read_source
from .trt_lint import TARGETS, lint_model
from .weights import WEIGHTS_FILE, WeightsFile

MAX_CHUNK = 1024
MAX_BATCH = 1024
DTYPE_ALIASES = {"float16": "float16", "fp16": "float16", "half": "float16",
                 "float32": "float32", "fp32": "float32", "float": "float32"}
VOCAB_FILE = "rwkv_vocab_v20230424.txt"
# Who runs the graphs: the layouts differ only where the two runtimes want different forms of the same
# stored numbers (an int8 embedding: gathered, then scaled, in onnxruntime; dequantized, then gathered,
# in TensorRT, whose parser takes INT8 only as a DequantizeLinear input).
EXPORT_TARGETS = ("onnxruntime", "tensorrt")
OUR_FILES = ("decode.onnx", "prefill.onnx", WEIGHTS_FILE, VOCAB_FILE, MANIFEST_NAME, "decode.engine", "prefill.engine")


@dataclass
class ExportOptions:
    chunk: int = 32
    batch: int = 1
    dtype: str = "float16"
    force: bool = False
    progress: bool = True
    target: str = "onnxruntime"

    def checked(self) -> "ExportOptions":
        for what, v, hi in (("--chunk", self.chunk, MAX_CHUNK), ("--batch", self.batch, MAX_BATCH)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise InputError(f"{what} must be an integer, got {v!r}")
        if not 2 <= self.chunk <= MAX_CHUNK:
            raise InputError(f"--chunk must be between 2 and {MAX_CHUNK} tokens (T=1 is the decode graph), "
                             f"got {self.chunk}")
        if not 1 <= self.batch <= MAX_BATCH:
            raise InputError(f"--batch must be between 1 and {MAX_BATCH}, got {self.batch}")
        dt = DTYPE_ALIASES.get(str(self.dtype).lower())
        if dt is None:
            raise InputError(f"--dtype must be float16 or float32, got {self.dtype!r}")
        if self.target not in EXPORT_TARGETS:
            raise InputError(f"export target must be one of {', '.join(EXPORT_TARGETS)}, got {self.target!r}")
        return ExportOptions(self.chunk, self.batch, dt, self.force, self.progress, self.target)


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


def validate_graph(path: Path, model: onnx.ModelProto) -> None:
    """onnx.checker (full, from the file: external data is located, not read) and strict shape inference
    on the in-memory graph (which holds no weights); raises with the file name on failure."""
    from onnx import shape_inference

    try:
        onnx.checker.check_model(str(path), full_check=True)
        shape_inference.infer_shapes(model, strict_mode=True, check_type=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise RuntimeError(f"{path.name}: ONNX validation failed: {e}") from None


def world_vocab_file(src: ExportSource) -> Path | None:
    """The RWKV World vocabulary file when the model uses that tokenizer (its vocabulary size), else None."""
    if src.config.vocab_size != VOCAB_SIZE:
        return None
    # The file beside the tokenizer package (building the tokenizer itself would cost ~0.25 GB of RAM).
    spec = importlib.util.find_spec("pyrwkv_tokenizer")
    path = Path(spec.origin).parent / VOCAB_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise RuntimeError(f"the RWKV World vocabulary ({VOCAB_FILE}) is not installed with pyrwkv-tokenizer")
    return path


def export_onnx(model_path: str | os.PathLike, out_dir: str | os.PathLike, options: ExportOptions | None = None,
                src: ExportSource | None = None, log=print) -> dict:
    """Export decode + prefill graphs, their shared weights.bin, the vocabulary and the manifest; returns the manifest."""
    opt = (options or ExportOptions()).checked()
    out = Path(out_dir)
    src = src or read_source(model_path, progress=opt.progress)
    prepare_output_dir(out, opt.force)
    # For onnxruntime the prefill graph takes any number of tokens, so one session can run a whole sequence
    # (chunks, then single tokens) with one copy of the weights; TensorRT wants fixed shapes.
    specs = [GraphSpec(opt.batch, 1, opt.dtype, opt.target),
             GraphSpec(opt.batch, opt.chunk, opt.dtype, opt.target, any_tokens=opt.target == "onnxruntime")]
    graphs, lint = {}, {}
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        weights = WeightsFile(tmp, WEIGHTS_FILE)
        try:
            for spec in specs:
                bar = (lambda it, s=spec: progress_iter(it, desc=f"{s.name} graph", enabled=opt.progress, unit="layer"))
                m = build_graph(src, spec, progress=bar, weights=weights)  # weights already on disk
                lint[spec.name] = {t: [str(i) for i in lint_model(m, t) if i.level != "note"] for t in TARGETS}
                with atomic_path(out / f"{spec.name}.onnx") as g_tmp:
                    onnx.save_model(m, str(g_tmp))
                graphs[spec.name] = m
        finally:
            weights.close()
    for spec in specs:
        validate_graph(out / f"{spec.name}.onnx", graphs[spec.name])
    vocab = world_vocab_file(src)
    if vocab is not None:
        with atomic_path(out / VOCAB_FILE) as tmp:
            shutil.copyfile(vocab, tmp)
    manifest = make_manifest(src, specs, graphs, lint=lint, folder=out, vocab_file=VOCAB_FILE if vocab else None)
    write_manifest(out, manifest)
    if opt.target == "tensorrt":
        for name, per_target in lint.items():
            for target, problems in per_target.items():
                for p in problems:
                    log(f"lint [{name}, TensorRT {target}] {p}")
    else:  # expected (a free token dimension, an int8 embedding gathered as int8): one line, details in the manifest
        n = sum(len(p) for per_target in lint.values() for p in per_target.values())
        if n:
            log(f"lint: {n} TensorRT parser problem(s) recorded in the manifest: these graphs are laid out for "
                "onnxruntime; `--format tensorrt` writes TensorRT's layout")
    return manifest
