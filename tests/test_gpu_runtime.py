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
    assert m.describe()["decode"] == "cuda-graph, fused step"
    m.runner.graph_error = "forced eager for the comparison"
    m._idle_engines.clear()  # the next generation takes a fresh engine, which decodes eagerly
    eager_text, eager_state = m.generate("Hello there", max_tokens=24, temperature=0, return_state=True)
    assert graph_text == eager_text
    assert torch.allclose(graph_state.wkv, eager_state.wkv, atol=1e-4, rtol=1e-4)
    assert graph_state.tokens == eager_state.tokens


def test_quantized_graph_decode_equals_eager(model_file, tmp_path):
    """int4 at fp16: the captured fused step (LoRA on a side stream beside the r/k/v GEMV, activations
    rounded by norm_mix / time_mix_wkv) gives exactly what the same step gives eagerly."""
    from edge_rwkv.artifact import write_artifact
    from edge_rwkv.checkpoint import load_checkpoint
    from edge_rwkv.quant.policy import QuantPolicy
    from edge_rwkv.quantize import quantize_checkpoint
    from edge_rwkv.runtime.fused import FusedStep
    from edge_rwkv.runtime.graph import GraphStep

    tensors, meta = quantize_checkpoint(load_checkpoint(model_file), QuantPolicy(bits=4, group=64))
    write_artifact(tmp_path / "q.safetensors", tensors, meta)
    m = edge_rwkv.load(tmp_path / "q.safetensors", device="cuda", dtype="float16")
    B = 2
    live = torch.ones(B, dtype=torch.int32, device="cuda")
    tokens = torch.zeros(B, 1, dtype=torch.long, device="cuda")
    g_state = m.new_state(B)
    graph = GraphStep(m.net, B, m.runner.packed(), state=g_state, tokens=tokens, live=live)
    assert graph.fused.side is not None
    eager = FusedStep(m.net, B, m.runner.packed())
    e_state = g_state.clone()
    gen = torch.Generator(device="cuda").manual_seed(3)
    with torch.inference_mode():
        for _ in range(6):
            tokens.copy_(torch.randint(0, 65536, (B, 1), generator=gen, device="cuda"))
            lg = graph.step().clone()
            le = eager(tokens, e_state, live)
            assert torch.equal(lg, le)
    assert torch.equal(g_state.wkv, e_state.wkv) and torch.equal(g_state.ffn_x, e_state.ffn_x)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("float16", 2e-2)])
def test_fused_step_equals_forward(model_file, dtype, tol):
    """The fused decode step (Numba kernels around the matmuls) against the model's own forward."""
    from edge_rwkv.runtime.fused import FusedStep

    m = edge_rwkv.load(model_file, device="cuda", dtype=dtype)
    ref = edge_rwkv.load(model_file, device="cuda", dtype=dtype)
    B = 3
    g = torch.Generator(device="cuda").manual_seed(0)
    st = m.new_state(B)
    st.wkv.copy_(torch.randn(st.wkv.shape, generator=g, device="cuda") * 0.3)
    st.att_x.copy_(torch.randn(st.att_x.shape, generator=g, device="cuda"))
    st.ffn_x.copy_(torch.randn(st.ffn_x.shape, generator=g, device="cuda"))
    st_ref = st.clone()
    live = torch.tensor([1, 0, 1], dtype=torch.int32, device="cuda")
    idle = st.select(1)
    step = FusedStep(m.net, B, m.runner.packed())
    with torch.inference_mode():
        for _ in range(4):
            tok = torch.randint(0, 65536, (B, 1), generator=g, device="cuda")
            lf = step(tok, st, live)
            lr, new = ref.net.forward(tok, st_ref, all_logits=False)
            st_ref.wkv[:, [0, 2]] = new.wkv[:, [0, 2]]
            st_ref.att_x[:, [0, 2]] = new.att_x[:, [0, 2]]
            st_ref.ffn_x[:, [0, 2]] = new.ffn_x[:, [0, 2]]
            err = ((lf - lr)[[0, 2]].abs().max() / lr.std()).item()
            assert err < tol
    assert torch.equal(st.select(1).wkv, idle.wkv)
    assert ((st.wkv - st_ref.wkv).abs().max() / st_ref.wkv.abs().max()).item() < tol


