"""RWKV-7a (DeepEmbed) in the torch model, against the float64 numpy reference; RWKV-7b is refused."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import edge_rwkv
from edge_rwkv import CheckpointError
from edge_rwkv.cli import main as cli_main
from edge_rwkv.synthetic import random_checkpoint
from reference_numpy import reference_logits

VOCAB = 400
TOKENS = [3, 399, 12, 12, 250, 0, 77, 150, 9]
D = 8


def rel_err(got, want) -> float:
    return float(np.abs(np.asarray(got, dtype=np.float64) - want).max() / want.std())


@pytest.fixture(scope="module")
def sd():
    return random_checkpoint(3, 64, 32, vocab_size=VOCAB, seed=5, deep_embed=D)


@pytest.fixture(scope="module")
def path(sd, tmp_path_factory):
    p = tmp_path_factory.mktemp("deep_embed") / "m7a.pth"
    torch.save(sd, p)
    return p


def test_matches_fp64_reference(sd, path):
    m = edge_rwkv.load(path)
    assert m.config.deep_embed == D
    assert m.describe()["architecture"] == f"RWKV-7a x070 + DeepEmbed (rank {D})"
    logits, _ = m.forward(TOKENS)
    want = reference_logits(sd, TOKENS)
    assert rel_err(logits, want) <= 1e-5
    # DeepEmbed matters: the same weights without it are another model
    plain = {k: v for k, v in sd.items() if ".ffn.s" not in k}
    assert rel_err(logits, reference_logits(plain, TOKENS)) > 1e-2


def test_steps_batches_and_chunks_agree(path):
    m = edge_rwkv.load(path)
    full, st_full = m.forward(TOKENS)
    state, steps = None, []
    for t in TOKENS:
        lg, state = m.forward([t], state)
        steps.append(lg[0])
    assert torch.allclose(torch.stack(steps), full, atol=1e-4, rtol=1e-4)
    assert torch.allclose(state.wkv, st_full.wkv, atol=1e-5)
    other = list(reversed(TOKENS))
    both, _ = m.forward(torch.tensor([TOKENS, other]))
    assert torch.allclose(both[0], full, atol=1e-5) and torch.allclose(both[1], m.forward(other)[0], atol=1e-5)


@pytest.mark.parametrize("dtype,bound", [("float16", 1e-2), ("bfloat16", 6e-2)])
def test_half_precision_close(sd, path, dtype, bound):
    m = edge_rwkv.load(path, dtype=dtype)
    logits, _ = m.forward(TOKENS)
    assert 0 < rel_err(logits, reference_logits(sd, TOKENS)) <= bound


def test_artifact_round_trip_and_generation(path, tmp_path):
    out = tmp_path / "m7a.safetensors"
    assert cli_main(["convert", str(path), "-o", str(out)]) == 0
    a, b = edge_rwkv.load(path), edge_rwkv.load(out)
    assert b.config == a.config and b.fingerprint == a.fingerprint
    assert torch.equal(a.forward(TOKENS)[0], b.forward(TOKENS)[0])
    assert a.generate(TOKENS, max_tokens=5, temperature=0) == b.generate(TOKENS, max_tokens=5, temperature=0)


def test_plain_configs_and_fingerprints_unchanged():
    from edge_rwkv.checkpoint import derive_config

    cfg = derive_config(random_checkpoint(1, 32, 16, vocab_size=50))
    assert "deep_embed" not in cfg.to_dict() and cfg.deep_embed == 0
    assert type(cfg).from_dict(cfg.to_dict()) == cfg  # artifacts written before DeepEmbed still read


@pytest.mark.parametrize("drop", ["s_emb_x.weight", "s2"])
def test_incomplete_deep_embed(sd, tmp_path, drop):
    bad = {k: v for k, v in sd.items() if k != f"blocks.1.ffn.{drop}"}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match=f"missing.*blocks.1.ffn.{drop}"):
        edge_rwkv.load(tmp_path / "bad.safetensors")


def test_wrong_deep_embed_shape(sd, tmp_path):
    bad = dict(sd, **{"blocks.2.ffn.s_emb.weight": torch.zeros(VOCAB, D * D + 1)})
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match=r"blocks.2.ffn.s_emb.weight.*\[400, 65\].*\[400, 64\]"):
        edge_rwkv.load(tmp_path / "bad.safetensors")


def test_paths_without_deep_embed_refuse_it(path, tmp_path, capsys):
    assert cli_main(["convert", str(path), "-o", str(tmp_path / "hf"), "--format", "hf"]) == 1
    assert "DeepEmbed" in capsys.readouterr().err and not (tmp_path / "hf").exists()
    from edge_rwkv.export.source import read_source

    with pytest.raises(CheckpointError, match="not exported"):
        read_source(path)


def test_rwkv7b_is_refused(sd, tmp_path):
    """7b adds DeepEmbedAttention (a growing key/value cache): refused, not run with a different memory promise."""
    b = dict(sd, **{"blocks.0.qkv.qq.weight": torch.zeros(256, 64), "blocks.0.qkv.k_emb.weight": torch.zeros(VOCAB, 256)})
    torch.save(b, tmp_path / "m7b.pth")
    with pytest.raises(CheckpointError, match="RWKV-7b.*constant-size state") as e:
        edge_rwkv.load(tmp_path / "m7b.pth")
    assert str(tmp_path / "m7b.pth") in str(e.value)
