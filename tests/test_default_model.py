"""The embedded default model: present, small, loadable, trained (far better than chance), used by default."""
import math
import subprocess
import sys

import torch

import edge_rwkv
from edge_rwkv.default_model import default_model_path

TEXT = ("Return the value of the named attribute of the object. If the attribute does not exist, the "
        "default value is returned if provided, otherwise an AttributeError is raised.\n\n"
        "This module provides functions for reading and writing files. The path argument must be a "
        "string or a path object.")


def test_shipped_artifact_is_small_and_quantized():
    path = default_model_path()
    assert path.stat().st_size <= 16 * 1024 * 1024
    m = edge_rwkv.load(path)
    assert m.config.vocab_size == 65536
    formats = {spec["format"] for spec in m.metadata["quant"]["tensors"].values()}
    assert formats == {"int4", "int8"}
    assert m.metadata["default_model"]["heldout_ppl"] < 1000


def test_it_is_trained():
    m = edge_rwkv.load(default_model_path())
    ids = m.tokenizer.encode(TEXT)
    logits, _ = m.forward(ids)
    nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]))
    assert math.exp(float(nll)) < 2000  # an untrained model sits near the vocabulary size, 65,536


def test_cli_uses_it_when_no_model_is_given():
    out = subprocess.run([sys.executable, "-m", "edge_rwkv", "generate", "Return the", "--max-tokens", "12",
                          "--temperature", "0"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.strip()) > 5
    m = edge_rwkv.load(default_model_path())
    assert out.stdout == m.generate("Return the", max_tokens=12, temperature=0) + "\n"


def test_chat_replies_are_never_empty():
    m = edge_rwkv.load(default_model_path())
    chat = m.chat(seed=0, max_tokens=24)
    for message in ("What does the socket module do?", "And the os module?"):
        reply = chat.ask(message)
        assert reply.strip() and "\n\n" not in reply
    assert chat.turns == 2


def test_cpu_keeps_small_models_dequantized(monkeypatch):
    """On a CPU a small quantized model keeps its matrices dequantized (no per-token int4 unpacking);
    above the size limit it dequantizes per call, with the same logits."""
    from edge_rwkv.quant import load as quant_load
    from edge_rwkv.quant.linear import QuantLinear

    def quant_linears(m):
        return [x for L in m.net.layers for x in vars(L).values() if isinstance(x, QuantLinear)]

    cached = edge_rwkv.load(default_model_path())
    assert quant_linears(cached) and all(q.cache_dequantized for q in quant_linears(cached))
    monkeypatch.setattr(quant_load, "CPU_DEQUANT_CACHE_BYTES", 0)
    per_call = edge_rwkv.load(default_model_path())
    assert not any(q.cache_dequantized for q in quant_linears(per_call))
    tokens = cached.tokenizer.encode("The socket module")
    a, _ = cached.forward(tokens)
    b, _ = per_call.forward(tokens)
    assert torch.equal(a, b)
