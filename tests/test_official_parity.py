"""Our runtime vs the official `rwkv` pip package (RWKV_x070, CPU fp32) on the same random checkpoint.

The official package reads configuration from environment variables at import time, so it runs in a
subprocess of its own; the checkpoint and tokens go through files.
"""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

import edge_rwkv
from edge_rwkv.synthetic import random_checkpoint

pytest.importorskip("rwkv")

OFFICIAL = textwrap.dedent("""
    import json, os, sys
    os.environ["RWKV_V7_ON"] = "1"
    os.environ["RWKV_JIT_ON"] = "1"
    os.environ["RWKV_CUDA_ON"] = "0"
    import torch
    from rwkv.model import RWKV
    base, tokens_path, out_path = sys.argv[1:]
    tokens = json.load(open(tokens_path))
    m = RWKV(model=base, strategy="cpu fp32")
    logits_seq, _ = m.forward(tokens, None, full_output=True)
    state = None
    steps = []
    for t in tokens:
        out, state = m.forward([t], state)
        steps.append(out)
    torch.save({"seq": logits_seq.float(), "steps": torch.stack(steps).float()}, out_path)
""")


@pytest.mark.parametrize("n_layer,n_embd,head_size", [(2, 128, 64), (3, 96, 32)])
def test_logits_match_official_package(tmp_path, n_layer, n_embd, head_size):
    sd = random_checkpoint(n_layer, n_embd, head_size, vocab_size=65536, seed=n_layer)
    torch.save(sd, tmp_path / "model.pth")
    tokens = [33155, 40213, 45, 33, 10464, 11685, 32845, 4970, 9863, 261, 24281, 59]
    (tmp_path / "tokens.json").write_text(json.dumps(tokens))
    script = tmp_path / "official.py"
    script.write_text(OFFICIAL)
    subprocess.run([sys.executable, str(script), str(tmp_path / "model"), str(tmp_path / "tokens.json"),
                    str(tmp_path / "out.pt")], check=True, capture_output=True, timeout=600)
    ref = torch.load(tmp_path / "out.pt", weights_only=True)

    m = edge_rwkv.load(tmp_path / "model.pth")
    ours, _ = m.forward(tokens)
    scale = ref["steps"].std()
    # the official sequence path returns all T logits; step-by-step gives the same within fp32 noise
    assert (ours - ref["steps"]).abs().max() / scale < 1e-4
    assert (ours - ref["seq"]).abs().max() / scale < 1e-4
    assert torch.equal(ours.argmax(-1), ref["steps"].argmax(-1))
