"""Device profiles and `edge-rwkv plan`: the memory model per precision and the decode speed, checked against
the modules' published specifications and the runtime's own figures."""
import json

import pytest

from edge_rwkv.cli import main as cli_main
from edge_rwkv.devices import (CUDA_CONTEXT, DEVICES, EFFICIENCY, GiB, PRESETS, PROCESS_BASE, format_plan, get_device,
                               plan, plan_model, preset_config, weight_bytes)
from edge_rwkv.errors import InputError
from edge_rwkv.state import State

# Published module specifications: (memory GB, peak bandwidth GB/s).
SPECS = {
    "orin-nano-4gb": (4, 34), "orin-nano-4gb-super": (4, 51),
    "orin-nano-8gb": (8, 68), "orin-nano-8gb-super": (8, 102),
    "orin-nx-8gb": (8, 102.4), "orin-nx-16gb": (16, 102.4),
    "agx-orin-32gb": (32, 204.8), "agx-orin-64gb": (64, 204.8),
    "thor-t4000": (64, 273), "thor": (128, 273),
}


def test_profiles_match_the_module_specs():
    assert set(SPECS) <= set(DEVICES)
    for name, (mem_gb, bw) in SPECS.items():
        d = DEVICES[name]
        assert d.memory_bytes == mem_gb * GiB and d.bandwidth == pytest.approx(bw * 1e9)
        # firmware carve-outs: Linux sees 0.4-6 GiB less than the module has
        assert 0.4 * GiB <= d.memory_bytes - d.visible_bytes <= 6 * GiB
        assert 0 < d.reserved_bytes < d.visible_bytes
        assert f"{bw:g} GB/s" in d.source and "estimate" in d.source
    assert get_device("ORIN-NANO-8GB").name == "orin-nano-8gb"
    assert get_device("thor-t5000").name == "thor"
    with pytest.raises(InputError):
        get_device("raspberry-pi")


def test_state_bytes_are_the_runtimes_own():
    cfg = preset_config("tiny")
    s = State.zeros(cfg.n_layer, 1, cfg.n_embd, cfg.n_head, cfg.head_size, "cpu")
    assert s.nbytes == cfg.state_bytes(1)
    # 64 hot sessions at the released sizes: 0.77 / 1.29 / 2.06 GiB
    got = [64 * PRESETS[f"rwkv7-{s}"].state_bytes(1) / GiB for s in ("1.5b", "2.9b", "7.2b")]
    assert got == pytest.approx([0.77, 1.29, 2.06], abs=0.005)


def test_memory_model_adds_up():
    cfg = PRESETS["rwkv7-1.5b"]
    r = plan(cfg, "orin-nx-16gb", slots=4, hot_sessions=64)
    state = cfg.state_bytes(1)
    assert r["budget_bytes"] == DEVICES["orin-nx-16gb"].visible_bytes - DEVICES["orin-nx-16gb"].reserved_bytes
    for row in r["rows"]:
        weights, _ = weight_bytes(cfg, row["precision"])
        assert row["weights_bytes"] == weights
        assert row["states_bytes"] == (2 * 4 + 64) * state
        assert row["runtime_bytes"] == CUDA_CONTEXT + PROCESS_BASE
        assert row["steady_bytes"] == (weights + row["slack_bytes"] + row["runtime_bytes"] + row["states_bytes"]
                                       + row["activation_bytes"])
        emb = cfg.vocab_size * cfg.n_embd * 2  # the embedding stays fp16 under every default policy
        assert row["load_peak_bytes"] > weights + emb + row["runtime_bytes"]
        assert row["total_bytes"] == max(row["steady_bytes"], row["load_peak_bytes"])
        assert 0 <= row["slack_bytes"] < 0.1 * weights
    fewer = plan(cfg, "orin-nx-16gb", slots=1, hot_sessions=0)["rows"][0]
    assert r["rows"][0]["steady_bytes"] - fewer["steady_bytes"] > (2 * 3 + 64) * state


def test_speed_bound_and_expected_range():
    cfg = PRESETS["rwkv7-1.5b"]
    r = plan(cfg, "orin-nano-8gb-super")
    rows = {x["precision"]: x for x in r["rows"]}
    assert rows["fp16"]["tok_s_bound"] < rows["int8"]["tok_s_bound"] < rows["int4"]["tok_s_bound"]
    row = rows["int4"]
    assert row["tok_s_bound"] == pytest.approx(102e9 / row["bytes_per_token"])
    assert row["tok_s_expected"] == pytest.approx([row["tok_s_bound"] * e for e in EFFICIENCY])
    # the published int4 figures on an Orin Nano sit at 75-80 % of the bound: inside the stated range
    assert EFFICIENCY[0] < 0.75 and 0.80 <= EFFICIENCY[1] < 1


