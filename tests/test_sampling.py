"""Sampling (greedy, temperature, top-k/top-p, penalties) and stop strings during generation."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

import edge_rwkv
from edge_rwkv import InputError, SamplingParams
from edge_rwkv.generate import Generation, held_back
from edge_rwkv.sampling import Sampler, sample_batch, sample_token
from edge_rwkv.state import State
from edge_rwkv.synthetic import random_checkpoint
from edge_rwkv.tokenizer import END_OF_TEXT, default_tokenizer

V = 50


def probs_logits(p):
    return torch.log(torch.tensor(p, dtype=torch.float32))


def draw(params, logits, n=400, seed=0):
    s = Sampler(params.with_(seed=seed))
    out = []
    for _ in range(n):
        out.append(s.sample(logits))
        s.occurrence.clear()
    return out


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


def test_penalties_with_decay_as_specified():
    d, pres, freq = 0.9, 0.5, 0.25
    p = SamplingParams(temperature=0, presence_penalty=pres, frequency_penalty=freq, penalty_decay=d)
    s = Sampler(p)
    for t in (3, 3, 5):
        s.observe(t)
    # counts fade by `d` at every step and grow by 1 for the emitted token
    assert s.occurrence[3] == pytest.approx((1 * d + 1) * d)
    assert s.occurrence[5] == pytest.approx(1.0)
    base = torch.zeros(10)
    out = s.penalize(base)
    assert out[3] == pytest.approx(-(pres + (1 * d + 1) * d * freq))
    assert out[5] == pytest.approx(-(pres + 1.0 * freq))
    assert torch.equal(out[[0, 1, 2, 4, 6, 7, 8, 9]], torch.zeros(8))
    assert torch.equal(base, torch.zeros(10))  # the caller's logits are not modified


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
    s = Sampler(SamplingParams(temperature=0))
    s.observe(int(logits.argmax()))
    assert torch.equal(s.penalize(logits), logits)


def test_ban_end_of_text():
    lg = torch.tensor([5.0, 1.0, 0.0])
    assert Sampler(SamplingParams(temperature=0)).sample(lg) == END_OF_TEXT
    assert Sampler(SamplingParams(temperature=0, ban_end_of_text=True)).sample(lg) == 1


def test_batch_sampling_equals_row_by_row():
    """sample_batch (what the batch engine uses) draws exactly what each Sampler draws alone."""
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
    batch = [Sampler(p.with_(seed=i)) for i, p in enumerate(settings)]
    for step in range(30):
        logits = torch.randn(len(settings), V, generator=g) * 2
        logits[:, END_OF_TEXT] += 3 if step % 3 == 0 else 0  # make the ban matter
        want = [s.sample(logits[i]) for i, s in enumerate(alone)]
        assert sample_batch(logits, batch) == want
    assert [b.occurrence for b in batch] == [a.occurrence for a in alone]
    assert len({t for t in want}) > 1


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

class ScriptedNet:
    """A stand-in network whose logits pick the next token of a script (then end of text)."""

    def __init__(self, script, vocab=65536):
        self.script, self.vocab, self.calls = list(script), vocab, 0

    @property
    def device(self):
        return torch.device("cpu")

    def forward(self, ids, state, all_logits=True):
        nxt = self.script[self.calls] if self.calls < len(self.script) else END_OF_TEXT
        self.calls += 1
        logits = torch.zeros(ids.shape[0], self.vocab)
        logits[:, nxt] = 10.0
        return logits, State(state.att_x.clone(), state.wkv.clone(), state.ffn_x.clone(), state.fingerprint)


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


def byte_tokens(tok, text):
    table = {b: i for i, b in tok._bytes.items() if len(b) == 1}
    return [table[bytes([c])] for c in text.encode("utf-8")]


def run_scripted(tok, script, **params):
    net = ScriptedNet(script)
    gen = Generation(net, tok, [1], State.zeros(1, 1, 4, 1, 4), SamplingParams(temperature=0, **params))
    pieces = list(gen)
    return pieces, gen


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


def test_max_tokens_zero(tok):
    pieces, gen = run_scripted(tok, tok.encode("abc"), max_tokens=0)
    assert pieces == [] and gen.finish_reason == "length"


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
