"""`manifest.json` of an export folder: what each graph is, how to feed and chain it, what ships with it.

    {"format": "edge-rwkv-export", "format_version": 2,
     "target": "onnxruntime" | "tensorrt" (the runtime the graphs are laid out for; absent = onnxruntime),
     "graphs": {"decode":  {"file", "batch", "tokens_per_call": 1, "any_tokens": false, "nodes", "inlined_nodes",
                            "inputs", "outputs"},
                "prefill": {... "tokens_per_call": chunk, "any_tokens": true for the onnxruntime target ...}},
     "io": naming convention of the state tensors,
     "initial_state": every state input zero starts a sequence,
     "chaining": how prefill and decode calls follow each other,
     "tokenizer": {"name", "file", "format", "vocab_size", "end_of_text_id"} | null (not the World vocabulary),
     "model": {"config", "fingerprint", "source_file", "source_sha256", "artifact_source_sha256"},
     "precision": {"weights", "activations", "state", "norms", "decay"},
     "quant": {"formats": {"int8": n, "int4/g128": n}, "tensors": {name: {"format", "group", "input_scale", "onnx"}}},
     "wkv": {"domain": "rwkv7", "name": "wkv7", "inputs", "outputs"},
     "onnxruntime": {"session_config": {key: value} that keep parity, "faster": {...} that do not, "why", "memory"},
     "opset", "ir_version", "external_data": "weights.bin",
     "files": {name: {"bytes", "sha256"}} for every file but the manifest,
     "lint": {...}, "tools": {...}, "engines": {name: file} once TensorRT engines are built}

Each input/output entry is {"name", "dtype", "shape"}; a free dimension is named ("T": any tokens per call). State inputs are `att_x.{i}`, `wkv.{i}`,
`ffn_x.{i}`; the matching outputs are `att_x_out.{i}`, `wkv_out.{i}`, `ffn_x_out.{i}`.
"""
from __future__ import annotations

import json
from pathlib import Path

from edge_rwkv.errors import InputError
from edge_rwkv.fileio import atomic_write_bytes, sha256_file
from edge_rwkv.tokenizer import END_OF_TEXT, WorldTokenizer

from .reference import reference_fingerprint
from .versions import tool_versions

MANIFEST_NAME = "manifest.json"
FORMAT = "edge-rwkv-export"
FORMAT_VERSION = 2

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
INITIAL_STATE = {
    "kind": "zeros",
    "rule": "a new sequence starts with every state input (att_x.{i}, wkv.{i}, ffn_x.{i}) all zeros, float32; "
            "a saved state (the *_out tensors of any call) resumes a sequence exactly",
}
CHAINING = {
    "rule": "the state is the only memory between calls, and prefill and decode take and give the same state "
            "tensors: feed a prompt of L tokens as floor(L / P) prefill calls of P = tokens_per_call tokens, "
            "then the remaining L mod P tokens one decode call each; the logits of the last call are the "
            "next-token distribution; then decode one token per call. Each call's *_out tensors are the next "
            "call's inputs, whichever graph made them",
    "one_session": "a graph with any_tokens true takes [B, T] tokens for any T >= 1: one session of it can run the "
                   "prefill chunks, the remainder and every decode step (bind a [B, P] and a [B, 1] token buffer), "
                   "holding one copy of the weights instead of two sessions' two",
    "logits": "float32 [B, V] of the last token of each call (a prefill call gives only its last token's logits)",
    "token_ids": "int64 in [0, vocab_size); the graphs do not check ids (a Gather of an out-of-range id is "
                 "undefined or an error depending on the runtime): check them before each call",
}
# onnxruntime session options that keep the exported numerics (see onnxruntime_options).
ACCURACY_LEVEL_KEY = "session.qdq_matmulnbits_accuracy_level"


def _io(values) -> list[dict]:
    out = []
    for vi in values:
        tt = vi.type.tensor_type
        out.append({"name": vi.name, "dtype": _DT.get(tt.elem_type, str(tt.elem_type)),
                    "shape": [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim]})
    return out


def count_nodes(graph) -> int:
    """Nodes of a graph including those of its subgraphs (Scan/Loop/If bodies)."""
    from onnx import helper

    n = 0
    for node in graph.node:
        n += 1
        for attr in node.attribute:
            g = helper.get_attribute_value(attr)
            for sub in (g if isinstance(g, list) else [g]):
                if hasattr(sub, "node"):
                    n += count_nodes(sub)
    return n


def inlined_node_count(model) -> int:
    """Nodes after inlining the model-local functions (what a runtime without a wkv7 plugin builds)."""
    from onnx import inliner

    return count_nodes(inliner.inline_local_functions(model).graph)


