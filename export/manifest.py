"""`manifest.json` of an export folder: what each graph is and how to feed it.

    {"format": "edge-rwkv-export", "format_version": 1,
     "graphs": {"decode":  {"file", "batch", "tokens_per_call": 1, "inputs": [...], "outputs": [...]},
                "prefill": {... "tokens_per_call": chunk ...}},
     "io": naming convention of the state tensors,
     "model": {"config", "fingerprint", "source_file", "source_sha256", "artifact_source_sha256"},
     "precision": {"weights", "activations", "state", "norms", "decay"},
     "quant": {"formats": {"int8": n, "int4/g128": n}, "tensors": {name: {"format", "group", "input_scale"}}},
     "wkv": {"domain": "rwkv7", "name": "wkv7", "inputs", "outputs"},
     "opset", "ir_version", "external_data": "weights.bin" | null, "lint": {...}, "tools": {...},
     "engines": {name: file} once TensorRT engines are built}

Each input/output entry is {"name", "dtype", "shape"}. State inputs are `att_x.{i}`, `wkv.{i}`,
`ffn_x.{i}`; the matching outputs are `att_x_out.{i}`, `wkv_out.{i}`, `ffn_x_out.{i}`.
"""
from __future__ import annotations

import json
from pathlib import Path

from edge_rwkv.errors import InputError
from edge_rwkv.fileio import atomic_write_bytes

MANIFEST_NAME = "manifest.json"
FORMAT = "edge-rwkv-export"
FORMAT_VERSION = 1

_DT = {1: "float32", 10: "float16", 7: "int64", 3: "int8", 22: "int4", 2: "uint8", 16: "bfloat16"}

IO_CONVENTION = {
    "tokens": "int64 [B, T] token ids",
    "logits": "float32 [B, V] logits of the last token of the call",
    "state_inputs": ["att_x.{i}", "wkv.{i}", "ffn_x.{i}"],
    "state_outputs": ["att_x_out.{i}", "wkv_out.{i}", "ffn_x_out.{i}"],
    "state_shapes": {"att_x": "[B, C]", "wkv": "[B, H, N, N] (rows = values, columns = keys)", "ffn_x": "[B, C]"},
    "note": "feed each *_out tensor back as the matching input for the next call; all state is float32; "
            "edge_rwkv.State.att_x[i] / .wkv[i] / .ffn_x[i] map one to one",
}


def _io(values) -> list[dict]:
    out = []
    for vi in values:
        tt = vi.type.tensor_type
        out.append({"name": vi.name, "dtype": _DT.get(tt.elem_type, str(tt.elem_type)),
                    "shape": [d.dim_value for d in tt.shape.dim]})
    return out


def make_manifest(src, specs, models, external_data: str | None, lint: dict) -> dict:
    from .exporter import tool_versions
    from .onnx_graph import IR_VERSION, OPSET, WKV_DOMAIN, WKV_NAME
    from .reference import reference_fingerprint

    graphs = {}
    for spec in specs:
        m = models[spec.name]
        graphs[spec.name] = {"file": f"{spec.name}.onnx", "batch": spec.batch, "tokens_per_call": spec.tokens,
                             "nodes": len(m.graph.node), "inputs": _io(m.graph.input), "outputs": _io(m.graph.output)}
    quant_tensors = {name: {"format": q.format, "group": q.group, "input_scale": q.input_scale is not None,
                            "onnx": ("DequantizeLinear axis=0, int8 [out,K], scale [out]" if q.format == "int8" else
                                     f"DequantizeLinear axis=1 block_size={q.group}, int4 [out,K], scale [out,K/{q.group}]")}
                     for name, q in sorted(src.quant.items())}
    dtype = specs[0].dtype
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "graphs": graphs,
        "io": IO_CONVENTION,
        "model": {"config": src.config.to_dict(), "fingerprint": reference_fingerprint(src),
                  "source_file": Path(src.path).name, "source_sha256": src.sha256,
                  "artifact_source_sha256": (src.metadata or {}).get("source_sha256")},
        "precision": {"weights": dtype if not src.quant else f"{dtype} (+ quantized matrices, dequantized to {dtype})",
                      "matmul": dtype, "activations_between_blocks": "float32", "state": "float32",
                      "norms": "float32", "decay": "float32 exp(-e^-0.5 * sigmoid(w))",
                      "embedding": f"{dtype}, ln0 folded in"},
        "quant": {"formats": src.quant_formats, "tensors": quant_tensors},
        "wkv": {"domain": WKV_DOMAIN, "name": WKV_NAME, "kind": "ONNX model-local function (plain ONNX ops, unrolled over T)",
                "inputs": ["r", "w", "k", "v", "a", "b", "state"], "outputs": ["y", "state_out"],
                "shapes": "r..b float32 [B, T, H, N]; state float32 [B, H, N, N]"},
        "opset": OPSET, "ir_version": IR_VERSION,
        "external_data": external_data,
        "lint": lint,
        "tools": tool_versions(),
        "engines": {},
    }


