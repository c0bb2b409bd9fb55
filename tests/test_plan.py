"""Device profiles and `edge-rwkv plan`: memory fit per precision and the bandwidth-bound speed."""
import json

import pytest

from edge_rwkv.cli import main as cli_main
from edge_rwkv.devices import DEVICES, PRESETS, RUNTIME_OVERHEAD, get_device, plan, weight_bytes
from edge_rwkv.errors import InputError


def test_profiles_have_sources_and_sane_figures():
    for name in ("orin-nano-8gb", "orin-nx-16gb", "agx-orin-64gb", "thor"):
        d = DEVICES[name]
        assert d.source and "GB/s" in d.source
        assert 4 << 30 <= d.memory_bytes <= 128 << 30
        assert 50e9 <= d.bandwidth <= 300e9
        assert 0 < d.reserved_bytes < d.memory_bytes
    assert get_device("ORIN-NANO-8GB").name == "orin-nano-8gb"
    with pytest.raises(InputError):
        get_device("raspberry-pi")


def test_precision_ordering_and_bound():
    cfg = PRESETS["rwkv7-1.5b"]
    fp16, _ = weight_bytes(cfg, "fp16")
    int8, _ = weight_bytes(cfg, "int8")
    int4, _ = weight_bytes(cfg, "int4")
    assert fp16 > int8 > int4
    assert 2.8e9 < fp16 < 3.3e9  # ~1.5B parameters in fp16
    r = plan(cfg, "orin-nx-16gb")
    rows = {x["precision"]: x for x in r["rows"]}
    assert rows["fp16"]["tok_s_bound"] < rows["int8"]["tok_s_bound"] < rows["int4"]["tok_s_bound"]
    row = rows["fp16"]
    assert row["total_bytes"] == row["weights_bytes"] + row["state_bytes"] + RUNTIME_OVERHEAD
    assert row["tok_s_bound"] == pytest.approx(102.4e9 / row["bytes_per_token"])
    assert r["recommended"] == "fp16"


def test_big_model_on_small_device():
    r = plan(PRESETS["rwkv7-7.2b"], "orin-nano-8gb")
    fits = {x["precision"]: x["fits"] for x in r["rows"]}
    assert fits == {"fp16": False, "int8": False, "int4": True}
    assert r["recommended"] == "int4"
    assert plan(PRESETS["rwkv7-7.2b"], "thor")["recommended"] == "fp16"


def test_plan_command(tmp_path, capsys):
    model = tmp_path / "m.safetensors"
    assert cli_main(["init", "-o", str(model), "--layers", "1", "--embd", "32", "--head-size", "32"]) == 0
    capsys.readouterr()
    assert cli_main(["plan", str(model), "--device", "agx-orin-64gb"]) == 0
    out = capsys.readouterr().out
    assert "Jetson AGX Orin 64GB" in out and "int4" in out and "recommended: fp16" in out
    assert cli_main(["plan", "rwkv7-2.9b", "--device", "orin-nano-8gb", "--slots", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["slots"] == 2 and [r["precision"] for r in data["rows"]] == ["fp16", "int8", "int4"]
    assert cli_main(["plan", "rwkv7-2.9b", "--device", "nope"]) == 1
