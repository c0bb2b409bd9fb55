"""BatchEngine: slots join and leave between steps; batched decoding (greedy and seeded sampling) equals
each sequence alone; tokens reach the host one step after they are drawn, and a sequence that ends on
one is left with exactly the state of the tokens returned."""
import pytest
import torch

import edge_rwkv
from edge_rwkv.cli import main as cli_main
from edge_rwkv.runtime.engine import BatchEngine
from edge_rwkv.errors import InputError
from edge_rwkv.sampling import SamplingParams
from edge_rwkv.tokenizer import END_OF_TEXT

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("engine") / "m.safetensors"
    assert cli_main(["init", "-o", str(path), "--layers", "2", "--embd", "64", "--head-size", "32", "--seed", "3"]) == 0
    return edge_rwkv.load(path)


def alone(model, prompt_tokens, n, state=None, params=GREEDY):
    """Tokens and final state of one sequence run by itself (the Model.stream path)."""
    gen = model.stream(prompt_tokens, state=state, **{**params.__dict__, "max_tokens": n})
    for _ in gen:
        pass
    return gen.tokens, gen.state


def prompts(model):
    texts = ["Hello", "The capital of France is", "User: hi\n\nAssistant:", "1 2 3 4 5 6 7 8 9",
             "RWKV is a recurrent network " * 3]
    return [model.tokenizer.encode(t) for t in texts]


def collect(eng, slots, n):
    """Step until every slot has n tokens (or drew end of text); {slot: tokens}."""
    out = {s: [] for s in slots}
    for _ in range(4 * n + 8):
        if all(len(out[s]) >= n or END_OF_TEXT in out[s] for s in slots):
            break
        for i, t in eng.step().items():
            if i in out and len(out[i]) < n and END_OF_TEXT not in out[i]:
                out[i].append(t)
                if len(out[i]) == n:
                    eng.stop(i)  # as a consumer ends a sequence: its state keeps exactly these tokens
    return out


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(temperature=1.0, top_p=0.8, seed=11),
                                    SamplingParams(temperature=0.8, top_k=20, frequency_penalty=0.5, seed=3)],
                         ids=["greedy", "top_p", "top_k+penalty"])
def test_batched_equals_alone(model, params):
    ps = prompts(model)
    n = 12
    eng = BatchEngine(model, max_slots=8)
    slots = [eng.join(p, params.with_(seed=(params.seed or 0) + k)) for k, p in enumerate(ps)]
    out = collect(eng, slots, n)
    for k, (s, p) in enumerate(zip(slots, ps)):
        ref_tokens, ref_state = alone(model, p, n, params=params.with_(seed=(params.seed or 0) + k))
        got = [t for t in out[s] if t != END_OF_TEXT]
        assert got == ref_tokens
        st = eng.leave(s)  # leaving right after the n-th token: the state has read exactly those
        if len(got) == n:
            assert st.tokens == len(p) + n
            torch.testing.assert_close(st.wkv, ref_state.wkv, atol=1e-5, rtol=1e-4)


def test_tokens_arrive_one_step_after_they_are_drawn(model):
    eng = BatchEngine(model, max_slots=2)
    eng.join(prompts(model)[0], GREEDY)
    assert eng.step() == {}  # read the prompt, draw the first token
    first = eng.step()  # decode it (and draw the second) while the first reaches the host
    assert list(first) == [0]
    assert eng.drain() != {} and eng.drain() == {}


def test_end_of_text_is_never_read(model):
    """A row that draws end of text keeps its state: given logits that make end of text certain, the
    slot's state after leaving is the one it joined with."""
    st = alone(model, prompts(model)[0], 3)[1]
    logits = torch.full((model.config.vocab_size,), -10.0)
    logits[END_OF_TEXT] = 10.0
    eng = BatchEngine(model, max_slots=2)
    other = eng.join(prompts(model)[1], GREEDY)
    slot = eng.join([], GREEDY, state=st, logits=logits)
    got = collect(eng, [slot, other], 3)
    assert got[slot] == [END_OF_TEXT]
    left = eng.leave(slot)
    assert torch.equal(left.wkv, st.wkv) and left.tokens == st.tokens


