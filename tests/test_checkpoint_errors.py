"""Every bad model file is refused with a CheckpointError that names the file and, where one is at fault, the tensor."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

import edge_rwkv
from edge_rwkv import CheckpointError
from edge_rwkv.artifact import make_metadata, write_artifact
from edge_rwkv.checkpoint import derive_config
from edge_rwkv.synthetic import random_checkpoint

VOCAB = 256


@pytest.fixture(scope="module")
def good_sd():
    return random_checkpoint(2, 64, 32, vocab_size=VOCAB, seed=0)


def fresh(sd):
    return {k: v.clone() for k, v in sd.items()}


def write(sd, path):
    if str(path).endswith(".pth"):
        torch.save(sd, path)
    else:
        save_file(sd, str(path))
    return path


def rejected(path, *needles) -> str:
    with pytest.raises(CheckpointError) as e:
        edge_rwkv.load(path)
    msg = str(e.value)
    assert str(path) in msg, msg
    for n in needles:
        assert n.lower() in msg.lower(), f"{n!r} not in {msg!r}"
    assert "\n" not in msg.strip(), msg
    return msg


def test_good_checkpoint_loads(good_sd, tmp_path):
    for name in ("ok.pth", "ok.safetensors"):
        m = edge_rwkv.load(write(good_sd, tmp_path / name))
        assert m.config.n_layer == 2


# --------------------------------------------------------------------------- damaged files

@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_truncated(good_sd, tmp_path, fmt, keep):
    src = write(good_sd, tmp_path / f"full.{fmt}")
    data = src.read_bytes()
    bad = tmp_path / f"trunc.{fmt}"
    bad.write_bytes(data[: int(len(data) * keep)])
    msg = rejected(bad)
    if fmt == "safetensors":
        assert "truncated" in msg and "tensor '" in msg, msg
    else:
        assert "truncated or corrupt" in msg, msg


@pytest.mark.parametrize("truncate", [False, True])
def test_torch_file_named_safetensors(good_sd, tmp_path, truncate):
    """Formats are told apart by their bytes: a torch checkpoint named *.safetensors is read as torch."""
    data = write(good_sd, tmp_path / "real.pth").read_bytes()
    p = tmp_path / "misnamed.safetensors"
    p.write_bytes(data[: len(data) // 3] if truncate else data)
    if truncate:
        rejected(p, "unreadable torch checkpoint")
    else:
        assert edge_rwkv.load(p).config.n_layer == 2


@pytest.mark.parametrize("keep", [0.01, 0.5, 0.99])
def test_truncated_legacy_torch_format(good_sd, tmp_path, keep):
    full = tmp_path / "legacy.pth"
    torch.save(good_sd, full, _use_new_zipfile_serialization=False)
    assert edge_rwkv.load(full).config.n_layer == 2  # the pre-zip torch format loads
    bad = tmp_path / "legacy_trunc.pth"
    data = full.read_bytes()
    bad.write_bytes(data[: int(len(data) * keep)])
    rejected(bad, "truncated or corrupt")


def test_truncated_inside_safetensors_header(good_sd, tmp_path):
    data = write(good_sd, tmp_path / "full.safetensors").read_bytes()
    bad = tmp_path / "hdr.safetensors"
    bad.write_bytes(data[:200])
    msg = rejected(bad)
    assert "header" in msg or "not a recognised" in msg, msg


def test_random_bytes(tmp_path):
    bad = tmp_path / "noise.pth"
    bad.write_bytes(os.urandom(1) and bytes((i * 37 + 11) % 256 for i in range(5000)))
    rejected(bad, "not a recognised model file")


def test_empty_file(tmp_path):
    bad = tmp_path / "empty.safetensors"
    bad.write_bytes(b"")
    rejected(bad, "not a recognised model file")


def test_directory(tmp_path):
    d = tmp_path / "model.pth"
    d.mkdir()
    rejected(d, "directory")


def test_missing_file(tmp_path):
    rejected(tmp_path / "absent.safetensors", "no such file")


def test_corrupt_safetensors_header_json(good_sd, tmp_path):
    data = bytearray(write(good_sd, tmp_path / "full.safetensors").read_bytes())
    data[9:14] = b"\xff\xfe!!!"
    bad = tmp_path / "json.safetensors"
    bad.write_bytes(bytes(data))
    rejected(bad, "corrupt safetensors header")


# --------------------------------------------------------------------------- wrong contents

@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_wrong_shape(good_sd, tmp_path, fmt):
    sd = fresh(good_sd)
    sd["blocks.1.att.key.weight"] = torch.randn(64, 65)
    rejected(write(sd, tmp_path / f"shape.{fmt}"), "blocks.1.att.key.weight", "shape", "[64, 65]", "[64, 64]")


def test_wrong_shape_lora(good_sd, tmp_path):
    sd = fresh(good_sd)
    sd["blocks.1.att.w2"] = torch.randn(16, 64)
    rejected(write(sd, tmp_path / "lora.safetensors"), "blocks.1.att.w2", "shape")


def test_inconsistent_head_shape(good_sd, tmp_path):
    sd = fresh(good_sd)
    sd["blocks.0.att.r_k"] = torch.randn(3, 32)
    rejected(write(sd, tmp_path / "rk.safetensors"), "r_k")


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_missing_key(good_sd, tmp_path, fmt):
    sd = fresh(good_sd)
    del sd["blocks.1.ffn.value.weight"]
    rejected(write(sd, tmp_path / f"missing.{fmt}"), "missing", "blocks.1.ffn.value.weight")


def test_missing_layer(good_sd, tmp_path):
    sd = {k: v for k, v in good_sd.items() if not k.startswith("blocks.1.")}
    sd.update({k.replace("blocks.0.", "blocks.2."): v.clone() for k, v in good_sd.items()
               if k.startswith("blocks.0.") and "ln0" not in k})
    rejected(write(sd, tmp_path / "hole.safetensors"), "layer", "[1]")


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_unexpected_key(good_sd, tmp_path, fmt):
    sd = fresh(good_sd)
    sd["blocks.1.att.time_state"] = torch.zeros(2, 32, 32)
    rejected(write(sd, tmp_path / f"extra.{fmt}"), "unexpected", "blocks.1.att.time_state")


def test_duplicate_spelling(good_sd, tmp_path):
    sd = fresh(good_sd)
    sd["_orig_mod.emb.weight"] = sd["emb.weight"].clone()
    rejected(write(sd, tmp_path / "dup.pth"), "emb.weight", "twice")


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_non_finite(good_sd, tmp_path, fmt, bad_value):
    sd = fresh(good_sd)
    sd["blocks.1.ffn.key.weight"][3, 5] = bad_value
    rejected(write(sd, tmp_path / f"nan.{fmt}"), "blocks.1.ffn.key.weight", "NaN/Inf")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_integer_dtype(good_sd, tmp_path, dtype):
    sd = fresh(good_sd)
    sd["blocks.0.att.x_r"] = torch.ones(1, 1, 64, dtype=dtype)
    rejected(write(sd, tmp_path / "int.safetensors"), "blocks.0.att.x_r", "dtype", str(dtype).replace("torch.", ""))


def test_not_a_dict_of_tensors(tmp_path):
    p = tmp_path / "list.pth"
    torch.save([torch.zeros(3)], p)
    rejected(p, "dict of tensors")
    p2 = tmp_path / "mixed.pth"
    torch.save({"emb.weight": torch.zeros(3), "step": 5}, p2)
    rejected(p2, "dict of tensors")


# --------------------------------------------------------------------------- other RWKV generations

def _v4(C=64, V=VOCAB):
    sd = {"emb.weight": torch.randn(V, C), "head.weight": torch.randn(V, C),
          "ln_out.weight": torch.ones(C), "ln_out.bias": torch.zeros(C)}
    for i in range(2):
        p = f"blocks.{i}.att."
        sd.update({p + "time_decay": torch.randn(C), p + "time_first": torch.randn(C), p + "time_mix_k": torch.rand(1, 1, C),
                   p + "key.weight": torch.randn(C, C), p + "value.weight": torch.randn(C, C)})
    return sd


def _v5(C=64, V=VOCAB):
    sd = _v4(C, V)
    for i in range(2):
        p = f"blocks.{i}.att."
        del sd[p + "time_first"]
        sd[p + "time_faaaa"] = torch.randn(2, 32)
        sd[p + "gate.weight"] = torch.randn(C, C)
    return sd


def _v6(C=64, V=VOCAB):
    sd = _v5(C, V)
    for i in range(2):
        p = f"blocks.{i}.att."
        sd[p + "time_maa_x"] = torch.rand(1, 1, C)
        sd[p + "time_decay_w1"] = torch.randn(C, 64)
    return sd


@pytest.mark.parametrize("make,label", [(_v4, "RWKV-4"), (_v5, "RWKV-5"), (_v6, "RWKV-6")])
@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_older_generations(tmp_path, make, label, fmt):
    msg = rejected(write(make(), tmp_path / f"old.{fmt}"), label, "not RWKV-7", "blocks.0.att.time_")
    assert "x070" in msg


def test_incomplete_rwkv7a_deepembed(good_sd, tmp_path):
    """RWKV-7a loads (tests/test_deep_embed.py); a file with only part of its DeepEmbed tensors does not."""
    sd = fresh(good_sd)
    sd["blocks.0.ffn.s_emb.weight"] = torch.randn(VOCAB, 32)
    sd["blocks.0.ffn.s1"] = torch.randn(64, 32)
    rejected(write(sd, tmp_path / "deepembed.pth"), "missing", "blocks.0.ffn.s")


def test_rwkv7b_deepembed_attention(good_sd, tmp_path):
    sd = fresh(good_sd)
    sd["blocks.0.qkv.qq.weight"] = torch.randn(256, 64)
    rejected(write(sd, tmp_path / "dea.pth"), "7b", "DeepEmbedAttention", "blocks.0.qkv.qq.weight")


def test_not_rwkv_at_all(tmp_path):
    p = write({"transformer.wte.weight": torch.randn(10, 8)}, tmp_path / "gpt.safetensors")
    rejected(p, "not an RWKV-7", "blocks.0.att.r_k")


# --------------------------------------------------------------------------- artifacts

def _artifact(sd, path, **meta_changes):
    meta = make_metadata(derive_config(sd), "float32")
    meta.update(meta_changes)
    write_artifact(path, sd, meta)
    return path


def test_artifact_loads(good_sd, tmp_path):
    m = edge_rwkv.load(_artifact(good_sd, tmp_path / "a.safetensors"))
    assert m.metadata["format_version"] == 1


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_artifact_unknown_format_version(good_sd, tmp_path, version):
    rejected(_artifact(good_sd, tmp_path / "v.safetensors", format_version=version), "format version", repr(version))


def test_artifact_wrong_format_name_and_tokenizer(good_sd, tmp_path):
    rejected(_artifact(good_sd, tmp_path / "f.safetensors", format="something-else"), "something-else")
    rejected(_artifact(good_sd, tmp_path / "t.safetensors", tokenizer="gpt2"), "tokenizer", "gpt2")


def test_artifact_config_disagrees_with_tensors(good_sd, tmp_path):
    cfg = derive_config(good_sd).to_dict()
    cfg["dim_ffn"] = 128
    rejected(_artifact(good_sd, tmp_path / "c.safetensors", config=cfg), "blocks.0.ffn.key.weight", "shape")


def test_artifact_bad_metadata_json(good_sd, tmp_path):
    p = tmp_path / "j.safetensors"
    save_file(good_sd, str(p), metadata={"edge_rwkv": "{not json"})
    rejected(p, "metadata", "JSON")


# --------------------------------------------------------------------------- code in pickles

class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("container", ["torch-zip", "legacy-pickle", "nested"])
def test_pickle_with_code_payload_is_refused_and_not_run(tmp_path, container):
    marker = tmp_path / "PWNED"
    p = tmp_path / f"evil_{container}.pth"
    if container == "torch-zip":
        torch.save({"emb.weight": _Payload(marker)}, p)
    elif container == "legacy-pickle":
        p.write_bytes(pickle.dumps({"emb.weight": _Payload(marker)}, protocol=2))
    else:
        torch.save({"state_dict": {"emb.weight": torch.zeros(2)}, "extra": _Payload(marker)}, p)
    msg = rejected(p, "refused to unpickle")
    assert not marker.exists(), "the pickle's code ran while loading"
    # the CLI refuses it the same way
    from edge_rwkv.cli import main

    assert main(["info", str(p)]) == 1
    assert not marker.exists()
    assert "GLOBAL" in msg and "system" in msg, msg  # names what was refused
    assert "weights_only` set to `False`" not in msg  # and does not advise running the code


# --------------------------------------------------------------------------- hostile metadata and keys

def _with_raw_metadata(sd, path, raw: str):
    save_file(sd, str(path), metadata={"edge_rwkv": raw})
    return path


@pytest.mark.parametrize("raw,needle", [
    ("[1, 2]", "JSON object"), ('"text"', "JSON object"), ("{}", "JSON object"),
    ("[" * 5000 + "]" * 5000, "nested"), ('{"a": ' * 200 + "1" + "}" * 200, "nested"),
])
def test_artifact_metadata_not_an_object(good_sd, tmp_path, raw, needle):
    rejected(_with_raw_metadata(good_sd, tmp_path / "m.safetensors", raw), "metadata", needle)


@pytest.mark.parametrize("change,needle", [
    ({"quant": []}, "quant must be an object"),
    ({"quant": None}, "quant must be an object"),
    ({"quant": {"tensors": []}}, "quant.tensors must be an object"),
    ({"quant": {"tensors": {"head.weight": 5}}}, "quant.tensors.head.weight must be an object"),
    ({"dtype": "float8"}, "dtype"),
    ({"source_sha256": 12}, "source_sha256"),
    ({"default_model": {"name": "x", "trained_on": "y", "heldout_ppl": "high", "quantization": "z"}}, "heldout_ppl"),
])
def test_artifact_metadata_schema(good_sd, tmp_path, change, needle):
    rejected(_artifact(good_sd, tmp_path / "s.safetensors", **change), "artifact metadata is invalid", needle)


@pytest.mark.parametrize("field,value,needle", [
    ("n_layer", 2147483648, "config.n_layer"), ("n_layer", 10**400, "config.n_layer"),
    ("head_size", 0, "config.head_size"), ("n_embd", -64, "config.n_embd"), ("vocab_size", "256", "config.vocab_size"),
    ("n_layer", 1.5, "config.n_layer"), ("n_layer", True, "config.n_layer"), ("dim_ffn", None, "config.dim_ffn"),
    ("n_layer", 3, "layer(s) [2]"), ("n_layer", 1, "model has 1 layers"), ("n_layer", 4000, "(+3993 more)"),
    ("head_size", 48, "not a multiple"),
])
def test_artifact_config_numbers_checked_before_use(good_sd, tmp_path, field, value, needle):
    import time

    cfg = derive_config(good_sd).to_dict()
    cfg[field] = value
    t0 = time.monotonic()
    rejected(_artifact(good_sd, tmp_path / "c.safetensors", config=cfg), needle)
    assert time.monotonic() - t0 < 5


def test_cli_info_refuses_huge_layer_count_fast(good_sd, tmp_path, capsys):
    import time

    from edge_rwkv.cli import main

    cfg = derive_config(good_sd).to_dict()
    cfg["n_layer"] = 4096
    p = _artifact(good_sd, tmp_path / "big.safetensors", config=cfg)
    t0 = time.monotonic()
    assert main(["info", str(p)]) == 1
    assert time.monotonic() - t0 < 10
    err = capsys.readouterr().err
    assert err.startswith("edge-rwkv: error:") and err.count("\n") == 1, err


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_far_layer_key_refused_without_allocating(good_sd, tmp_path, fmt):
    import resource
    import time

    sd = fresh(good_sd)
    sd["blocks.100000000.ln1.weight"] = torch.ones(64)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.monotonic()
    rejected(write(sd, tmp_path / f"far.{fmt}"), "layer(s) [2, 3, 4, 5, 6]", "(+99999993 more)")
    assert time.monotonic() - t0 < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # KiB: no set(range(1e8))


def test_layer_number_of_thousands_of_digits(good_sd, tmp_path):
    sd = fresh(good_sd)
    sd["blocks." + "9" * 5000 + ".ln1.weight"] = torch.ones(64)
    rejected(write(sd, tmp_path / "digits.pth"), "beyond any model")


def test_pth_with_non_string_key(good_sd, tmp_path):
    sd = fresh(good_sd)
    sd[7] = sd.pop("ln_out.bias")
    rejected(write(sd, tmp_path / "intkey.pth"), "tensor names must be strings", "int")


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_float8_tensor_refused(good_sd, tmp_path, fmt):
    sd = fresh(good_sd)
    sd["blocks.0.att.x_r"] = sd["blocks.0.att.x_r"].to(torch.float8_e4m3fn)
    rejected(write(sd, tmp_path / f"f8.{fmt}"), "blocks.0.att.x_r", "float8_e4m3fn")


@pytest.mark.parametrize("edit,needle", [
    (lambda h: h["emb.weight"].update(shape=[256, "64"]), "shape[1] must be an integer"),
    (lambda h: h["emb.weight"].update(shape=[256, 65]), "data bytes"),
    (lambda h: h["emb.weight"].update(dtype="Q4"), "unknown dtype"),
    (lambda h: h["emb.weight"].update(data_offsets=[0]), "data offsets"),
    (lambda h: h.update({"__metadata__": {"a": 5}}), "__metadata__.a must be a string"),
    (lambda h: h.update({"__metadata__": [1]}), "__metadata__ must be an object"),
])
def test_safetensors_header_schema(good_sd, tmp_path, edit, needle):
    import struct

    data = write(good_sd, tmp_path / "ok.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    bad = tmp_path / "hdr.safetensors"
    bad.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    rejected(bad, needle)
