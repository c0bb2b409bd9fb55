"""Loading never holds two copies of the weights: tensors reach the device one at a time (a Jetson's CPU
and GPU share one DRAM), and a dense build hands each tensor over instead of keeping the original."""
import gc
import weakref

import pytest
import torch

from edge_rwkv.api import load
from edge_rwkv.artifact import make_metadata, write_artifact
from edge_rwkv.checkpoint import derive_config, read_tensors, to_device_one_by_one
from edge_rwkv.model import build_model
from edge_rwkv.synthetic import random_checkpoint


def test_each_host_tensor_is_gone_before_the_next_is_read():
    alive_at_read = []
    refs = []

    def read(i):  # a fresh host tensor, watched; the reader keeps no reference of its own
        t = torch.full((64, 64), float(i))
        refs.append(weakref.ref(t))
        return t

    def host_tensors():
        for i in range(5):
            gc.collect()
            alive_at_read.append(sum(r() is not None for r in refs))
            yield f"t{i}", read(i)

    out = to_device_one_by_one(host_tensors(), torch.device("meta"))
    assert alive_at_read == [0, 0, 0, 0, 0]  # no earlier host tensor survives its copy
    assert [tuple(v.shape) for v in out.values()] == [(64, 64)] * 5
    assert all(v.device.type == "meta" for v in out.values())


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    sd = random_checkpoint(2, 64, 32, 256, seed=3, dtype=torch.float32)
    path = tmp_path_factory.mktemp("m") / "m.safetensors"
    write_artifact(path, sd, make_metadata(derive_config(sd), "float32"))
    pth = path.with_suffix(".pth")
    torch.save(sd, pth)
    return path, pth, sd


@pytest.mark.parametrize("which", [0, 1], ids=["safetensors", "torch-zip"])
def test_read_tensors_places_every_tensor_on_the_device(tiny_model, which):
    path, sd = tiny_model[which], tiny_model[2]
    tensors, _ = read_tensors(path, device="meta")
    assert set(tensors) == set(sd)
    assert all(t.device.type == "meta" and t.shape == sd[k].shape and t.dtype == sd[k].dtype
               for k, t in tensors.items())


def test_release_source_hands_tensors_over_and_builds_the_same_model(tiny_model):
    sd = tiny_model[2]
    cfg = derive_config(sd)
    kept = dict(sd)
    handed = dict(sd)
    ref = build_model(cfg, kept, torch.bfloat16, "cpu")
    net = build_model(cfg, handed, torch.bfloat16, "cpu", release_source=True)
    assert len(kept) == len(sd)
    # only the unused layer-0 value-residual tensors are left behind
    assert set(handed) <= {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}
    tokens = torch.tensor([[1, 2, 3, 4]])
    state = load_state(cfg)
    a, _ = ref.forward(tokens, state)
    b, _ = net.forward(tokens, state)
    assert torch.equal(a, b)


def load_state(cfg):
    from edge_rwkv.state import State

    return State.zeros(cfg.n_layer, 1, cfg.n_embd, cfg.n_head, cfg.head_size, "cpu")


def test_api_load_unchanged_on_cpu(tiny_model):
    m = load(tiny_model[0])
    m2 = load(tiny_model[1])
    assert m.fingerprint == m2.fingerprint
    a, _ = m.forward([5, 6, 7])
    b, _ = m2.forward([5, 6, 7])
    assert torch.equal(a, b)


def test_read_device_is_the_gpu_only_where_it_shares_host_memory(monkeypatch):
    from types import SimpleNamespace

    from edge_rwkv.api import read_device

    assert read_device(torch.device("cpu")) == torch.device("cpu")
    for integrated, want in ((1, "cuda"), (0, "cpu")):  # a Jetson; a discrete GPU (narrowed on the way)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d, i=integrated: SimpleNamespace(is_integrated=i))
        assert read_device(torch.device("cuda")).type == want


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits", [None, 4], ids=["dense", "int4"])
def test_straight_to_gpu_load_matches_the_host_read(tiny_model, monkeypatch, tmp_path, bits):
    """The unified-memory path (tensors read to the GPU, validated and built there) on any CUDA GPU."""
    import edge_rwkv.api as api

    path = tiny_model[0]
    if bits:
        from edge_rwkv.checkpoint import load_checkpoint
        from edge_rwkv.quant.policy import QuantPolicy
        from edge_rwkv.quant.transform import quantize_checkpoint

        tensors, meta = quantize_checkpoint(load_checkpoint(path), QuantPolicy(bits=bits, group=32))
        path = tmp_path / "q.safetensors"
        write_artifact(path, tensors, meta)
    ref = load(path, device="cuda")
    monkeypatch.setattr(api, "read_device", lambda dev: dev)
    m = load(path, device="cuda")
    assert m.fingerprint == ref.fingerprint
    a, _ = ref.forward([5, 6, 7])
    b, _ = m.forward([5, 6, 7])
    assert torch.equal(a, b)