def test_small_modules_are_not_overcommitted():
    # 2.9B fp16 (5.5 GiB of weights) does not fit an 8 GB module once the carve-outs, the CUDA context and 64
    # hot sessions are counted; int8 does
    r = plan(PRESETS["rwkv7-2.9b"], "orin-nano-8gb")
    assert {x["precision"]: x["fits"] for x in r["rows"]} == {"fp16": False, "int8": True, "int4": True}
    assert r["recommended"] == "int8"
    # int8 fits only with a smaller prefill chunk than the runtime's own (256 tokens × 2560 wide: ~0.3 GB):
    # the plan says so and names the --max-memory budget that makes the runtime pick it
    int8 = r["rows"][1]
    assert int8["needs_max_memory"] and int8["prefill_chunk"] < 256
    assert 0 < int8["max_memory_bytes"] < r["budget_bytes"]
    assert not r["rows"][2]["needs_max_memory"] and r["rows"][2]["prefill_chunk"] == 256
    assert "--max-memory" in format_plan(r)
    assert plan(PRESETS["rwkv7-7.2b"], "orin-nano-8gb")["recommended"] is None
    assert plan(PRESETS["rwkv7-1.5b"], "orin-nano-4gb")["recommended"] is None
    assert plan(PRESETS["rwkv7-0.4b"], "orin-nano-4gb")["recommended"] == "int4"
    assert plan(PRESETS["rwkv7-7.2b"], "agx-orin-32gb")["recommended"] == "fp16"
    assert plan(PRESETS["rwkv7-7.2b"], "thor-t4000")["recommended"] == "fp16"
    # a module that shows more memory to Linux fits more
    more = plan(PRESETS["rwkv7-2.9b"], "orin-nano-8gb", visible_bytes=int(7.9 * GiB))
    assert more["budget_bytes"] - r["budget_bytes"] == int(7.9 * GiB) - DEVICES["orin-nano-8gb"].visible_bytes


def test_preset_names_as_bench_spells_them():
    assert preset_config("7.2b") == preset_config("rwkv7-7.2b") == PRESETS["rwkv7-7.2b"]
    tiny = preset_config("tiny")
    assert (tiny.n_layer, tiny.n_embd) == (2, 128)
    assert preset_config("13b") is None


def test_plan_command(tmp_path, capsys):
    model = tmp_path / "m.safetensors"
    assert cli_main(["init", "-o", str(model), "--layers", "1", "--embd", "32", "--head-size", "32"]) == 0
    capsys.readouterr()
    assert cli_main(["plan", str(model), "--device", "agx-orin-64gb"]) == 0
    out = capsys.readouterr().out
    assert "Jetson AGX Orin 64GB" in out and "int4" in out and "recommended: fp16" in out
    ours = [ln for ln in out.splitlines() if not ln.strip().startswith("source:")]  # the spec sheet's own GB
    assert any(" GiB" in ln for ln in ours) and not any(" GB " in ln or ln.endswith(" GB") for ln in ours)
    assert cli_main(["plan", "7.2b", "--device", "orin-nano-8gb"]) == 0
    assert "recommended: none" in capsys.readouterr().out
    assert cli_main(["plan", "2.9b", "--device", "orin-nano-8gb", "--slots", "2", "--hot-sessions", "0",
                     "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["slots"] == 2 and data["hot_sessions"] == 0
    assert [r["precision"] for r in data["rows"]] == ["fp16", "int8", "int4"]
    assert data == json.loads(json.dumps(plan_model("rwkv7-2.9b", "orin-nano-8gb", 2, 0) | {"model": "2.9b"}))
    assert cli_main(["plan", "rwkv7-2.9b", "--device", "nope"]) == 1
    assert cli_main(["plan", "rwkv7-2.9b", "--visible", "99"]) == 1
    assert cli_main(["plan", "rwkv7-2.9b", "--hot-sessions", "-1"]) == 1
    err = capsys.readouterr().err
    assert err.count("edge-rwkv: error:") == 3
