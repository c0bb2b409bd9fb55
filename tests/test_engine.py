"""BatchEngine: slots join and leave between steps; batched greedy decoding equals each sequence alone."""
import pytest
import torch

import edge_rwkv
from edge_rwkv.cli import main as cli_main
from edge_rwkv.engine import BatchEngine
from edge_rwkv.errors import InputError
from edge_rwkv.sampling import SamplingParams
from edge_rwkv.tokenizer import END_OF_TEXT

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("engine") / "m.safetensors"
    assert cli_main(["init", "-o", str(path), "--layers", "2", "--embd", "64", "--head-size", "32", "--seed", "3"]) == 0
    return edge_rwkv.load(path)


def alone(model, prompt_tokens, n, state=None):
    """Greedy tokens and final state of one sequence run by itself (the generate() path)."""
    gen = model.stream(prompt_tokens, state=state, max_tokens=n, temperature=0)
    for _ in gen:
        pass
    return gen.tokens, gen.state


def prompts(model):
    texts = ["Hello", "The capital of France is", "User: hi\n\nAssistant:", "1 2 3 4 5 6 7 8 9",
             "RWKV is a recurrent network " * 3]
    return [model.tokenizer.encode(t) for t in texts]


def run_slot_until(eng, slot, n, collected):
    while len(collected[slot]) < n:
        for i, t in eng.step().items():
            collected.setdefault(i, []).append(t)


def test_batched_equals_alone(model):
    ps = prompts(model)
    n = 12
    eng = BatchEngine(model, max_slots=8)
    slots = [eng.join(p, GREEDY) for p in ps]
    out = {s: [] for s in slots}
    for _ in range(n + 1):  # the first step reads the prompts and samples
        for i, t in eng.step().items():
            out[i].append(t)
    for s, p in zip(slots, ps):
        ref_tokens, ref_state = alone(model, p, n)
        got = [t for t in out[s] if t != END_OF_TEXT][:len(ref_tokens)]
        assert got == ref_tokens
        st = eng.leave(s)
        if len(ref_tokens) == n and len(out[s]) >= n:
            assert st.tokens >= len(p) + n


def test_one_forward_per_step(model):
    eng = BatchEngine(model, max_slots=4)
    for p in prompts(model)[:3]:
        eng.join(p, GREEDY)
    eng.step()  # prefill + first batched decode
    before = eng.forward_calls
    for _ in range(3):
        eng.step()
    assert eng.forward_calls - before == 3


def test_join_and_leave_midway(model):
    ps = prompts(model)
    n = 10
    eng = BatchEngine(model, max_slots=3)
    got: dict[int, list[int]] = {}
    a = eng.join(ps[0], GREEDY)
    b = eng.join(ps[1], GREEDY)
    seqs = {a: 0, b: 1}
    for _ in range(4):
        for i, t in eng.step().items():
            got.setdefault(i, []).append(t)
    st_a = eng.leave(a)  # a leaves after 4 tokens; its slot is reused by a new sequence
    tokens_a = got.pop(a)
    c = eng.join(ps[2], GREEDY)
    assert c == a
    seqs[c] = 2
    d = eng.join(ps[3], GREEDY)
    seqs[d] = 3
    with pytest.raises(InputError):
        eng.join(ps[4], GREEDY)
    while min(len(got.get(s, [])) for s in (b, c, d)) < n:
        for i, t in eng.step().items():
            got.setdefault(i, []).append(t)
    assert eng.free == 0
    ref_a, ref_state_a = alone(model, ps[0], 4)
    assert tokens_a[:len(ref_a)] == ref_a
    if len(ref_a) == 4:
        torch.testing.assert_close(st_a.wkv, ref_state_a.wkv, atol=1e-5, rtol=1e-4)
        assert st_a.tokens == len(ps[0]) + 4
    for s in (b, c, d):
        ref, _ = alone(model, ps[seqs[s]], n)
        assert got[s][:len(ref)] == ref


