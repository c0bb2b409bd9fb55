"""Sampling (greedy, temperature, top-k/top-p, penalties, the per-row random stream) and the text
stream (UTF-8, stop strings) every face reads generated tokens through."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

import edge_rwkv
from edge_rwkv import InputError, SamplingParams
from edge_rwkv.runtime.textstream import TextStream, held_back
from edge_rwkv.sampling import RowSampler, Sampler, sample_token, uniforms
from edge_rwkv.synthetic import random_checkpoint
from edge_rwkv.tokenizer import END_OF_TEXT, default_tokenizer

V = 50


def probs_logits(p):
    return torch.log(torch.tensor(p, dtype=torch.float32))


def draw(params, logits, n=400, seed=0):
    s = Sampler(params.with_(seed=seed))
    return [s.sample(logits) for _ in range(n)]


@pytest.fixture
def logits():
    return torch.randn(V, generator=torch.Generator().manual_seed(1)) * 2


# --------------------------------------------------------------------------- token choice

def test_greedy_is_argmax(logits):
    p = SamplingParams(temperature=0)
    for seed in range(5):
        assert Sampler(p.with_(seed=seed)).sample(logits) == int(logits.argmax())
    assert sample_token(logits, p) == int(logits.argmax())


def test_seed_reproducible_and_seeds_differ(logits):
    p = SamplingParams(temperature=1.0, top_p=1.0, seed=123)
    a, b = draw(p, logits, 200, seed=7), draw(p, logits, 200, seed=7)
    assert a == b
    assert draw(p, logits, 200, seed=8) != a
    assert len(set(a)) > 5  # really random at temperature 1


def test_top_k_1_is_greedy(logits):
    p = SamplingParams(temperature=1.5, top_p=1.0, top_k=1)
    assert set(draw(p, logits, 200)) == {int(logits.argmax())}


def test_top_k_limits_support():
    lg = probs_logits([0.4, 0.3, 0.2, 0.1])
    got = draw(SamplingParams(temperature=1.0, top_p=1.0, top_k=2), lg, 600)
    assert set(got) == {0, 1}
    assert 0.45 < got.count(0) / len(got) < 0.7  # renormalised 0.4/0.7 ≈ 0.57


def test_top_p_small_keeps_only_top_token(logits):
    for top_p in (1e-6, 0.01, 0.05):
        assert set(draw(SamplingParams(temperature=1.0, top_p=top_p), logits, 200)) == {int(logits.argmax())}


def test_top_p_keeps_smallest_set_reaching_mass():
    lg = probs_logits([0.5, 0.3, 0.15, 0.05])
    assert set(draw(SamplingParams(temperature=1.0, top_p=0.7), lg, 600)) == {0, 1}
    assert set(draw(SamplingParams(temperature=1.0, top_p=0.45), lg, 300)) == {0}
    assert set(draw(SamplingParams(temperature=1.0, top_p=0.9), lg, 1500)) == {0, 1, 2}
    assert set(draw(SamplingParams(temperature=1.0, top_p=1.0), lg, 1500)) == {0, 1, 2, 3}


def test_temperature_sharpens_and_flattens():
    lg = probs_logits([0.6, 0.4])
    cold = draw(SamplingParams(temperature=0.2, top_p=1.0), lg, 800)
    hot = draw(SamplingParams(temperature=5.0, top_p=1.0), lg, 800)
    assert cold.count(0) / 800 > 0.8  # 0.6^5 / (0.6^5 + 0.4^5) ≈ 0.88
    assert 0.4 < hot.count(0) / 800 < 0.62  # ≈ 0.52


def forced(rows, token, vocab=10):
    """Logits [rows, vocab] that make `token` certain (penalties cannot overturn it)."""
    lg = torch.full((rows, vocab), -100.0)
    lg[:, token] = 100.0
    return lg


def test_penalties_with_decay_as_specified():
    d, pres, freq = 0.9, 0.5, 0.25
    rs = RowSampler(1, 10, "cpu")
    rs.reset(0, SamplingParams(temperature=0, presence_penalty=pres, frequency_penalty=freq, penalty_decay=d))
    for t in (3, 3, 5):
        assert int(rs.draw(forced(1, t), [0])[0]) == t
    # counts fade by `d` at every step and grow by 1 for the emitted token
    assert float(rs.occurrence[0, 3]) == pytest.approx((1 * d + 1) * d)
    assert float(rs.occurrence[0, 5]) == pytest.approx(1.0)
    base = torch.zeros(1, 10)
    out = rs.adjust(base, [0])[0]
    assert out[3] == pytest.approx(-(pres + (1 * d + 1) * d * freq))
    assert out[5] == pytest.approx(-(pres + 1.0 * freq))
    assert torch.equal(out[[0, 1, 2, 4, 6, 7, 8, 9]], torch.zeros(8))
    assert torch.equal(base, torch.zeros(1, 10))  # the caller's logits are not modified


def test_penalties_change_the_choice():
    lg = torch.tensor([0.0, 3.0, 2.5, 1.0])
    no_pen = Sampler(SamplingParams(temperature=0))
    assert [no_pen.sample(lg) for _ in range(4)] == [1, 1, 1, 1]
    pen = Sampler(SamplingParams(temperature=0, frequency_penalty=1.0, penalty_decay=1.0))
    # token 1 is penalised after it appears: 3-1=2 < 2.5 → 2; then 2.5-1=1.5 < 2 → 1; ...
    assert [pen.sample(lg) for _ in range(4)] == [1, 2, 1, 2]
    presence = Sampler(SamplingParams(temperature=0, presence_penalty=10.0))
    assert [presence.sample(lg) for _ in range(3)] == [1, 2, 3]


def test_penalties_off_leave_logits_alone(logits):
    rs = RowSampler(1, V, "cpu")
    rs.reset(0, SamplingParams(temperature=0))
    rs.draw(logits[None], [0])
    assert torch.equal(rs.adjust(logits[None], [0])[0], logits)


def test_ban_end_of_text():
    lg = torch.tensor([5.0, 1.0, 0.0])
    assert Sampler(SamplingParams(temperature=0)).sample(lg) == END_OF_TEXT
    assert Sampler(SamplingParams(temperature=0, ban_end_of_text=True)).sample(lg) == 1


def test_require_text_bans_stops_until_visible_text():
    """Before a visible token, end of text and the stop strings' tokens cannot be drawn; after, they can."""
    visible = torch.tensor([False, False, True, True])  # 0 end of text, 1 whitespace, 2-3 text
    rs = RowSampler(1, 4, "cpu", visible, stop_ids=lambda stops: [0, 3])
    rs.reset(0, SamplingParams(temperature=0, require_text=True))
    assert int(rs.draw(torch.tensor([[9.0, 8.0, 1.0, 7.0]]), [0])[0]) == 1  # whitespace: still no text
    assert int(rs.draw(torch.tensor([[9.0, 1.0, 8.0, 7.0]]), [0])[0]) == 2  # visible text
    assert int(rs.draw(torch.tensor([[9.0, 1.0, 8.0, 7.0]]), [0])[0]) == 0  # now it may end
    with pytest.raises(InputError):
        RowSampler(1, 4, "cpu").reset(0, SamplingParams(require_text=True))


