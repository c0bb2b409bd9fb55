"""`edge-rwkv export MODEL --format onnx|tensorrt -o DIR [--chunk 32] [--batch 1] [--dtype float16]`."""
from __future__ import annotations

import sys

from edge_rwkv.extras import require


def register(sub) -> None:
    p = sub.add_parser("export", help="export ONNX decode/prefill graphs (and TensorRT engines)",
                       description="Write decode.onnx (1 token/call), prefill.onnx (--chunk tokens/call), their shared "
                                   "weights.bin, the tokenizer's vocabulary and manifest.json to DIR (see "
                                   "INTEGRATION.md beside this module); --format tensorrt lays the graphs out for "
                                   "TensorRT's ONNX parser and also builds strongly-typed engines "
                                   "where TensorRT and a GPU are present, else prints the trtexec lines to run "
                                   "on the target.")
    p.add_argument("model", nargs="?", default=None,
                   help="model file: official .pth, safetensors, or an edge-rwkv artifact, quantized or not "
                        "(default: the embedded default model)")
    p.add_argument("--format", choices=("onnx", "tensorrt"), default="onnx",
                   help="onnx: graphs laid out for onnxruntime (default); tensorrt: laid out for TensorRT "
                        "(recorded as the manifest's target), then engines built where TensorRT is present")
    p.add_argument("-o", "--output", required=True, help="output folder (must be empty unless --force)")
    p.add_argument("--chunk", type=int, default=32, help="tokens per prefill call (default 32)")
    p.add_argument("--batch", type=int, default=1, help="fixed batch size of both graphs (default 1)")
    p.add_argument("--dtype", default="float16", help="weight/matmul dtype: float16 (default) or float32")
    p.add_argument("--force", action="store_true", help="write into a non-empty folder, replacing earlier export files")
    p.add_argument("--verify", type=int, default=0, metavar="TOKENS",
                   help="after export, run TOKENS random tokens through onnxruntime and the torch runtime and "
                        "report the largest logit difference")
    p.set_defaults(func=cmd_export)


def cmd_export(a) -> int:
    require("onnx", "export")
    if a.verify:  # checked before the export is written, not after
        require("onnxruntime", "export --verify")
    from edge_rwkv.default_model import resolve_model

    from .exporter import ExportOptions, export_onnx
    from .manifest import describe

    a.model = resolve_model(a.model)
    opts = ExportOptions(chunk=a.chunk, batch=a.batch, dtype=a.dtype, force=a.force, progress=True,
                         target="tensorrt" if a.format == "tensorrt" else "onnxruntime").checked()
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    export_onnx(a.model, a.output, opts, log=log)
    print(describe(a.output))
    if a.verify:
        from .verify import verify_export

        rep = verify_export(a.model, a.output, tokens=a.verify)
        print(f"verify          onnxruntime vs torch runtime over {rep['tokens']} tokens: "
              f"max |Δlogits| / std = {rep['max_rel']:.2e} (decode steps), {rep['max_rel_chunked']:.2e} (chunked)"
              + ("" if rep["max_rel_one_session"] is None else f", {rep['max_rel_one_session']:.2e} (one session)")
              + f"; argmax {rep['argmax_agree']}/{rep['argmax_total']} ({rep['argmax_near_ties']} near-ties)")
    if a.format == "tensorrt":
        from .tensorrt import TensorRTUnavailable, build_engines, trtexec_commands

        try:
            built = build_engines(a.output, log=log)
        except TensorRTUnavailable as e:
            print(f"edge-rwkv: error: {e}", file=sys.stderr)
            print("\n".join(trtexec_commands(a.output)))
            return 3
        for g, f in built.items():
            print(f"engine          {g}: {f}")
    return 0
