"""Memory of an export's onnxruntime sessions: one session vs two, under each sharing option; prints one table.

    python3 benchmarks/ort_sessions_memory.py [--layers 12 --embd 768] [--precisions fp16,int8,int4]
                                              [--chunk 256] [--threads 1] [--workdir DIR] [--json out.json]

Models and exports are made as benchmarks/bench_export.py makes them (the same --workdir is reused).
Every configuration runs in its own child process, so each starts from a fresh heap. A child imports
onnxruntime and numpy (its base resident size), makes the sessions with the export's own session config
(manifest.onnxruntime.session_config) plus the configuration's changes, runs one decode call and one
prefill call, and reports its resident size above the base (VmRSS: anonymous memory plus mapped file
pages), the high-water mark above the base (VmHWM: session creation's transients included), session
creation time, decode / prefill tok/s, and how far its decode logits are from the first configuration's
(a sharing option must not change the numbers). Configurations:

- one session: decode.onnx only (prefill then runs one token per call);
- one session of prefill.onnx: the onnxruntime target's prefill graph takes any number of tokens, so it
  runs the chunks and the single tokens (OrtModel(one_copy=True)); decode is timed through it;
- two sessions: decode.onnx + prefill.onnx, onnxruntime's defaults;
- shared initializers: every external initializer handed to both sessions as the same OrtValue, a
  view of weights.bin mapped read-only (SessionOptions.add_initializer);
- no prepacking: `session.disable_prepacking=1` (kernels keep the initializers as they are);
- env allocators: one arena registered with onnxruntime's environment and used by both sessions
  (`create_and_register_allocator` + `session.use_env_allocators=1`);
- graph optimization levels: disabled / basic / extended (default: all);
- combinations of the above where a single change alone cannot help.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

@dataclass(frozen=True)
class SessionSetup:
    """How a configuration opens its sessions."""

    graphs: tuple[str, ...] = ("decode", "prefill")
    shared_initializers: bool = False  # every external initializer added to each session as one shared OrtValue
    entries: tuple[tuple[str, str], ...] = ()  # session config entries on top of the manifest's
    optimization: str | None = None  # "disable" | "basic" | "extended"; None: onnxruntime's default (all)
    env_arena: bool = False  # one arena registered with the environment, used by every session


PREPACK_OFF = (("session.disable_prepacking", "1"),)
CONFIGS = {
    "one session (decode only)": SessionSetup(graphs=("decode",)),
    "one session of prefill.onnx (any T: OrtModel one_copy)": SessionSetup(graphs=("prefill",)),
    "two sessions": SessionSetup(),
    "two + shared initializers": SessionSetup(shared_initializers=True),
    "two + disable_prepacking": SessionSetup(entries=PREPACK_OFF),
    "two + shared + disable_prepacking": SessionSetup(shared_initializers=True, entries=PREPACK_OFF),
    "two + env allocators (shared arena)": SessionSetup(entries=(("session.use_env_allocators", "1"),), env_arena=True),
    "two + optimization disabled": SessionSetup(optimization="disable"),
    "two + shared + optimization disabled": SessionSetup(shared_initializers=True, optimization="disable"),
    "two + optimization basic": SessionSetup(optimization="basic"),
    "two + shared + optimization basic": SessionSetup(shared_initializers=True, optimization="basic"),
    "two + optimization extended": SessionSetup(optimization="extended"),
}


def _status_bytes(*keys: str) -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k = line.split(":", 1)[0]
            if k in keys:
                out[k] = int(line.split()[1]) * 1024
    return out


def shared_initializers(folder: Path, graph_files) -> tuple[list[str], list, object]:
    """(names, OrtValues, the map) of every external initializer of the graphs: views of weights.bin mapped
    read-only, one OrtValue per name whichever graph uses it."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    mapped = np.memmap(folder / "weights.bin", dtype=np.uint8, mode="r")
    names, values = [], []
    for f in graph_files:
        for t in onnx.load(str(folder / f), load_external_data=False).graph.initializer:
            if t.data_location != TensorProto.EXTERNAL or t.name in names:
                continue
            ext = {e.key: int(e.value) for e in t.external_data if e.key in ("offset", "length")}
            raw = mapped[ext["offset"]:ext["offset"] + ext["length"]]
            if t.data_type in (TensorProto.INT4, TensorProto.UINT4):
                # Two levels a byte, no numpy dtype: onnxruntime takes the array's shape as the tensor's and
                # reads its packed bytes from the array's start, so a [K, N] view with the packed rows' strides
                # over the K·N/2 mapped bytes hands over the mapping itself (no copy).
                K, N = t.dims
                value = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
                    np.lib.stride_tricks.as_strided(raw.view(np.int8), shape=(K, N), strides=(N // 2, 1)), t.data_type)
            else:
                arr = raw.view(helper.tensor_dtype_to_np_dtype(t.data_type)).reshape(list(t.dims))
                value = ort.OrtValue.ortvalue_from_numpy(arr)
            names.append(t.name)
            values.append(value)
    return names, values, mapped


def child(folder: str, config: str, threads: int, logits_path: str) -> None:
    """In a fresh process: make the sessions of `config`, run them, print the measurements as JSON (and write
    the first decode call's logits to `logits_path`)."""
    import numpy as np
    import onnxruntime as ort

    base = _status_bytes("VmRSS")["VmRSS"]
    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    setup = CONFIGS[config]
    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}
    if setup.env_arena:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
    files = [manifest["graphs"][g]["file"] for g in setup.graphs]
    keep = shared_initializers(folder, files) if setup.shared_initializers else None
    sessions, t0 = {}, time.perf_counter()
    for g, f in zip(setup.graphs, files):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        for k, v in {**manifest["onnxruntime"]["session_config"], **dict(setup.entries)}.items():
            opts.add_session_config_entry(k, str(v))
        if setup.optimization:
            opts.graph_optimization_level = levels[setup.optimization]
        if keep:
            for name, value in zip(keep[0], keep[1]):
                opts.add_initializer(name, value)
        sessions[g] = ort.InferenceSession(str(folder / f), opts, providers=["CPUExecutionProvider"])
    created = time.perf_counter() - t0
    after_create = _status_bytes("VmRSS")["VmRSS"]

    def feeds(sess, T):
        return {i.name: (np.full((i.shape[0], T), 1, np.int64) if i.name == "tokens" else np.zeros(i.shape, np.float32))
                for i in sess.get_inputs()}

    # Decode on the decode graph, or on the prefill graph with one token where that is the only session.
    calls = {"decode": (sessions.get("decode") or sessions["prefill"], 1, 8)}
    if "prefill" in sessions:
        calls["prefill"] = (sessions["prefill"], manifest["graphs"]["prefill"]["tokens_per_call"], 1)
    rates = {}
    for what, (sess, T, n) in calls.items():
        f = feeds(sess, T)
        out = sess.run(["logits"], f)[0]  # warm: the first call sizes the arenas
        if what == "decode":
            np.save(logits_path, out)  # the parent checks every configuration computes the same logits
        t = time.perf_counter()
        for _ in range(n):
            sess.run(None, f)
        rates[what] = n * T / (time.perf_counter() - t)
    st = _status_bytes("VmRSS", "VmHWM", "RssAnon", "RssFile")
    print(json.dumps({"base": base, "after_create": after_create - base, "after_run": st["VmRSS"] - base,
                      "anon": st["RssAnon"], "file": st["RssFile"], "peak": st["VmHWM"] - base,
                      "session_s": created, "decode_tok_s": rates.get("decode"), "prefill_tok_s": rates.get("prefill")}))


def measure(folder: Path, config: str, threads: int, reference) -> tuple[dict, object]:
    """One configuration in a child process; its decode logits are compared with `reference` (the first
    configuration's): max |Δ| / std. Returns (row fields, these logits)."""
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "logits.npy"
        r = subprocess.run([sys.executable, __file__, "--child", str(folder), config, str(threads), str(path)],
                           capture_output=True, text=True)
        if r.returncode:
            return {"error": (r.stderr.strip().splitlines() or ["?"])[-1][:160]}, None
        logits = np.load(path)
    row = json.loads(r.stdout.strip().splitlines()[-1])
    ref = logits if reference is None else reference
    row["logits_vs_first"] = float(np.abs(logits - ref).max() / ref.std())
    return row, logits


def weights_bytes(folder: Path) -> int:
    return (folder / "weights.bin").stat().st_size


HEADER = ("| precision (weights.bin MB) | configuration | resident MB after runs (× weights.bin) | peak MB | "
          "session s | decode tok/s | prefill tok/s | logits vs first row |")


def print_row(r: dict, file=sys.stdout) -> None:
    wb = r["weights_bytes"]
    if "error" in r:
        print(f"| {r['precision']} ({wb / 1e6:.0f}) | {r['config']} | failed: {r['error']} | | | | | |", file=file)
        return
    pre = f"{r['prefill_tok_s']:.0f}" if r["prefill_tok_s"] else "—"
    print(f"| {r['precision']} ({wb / 1e6:.0f}) | {r['config']} | {r['after_run'] / 1e6:.0f} ({r['after_run'] / wb:.2f}×) "
          f"| {r['peak'] / 1e6:.0f} | {r['session_s']:.2f} | {r['decode_tok_s']:.1f} | {pre} "
          f"| {r['logits_vs_first']:.1e} |", file=file)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--embd", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--precisions", type=lambda s: s.split(","), default=["fp16", "int8", "int4"])
    ap.add_argument("--chunk", type=int, default=256, help="prefill graph tokens per call")
    ap.add_argument("--dtype", default="float16", help="export --dtype (default float16)")
    ap.add_argument("--configs", type=lambda s: s.split(";"), default=list(CONFIGS),
                    help="configurations to run, ';'-separated names (default: all)")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    ap.add_argument("--workdir", default="bench-export")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", nargs=4, metavar=("FOLDER", "CONFIG", "THREADS", "LOGITS"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a.child[0], a.child[1], int(a.child[2]), a.child[3])
        return 0
    unknown = [c for c in a.configs if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown configuration(s) {unknown}; known: {'; '.join(CONFIGS)}")
    # Imported here, in the parent only: bench_export imports torch, which would inflate every child's base.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_export  # the models and exports are made one way, there

    from edge_rwkv.progress import progress_iter

    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []

    jobs = []
    for prec, model in bench_export.make_models(work, a).items():
        out = work / f"export-{prec}"
        if not (out / "manifest.json").is_file():
            bench_export.export(model, out, a.chunk, a.dtype)
        jobs += [(prec, out, c) for c in a.configs]
    reference = {}
    for prec, out, config in progress_iter(jobs, desc="configurations", unit="config"):
        row, logits = measure(out, config, a.threads, reference.get(prec))
        if prec not in reference and logits is not None:
            reference[prec] = logits
        rows.append({"precision": prec, "config": config, "weights_bytes": weights_bytes(out), **row})
    print(f"RWKV-7 {a.layers}×{a.embd}, vocab {a.vocab}, random weights; export --dtype {a.dtype}, prefill chunk "
          f"{a.chunk}; onnxruntime CPU, {a.threads} thread(s), each configuration in a fresh process; resident = "
          f"VmRSS above the process's size after importing onnxruntime, after one decode and one prefill call")
    print(HEADER)
    print("|" + "---|" * HEADER.count(" | ") + "---|")
    for r in rows:
        print_row(r)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
