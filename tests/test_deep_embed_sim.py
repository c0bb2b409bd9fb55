"""Under the Numba CUDA simulator: the fused decode step declines RWKV-7a (it covers plain x070), so
the CUDA-graph step captures the model's own forward instead and says why (GraphStep.how, describe()).

numba reads NUMBA_ENABLE_CUDASIM at its first import, so the checks run in a child process started
with it set (`python tests/test_deep_embed_sim.py` runs them directly).
"""
from __future__ import annotations

import pytest
from _simulator import report, simulator_results


def _checks() -> dict:
    import torch

    from edge_rwkv.checkpoint import derive_config
    from edge_rwkv.cuda_kernels._runtime import simulator
    from edge_rwkv.runtime.fused import fused_step_supported
    from edge_rwkv.model import build_model
    from edge_rwkv.synthetic import random_checkpoint

    assert simulator()
    sd = random_checkpoint(2, 32, 8, 300, seed=1, deep_embed=4)
    plain = {k: v for k, v in sd.items() if ".ffn.s" not in k}
    reason_7a = fused_step_supported(build_model(derive_config(sd), sd, torch.float32, "cpu"))
    reason_plain = fused_step_supported(build_model(derive_config(plain), plain, torch.float32, "cpu"))
    return {"declines_deep_embed": [bool(reason_7a) and "DeepEmbed" in reason_7a, f"reason: {reason_7a}"],
            "takes_the_same_plain_model": [reason_plain is None, f"reason: {reason_plain}"]}


@pytest.fixture(scope="module")
def sim_results():
    return simulator_results(__file__)


@pytest.mark.parametrize("name", ["declines_deep_embed", "takes_the_same_plain_model"])
def test_fused_step_and_deep_embed(sim_results, name):
    ok, detail = sim_results[name]
    assert ok, f"{name}: {detail}"


if __name__ == "__main__":
    report(_checks())
