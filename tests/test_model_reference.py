"""The torch model, loaded through edge_rwkv.load, against the independent float64 numpy reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import edge_rwkv
from edge_rwkv.synthetic import random_checkpoint
from reference_numpy import ReferenceRWKV7, reference_logits

VOCAB = 1000
TOKENS = [17, 503, 2, 999, 64, 64, 128, 1, 777, 350, 12, 421]

# (n_layer, n_embd, head_size): widths that are and are not multiples of 128, H >= 2.
SIZES = [(1, 64, 32), (2, 96, 32), (3, 160, 32)]


def rel_err(got, want) -> float:
    got = np.asarray(got, dtype=np.float64)
    return float(np.abs(got - want).max() / want.std())


def write(sd, folder, name, fmt):
    path = folder / f"{name}.{'pth' if fmt == 'pth' else 'safetensors'}"
    if fmt == "pth":
        torch.save(sd, path)
    else:
        save_file(sd, str(path))
    return path


@pytest.fixture(scope="module", params=SIZES, ids=lambda s: f"L{s[0]}-C{s[1]}-N{s[2]}")
def case(request, tmp_path_factory):
    n_layer, n_embd, head_size = request.param
    sd = random_checkpoint(n_layer, n_embd, head_size, vocab_size=VOCAB, seed=n_layer * 7 + n_embd)
    ref = reference_logits(sd, TOKENS)
    folder = tmp_path_factory.mktemp(f"ckpt{n_layer}_{n_embd}")
    return {"sd": sd, "ref": ref, "folder": folder, "size": request.param}


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_fp32_matches_reference(case, fmt):
    path = write(case["sd"], case["folder"], "m", fmt)
    m = edge_rwkv.load(path)
    n_layer, n_embd, head_size = case["size"]
    assert (m.config.n_layer, m.config.n_embd, m.config.head_size, m.config.n_head) == (
        n_layer, n_embd, head_size, n_embd // head_size)
    assert m.config.vocab_size == VOCAB
    logits, state = m.forward(TOKENS)
    assert logits.shape == (len(TOKENS), VOCAB) and logits.dtype == torch.float32
    assert rel_err(logits, case["ref"]) <= 1e-5
    assert state.tokens == len(TOKENS)


# Half-precision weights: matrices (and the folded embedding) are rounded; norms, decay and state stay fp32.
HALF_BOUNDS = {"float16": 1e-2, "bfloat16": 6e-2}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_close_to_reference(case, dtype):
    path = write(case["sd"], case["folder"], "m", "safetensors")
    m = edge_rwkv.load(path, dtype=dtype)
    assert m.dtype == getattr(torch, dtype)
    logits, _ = m.forward(TOKENS)
    assert logits.dtype == torch.float32
    err = rel_err(logits, case["ref"])
    assert err <= HALF_BOUNDS[dtype], f"{dtype}: max|Δ|/std = {err:.3g}"
    assert err > 0  # it really ran in reduced precision


def test_half_precision_checkpoint_file_loads(case):
    """A checkpoint stored in fp16 loads as fp32 on CPU and matches the reference of its own (rounded) weights."""
    sd16 = {k: v.to(torch.float16) for k, v in case["sd"].items()}
    path = write(sd16, case["folder"], "m16", "safetensors")
    m = edge_rwkv.load(path)
    assert m.dtype == torch.float32
    logits, _ = m.forward(TOKENS)
    assert rel_err(logits, reference_logits(sd16, TOKENS)) <= 1e-5


def test_sequence_equals_step_by_step(case):
    m = edge_rwkv.load(write(case["sd"], case["folder"], "m", "safetensors"))
    seq, s_seq = m.forward(TOKENS)
    state = m.new_state()
    steps = []
    for t in TOKENS:
        lg, state = m.forward([t], state)
        steps.append(lg[0])
    torch.testing.assert_close(torch.stack(steps), seq, rtol=0, atol=2e-5 * float(seq.std()))
    for name in ("att_x", "wkv", "ffn_x"):
        torch.testing.assert_close(getattr(state, name), getattr(s_seq, name), rtol=1e-5, atol=1e-5)
    assert state.tokens == s_seq.tokens == len(TOKENS)


def test_state_continuation(case):
    m = edge_rwkv.load(write(case["sd"], case["folder"], "m", "safetensors"))
    a, b = TOKENS[:5], TOKENS[5:]
    full, s_full = m.forward(a + b)
    _, s_a = m.forward(a)
    s_a_copy = s_a.clone()
    tail, s_ab = m.forward(b, s_a)
    torch.testing.assert_close(tail, full[len(a):], rtol=0, atol=2e-5 * float(full.std()))
    torch.testing.assert_close(s_ab.wkv, s_full.wkv, rtol=1e-5, atol=1e-5)
    # forward does not modify the state it is given
    for name in ("att_x", "wkv", "ffn_x"):
        assert torch.equal(getattr(s_a, name), getattr(s_a_copy, name))
    # and the reference agrees on the continuation
    ref = ReferenceRWKV7({k: v.double().numpy() for k, v in case["sd"].items()})
    ref.run(a)
    assert rel_err(tail, ref.run(b)) <= 1e-5


def test_batch_equals_single_runs(case):
    m = edge_rwkv.load(write(case["sd"], case["folder"], "m", "safetensors"))
    prompts = [TOKENS[:8], TOKENS[4:], [5, 6, 7, 8, 900, 901, 902, 3]]
    batched, s_b = m.forward(torch.tensor(prompts))
    assert batched.shape == (3, 8, VOCAB) and s_b.batch == 3
    for i, p in enumerate(prompts):
        single, s_1 = m.forward(p)
        torch.testing.assert_close(batched[i], single, rtol=0, atol=2e-5 * float(single.std()))
        torch.testing.assert_close(s_b.select(i).wkv, s_1.wkv, rtol=1e-5, atol=1e-5)
    # a batch continues from a batched state (here: the three single states concatenated)
    cont = [[11, 12], [13, 14], [15, 16]]
    states = [m.forward(p)[1] for p in prompts]
    out, _ = m.forward(torch.tensor(cont), edge_rwkv.State.cat(states))
    for i in range(3):
        single, _ = m.forward(cont[i], states[i])
        torch.testing.assert_close(out[i], single, rtol=0, atol=2e-5 * float(single.std()))


def test_forward_carries_the_token_count(tmp_path):
    """The network's forward returns the state counting what it read: a whole prompt, a prompt read in
    chunks, a batch, and single decode steps — no caller adds the count afterwards."""
    sd = random_checkpoint(2, 64, 32, vocab_size=VOCAB, seed=5)
    m = edge_rwkv.load(write(sd, tmp_path, "m", "safetensors"))
    ids = torch.tensor([TOKENS])
    _, st = m.net.forward(ids, m.new_state())
    assert st.tokens == len(TOKENS)
    _, st = m.net.forward(ids[:, :3], st, all_logits=False)  # continues from the count it is given
    assert st.tokens == len(TOKENS) + 3
    for chunk in (5, len(TOKENS)):  # chunked prefill: each chunk's forward adds its own tokens
        _, pre = m.runner.prefill(TOKENS, m.new_state(), chunk=chunk)
        assert pre.tokens == len(TOKENS)
    _, batched = m.net.forward(torch.tensor([TOKENS[:4], TOKENS[4:8]]), m.new_state(2))
    assert batched.tokens == 4  # one count for the batch, as the State keeps it
    step = pre
    for t in (7, 8, 9):  # decode steps, one token each
        _, step = m.net.forward(torch.tensor([[t]]), step, all_logits=False)
    assert step.tokens == len(TOKENS) + 3 and pre.tokens == len(TOKENS)  # the given state is untouched
    _, api_state = m.forward([7, 8, 9], pre)
    assert api_state.tokens == step.tokens
    torch.testing.assert_close(api_state.wkv, step.wkv)


def test_generate_greedy_is_argmax_decoding(case):
    m = edge_rwkv.load(write(case["sd"], case["folder"], "m", "safetensors"))
    prompt = TOKENS[:6]
    n = 10
    g1 = m.stream(prompt, max_tokens=n, temperature=0)
    text1 = "".join(g1)
    g2 = m.stream(prompt, max_tokens=n, temperature=0)
    text2 = "".join(g2)
    assert g1.tokens == g2.tokens and text1 == text2
    # manual argmax decoding (token 0 ends a text, as in generation)
    logits, state = m.forward(prompt)
    last, manual = logits[-1], []
    for _ in range(n):
        t = int(torch.argmax(last))
        if t == 0:
            break
        manual.append(t)
        lg, state = m.forward([t], state)
        last = lg[-1]
    assert g1.tokens == manual
    assert text1 == m.tokenizer.decode(manual)
    assert m.generate(prompt, max_tokens=n, temperature=0) == text1
    # the state after generation is the state after the prompt + generated tokens
    torch.testing.assert_close(g1.state.wkv, state.wkv, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_layer", [1, 2])
def test_layer0_without_v_params_loads(tmp_path, n_layer):
    """Official files omit blocks.0.att.v0/v1/v2 (unused in layer 0): they must load and run."""
    sd = random_checkpoint(n_layer, 64, 32, vocab_size=VOCAB, seed=3)
    for k in ("v0", "v1", "v2"):
        del sd[f"blocks.0.att.{k}"]
    ref = reference_logits(sd, TOKENS)
    for fmt in ("pth", "safetensors"):
        m = edge_rwkv.load(write(sd, tmp_path, f"nov{fmt}", fmt))
        logits, _ = m.forward(TOKENS)
        assert rel_err(logits, ref) <= 1e-5
    if n_layer > 1:
        assert m.config.mv_lora == sd["blocks.1.att.v1"].shape[1]


def test_layer0_v_params_are_ignored(tmp_path):
    """Values in layer-0 v0/v1/v2 must not change the output (layer 0 defines v_first)."""
    sd = random_checkpoint(2, 64, 32, vocab_size=VOCAB, seed=4)
    sd2 = dict(sd)
    for k in ("v0", "v1", "v2"):
        sd2[f"blocks.0.att.{k}"] = torch.randn_like(sd[f"blocks.0.att.{k}"]) * 5
    la, _ = edge_rwkv.load(write(sd, tmp_path, "a", "safetensors")).forward(TOKENS)
    lb, _ = edge_rwkv.load(write(sd2, tmp_path, "b", "safetensors")).forward(TOKENS)
    assert torch.equal(la, lb)


def test_invalid_token_inputs_rejected(tmp_path):
    m = edge_rwkv.load(write(random_checkpoint(1, 64, 32, vocab_size=VOCAB, seed=1), tmp_path, "m", "safetensors"))
    for bad, needle in [([1, VOCAB], "outside the vocabulary"), ([-1], "outside the vocabulary"), ([], "empty"),
                        (torch.zeros(2, 2, 2, dtype=torch.long), "shape"), (torch.zeros(3), "integers"),
                        ("hello", "list of ints"), ([1, 2.0], "ints"), ([True], "ints")]:
        with pytest.raises(edge_rwkv.InputError, match=needle):
            m.forward(bad)
    with pytest.raises(edge_rwkv.InputError, match="empty"):
        m.generate([], max_tokens=2)
    with pytest.raises(edge_rwkv.InputError, match="outside"):
        m.generate([VOCAB + 5], max_tokens=2)