def test_engine_graph_batched_equals_alone(model_file):
    """Batched decode through the engine's per-bucket CUDA graphs == each sequence alone (greedy)."""
    from edge_rwkv.runtime.engine import BatchEngine
    from edge_rwkv.sampling import SamplingParams

    m = edge_rwkv.load(model_file, device="cuda", dtype="float32")
    texts = ["Hello", "The capital of France is", "1 2 3 4 5", "RWKV is a recurrent network " * 3, "x"]
    ps = [m.tokenizer.encode(t) for t in texts]
    eng = BatchEngine(m, max_slots=8)
    slots = [eng.join(p, SamplingParams(temperature=0, ban_end_of_text=True)) for p in ps]
    out = {s: [] for s in slots}
    for _ in range(60):  # short prompts are read a token a step beside the decoding rows
        for i, t in eng.step().items():
            out[i].append(t)
    assert eng.decode_how.startswith("cuda-graph") and any(eng._graphs.values())
    for s, p in zip(slots, ps):
        gen = m.stream(p, max_tokens=12, temperature=0, ban_end_of_text=True)
        for _ in gen:
            pass
        assert out[s][:12] == gen.tokens


def test_fused_step_quantized_fp16(model_file, tmp_path):
    """An int4 artifact at fp16: LoRA through the segmented GEMV, matrices through the int8-activation
    GEMVs (three live rows of a batch of 3) — against the model's own forward on the same weights."""
    from edge_rwkv.artifact import write_artifact
    from edge_rwkv.checkpoint import load_checkpoint
    from edge_rwkv.runtime.fused import FusedStep
    from edge_rwkv.quant.policy import QuantPolicy
    from edge_rwkv.quantize import quantize_checkpoint

    tensors, meta = quantize_checkpoint(load_checkpoint(model_file), QuantPolicy(bits=4, group=64))
    write_artifact(tmp_path / "q.safetensors", tensors, meta)
    m = edge_rwkv.load(tmp_path / "q.safetensors", device="cuda", dtype="float16")
    ref = edge_rwkv.load(tmp_path / "q.safetensors", device="cuda", dtype="float16")
    from edge_rwkv.quant.linear import QuantLinear, quantized_linears

    B = 3
    live = torch.ones(B, dtype=torch.int32, device="cuda")
    # fp32 activations: the fused step and the forward differ only by fp16 roundings; int8
    # activations: rounding x to int8 also follows those small differences (random weights amplify).
    # A step fixes its paths when it is built (as a captured graph does): one step per setting.
    for int8_x, tol in ((False, 2e-2), (True, 6e-2)):
        for lin in quantized_linears(m.net) + quantized_linears(ref.net):
            lin.int8_activations = int8_x
        step = FusedStep(m.net, B, m.runner.packed())
        assert step.tables is not None and not m.runner.packed()[1].seg.rkv
        # int8 activations: rounded by the kernels that produce them, for every quantized product (layer 0's
        # output stays fp16 under the default policy)
        for L, plan in zip(m.net.layers, step.a8):
            assert (plan.rkv is not None) == int8_x
            assert (plan.output is not None) == (int8_x and isinstance(L.output, QuantLinear))
            assert (plan.ffn_key is not None) == int8_x
        st = m.new_state(B)
        st_ref = st.clone()
        g = torch.Generator(device="cuda").manual_seed(1)
        with torch.inference_mode():
            for _ in range(4):
                tok = torch.randint(0, 65536, (B, 1), generator=g, device="cuda")
                lf = step(tok, st, live)
                lr, st_ref = ref.net.forward(tok, st_ref, all_logits=False)
                err = ((lf - lr).abs().max() / lr.std()).item()
                assert err < tol, (int8_x, err)


def test_engine_fp16_segmented_batched_equals_alone(model_file):
    """fp16 batches of ≤ 4 take the segmented GEMV, whose per-row arithmetic does not depend on the
    batch: three sequences batched give the tokens each gives alone (greedy)."""
    from edge_rwkv.runtime.engine import BatchEngine
    from edge_rwkv.sampling import SamplingParams

    m = edge_rwkv.load(model_file, device="cuda", dtype="float16")
    ps = [m.tokenizer.encode(t) for t in ("Hello there", "1 2 3", "The quick brown fox")]
    eng = BatchEngine(m, max_slots=4)
    slots = [eng.join(p, SamplingParams(temperature=0, ban_end_of_text=True)) for p in ps]
    out = {s: [] for s in slots}
    for _ in range(40):  # short prompts are read a token a step beside the decoding rows
        for i, t in eng.step().items():
            out[i].append(t)
    assert eng.decode_how == "cuda-graph, fused step" and m.runner.packed()[0].seg is not None
    for s, p in zip(slots, ps):
        gen = m.stream(p, max_tokens=8, temperature=0, ban_end_of_text=True)
        for _ in gen:
            pass
        assert out[s][:8] == gen.tokens


