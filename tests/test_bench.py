"""`edge-rwkv bench` on the CPU with tiny random weights: the table, the JSON fields and the PNG plot."""
import json
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")


def test_bench_cpu_tiny(tmp_path):
    out_json, out_png = tmp_path / "x.json", tmp_path / "x.png"
    cmd = [sys.executable, "-m", "edge_rwkv", "bench", "--preset", "tiny", "--device", "cpu", "--batch", "1,2",
           "--prefill", "64", "--memory-ctx", "64,128", "--e2e-tokens", "12", "--json", str(out_json), "--plot", str(out_png)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| decode tok/s, B=1 |" in proc.stdout and "| peak memory |" in proc.stdout
    assert out_png.is_file() and out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    res = json.loads(out_json.read_text())
    meta = res["meta"]
    assert meta["config"]["n_layer"] == 2 and meta["config"]["n_embd"] == 128 and meta["config"]["vocab_size"] == 65536
    assert meta["copy_gbs"] > 0 and meta["weight_bytes_per_step"] > 0 and meta["state_bytes"] > 0

    decode = {r["precision"]: r for r in res["decode"]}
    assert decode["fp32"]["ours_tok_s"] > 0 and decode["fp32"]["gbs"] > 0 and decode["fp32"]["pct_bound"] > 0
    for q in ("int8", "int4"):  # either measured or reported as unavailable, never a crash
        assert "ours_tok_s" in decode[q] or "n/a" in decode[q].get("note", "")

    e2e = {(r["precision"], r["mode"]): r for r in res["e2e"]}  # Model.stream end to end, beside the step
    assert e2e[("fp32", "greedy")]["ours_tok_s"] > 0 and e2e[("fp32", "top_p 0.8")]["of_step"] > 0
    assert "| Model.stream tok/s, B=1 | fp32 top_p 0.8 |" in proc.stdout

    assert [r["batch"] for r in res["batched"]] == [1, 2]
    assert all(r["ours_tok_s"] > 0 for r in res["batched"])
    pre = {r["tokens"]: r for r in res["prefill"]}
    assert set(pre) == {64, 128}
    for r in pre.values():
        assert r["ours_tok_s"] > 0 and r["ours_peak_bytes"] is not None

    if "rwkv pip" in proc.stdout and "error" not in meta["peer"]:  # the peer column (rwkv package installed)
        assert decode["fp32"]["peer_tok_s"] > 0 and decode["fp32"]["ratio"] > 0
        assert all(r["peer_tok_s"] > 0 for r in pre.values())
    try:
        import rwkv  # noqa: F401
    except ImportError:
        return
    assert "decode_s" in meta["peer"], meta["peer"]


def test_bench_quantized_batch_and_memory_rows(tmp_path):
    """--batch-precisions / --memory-precisions: each precision's model made once, its rows labelled."""
    out_json, out_png = tmp_path / "q.json", tmp_path / "q.png"
    cmd = [sys.executable, "-m", "edge_rwkv", "bench", "--preset", "tiny", "--device", "cpu", "--no-peer",
           "--precisions", "fp32,int8", "--batch-precisions", "fp32,int8", "--memory-precisions", "fp32,int4",
           "--batch", "1,2", "--prefill", "64", "--memory-ctx", "64,128", "--steps", "5", "--e2e-tokens", "0",
           "--json", str(out_json), "--plot", str(out_png)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for label in ("| decode tok/s, batched | B=2", "| decode tok/s, batched int8 | B=2", "| peak memory | ctx 128",
                  "| peak memory int4 | ctx 128", "| prefill tok/s int4 | 64 tokens"):
        assert label in proc.stdout, label
    assert "int4: int4 g128 layers+head (layer 0 att.output fp16), int8 embedding, RTN" in proc.stdout
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # each quantized model is made once (int8 serves decode B=1 and batched rows)
    assert proc.stderr.count("int8: quantized") == 1 and proc.stderr.count("int4: quantized") == 1

    res = json.loads(out_json.read_text())
    meta = res["meta"]
    assert meta["quantization"] == {"int8": "int8 layers+head (layer 0 att.output fp16), int8 embedding, RTN",
                                    "int4": "int4 g128 layers+head (layer 0 att.output fp16), int8 embedding, RTN"}
    assert meta["weights_bytes"]["int4"] < meta["weights_bytes"]["int8"] < meta["weights_bytes"]["fp32"]
    assert [r["precision"] for r in res["decode"]] == ["fp32", "int8"]
    assert all(r["ours_tok_s"] > 0 for r in res["decode"])
    assert [(r["precision"], r["batch"]) for r in res["batched"]] == [("fp32", 1), ("fp32", 2), ("int8", 1), ("int8", 2)]
    assert all(r["ours_tok_s"] > 0 for r in res["batched"])
    pre = {(r["precision"], r["tokens"]): r for r in res["prefill"]}
    assert set(pre) == {("fp32", 64), ("fp32", 128), ("int4", 64), ("int4", 128)}
    assert all(r["ours_tok_s"] > 0 and r["ours_peak_bytes"] is not None for r in pre.values())
    assert set(meta["ours_memory_flat_by_precision"]) == {"fp32", "int4"}
    assert res["options"]["batch_precisions"] == ["fp32", "int8"] and res["options"]["memory_precisions"] == ["fp32", "int4"]


def test_bench_engine_presets():
    """benchmarks/bench_engine.py: 7.2b adds int4 batched / memory rows unless --big-fp16-only; its estimate says so."""
    import argparse
    import importlib.util
    from pathlib import Path

    from edge_rwkv.bench.cli import add_bench_args

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_engine.py"
    spec = importlib.util.spec_from_file_location("bench_engine", path)
    be = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(be)

    def args(*extra):
        ap = argparse.ArgumentParser()
        add_bench_args(ap)
        ap.add_argument("--big-fp16-only", action="store_true")
        return ap.parse_args(["--device", "cuda", *extra])

    o = be.preset_options(args(), "7.2b")
    assert o.precisions == ["fp16", "int8", "int4"]
    assert o.batch_precisions == ["fp16", "int4"] and o.memory_precisions == ["fp16", "int4"]
    o = be.preset_options(args("--big-fp16-only"), "7.2b")
    assert o.precisions == ["fp16"] and o.batch_precisions is None and o.memory_precisions is None
    o = be.preset_options(args("--memory-precisions", "fp16,int8"), "7.2b")
    assert o.memory_precisions == ["fp16", "int8"] and o.batch_precisions == ["fp16", "int4"]
    o = be.preset_options(args(), "1.5b")
    assert o.batch_precisions is None and o.memory_precisions is None
    assert be.estimate_s("7.2b", False) > be.estimate_s("7.2b", True) == be.ESTIMATE_S["7.2b"]


def test_bench_help_lists_options():
    proc = subprocess.run([sys.executable, "-m", "edge_rwkv", "bench", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for opt in ("--preset", "--precisions", "--batch-precisions", "--memory-precisions", "--batch", "--prefill",
                "--memory-ctx", "--no-peer", "--json", "--plot", "--quality"):
        assert opt in proc.stdout


@pytest.mark.parametrize("args,message", [(["--chunk", "0"], "--chunk must be positive"),
                                          (["no-such-model.pth"], "no such model file"),
                                          (["--batch-precisions", "fp16,int3"], "unknown precision 'int3'"),
                                          (["--memory-precisions", ","], "precisions must be among")])
def test_bench_bad_options(tmp_path, args, message):
    proc = subprocess.run([sys.executable, "-m", "edge_rwkv", "bench", "--device", "cpu", *args],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode != 0 and message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bench_rows_say_why_a_precision_is_missing(monkeypatch):
    """A quantized precision that cannot be made leaves rows with the reason, and the table still prints."""
    from edge_rwkv.bench import options, run, weights
    from edge_rwkv.bench.table import format_table
    from edge_rwkv.bench.weights import QUANT_NA

    monkeypatch.setattr(weights, "quantizer", lambda: (None, "not here (test)"))
    o = options.BenchOptions(preset="tiny", device="cpu", precisions=["fp32", "int4"], batch_precisions=["int4"],
                             memory_precisions=["fp32", "int4"], batch=[1], prefill=[32], memory_ctx=[32, 64],
                             peer=False, decode_steps=2, warmup=1)
    res = run.run_bench(o, log=lambda s: None)
    decode = {r["precision"]: r for r in res["decode"]}
    assert decode["fp32"]["ours_tok_s"] > 0 and decode["int4"]["note"] == QUANT_NA
    assert res["batched"] == [{"precision": "int4", "batch": 1, "note": QUANT_NA}]
    int4 = [r for r in res["prefill"] if r["precision"] == "int4"]
    assert [r["tokens"] for r in int4] == [32, 64] and all(r["ours_note"] == QUANT_NA for r in int4)
    table = format_table(res)
    assert f"| peak memory int4 | ctx 64 | {QUANT_NA} |" in table
    assert f"| decode tok/s, batched int4 | B=1 | {QUANT_NA} |" in table


def test_runtime_never_imports_bench():
    """The bench depends on the runtime, never the other way round (cli.py only names it in EXTRA_COMMANDS)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    packages = {"edge_rwkv": root / "edge_rwkv", "edge_rwkv.quant": root / "quant",
                "edge_rwkv.export": root / "export", "edge_rwkv.cuda_kernels": root / "cuda_kernels"}
    offenders = []
    for base, folder in packages.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder)
            if base == "edge_rwkv" and rel.parts[0] == "bench":
                continue
            package = ".".join([base, *rel.parts[:-1]])
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    parent = package.rsplit(".", node.level - 1)[0] if node.level else ""
                    module = ".".join(p for p in (parent, node.module or "") if p)
                    names = [module, *(f"{module}.{a.name}" for a in node.names)]
                else:
                    continue
                if any(n == "edge_rwkv.bench" or n.startswith("edge_rwkv.bench.") for n in names):
                    offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not offenders, offenders