def onnxruntime_options(quant: dict) -> dict:
    """Session config entries for onnxruntime that keep the export's numerics ("session_config"), a faster
    alternative that does not ("faster"), and why. `quant` maps tensor names to StoredQuant.

    onnxruntime fuses every `DequantizeLinear(Wᵀ) → MatMul` into MatMulNBits. Its default accuracy level
    (4) quantizes the activations to int8 per block, which moves the logits far from the stored weights'
    own result (max |Δ|/std 0.3 at int8, 3.5 at int4 on a random 12×768 model). Level 1 keeps fp32
    activations: fast for int4, but MatMulNBits has no fast 8-bit kernel with fp32 activations (a 12×768
    int8 model decoded 0.4 tok/s), so int8 matrices are dequantized once at session creation instead
    (`session.disable_quant_qdq`: the DequantizeLinear of each constant weight is folded to float32).
    """
    matrices = {q.format for name, q in quant.items() if name != "emb.weight"}
    faster = {ACCURACY_LEVEL_KEY: "4"}
    if not matrices:
        return {"session_config": {}, "why": "no quantized matrices: onnxruntime's defaults keep the numerics"}
    if "int8" in matrices:
        return {"session_config": {"session.disable_quant_qdq": "1"}, "faster": faster,
                "why": "int8 matrices: MatMulNBits at an accuracy level that keeps fp32 activations has no fast "
                       "8-bit kernel, so the weights are dequantized to float32 once, when the session is made "
                       "(the same values, 4x the int8 bytes in memory); 'faster' runs MatMulNBits with int8 "
                       "activations and loses parity"}
    return {"session_config": {ACCURACY_LEVEL_KEY: "1"}, "faster": faster,
            "why": "int4 matrices run as MatMulNBits (DequantizeLinear of Wᵀ fused with MatMul, the packed levels "
                   "read directly); accuracy level 1 keeps fp32 activations; 'faster' (the default level, 4) "
                   "quantizes activations to int8 and loses parity"}


def file_table(folder: Path, names) -> dict:
    """{name: {"bytes", "sha256"}} of the export's files."""
    return {n: {"bytes": (folder / n).stat().st_size, "sha256": sha256_file(folder / n)} for n in names}


def make_manifest(src, specs, models, lint: dict, folder: Path, vocab_file: str | None) -> dict:
    # the graph builder and the weights file need onnx (the `export` extra): reading a manifest does not
    from .onnx_graph import IR_VERSION, OPSET, WKV_DOMAIN, WKV_NAME
    from .weights import WEIGHTS_FILE

    graphs = {}
    for spec in specs:
        m = models[spec.name]
        graphs[spec.name] = {"file": f"{spec.name}.onnx", "batch": spec.batch, "tokens_per_call": spec.tokens,
                             "any_tokens": spec.any_tokens,
                             "nodes": len(m.graph.node), "inlined_nodes": inlined_node_count(m),
                             "inputs": _io(m.graph.input), "outputs": _io(m.graph.output)}
    quant_tensors = {name: {"format": q.format, "group": q.group, "input_scale": q.input_scale is not None,
                            "onnx": _quant_layout(name, q, specs[0].target)}
                     for name, q in sorted(src.quant.items())}
    dtype, target = specs[0].dtype, specs[0].target
    emb = src.quant.get("emb.weight")
    tokenizer = None
    if vocab_file:
        tokenizer = {"name": WorldTokenizer.name, "file": vocab_file, "vocab_size": src.config.vocab_size,
                     "end_of_text_id": END_OF_TEXT,
                     "format": "one token a line: `<id> <Python literal of the token: str, or bytes b'..'> <byte "
                               "length>`; encode greedily by longest byte match (the RWKV World tokenizer); "
                               "decode by concatenating the tokens' UTF-8/bytes"}
    files = [f"{s.name}.onnx" for s in specs] + [WEIGHTS_FILE] + ([vocab_file] if vocab_file else [])
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "target": target,
        "graphs": graphs,
        "io": IO_CONVENTION,
        "initial_state": INITIAL_STATE,
        "chaining": CHAINING,
        "tokenizer": tokenizer,
        "model": {"config": src.config.to_dict(), "fingerprint": reference_fingerprint(src),
                  "source_file": Path(src.path).name, "source_sha256": src.sha256,
                  "artifact_source_sha256": (src.metadata or {}).get("source_sha256")},
        "precision": {"weights": dtype if not src.quant else f"{dtype} (+ quantized matrices, dequantized to {dtype})",
                      "matmul": dtype, "activations_between_blocks": "float32", "state": "float32",
                      "norms": "float32", "decay": "float32 exp(-e^-0.5 * sigmoid(w))",
                      "embedding": (f"{dtype}, ln0 folded in" if emb is None else
                                    "int8 rows with a float32 scale per row (as stored), ln0 applied in float32"
                                    if target == "onnxruntime" else
                                    f"int8 table with a {dtype} scale per row (as stored), dequantized to {dtype}, "
                                    "ln0 applied in float32")},
        "quant": {"formats": src.quant_formats, "tensors": quant_tensors},
        "wkv": {"domain": WKV_DOMAIN, "name": WKV_NAME,
                "kind": "ONNX model-local function (plain ONNX ops: one step at T=1, a Scan over time at T>1)",
                "inputs": ["r", "w", "k", "v", "a", "b", "state"], "outputs": ["y", "state_out"],
                "shapes": "r..b float32 [B, T, H, N]; state float32 [B, H, N, N]"},
        "onnxruntime": dict(onnxruntime_options(src.quant), memory=(
            "weights.bin is read while a session is created, not kept mapped. On a CPU each session then holds "
            "its own compute copy: fp16 matrices cast to float32 (2x their fp16 bytes), int4 matrices packed "
            "for MatMulNBits (about their stored bytes), int8 ones as float32 under session_config. Shared "
            "initializers (add_initializer), disabling prepacking, a shared arena or lower optimization levels "
            "do not remove the second copy (the copies are made by onnxruntime's own graph transforms, per "
            "session). One copy: run the whole sequence in one session of a graph with any_tokens (see "
            "chaining.one_session)")),
        "opset": OPSET, "ir_version": IR_VERSION,
        "external_data": WEIGHTS_FILE,
        "files": file_table(folder, files),
        "lint": lint,
        "tools": tool_versions(),
        "engines": {},
    }


