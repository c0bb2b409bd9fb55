"""The training script behind the embedded default model: flags checked, a tiny run end to end."""
from __future__ import annotations

import json

import pytest
import torch

from edge_rwkv.checkpoint import load_checkpoint
from edge_rwkv.training import main


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A pre-tokenized corpus file in the --dump-corpus format (random ids: only the mechanics matter)."""
    g = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("corpus") / "corpus.pt"
    info = {"source": "random ids", "license": "n/a", "files": 1, "heldout_files": 1}
    torch.save({"train": torch.randint(0, 300, (3000,), generator=g, dtype=torch.int32),
                "heldout": torch.randint(0, 300, (700,), generator=g, dtype=torch.int32),
                "info": json.dumps(info)}, path)
    return path


TINY = ["--device", "cpu", "--layers", "1", "--embd", "32", "--head-size", "16", "--ctx", "16", "--batch", "2"]


@pytest.mark.parametrize("flag,value", [("--val-tokens", "0"), ("--val-every", "-1"), ("--minutes", "0"),
                                        ("--ctx", "0"), ("--batch", "0")])
def test_bad_flags_rejected(tmp_path, corpus, flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        main(["-o", str(tmp_path / "m.safetensors"), "--corpus-file", str(corpus), *TINY, flag, value])
    assert e.value.code == 2
    assert f"{flag} must be positive" in capsys.readouterr().err
    assert not (tmp_path / "m.safetensors").exists()


def test_package_must_differ_from_output(tmp_path, corpus, capsys):
    out = str(tmp_path / "m.safetensors")
    with pytest.raises(SystemExit):
        main(["-o", out, "--package", out, "--corpus-file", str(corpus), *TINY])
    assert "--package must name a file other than --output" in capsys.readouterr().err


def test_validation_larger_than_corpus_rejected(tmp_path, corpus):
    with pytest.raises(SystemExit, match="leaves too few"):
        main(["-o", str(tmp_path / "m.safetensors"), "--corpus-file", str(corpus), *TINY, "--val-tokens", "2990"])
    assert not (tmp_path / "m.safetensors").exists()


def test_tiny_run_keeps_best_validation_step_and_packages(tmp_path, corpus):
    out, shipped = tmp_path / "m.safetensors", tmp_path / "q.safetensors"
    main(["-o", str(out), "--corpus-file", str(corpus), *TINY, "--max-steps", "6", "--minutes", "5",
          "--val-tokens", "200", "--val-every", "2", "--eval-tokens", "300", "--lr", "1e-2",
          "--package", str(shipped)])
    meta = load_checkpoint(out).metadata["training"]
    assert meta["steps"] == 6 and meta["kept_step"] in (2, 4, 6)
    assert meta["validation_tokens"] == 200 and meta["validation_ppl"] > 1
    q = load_checkpoint(shipped)
    assert q.quant["tensors"] and q.metadata["training"] == meta
    d = q.metadata["default_model"]
    assert d["heldout_tokens"] == 512 and d["heldout_ppl"] > 1 and d["heldout_ppl_fp16"] > 1
