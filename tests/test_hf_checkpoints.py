"""Hugging Face / fla folders in and out.

The folders here are written by `fla_layout`, a mapping written in this test from the published fla
layout (flash-linear-attention's RWKV7 model and its `convert_from_rwkv7`), independent of the loader's
own table: agreement means both read the layout the same way.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import edge_rwkv
from edge_rwkv import CheckpointError
from edge_rwkv.cli import main as cli_main
from edge_rwkv.synthetic import random_checkpoint
from reference_numpy import reference_logits

VOCAB = 300
TOKENS = [5, 299, 17, 0, 128, 128, 42, 7]


# --------------------------------------------------------------------------- the independent mapping

def fla_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official x070 names → fla names, written from the fla model's module tree."""
    out = {}
    top = {"emb.weight": "model.embeddings.weight", "ln_out.weight": "model.norm.weight",
           "ln_out.bias": "model.norm.bias", "head.weight": "lm_head.weight"}
    for name, t in sd.items():
        if name in top:
            out[top[name]] = t
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.(\w+)\.(.+)", name)
        layer, part, rest = int(m.group(1)), m.group(2), m.group(3)
        p = f"model.layers.{layer}."
        if part in ("ln0", "ln1", "ln2"):
            out[p + {"ln0": "pre_norm", "ln1": "attn_norm", "ln2": "ffn_norm"}[part] + "." + rest] = t
        elif part == "ffn":
            out[p + "ffn." + rest] = t.flatten() if rest == "x_k" else t
        elif re.fullmatch(r"[wavg][012]", rest):
            if layer == 0 and rest[0] == "v":
                continue  # fla has no value LoRA in the first layer
            lin = {"1": "lora.0.weight", "2": "lora.2.weight", "0": "lora.2.bias"}[rest[1]]
            out[p + f"attn.{rest[0]}_lora.{lin}"] = t.flatten() if rest[1] == "0" else t.T.contiguous()
        elif rest.startswith("ln_x."):
            out[p + "attn.g_norm." + rest[5:]] = t
        elif rest in ("k_k", "k_a"):
            out[p + "attn." + rest] = t.flatten()
        elif rest.endswith(".weight"):
            proj = {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj"}[rest[:-7]]
            out[p + f"attn.{proj}.weight"] = t
        else:  # x_r … x_g stay [1, 1, C]; r_k stays [H, N]
            out[p + "attn." + rest] = t
    return out


def fla_config(sd) -> dict:
    C = sd["emb.weight"].shape[1]
    H, N = sd["blocks.0.att.r_k"].shape
    L = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    cfg = {"model_type": "rwkv7", "architectures": ["RWKV7ForCausalLM"], "hidden_size": C, "num_hidden_layers": L,
           "head_dim": N, "vocab_size": sd["emb.weight"].shape[0],
           "intermediate_size": sd["blocks.0.ffn.key.weight"].shape[0],
           "decay_low_rank_dim": sd["blocks.0.att.w1"].shape[1], "a_low_rank_dim": sd["blocks.0.att.a1"].shape[1],
           "gate_low_rank_dim": sd["blocks.0.att.g1"].shape[1], "norm_eps": 1e-5, "attn": None,
           "tie_word_embeddings": False}
    if L > 1:
        cfg["v_low_rank_dim"] = sd["blocks.1.att.v1"].shape[1]
    return cfg


def write_folder(folder: Path, sd, shards: int = 1, config: dict | None = None, hf: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    hf = fla_layout(sd) if hf is None else hf
    (folder / "config.json").write_text(json.dumps(config or fla_config(sd)))
    if shards == 1:
        save_file(hf, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    names = sorted(hf)
    weight_map = {}
    for k in range(shards):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = names[k::shards]
        save_file({n: hf[n] for n in part}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.fixture(scope="module")
def sd():
    return random_checkpoint(2, 96, 32, vocab_size=VOCAB, seed=11)


def rel_err(got, want) -> float:
    return float(np.abs(np.asarray(got, dtype=np.float64) - want).max() / want.std())


def same_tensors(got: dict, want: dict) -> None:
    assert set(got) == set(want) - {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}
    for k in got:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k].reshape(want[k].shape), want[k]), k


# --------------------------------------------------------------------------- in

@pytest.mark.parametrize("size", [(1, 64, 32), (2, 96, 32), (3, 128, 64)], ids=lambda s: f"L{s[0]}-C{s[1]}-N{s[2]}")
def test_folder_matches_fp64_reference(tmp_path, size):
    L, C, N = size
    sd = random_checkpoint(L, C, N, vocab_size=VOCAB, seed=L + C)
    if L == 1:  # official one-layer files may lack the unused layer-0 value LoRA
        sd = {k: v for k, v in sd.items() if not re.fullmatch(r"blocks\.0\.att\.v[012]", k)}
    m = edge_rwkv.load(write_folder(tmp_path / "hf", sd))
    assert (m.config.n_layer, m.config.n_embd, m.config.head_size, m.config.vocab_size) == (L, C, N, VOCAB)
    logits, _ = m.forward(TOKENS)
    assert rel_err(logits, reference_logits(sd, TOKENS)) <= 1e-5


def test_folder_tensors_equal_official(sd, tmp_path):
    from edge_rwkv.checkpoint import load_checkpoint

    same_tensors(load_checkpoint(write_folder(tmp_path / "hf", sd)).tensors, sd)


@pytest.mark.parametrize("shards", [2, 3])
def test_sharded_folder(sd, tmp_path, shards):
    from edge_rwkv.checkpoint import load_checkpoint

    folder = write_folder(tmp_path / "sharded", sd, shards=shards)
    assert not (folder / "model.safetensors").exists()
    same_tensors(load_checkpoint(folder).tensors, sd)


def test_fused_mix_of_older_fla_folders(sd, tmp_path):
    """fla's first RWKV7 layout stacked the six token-shift mixes as attn.x_x [6, C] (r, w, k, v, a, g)."""
    from edge_rwkv.checkpoint import load_checkpoint

    hf = fla_layout(sd)
    for i in range(2):
        p = f"model.layers.{i}.attn."
        hf[p + "x_x"] = torch.cat([hf.pop(p + x).reshape(1, -1) for x in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")])
    same_tensors(load_checkpoint(write_folder(tmp_path / "v1", sd, hf=hf)).tensors, sd)


def test_layer0_value_lora_of_older_fla_builds_is_read(sd, tmp_path):
    from edge_rwkv.checkpoint import load_checkpoint

    hf = fla_layout(sd)
    p = "model.layers.0.attn.v_lora.lora."
    hf.update({p + "0.weight": sd["blocks.0.att.v1"].T.contiguous(), p + "2.weight": sd["blocks.0.att.v2"].T.contiguous(),
               p + "2.bias": sd["blocks.0.att.v0"].flatten()})
    got = load_checkpoint(write_folder(tmp_path / "v0", sd, hf=hf)).tensors
    assert all(torch.equal(got[k].reshape(sd[k].shape), sd[k]) for k in sd)


def test_tied_embeddings(sd, tmp_path):
    from edge_rwkv.checkpoint import load_checkpoint

    tied = dict(sd, **{"head.weight": sd["emb.weight"]})
    hf = fla_layout(tied)
    del hf["lm_head.weight"]
    cfg = dict(fla_config(sd), tie_word_embeddings=True)
    same_tensors(load_checkpoint(write_folder(tmp_path / "tied", sd, config=cfg, hf=hf)).tensors, tied)


def test_config_fields_fla_may_leave_out_come_from_shapes(sd, tmp_path):
    from edge_rwkv.checkpoint import load_checkpoint

    cfg = fla_config(sd)
    for k in ("intermediate_size", "decay_low_rank_dim", "a_low_rank_dim", "gate_low_rank_dim", "v_low_rank_dim",
              "head_dim"):
        cfg.pop(k)
    cfg["num_heads"] = 3
    same_tensors(load_checkpoint(write_folder(tmp_path / "sparse", sd, config=cfg)).tensors, sd)


def test_info_on_folder(sd, tmp_path, capsys):
    folder = write_folder(tmp_path / "hf", sd, shards=2)
    assert cli_main(["info", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"].startswith("Hugging Face / fla folder, 2 safetensors files")
    assert info["config"]["n_layer"] == 2 and info["config"]["n_embd"] == 96
    assert info["file_bytes"] == sum(f.stat().st_size for f in folder.glob("*.safetensors"))


# --------------------------------------------------------------------------- out, and round trips

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_official_to_hf_to_loader_is_exact(sd, tmp_path, dtype):
    from edge_rwkv.checkpoint import load_checkpoint

    src = {k: v.to(dtype) for k, v in sd.items()}
    torch.save(src, tmp_path / "official.pth")
    out = tmp_path / "hf"
    assert cli_main(["convert", str(tmp_path / "official.pth"), "-o", str(out), "--format", "hf"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    same_tensors(load_checkpoint(out).tensors, src)
    # the layout written is the one fla publishes: same names, shapes and bytes as the independent mapping
    from safetensors.torch import load_file

    written, expected = load_file(str(out / "model.safetensors")), fla_layout(src)
    assert set(written) == set(expected)
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    cfg = json.loads((out / "config.json").read_text())
    assert {k: cfg[k] for k in fla_config(sd)} == fla_config(sd)
    assert cfg["torch_dtype"] == str(dtype).replace("torch.", "")
    # and on to an artifact, then back to hf: still the same tensors
    assert cli_main(["convert", str(out), "-o", str(tmp_path / "a.safetensors")]) == 0
    same_tensors(load_checkpoint(tmp_path / "a.safetensors").tensors, src)
    assert cli_main(["convert", str(tmp_path / "a.safetensors"), "-o", str(tmp_path / "hf2"), "--format", "hf"]) == 0
    assert (tmp_path / "hf2" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_other_commands_take_a_folder(sd, tmp_path, capsys):
    from edge_rwkv.checkpoint import source_sha256

    folder = write_folder(tmp_path / "hf", sd, shards=2)
    assert cli_main(["quantize", str(folder), "-o", str(tmp_path / "q.safetensors"), "--bits", "8"]) == 0
    assert edge_rwkv.load(tmp_path / "q.safetensors").metadata["source_sha256"] == source_sha256(folder)
    capsys.readouterr()
    assert cli_main(["plan", str(folder), "--json"]) == 0
    assert '"n_layer": 2' in capsys.readouterr().out


def test_hf_output_never_replaces_an_existing_folder(sd, tmp_path, capsys):
    torch.save(sd, tmp_path / "m.pth")
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty folder (made beforehand, e.g. a mount point's child) is filled
    assert cli_main(["convert", str(tmp_path / "m.pth"), "-o", str(empty), "--format", "hf"]) == 0
    assert sorted(p.name for p in empty.iterdir()) == ["config.json", "model.safetensors"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli_main(["convert", str(tmp_path / "m.pth"), "-o", str(out), "--format", "hf"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_hf_output_is_all_or_nothing(sd, tmp_path, monkeypatch):
    """A write that fails half-way leaves neither the folder nor its temporary sibling."""
    from edge_rwkv import checkpoint
    from edge_rwkv.checkpoint import write_hf_folder
    from edge_rwkv.config import ModelConfig
    from edge_rwkv.checkpoint import derive_config

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(OSError):
        write_hf_folder(tmp_path / "out", sd, derive_config(sd), torch.float32)
    assert list(tmp_path.iterdir()) == []
    assert isinstance(derive_config(sd), ModelConfig)


# --------------------------------------------------------------------------- bad folders

def rejected(path, *needles) -> str:
    with pytest.raises(CheckpointError) as e:
        edge_rwkv.load(path)
    msg = str(e.value)
    assert str(path) in msg, msg
    for n in needles:
        assert n.lower() in msg.lower(), f"{n!r} not in {msg!r}"
    assert "\n" not in msg.strip(), msg
    return msg


def refused_by_convert(folder: Path, capsys, *needles) -> None:
    """The CLI says the same thing in one line, and writes nothing."""
    out = folder.parent / f"{folder.name}-out"
    for fmt in ("artifact", "hf"):
        assert cli_main(["convert", str(folder), "-o", str(out), "--format", fmt]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("edge-rwkv: error: ") and "\n" not in err, err
        assert all(n.lower() in err.lower() for n in needles), err
        assert not out.exists()
        assert not [p for p in folder.parent.iterdir() if p.name.startswith(f".{out.name}")]


@pytest.mark.parametrize("keep", [0.3, 0.97])
@pytest.mark.parametrize("shards", [1, 2])
def test_truncated_weights(sd, tmp_path, capsys, keep, shards):
    folder = write_folder(tmp_path / "hf", sd, shards=shards)
    victim = sorted(folder.glob("*.safetensors"))[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[: int(len(data) * keep)])
    rejected(folder, "truncated", victim.name)
    refused_by_convert(folder, capsys, "truncated")


def test_wrong_shape_names_the_hf_tensor(sd, tmp_path, capsys):
    hf = fla_layout(sd)
    hf["model.layers.1.attn.w_lora.lora.0.weight"] = hf["model.layers.1.attn.w_lora.lora.0.weight"].T.contiguous()
    folder = write_folder(tmp_path / "hf", sd, hf=hf)
    rejected(folder, "model.layers.1.attn.w_lora.lora.0.weight", "shape", "expected")
    refused_by_convert(folder, capsys, "w_lora")


def test_config_disagreeing_with_tensors(sd, tmp_path):
    cfg = dict(fla_config(sd), intermediate_size=200)
    rejected(write_folder(tmp_path / "hf", sd, config=cfg), "model.layers.0.ffn.key.weight", "[384, 96]", "[200, 96]")


@pytest.mark.parametrize("field", ["model_type", "hidden_size", "num_hidden_layers", "vocab_size", "head_dim"])
def test_missing_config_field(sd, tmp_path, capsys, field):
    cfg = fla_config(sd)
    del cfg[field]
    folder = write_folder(tmp_path / "hf", sd, config=cfg)
    rejected(folder, "config field", field)
    refused_by_convert(folder, capsys, field)


@pytest.mark.parametrize("change,needle", [
    ({"model_type": "rwkv6"}, "not RWKV-7"),
    ({"attn": {"layers": [1], "num_heads": 2}}, "attention"),
    ({"norm_eps": 1e-6}, "norm_eps"),
    ({"hidden_size": "96"}, "positive integer"),
    ({"head_dim": 40}, "head_dim"),
])
def test_config_describing_another_model(sd, tmp_path, change, needle):
    rejected(write_folder(tmp_path / "hf", sd, config=dict(fla_config(sd), **change)), needle)


def test_unreadable_config(sd, tmp_path):
    folder = write_folder(tmp_path / "hf", sd)
    (folder / "config.json").write_text("{not json")
    rejected(folder, "config.json", "unreadable")


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite(sd, tmp_path, capsys, bad_value):
    hf = fla_layout(sd)
    hf["model.layers.1.attn.k_proj.weight"][2, 3] = bad_value
    folder = write_folder(tmp_path / "hf", sd, hf=hf)
    rejected(folder, "model.layers.1.attn.k_proj.weight", "NaN/Inf")
    refused_by_convert(folder, capsys, "NaN/Inf")


def test_missing_and_unexpected_tensors(sd, tmp_path):
    hf = fla_layout(sd)
    del hf["model.layers.0.ffn.value.weight"]
    rejected(write_folder(tmp_path / "a", sd, hf=hf), "missing", "model.layers.0.ffn.value.weight")
    hf = dict(fla_layout(sd), **{"model.layers.1.attn.q_proj.weight": torch.zeros(96, 96)})
    rejected(write_folder(tmp_path / "b", sd, hf=hf), "unexpected", "q_proj")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_in_place_of_safetensors_is_never_unpickled(sd, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    folder = write_folder(tmp_path / "hf", sd)
    torch.save({"model.embeddings.weight": _Payload(marker)}, folder / "model.safetensors")
    rejected(folder, "torch pickle", "not safetensors")
    refused_by_convert(folder, capsys, "pickle")
    assert not marker.exists()


def test_only_pickled_weights(sd, tmp_path):
    folder = write_folder(tmp_path / "hf", sd)
    (folder / "model.safetensors").unlink()
    torch.save(fla_layout(sd), folder / "pytorch_model.bin")
    rejected(folder, "pytorch_model.bin", "not read")


def test_bad_index(sd, tmp_path):
    folder = write_folder(tmp_path / "hf", sd, shards=2)
    index = folder / "model.safetensors.index.json"
    good = json.loads(index.read_text())
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.rename(folder / "elsewhere.bin")
    rejected(folder, "missing", shard.name)
    (folder / "elsewhere.bin").rename(shard)
    wm = dict(good["weight_map"])
    name = next(iter(wm))
    wm[name] = next(f for f in set(wm.values()) if f != wm[name])
    index.write_text(json.dumps({"weight_map": wm}))
    rejected(folder, name, "index")
    index.write_text(json.dumps({"weight_map": {**good["weight_map"], "x": "../../etc/passwd"}}))
    rejected(folder, "inside the folder")
    index.write_text("[]")
    rejected(folder, "not a valid safetensors index")


def test_directory_without_config(tmp_path):
    rejected(tmp_path, "without config.json")


# --------------------------------------------------------------------------- against fla itself (where installed)

def test_folders_load_in_fla_and_back(sd, tmp_path):
    """Our --format hf folder is what fla's RWKV7ForCausalLM loads key for key, and what fla saves
    (single file and sharded) loads here as the original weights."""
    pytest.importorskip("fla.models")
    from fla.models import RWKV7Config, RWKV7ForCausalLM
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from edge_rwkv.checkpoint import load_checkpoint

    torch.save(sd, tmp_path / "m.pth")
    assert cli_main(["convert", str(tmp_path / "m.pth"), "-o", str(tmp_path / "hf"), "--format", "hf"]) == 0
    ours = load_file(str(tmp_path / "hf" / "model.safetensors"))
    fla_model = RWKV7ForCausalLM(RWKV7Config(**json.loads((tmp_path / "hf" / "config.json").read_text())))
    assert not any(fla_model.load_state_dict(ours, strict=True))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert all(torch.equal(loaded.state_dict()[k], ours[k]) for k in ours)
    loaded.save_pretrained(str(tmp_path / "fla1"))
    loaded.save_pretrained(str(tmp_path / "fla3"), max_shard_size="200KB")
    assert len(list((tmp_path / "fla3").glob("model-*.safetensors"))) > 1
    for folder in ("fla1", "fla3"):
        same_tensors(load_checkpoint(tmp_path / folder).tensors, sd)