def _quant_layout(name: str, q, target: str) -> str:
    if name == "emb.weight":
        if target == "tensorrt":
            return "DequantizeLinear(int8 [V, C], scale [V], axis=0) → Gather"
        return "Gather of int8 rows [V, C] and float32 scales [V, 1], Cast, Mul"
    if q.format == "int8":
        return "DequantizeLinear(Wᵀ int8 [K, out], scale [out], axis=1) → MatMul"
    return f"DequantizeLinear(Wᵀ int4 [K, out], scale [K/{q.group}, out], axis=0, block_size={q.group}) → MatMul"


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
    lines = [f"export          {folder}  (edge-rwkv export v{m['format_version']}, ONNX opset {m['opset']}, "
             f"laid out for {m.get('target', 'onnxruntime')})",
             f"model           RWKV-7 {c['n_layer']} layers, width {c['n_embd']}, head size {c['head_size']}, "
             f"vocab {c['vocab_size']}; source {m['model']['source_file']} sha256 {m['model']['source_sha256'][:16]}…"]
    for name, g in m["graphs"].items():
        f = folder / g["file"]
        size = f.stat().st_size if f.exists() else None
        per_call = f"{g['tokens_per_call']} token(s)/call" + (" (takes any number)" if g.get("any_tokens") else "")
        lines.append(f"{name:<16}{g['file']}: batch {g['batch']}, {per_call}, {g['nodes']} nodes "
                     f"({g['inlined_nodes']} inlined)"
                     + (f", {size / 1e6:.1f} MB" if size is not None else " (MISSING)"))
    p = m["precision"]
    lines.append(f"precision       weights {p['weights']}; state, norms, decay float32")
    if m["quant"]["formats"]:
        lines.append("quantized       " + ", ".join(f"{k}: {v} tensors" for k, v in sorted(m["quant"]["formats"].items())))
    lines.append(f"wkv             {m['wkv']['domain']}.{m['wkv']['name']} model-local function")
    w = folder / m["external_data"]
    lines.append(f"weights file    {m['external_data']} (shared by the graphs)"
                 + (f", {w.stat().st_size / 1e6:.1f} MB" if w.exists() else " (MISSING)"))
    if m.get("tokenizer"):
        t = m["tokenizer"]
        lines.append(f"tokenizer       {t['name']} ({t['file']}), end of text id {t['end_of_text_id']}")
    if m["onnxruntime"]["session_config"]:
        lines.append("onnxruntime     " + ", ".join(f"{k}={v}" for k, v in m["onnxruntime"]["session_config"].items()))
    for target, errs in sorted({t: sum(len(v.get(t, [])) for v in m['lint'].values())
                                for g in m["lint"].values() for t in g}.items()):
        lines.append(f"TensorRT lint   {target}: {'clean' if not errs else f'{errs} problem(s)'}"
                     + (" (laid out for onnxruntime; `--format tensorrt` exports for TensorRT)"
                        if errs and m.get("target", "onnxruntime") != "tensorrt" else ""))
    for name, e in (m.get("engines") or {}).items():
        lines.append(f"engine          {name}: {e}")
    t = m["tools"]
    lines.append("exported with   " + ", ".join(f"{k} {v}" for k, v in t.items() if v))
    return "\n".join(lines)
