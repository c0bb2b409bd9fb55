"""`edge-rwkv quantize`: checkpoint → int8/int4 artifact (registered by edge_rwkv.cli.EXTRA_COMMANDS)."""
from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    s = sub.add_parser("quantize", help="quantize a model to int8 / int4",
                       description="Quantize the big matrices of a model to int8 (per output channel) or int4 "
                                   "(group-wise along K), optionally calibrated on text (awq / gptq), and write "
                                   "an artifact that `edge_rwkv.load` reads on CPU and GPU.")
    s.add_argument("model", help="official .pth, safetensors, an unquantized edge-rwkv artifact or a Hugging Face folder")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--bits", type=int, choices=(8, 4), required=True)
    s.add_argument("--group-size", type=int, default=128, choices=(32, 64, 128), help="int4 group along K")
    s.add_argument("--method", default="rtn", choices=("rtn", "awq", "gptq"))
    s.add_argument("--calib", help="calibration text file (UTF-8); default: built-in offline text")
    s.add_argument("--calib-tokens", type=int, default=8192)
    s.add_argument("--quantize-head", action="store_true", help="also quantize the output head")
    s.add_argument("--quantize-embedding", action="store_true", help="store the embedding as int8")
    s.add_argument("--quantize-layer0-output", action="store_true",
                   help="also quantize blocks.0.att.output (kept fp16 by default: outlier-sensitive)")
    s.add_argument("--device", default="cpu",
                   help="where the rounding / GPTQ arithmetic runs: cpu or cuda (a 7B model: seconds on a GPU)")
    s.set_defaults(func=run)


def run(a) -> int:
    from edge_rwkv.api import parse_device
    from edge_rwkv.artifact import write_artifact
    from edge_rwkv.checkpoint import load_checkpoint, source_sha256
    from edge_rwkv.keys import parameter_count
    from edge_rwkv.corpus import calibration_tokens
    from edge_rwkv.errors import EdgeRWKVError, InputError
    from edge_rwkv.progress import human_bytes
    from edge_rwkv.tokenizer import default_tokenizer

    from .policy import QuantPolicy
    from .transform import quantize_checkpoint

    src, dst = Path(a.model), Path(a.output)
    if dst.exists() and dst.resolve() == src.resolve():
        raise InputError("output would overwrite the input; choose another path")
    if a.calib_tokens < 16:
        raise InputError("--calib-tokens must be at least 16")
    device = parse_device(a.device)  # before reading anything: a bad --device fails at once
    policy = QuantPolicy(bits=a.bits, group=a.group_size, quantize_head=a.quantize_head,
                         quantize_embedding=a.quantize_embedding, keep_layer0_output=not a.quantize_layer0_output,
                         method=a.method)
    ckpt = load_checkpoint(src, progress=True)
    if ckpt.quant.get("tensors"):
        raise EdgeRWKVError(f"{src}: already quantized; quantize the full-precision model instead")
    calib = None
    if a.method != "rtn":
        tok = default_tokenizer()
        if a.calib:
            try:
                text = Path(a.calib).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise InputError(f"{a.calib}: cannot read calibration text ({e})") from None
            calib = tok.encode(text)[: a.calib_tokens]
            if len(calib) < 16:
                raise InputError(f"{a.calib}: calibration text is too short ({len(calib)} tokens)")
        else:
            calib = calibration_tokens(tok, a.calib_tokens)
    tensors, meta = quantize_checkpoint(ckpt, policy, calib, progress=True, source_sha256=source_sha256(src),
                                        device=device)
    write_artifact(dst, tensors, meta)
    fp16 = parameter_count(ckpt.config) * 2
    size = dst.stat().st_size
    n_q = len(meta["quant"]["tensors"])
    print(f"wrote {dst}: {human_bytes(size)} ({size / fp16:.2f}× fp16), {n_q} tensors quantized "
          f"({'int8' if a.bits == 8 else f'int4 g{a.group_size}'}, {a.method})")
    return 0