def test_uniforms_are_splitmix64():
    """The per-row stream is splitmix64 over (seed, draw counter): checked against plain integers."""
    def ref(seed, counter):
        z = (seed + (counter + 1) * 0x9E3779B97F4A7C15) % 2**64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
        return ((z ^ (z >> 31)) >> 11) / 2**53

    seeds = [0, 1, 12345, -1, -(2**63), 2**62 + 7]
    counters = [0, 1, 2, 1000, 2**40]
    got = uniforms(torch.tensor([s for s in seeds for _ in counters]), torch.tensor(counters * len(seeds)))
    want = [ref(s % 2**64, c) for s in seeds for c in counters]
    assert got.tolist() == pytest.approx(want, abs=0, rel=0)
    assert all(0 <= u < 1 for u in want)


def test_batch_sampling_equals_row_by_row():
    """A RowSampler drawing for many rows at once draws exactly what each row's own sampler draws."""
    g = torch.Generator().manual_seed(5)
    settings = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0, ban_end_of_text=True),
        SamplingParams(temperature=1.0, top_p=1.0),
        SamplingParams(temperature=0.7, top_p=0.5),
        SamplingParams(temperature=1.3, top_p=0.9, top_k=5),
        SamplingParams(temperature=1.0, top_p=1.0, top_k=1),
        SamplingParams(temperature=0.9, presence_penalty=0.5, frequency_penalty=0.3, penalty_decay=0.9),
        SamplingParams(temperature=0, frequency_penalty=2.0, penalty_decay=1.0),
    ]
    alone = [Sampler(p.with_(seed=i)) for i, p in enumerate(settings)]
    batch = RowSampler(len(settings), V, "cpu")
    for i, p in enumerate(settings):
        batch.reset(i, p.with_(seed=i))
    rows = list(range(len(settings)))
    for step in range(30):
        logits = torch.randn(len(settings), V, generator=g) * 2
        logits[:, END_OF_TEXT] += 3 if step % 3 == 0 else 0  # make the ban matter
        want = [s.sample(logits[i]) for i, s in enumerate(alone)]
        order = rows[step % 2:] + rows[:step % 2]  # rows drawn in another order, and some skipped
        got = batch.draw(logits[order], order).tolist()
        assert got == [want[r] for r in order]
    assert torch.equal(batch.occurrence[6], alone[6].occurrence())
    assert len(set(want)) > 1