@pytest.mark.parametrize("quantized", [False, True])
def test_prefill_graph_equals_eager(model_file, tmp_path, quantized):
    """Full prompt chunks replayed from a captured CUDA graph give the eager forward's logits and state
    (fp16; an int4 artifact: its many-row dequantize-and-GEMM path); what a caller got from one prefill
    is not changed by the next replay; the batch engine's prompt chunks take the same graph."""
    from edge_rwkv.runtime.engine import BatchEngine
    from edge_rwkv.runtime.graph import PrefillGraph
    from edge_rwkv.sampling import SamplingParams

    path = model_file
    if quantized:
        from edge_rwkv.artifact import write_artifact
        from edge_rwkv.checkpoint import load_checkpoint
        from edge_rwkv.quant.policy import QuantPolicy
        from edge_rwkv.quantize import quantize_checkpoint

        tensors, meta = quantize_checkpoint(load_checkpoint(model_file), QuantPolicy(bits=4, group=64))
        path = tmp_path / "q.safetensors"
        write_artifact(path, tensors, meta)
    m = edge_rwkv.load(path, device="cuda", dtype="float16")
    g = torch.Generator().manual_seed(5)
    toks = torch.randint(0, 65536, (3 * 64 + 17,), generator=g).tolist()
    eager = edge_rwkv.load(path, device="cuda", dtype="float16")
    eager.runner.device = torch.device("cpu")  # a runner that never captures: the eager chunked forward
    la, sa = eager.runner.prefill(toks, m.new_state(1), chunk=64)
    lb, sb = m.runner.prefill(toks, m.new_state(1), chunk=64)
    assert isinstance(m.runner._prefill_graphs.get(64), PrefillGraph)
    scale = la.float().std()
    assert ((lb - la).abs().max() / scale).item() < 1e-3
    for a, b in ((sa.wkv, sb.wkv), (sa.att_x, sb.att_x), (sa.ffn_x, sb.ffn_x)):
        assert ((b - a).abs().max() / a.abs().max()).item() < 1e-3
    assert sb.tokens == sa.tokens == len(toks)
    kept = lb.clone(), sb.wkv.clone()
    m.runner.prefill(toks[::-1], m.new_state(1), chunk=64)  # another replay of the same graph
    assert torch.equal(lb, kept[0]) and torch.equal(sb.wkv, kept[1])
    # the engine reads whole chunks through the same graph: its first greedy token is the graph's argmax
    # (a tail shorter than a chunk is read through the decode step instead, whose quantized products
    # round activations to int8: not the same arithmetic, so the prompt here is whole chunks)
    whole = toks[:3 * 64]
    lw, _ = m.runner.prefill(whole, m.new_state(1), chunk=64)
    eng = BatchEngine(m, max_slots=2, prefill_chunk=64)
    slot = eng.join(whole, SamplingParams(temperature=0, ban_end_of_text=True))
    first = None
    for _ in range(3):  # the whole prompt (3 chunks) and the first draw, then its token reaches the host
        first = eng.step().get(slot)
        if first is not None:
            break
    assert first == 1 + int(lw.float()[1:].argmax())  # greedy, end-of-text (id 0) banned


def test_sampling_on_the_device(model_file):
    """Seeded top-p / top-k / penalty sampling on CUDA: the random stream equals the CPU's, and a
    sequence draws the same tokens alone as batched with others (fp32, the engine's graphs)."""
    from edge_rwkv.runtime.engine import BatchEngine
    from edge_rwkv.sampling import SamplingParams, uniforms

    seeds, counters = torch.tensor([3, -7, 2**62]), torch.tensor([0, 5, 2**40])
    assert torch.equal(uniforms(seeds.cuda(), counters.cuda()).cpu(), uniforms(seeds, counters))
    m = edge_rwkv.load(model_file, device="cuda", dtype="float32")
    params = [SamplingParams(temperature=1.0, top_p=0.8, seed=1), SamplingParams(temperature=0.7, top_k=50, seed=2),
              SamplingParams(temperature=1.0, top_p=0.9, frequency_penalty=0.4, seed=3)]
    ps = [m.tokenizer.encode(t) for t in ("Hello", "1 2 3", "The quick brown fox")]
    eng = BatchEngine(m, max_slots=4)
    slots = [eng.join(p, q.with_(max_tokens=10)) for p, q in zip(ps, params)]
    out = {s: [] for s in slots}
    for _ in range(40):
        for i, t in eng.step().items():
            if len(out[i]) < 10 and 0 not in out[i]:
                out[i].append(t)
    for s, p, q in zip(slots, ps, params):
        gen = m.stream(p, **{**q.__dict__, "max_tokens": 10})
        list(gen)
        assert [t for t in out[s] if t != 0] == gen.tokens