def write_manifest(folder: str | Path, manifest: dict) -> None:
    atomic_write_bytes(Path(folder) / MANIFEST_NAME, (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode())


def load_manifest(path: str | Path) -> dict:
    """The manifest of an export folder (or the manifest file itself), checked for format."""
    p = Path(path)
    f = p / MANIFEST_NAME if p.is_dir() else p
    if not f.is_file():
        raise InputError(f"{p}: no {MANIFEST_NAME} (not an edge-rwkv export folder)")
    try:
        m = json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{f}: corrupt manifest ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise InputError(f"{f}: not an edge-rwkv export manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{f}: export manifest version {m.get('format_version')!r} is not supported (reads {FORMAT_VERSION})")
    return m


def is_export_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / MANIFEST_NAME).is_file() if p.is_dir() else p.name == MANIFEST_NAME and p.is_file()


def describe(path: str | Path) -> str:
    """Human-readable summary of an export folder (used by `edge-rwkv info DIR`)."""
    m = load_manifest(path)
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    c = m["model"]["config"]
    lines = [f"export          {folder}  (edge-rwkv export v{m['format_version']}, ONNX opset {m['opset']})",
             f"model           RWKV-7 {c['n_layer']} layers, width {c['n_embd']}, head size {c['head_size']}, "
             f"vocab {c['vocab_size']}; source {m['model']['source_file']} sha256 {m['model']['source_sha256'][:16]}…"]
    for name, g in m["graphs"].items():
        f = folder / g["file"]
        size = f.stat().st_size if f.exists() else None
        lines.append(f"{name:<16}{g['file']}: batch {g['batch']}, {g['tokens_per_call']} token(s)/call, {g['nodes']} nodes"
                     + (f", {size / 1e6:.1f} MB" if size is not None else " (MISSING)"))
    p = m["precision"]
    lines.append(f"precision       weights {p['weights']}; state, norms, decay float32")
    if m["quant"]["formats"]:
        lines.append("quantized       " + ", ".join(f"{k}: {v} tensors" for k, v in sorted(m["quant"]["formats"].items())))
    lines.append(f"wkv             {m['wkv']['domain']}.{m['wkv']['name']} model-local function")
    if m.get("external_data"):
        lines.append(f"weights file    {m['external_data']} (shared by the graphs)")
    for target, errs in sorted({t: sum(len(v.get(t, [])) for v in m['lint'].values())
                                for g in m["lint"].values() for t in g}.items()):
        lines.append(f"TensorRT lint   {target}: {'clean' if not errs else f'{errs} problem(s)'}")
    for name, e in (m.get("engines") or {}).items():
        lines.append(f"engine          {name}: {e}")
    t = m["tools"]
    lines.append("exported with   " + ", ".join(f"{k} {v}" for k, v in t.items() if v))
    return "\n".join(lines)