def test_rows_not_live_do_not_advance():
    """A row drawn while not live (it ended on the device) keeps its counter and counts."""
    rs = RowSampler(2, V, "cpu")
    for r in range(2):
        rs.reset(r, SamplingParams(temperature=1.0, frequency_penalty=1.0, seed=4))
    lg = torch.randn(2, V)
    rs.draw(lg, [0, 1], live=torch.tensor([1, 0], dtype=torch.int32))
    assert rs.counter.tolist() == [1, 0]
    assert float(rs.occurrence[0].sum()) == 1.0 and float(rs.occurrence[1].sum()) == 0.0


@pytest.mark.parametrize("kw", [
    {"temperature": -0.1}, {"temperature": float("nan")},
    {"top_p": 0.0}, {"top_p": 1.01}, {"top_p": -0.5}, {"top_p": float("nan")},
    {"top_k": -1}, {"penalty_decay": 0.0}, {"penalty_decay": 1.5}, {"max_tokens": -1},
    {"stop": ("",)}, {"stop": (5,)},
])
def test_invalid_params_rejected(kw):
    with pytest.raises(InputError):
        SamplingParams(**kw)


def test_valid_edge_params_accepted():
    SamplingParams(temperature=0, top_p=1.0, top_k=0, penalty_decay=1.0, max_tokens=0, stop=["x"])
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")


# --------------------------------------------------------------------------- stop strings: held_back

@pytest.mark.parametrize("text,stops,want", [
    ("Hello Wor", ("World",), 3),
    ("Hello W", ("World",), 1),
    ("Hello", ("World",), 0),
    ("Hello Worl", ("World", "rl!"), 4),
    ("ab", ("abc", "b"), 2),
    ("User", ("\n\nUser:",), 0),
    ("text\n", ("\n\n",), 1),
    ("", ("abc",), 0),
    ("abc", (), 0),
    ("xxab", ("abab",), 2),
    ("aba", ("abab",), 3),
])
def test_held_back(text, stops, want):
    assert held_back(text, stops) == want


# --------------------------------------------------------------------------- stop strings: generation

@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


def byte_tokens(tok, text):
    table = {b: i for i, b in tok._bytes.items() if len(b) == 1}
    return [table[bytes([c])] for c in text.encode("utf-8")]


def run_scripted(tok, script, stop=(), max_tokens=100):
    """Feed a script of tokens (then end of text) through a TextStream: (pieces released, stream)."""
    ts = TextStream(tok, stop, max_tokens)
    pieces = []
    for t in list(script) + [END_OF_TEXT]:
        piece = ts.feed(t)
        if piece:
            pieces.append(piece)
        if ts.done:
            break
    return pieces, ts


def assert_no_leak(pieces, final):
    so_far = ""
    for p in pieces:
        so_far += p
        assert final.startswith(so_far), f"leaked {so_far!r} (final {final!r})"
    assert so_far == final


@pytest.mark.parametrize("split", ["bytes", "words"])
def test_stop_string_split_across_tokens(tok, split):
    text = "Hello Wonder World and more"
    script = byte_tokens(tok, text) if split == "bytes" else tok.encode(text)
    pieces, gen = run_scripted(tok, script, stop=("World",), max_tokens=100)
    assert_no_leak(pieces, "Hello Wonder ")
    assert gen.text == "Hello Wonder " and gen.finish_reason == "stop"
    if split == "bytes":  # generation stopped as soon as the stop string was complete
        assert len(gen.tokens) == len("Hello Wonder World")