def test_continue_saved_state_and_feed(model, tmp_path):
    p1 = model.tokenizer.encode("User: hello\n\nAssistant:")
    p2 = model.tokenizer.encode("\n\nUser: again\n\nAssistant:")
    _, s1 = alone(model, p1, 5)
    s1.save(tmp_path / "s.state")
    loaded = model.load_state(tmp_path / "s.state")
    ref, ref_state = alone(model, p2, 6, state=s1)
    eng = BatchEngine(model, max_slots=2)
    other = eng.join(prompts(model)[1], GREEDY)
    slot = eng.join(p2, GREEDY, state=loaded)
    got = []
    while len(got) < 6:
        got += [t for i, t in eng.step().items() if i == slot]
    assert got[:len(ref)] == ref
    st = eng.leave(slot)
    torch.testing.assert_close(st.wkv, ref_state.wkv, atol=1e-5, rtol=1e-4)
    # feed: more tokens to read, then decoding resumes
    eng.feed(other, model.tokenizer.encode(" and"))
    assert eng.busy(other)
    eng.step()
    assert not eng.busy(other)
    eng.leave(other)
    assert eng.active == []


def test_bad_input(model):
    eng = BatchEngine(model, max_slots=1)
    with pytest.raises(InputError):
        eng.join([], GREEDY)
    with pytest.raises(InputError):
        eng.join([70000], GREEDY)
    with pytest.raises(InputError):
        eng.leave(0)
    with pytest.raises(InputError):
        BatchEngine(model, max_slots=0)
    for bad in (0, -4, 2.5):
        with pytest.raises(InputError, match="prefill_chunk must be a positive integer"):
            BatchEngine(model, max_slots=1, prefill_chunk=bad)


def test_gpu_prefill_chunk_scales_with_width():
    """GPU prompts are read in chunks of ~4M activations (pow2, 256..4096 tokens); CPU keeps 256."""
    from types import SimpleNamespace

    from edge_rwkv.generate import PREFILL_CHUNK, prefill_chunk_for

    from edge_rwkv.quant.formats import int4_spec, quantize_rtn
    from edge_rwkv.quant.linear import QuantLinear

    quant = QuantLinear(quantize_rtn(torch.randn(8, 128), int4_spec(32)))

    def net(dev, width, quantized=False):
        layer = SimpleNamespace(key=quant if quantized else None)
        return SimpleNamespace(device=torch.device(dev), cfg=SimpleNamespace(n_embd=width), layers=[layer], head=None)

    assert prefill_chunk_for(net("cpu", 768)) == PREFILL_CHUNK
    assert [prefill_chunk_for(net("cuda", c)) for c in (128, 768, 2048, 2560, 4096, 8192)] == \
        [4096, 4096, 2048, 1024, 1024, 512]
    # quantized (memory-bound deployments): a quarter, still ≥ 256
    assert [prefill_chunk_for(net("cuda", c, True)) for c in (768, 2048, 4096, 8192)] == [1024, 512, 256, 256]


def test_prefill_without_a_gpu_graph_is_the_chunked_forward(model):
    """Off CUDA no chunk is graph-captured (cuda_graph.PrefillGraph is GPU-only): prefill with graphs
    allowed equals prefill without, chunk for chunk, and counts the tokens it read."""
    from edge_rwkv.cuda_graph import prefill_graph
    from edge_rwkv.generate import prefill

    toks = model.tokenizer.encode("RWKV is a recurrent network " * 6)
    st = model.new_state(1)
    assert prefill_graph(model.net, 16, st) is None
    la, sa = prefill(model.net, toks, model.new_state(1), chunk=16)
    lb, sb = prefill(model.net, toks, model.new_state(1), chunk=16, graph=False)
    assert torch.equal(la, lb) and torch.equal(sa.wkv, sb.wkv) and sa.tokens == sb.tokens == len(toks)
    assert not hasattr(model.net, "_prefill_graphs")
    assert model.describe()["prefill"] == "eager, chunks of 256"
