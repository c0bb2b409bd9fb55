"""The runtime on a CUDA GPU: same logits as the CPU path, CUDA-graph decode == eager decode."""
import pytest
import torch

import edge_rwkv
from edge_rwkv.synthetic import random_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu") / "m.pth"
    torch.save(random_checkpoint(2, 128, 64, 65536, seed=3), path)
    return path


def test_cuda_fp32_logits_match_cpu(model_file):
    tokens = list(range(100, 140))
    cpu, _ = edge_rwkv.load(model_file).forward(tokens)
    gpu_model = edge_rwkv.load(model_file, device="cuda", dtype="float32")
    gpu, _ = gpu_model.forward(tokens)
    assert (gpu.cpu() - cpu).abs().max() / cpu.std() < 1e-4


def test_cuda_fp16_close_to_fp32(model_file):
    tokens = list(range(200, 232))
    ref, _ = edge_rwkv.load(model_file).forward(tokens)
    half, _ = edge_rwkv.load(model_file, device="cuda", dtype="float16").forward(tokens)
    assert (half.cpu() - ref).abs().max() / ref.std() < 2e-2


def test_graph_decode_equals_eager(model_file):
    m = edge_rwkv.load(model_file, device="cuda", dtype="float32")
    graph_text, graph_state = m.generate("Hello there", max_tokens=24, temperature=0, return_state=True)
    assert m.describe()["decode"] == "cuda-graph"
    m._graph_error = "forced eager for the comparison"
    eager_text, eager_state = m.generate("Hello there", max_tokens=24, temperature=0, return_state=True)
    assert graph_text == eager_text
    assert torch.allclose(graph_state.wkv, eager_state.wkv, atol=1e-4, rtol=1e-4)
    assert graph_state.tokens == eager_state.tokens