def test_stop_string_inside_one_token(tok):
    script = tok.encode("say\n\nUser: hi")
    assert any("\n\n" in tok.decode([t]) for t in script)
    pieces, gen = run_scripted(tok, script, stop=("\n\n",), max_tokens=50)
    assert_no_leak(pieces, "say")
    assert gen.finish_reason == "stop"


def test_stop_at_start_yields_nothing(tok):
    pieces, gen = run_scripted(tok, byte_tokens(tok, "STOP here"), stop=("STOP",), max_tokens=50)
    assert pieces == [] and gen.text == "" and gen.finish_reason == "stop"


def test_earliest_of_several_stops_wins(tok):
    pieces, gen = run_scripted(tok, byte_tokens(tok, "one two three"), stop=("three", "two"), max_tokens=50)
    assert_no_leak(pieces, "one ")


def test_partial_stop_prefix_released_at_length_limit(tok):
    """Held-back text that never became a stop string is released when generation ends."""
    script = byte_tokens(tok, "Hello Wor")
    pieces, gen = run_scripted(tok, script, stop=("World",), max_tokens=len(script))
    assert "".join(pieces) == "Hello Wor" and gen.finish_reason == "length"
    # ... but not before the end: the held part arrives last, as one piece
    assert pieces[-1].endswith("Wor")


def test_stop_with_multibyte_characters(tok):
    text = "你好。世界"
    pieces, gen = run_scripted(tok, byte_tokens(tok, text), stop=("。",), max_tokens=50)
    assert_no_leak(pieces, "你好")
    assert all("\ufffd" not in p for p in pieces)


def test_end_of_text_finishes(tok):
    pieces, gen = run_scripted(tok, tok.encode("short"), max_tokens=50)
    assert "".join(pieces) == "short" and gen.finish_reason == "stop"
    assert gen.tokens == tok.encode("short")


def test_strip_leading_and_turn_closing(tok):
    ts = TextStream(tok, ("\n\n",), 50, strip_leading=True)
    out = ""
    for t in tok.encode("  \n Hi there\n\nUser:"):
        out += ts.feed(t)
        if ts.done:
            break
    assert out == "Hi there" and ts.closes_turn() and ts.finish_reason == "stop"
    ts = TextStream(tok, ("\n\n",), 2)
    "".join(ts.feed(t) for t in tok.encode("Hi there friend")[:2])
    assert ts.finish_reason == "length" and not ts.closes_turn()


def test_real_model_stop_string(tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_file(random_checkpoint(1, 32, 16, vocab_size=65536, seed=5), str(path))
    m = edge_rwkv.load(path)
    prompt = m.tokenizer.encode("The answer is")
    full = m.generate(prompt, max_tokens=12, temperature=0, ban_end_of_text=True)
    assert len(full) >= 6
    stop = full[3:6]
    first = full.find(stop)
    got = m.generate(prompt, max_tokens=12, temperature=0, ban_end_of_text=True, stop=stop)
    assert got == full[:first]
    # sampling with a seed is reproducible through the model too
    a = m.generate(prompt, max_tokens=8, temperature=1.0, top_p=0.9, seed=11)
    b = m.generate(prompt, max_tokens=8, temperature=1.0, top_p=0.9, seed=11)
    assert a == b
    # max_tokens=0 reads the prompt and draws nothing
    gen = m.stream(prompt, max_tokens=0)
    assert list(gen) == [] and gen.finish_reason == "length" and gen.state.tokens == len(prompt)
    with pytest.raises(InputError):
        m.generate(prompt, temperature=-1)
    assert math.isfinite(float(m.forward(prompt)[0].abs().max()))


def test_top_p_beyond_the_sorted_prefix_sorts_everything():
    """When a row's top_p mass needs more tokens than the sorted prefix (a nearly flat distribution),
    the cut is still exact: the kept set is the smallest one reaching the mass."""
    from edge_rwkv.sampling import TOP_P_PREFIX, _top_p_cutoff

    V = 4 * TOP_P_PREFIX
    probs = torch.softmax(torch.linspace(0, 1e-3, V), 0)[None].repeat(2, 1)  # almost uniform
    top_p = torch.tensor([0.5, 1e-4])
    cut = _top_p_cutoff(probs, top_p)
    for r in range(2):
        kept = probs[r][probs[r] >= cut[r]]
        mass = top_p[r] * probs[r].sum()
        assert kept.sum() >= mass * (1 - 1e-6) and kept.sum() - kept.min() < mass
    assert int((probs[0] >= cut[0]).sum()) > TOP_P_PREFIX  # the first row needed the full sort
