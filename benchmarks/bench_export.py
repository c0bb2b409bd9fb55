"""ONNX export on a CPU: onnxruntime vs edge-rwkv's own CPU runtime on the same weights; prints one table.

    python3 benchmarks/bench_export.py [--layers 12 --embd 768] [--precisions fp16,int8,int4] [--chunk 256]
                                       [--steps 64] [--threads 1] [--dtype float16] [--workdir DIR] [--json out.json]

Per precision: a random model (`edge-rwkv init`, quantized with `edge-rwkv quantize --quantize-head
--quantize-embedding`), exported in a child process (time, peak RSS above the imports), then
- session creation time of each graph (onnxruntime, with the manifest's session config),
- decode: `steps` greedy tokens of the reference (`edge_rwkv.load(model, "cpu")`, fp32), fed to
  onnxruntime's decode graph through IO binding with two swapped state buffers (the integration
  guide's loop); parity = max over steps of max|Δlogits| / std(reference logits), and how many steps
  agree on the argmax under export/verify.py's rule (the same token, or a near-tie of the reference's
  two best logits — within ARGMAX_TIE_STD std — resolved to its runner-up; near-ties counted apart); tok/s of both runtimes timed in interleaved rounds (best of `rounds`), all
  precisions in turn, so a shared machine's changing load hits them alike,
- decode through one session of the prefill graph (it takes any number of tokens: OrtModel(one_copy=True),
  one copy of the weights instead of two), at the parity config: same parity required, tok/s timed alike,
- prefill: one chunk of `chunk` tokens from the zero state, tok/s of both,
- folder bytes against the artifact's bytes.
Quantized graphs are also timed at onnxruntime's faster accuracy level (the "faster" config of the
manifest), with their parity, so the trade is visible.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

TARGET_PARITY = 0.07
TARGET_SESSION_S = 5.0
TARGET_FOLDER = 1.05


def cli(*args) -> None:
    subprocess.run([sys.executable, "-m", "edge_rwkv", *args], check=True, capture_output=True, text=True)


def make_models(work: Path, a) -> dict[str, Path]:
    fp16 = work / "model-fp16.safetensors"
    if not fp16.is_file():
        cli("init", "-o", str(fp16), "--layers", str(a.layers), "--embd", str(a.embd), "--head-size", "64",
            "--vocab", str(a.vocab), "--dtype", "float16", "--seed", "0")
    models = {"fp16": fp16}
    for prec, bits in (("int8", "8"), ("int4", "4")):
        path = work / f"model-{prec}.safetensors"
        if prec in a.precisions and not path.is_file():
            cli("quantize", str(fp16), "-o", str(path), "--bits", bits, "--quantize-head", "--quantize-embedding")
        models[prec] = path
    return {p: models[p] for p in a.precisions}


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def export_child(model: str, out: str, chunk: int, dtype: str) -> None:
    """Run in a child process: export, print {"seconds", "base_rss", "peak_rss"} (bytes) as JSON: the resident
    size once everything is imported, and the high-water mark at the end (an upper bound of export's own peak)."""
    from edge_rwkv.export.exporter import ExportOptions, export_onnx

    base = _status_kb("VmRSS") * 1024
    t = time.perf_counter()
    export_onnx(model, out, ExportOptions(chunk=chunk, dtype=dtype, force=True, progress=False), log=lambda m: None)
    print(json.dumps({"seconds": time.perf_counter() - t, "base_rss": base, "peak_rss": _status_kb("VmHWM") * 1024}))


def export(model: Path, out: Path, chunk: int, dtype: str) -> dict:
    r = subprocess.run([sys.executable, __file__, "--export-child", str(model), str(out), str(chunk), dtype],
                       check=True, capture_output=True, text=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def reference_decode(m, steps: int, first: int):
    """Greedy tokens and their logits from the edge-rwkv CPU runtime."""
    state, tok, toks, logits = m.new_state(), first, [], []
    for _ in range(steps):
        lg, state = m.forward([tok], state)
        logits.append(lg[-1].numpy().copy())
        toks.append(tok)
        tok = int(lg[-1].argmax())
    return toks, np.stack(logits)


def decode_rate(step, toks) -> float:
    """tok/s of `step(token)` over the tokens, from the zero state (step resets itself)."""
    t = time.perf_counter()
    for tok in toks:
        step(tok)
    return len(toks) / (time.perf_counter() - t)


class EdgeDecoder:
    def __init__(self, m):
        self.m, self.state = m, None

    def reset(self):
        self.state = self.m.new_state()

    def __call__(self, tok):
        _, self.state = self.m.forward([tok], self.state)


class OrtDecoder:
    """Decode through decode.onnx, or (one_copy) through the any-T prefill graph, as OrtModel(one_copy=True) does."""

    def __init__(self, folder: Path, session_config, threads, one_copy: bool = False):
        from edge_rwkv.export.ort_runner import IoBoundGraph, OrtGraph

        t = time.perf_counter()
        g = OrtGraph(folder / ("prefill.onnx" if one_copy else "decode.onnx"), threads=threads, session_config=session_config)
        self.g = IoBoundGraph(g.with_tokens(1) if one_copy else g)
        self.created = time.perf_counter() - t

    def reset(self):
        self.g.reset()

    def __call__(self, tok):
        return self.g.step([[tok]])

    def parity(self, toks, ref_logits) -> tuple[float, int, int]:
        """max over steps of max|Δlogits| / std(reference); steps agreeing on the argmax under export/verify.py's
        rule (exact matches + near-ties); of those, near-ties."""
        from edge_rwkv.export.verify import argmax_agreement

        self.reset()
        worst, counts = 0.0, {"match": 0, "near_tie": 0, "miss": 0}
        for tok, ref in zip(toks, ref_logits):
            lg = self(tok)[0]
            worst = max(worst, float(np.abs(lg - ref).max() / ref.std()))
            counts[argmax_agreement(torch.from_numpy(ref), torch.from_numpy(lg))] += 1
        return worst, counts["match"] + counts["near_tie"], counts["near_tie"]


def ort_prefill(folder: Path, ids, session_config, threads):
    from edge_rwkv.export.ort_runner import IoBoundGraph, OrtGraph

    t = time.perf_counter()
    g = IoBoundGraph(OrtGraph(folder / "prefill.onnx", threads=threads, session_config=session_config))
    created = time.perf_counter() - t
    g.step(ids)
    times = []
    for _ in range(3):
        g.reset()
        t = time.perf_counter()
        g.step(ids)
        times.append(time.perf_counter() - t)
    return ids.shape[1] / min(times), created


def reference_prefill(m, ids) -> float:
    m.forward(ids[0].tolist())
    times = []
    for _ in range(3):
        t = time.perf_counter()
        m.forward(ids[0].tolist())
        times.append(time.perf_counter() - t)
    return ids.shape[1] / min(times)


def run(a) -> list[dict]:
    import edge_rwkv
    from edge_rwkv.export.manifest import load_manifest

    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads or os.cpu_count())
    rows, decoders = [], []
    for prec, model in make_models(work, a).items():
        out = work / f"export-{prec}"
        ex = export(model, out, a.chunk, a.dtype)
        manifest = load_manifest(out)
        m = edge_rwkv.load(model, "cpu")
        toks, ref_logits = reference_decode(m, a.steps, first=a.first_token)
        ids = np.random.default_rng(0).integers(0, a.vocab, (1, a.chunk))
        ref_pre = reference_prefill(m, ids)
        art = model.stat().st_size
        configs = [("parity", manifest["onnxruntime"]["session_config"])]
        if "faster" in manifest["onnxruntime"]:
            configs.append(("faster", manifest["onnxruntime"]["faster"]))
        edge = EdgeDecoder(m)
        for label, cfg in configs:
            dec = OrtDecoder(out, cfg, a.threads)
            parity, agree, near_ties = dec.parity(toks, ref_logits)
            one = OrtDecoder(out, cfg, a.threads, one_copy=True) if label == "parity" else None
            # one session for the whole sequence (the same numbers, one copy of the weights): its parity is kept
            one_parity = one.parity(toks, ref_logits)[0] if one is not None else None
            pre_rate, pre_s = ort_prefill(out, ids, cfg, a.threads)
            rows.append({
                "precision": prec, "config": label, "session_config": cfg,
                "artifact_bytes": art, "folder_bytes": folder_bytes(out),
                "export_s": ex["seconds"], "export_peak_over_base": ex["peak_rss"] - ex["base_rss"],
                "session_decode_s": dec.created, "session_prefill_s": pre_s,
                "prefill_inlined_nodes": manifest["graphs"]["prefill"]["inlined_nodes"],
                "ort_decode_tok_s": 0.0, "edge_decode_tok_s": 0.0, "ort_one_session_decode_tok_s": 0.0 if one else None,
                "ort_one_session_parity": one_parity,
                "ort_prefill_tok_s": pre_rate, "edge_prefill_tok_s": ref_pre,
                "parity": parity, "argmax_agree": agree, "argmax_near_ties": near_ties, "steps": a.steps,
            })
            decoders.append((rows[-1], [("ort_decode_tok_s", dec), ("edge_decode_tok_s", edge)]
                             + ([("ort_one_session_decode_tok_s", one)] if one else []), toks))
    # Decode speed: every decoder in turn, `rounds` times, best of each: a shared machine's load moves
    # in minutes, so interleaving compares the runtimes under the same conditions.
    for _ in range(a.rounds):
        for row, steppers, toks in decoders:
            for key, step in steppers:
                step.reset()
                step(toks[0])  # warm
                step.reset()
                row[key] = max(row[key], decode_rate(step, toks))
    return rows


HEADER = ("| precision | ORT config | artifact MB | folder (× artifact) | export s (peak RSS × artifact) | "
          "session s decode / prefill | ORT decode tok/s | ORT decode, one session (one_copy) tok/s | "
          "edge-rwkv CPU decode tok/s | ORT prefill tok/s | "
          "edge-rwkv prefill tok/s | parity max/std | argmax | of which near-ties |")


def print_row(r: dict, file=sys.stdout) -> None:
    art = r["artifact_bytes"]
    cfg = " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in r["session_config"].items()) or "defaults"
    one = "" if r["ort_one_session_decode_tok_s"] is None else f"{r['ort_one_session_decode_tok_s']:.1f}"
    print(f"| {r['precision']} | {r['config']}: {cfg} "
          f"| {art / 1e6:.1f} | {r['folder_bytes'] / 1e6:.1f} ({r['folder_bytes'] / art:.3f}×) "
          f"| {r['export_s']:.1f} ({r['export_peak_over_base'] / art:.2f}×) "
          f"| {r['session_decode_s']:.2f} / {r['session_prefill_s']:.2f} "
          f"| {r['ort_decode_tok_s']:.1f} | {one} | {r['edge_decode_tok_s']:.1f} | {r['ort_prefill_tok_s']:.0f} "
          f"| {r['edge_prefill_tok_s']:.0f} | {r['parity']:.4f} | {r['argmax_agree']}/{r['steps']} "
          f"| {r['argmax_near_ties']} |", file=file)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--embd", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--precisions", type=lambda s: s.split(","), default=["fp16", "int8", "int4"])
    ap.add_argument("--chunk", type=int, default=256, help="prefill graph tokens per call")
    ap.add_argument("--steps", type=int, default=64, help="decode steps compared and timed")
    ap.add_argument("--first-token", type=int, default=510)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved decode timing rounds (best of)")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime / torch threads (default: all cores)")
    ap.add_argument("--workdir", default="bench-export")
    ap.add_argument("--json", default=None)
    ap.add_argument("--dtype", default="float16", help="export --dtype: the graphs' matmul dtype (default float16)")
    ap.add_argument("--export-child", nargs=4, metavar=("MODEL", "OUT", "CHUNK", "DTYPE"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.export_child:
        export_child(a.export_child[0], a.export_child[1], int(a.export_child[2]), a.export_child[3])
        return 0
    rows = run(a)
    print(f"RWKV-7 {a.layers}×{a.embd}, vocab {a.vocab}, random weights; export --dtype {a.dtype}; prefill chunk "
          f"{a.chunk}; {a.steps} decode "
          f"steps; {os.cpu_count()} CPU cores; targets: ORT int8/int4 decode ≥ ORT fp16 and ≥ edge-rwkv, parity ≤ "
          f"{TARGET_PARITY} with {a.steps}/{a.steps} argmax, session ≤ {TARGET_SESSION_S} s, folder ≤ {TARGET_FOLDER}×")
    print(HEADER)
    print("|" + "---|" * HEADER.count(" | ") + "---|")
    for r in rows:
        print_row(r)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