def test_prefill_budget_keeps_decoding_rows_moving(model):
    """A long prompt joining while another row decodes is read a budget at a time: the decoding row
    gets a token at every step, and both produce what they produce alone."""
    short, long = prompts(model)[1], model.tokenizer.encode("RWKV is a recurrent network. " * 20)
    eng = BatchEngine(model, max_slots=2, prefill_budget=16)
    a = eng.join(short, GREEDY)
    eng.step(), eng.step()
    b = eng.join(long, GREEDY)
    steps_reading = 0
    got_a = []
    while eng.busy(b):
        out = eng.step()
        steps_reading += 1
        assert a in out
        got_a.append(out[a])
    assert steps_reading == -(-len(long) // 16)
    rest = collect(eng, [a, b], 6)
    ref_a, _ = alone(model, short, 1 + len(got_a) + 6)
    assert [ref_a[0]] + got_a + rest[a] == ref_a
    assert rest[b] == alone(model, long, 6)[0]


def test_snapshots_and_joining_from_one(model):
    """on_snapshot reports the state at the requested prompt lengths (and the logits at the end);
    joining from such a state (or from the whole prompt's state and logits) continues exactly."""
    p = prompts(model)[4]
    seen = {}
    eng = BatchEngine(model, max_slots=2)
    s = eng.join(p, GREEDY, snapshots=(3, len(p)), on_snapshot=lambda slot, n, st, lg: seen.update({n: (st, lg)}))
    ref = collect(eng, [s], 5)[s]
    eng.leave(s)
    assert set(seen) == {3, len(p)} and seen[3][1] is None and seen[len(p)][1] is not None
    assert seen[3][0].tokens == 3 and seen[len(p)][0].tokens == len(p)
    from_prefix = eng.join(p[3:], GREEDY, state=seen[3][0])
    from_whole = eng.join([], GREEDY, state=seen[len(p)][0], logits=seen[len(p)][1])
    out = collect(eng, [from_prefix, from_whole], 5)
    assert out[from_prefix] == ref and out[from_whole] == ref


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
    for _ in range(5):  # the 4th token reaches the host at the 5th step
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

    from edge_rwkv.runtime.runner import PREFILL_CHUNK, prefill_chunk_for

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
    """Off CUDA no chunk is graph-captured (graph.PrefillGraph is GPU-only): the runner's prefill is
    the model's chunked forward, counts the tokens it read, and leaves the model untouched."""
    toks = model.tokenizer.encode("RWKV is a recurrent network " * 6)
    st = model.new_state(1)
    assert model.runner.prefill_graph(16, st) is None
    la, sa = model.runner.prefill(toks, model.new_state(1), chunk=16)
    lb = sb = model.new_state(1)
    for i in range(0, len(toks), 16):
        lb, sb = model.net.forward(torch.tensor([toks[i:i + 16]]), sb, all_logits=False)
    assert torch.equal(la, lb[0]) and torch.equal(sa.wkv, sb.wkv) and sa.tokens == len(toks)
    assert not [k for k in vars(model.net) if "graph" in k or "packed" in k]
    assert model.describe()["prefill"] == "eager, chunks of 256"


class PiecewiseEngine(BatchEngine):
    """The engine as a many-slot engine reads prompts on a GPU: full chunks, then the rest one token a
    step through the batched decode step."""

    def _piece(self, n, chunk):
        return chunk if n >= chunk else 0


def test_short_prompt_tails_read_through_the_decode_step(model):
    """Reading a prompt's tail token by token through the decode step (beside decoding rows) gives the
    tokens and state of reading it whole; snapshots inside the tail and at its end are exact."""
    long = model.tokenizer.encode("RWKV is a recurrent network. " * 8)
    ps = [prompts(model)[0], prompts(model)[4], long]
    assert len(long) > 32 and len(long) % 32
    eng = PiecewiseEngine(model, max_slots=4, prefill_chunk=32)
    seen = {}
    slots = [eng.join(p, GREEDY, snapshots=(len(p) - 2, len(p)) if k == 2 else (),
                      on_snapshot=lambda slot, n, st, lg: seen.update({n: (st, lg)})) for k, p in enumerate(ps)]
    assert eng.busy(slots[0])
    out = collect(eng, slots, 6)
    for s, p in zip(slots, ps):
        ref, ref_state = alone(model, p, 6)
        assert out[s] == ref
        st = eng.leave(s)
        torch.testing.assert_close(st.wkv, ref_state.wkv, atol=1e-5, rtol=1e-4)
        assert st.tokens == ref_state.tokens
    assert set(seen) == {len(long) - 2, len(long)} and seen[len(long)][1] is not None
    assert seen[len(long)][0].tokens == len(long)
    # leaving (or being fed) in the middle of a tail keeps exactly what was read
    eng = PiecewiseEngine(model, max_slots=2, prefill_chunk=32)
    s = eng.join(ps[0], GREEDY)
    eng.step()
    eng.feed(s, model.tokenizer.encode(" more"), sample_after=False)
    while eng.busy(s):
        eng.step()
    _, want = model.runner.prefill(ps[0] + model.tokenizer.encode(" more"), model.new_state(1))
    torch.testing.assert_close(eng.leave(s).wkv, want.wkv, atol=1e-5, rtol=1e-4)
