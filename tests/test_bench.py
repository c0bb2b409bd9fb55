"""`edge-rwkv bench` on the CPU with tiny random weights: the table, the JSON fields and the PNG plot."""
import json
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")


def test_bench_cpu_tiny(tmp_path):
    out_json, out_png = tmp_path / "x.json", tmp_path / "x.png"
    cmd = [sys.executable, "-m", "edge_rwkv", "bench", "--preset", "tiny", "--device", "cpu", "--batch", "1,2",
           "--prefill", "64", "--memory-ctx", "64,128", "--json", str(out_json), "--plot", str(out_png)]
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


def test_bench_help_lists_options():
    proc = subprocess.run([sys.executable, "-m", "edge_rwkv", "bench", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for opt in ("--preset", "--precisions", "--batch", "--prefill", "--memory-ctx", "--no-peer", "--json", "--plot", "--quality"):
        assert opt in proc.stdout


@pytest.mark.parametrize("args,message", [(["--chunk", "0"], "--chunk must be positive"),
                                          (["no-such-model.pth"], "no such model file")])
def test_bench_bad_options(tmp_path, args, message):
    proc = subprocess.run([sys.executable, "-m", "edge_rwkv", "bench", "--device", "cpu", *args],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode != 0 and message in proc.stderr
    assert "Traceback" not in proc.stderr
