"""Generation split as prefill → decode_one → sample, streaming text that is always valid UTF-8."""
from __future__ import annotations

from typing import Iterator

import torch

from .cuda_graph import prefill_graph
from .sampling import Sampler, SamplingParams
from .state import State
from .tokenizer import END_OF_TEXT

PREFILL_CHUNK = 256  # tokens per forward while reading a prompt on the CPU: bounds activation memory
GPU_CHUNK_ELEMENTS = 1 << 22  # on a GPU, tokens × width per forward (16 MB per fp32 activation)
GPU_CHUNK_MAX = 4096


def prefill_chunk_for(net) -> int:
    """Tokens per prefill forward: on a GPU as many as keep one activation ≤ 16 MB (a power of two,
    ≤ 4096: 4096 at width 768, 1024 at 4096), so per-launch costs are paid per thousands of tokens
    while memory stays O(chunk); PREFILL_CHUNK elsewhere.

    A quantized network was chosen to fit a small device: a quarter of that (256 tokens at width
    4096), since a chunk's activations (~230 B per token·channel) would otherwise weigh ~25 % of an
    int4 7.2B model's weights."""
    if net.device.type != "cuda":
        return PREFILL_CHUNK
    n = GPU_CHUNK_ELEMENTS // net.cfg.n_embd
    if _is_quantized(net):
        n //= 4
    return max(PREFILL_CHUNK, min(GPU_CHUNK_MAX, 1 << (n.bit_length() - 1)))


def _is_quantized(net) -> bool:
    from .quant.linear import quantized_linears

    return bool(quantized_linears(net))


def prefill(net, tokens: list[int], state: State, chunk: int | None = None, graph: bool = True):
    """Consume tokens; return the last token's logits [V] and the new state.

    On a GPU, full chunks replay a captured chunk (cuda_graph.PrefillGraph, made on the first full
    chunk and kept on the model) unless `graph` is False; a last partial chunk runs eagerly."""
    chunk = chunk or prefill_chunk_for(net)
    logits = None
    for start in range(0, len(tokens), chunk):
        ids = torch.tensor([tokens[start:start + chunk]], dtype=torch.long, device=net.device)
        consumed = state.tokens + ids.shape[1]
        g = prefill_graph(net, chunk, state) if graph and ids.shape[1] == chunk else None
        logits, state = g.run(ids, state) if g is not None else net.forward(ids, state, all_logits=False)
        state.tokens = consumed  # the forward returns a fresh State that does not carry the count
    return logits[0], state


def decode_one(net, token: int, state: State):
    ids = torch.tensor([[token]], dtype=torch.long, device=net.device)
    consumed = state.tokens + 1
    logits, state = net.forward(ids, state, all_logits=False)
    state.tokens = consumed
    return logits[0], state


class EagerDecoder:
    """One token at a time through the network's ordinary forward."""

    def __init__(self, net):
        self.net = net
        self.state: State | None = None

    def start(self, state: State) -> None:
        self.state = state

    def step(self, token: int) -> torch.Tensor:
        logits, self.state = decode_one(self.net, token, self.state)
        return logits

    def final_state(self) -> State:
        return self.state


class GraphDecoder:
    """One token at a time by replaying a captured CUDA graph (see cuda_graph.GraphStep)."""

    def __init__(self, graph_step):
        self.g = graph_step
        self._ids = torch.zeros(1, dtype=torch.long, device=graph_step.tokens.device)

    def start(self, state: State) -> None:
        self.g.load_state(state)

    def step(self, token: int) -> torch.Tensor:
        self._ids.fill_(token)
        return self.g.step(self._ids)[0]

    def final_state(self) -> State:
        return self.g.state.clone()  # load_state() copied the fingerprint in


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


class Generation:
    """An iterator of text pieces. After it ends: `.state`, `.tokens`, `.finish_reason`, `.text`."""

    def __init__(self, net, tokenizer, prompt_tokens: list[int], state: State, params: SamplingParams,
                 decoder=None):
        self.net, self.tok, self.params = net, tokenizer, params
        self.decoder = decoder or EagerDecoder(net)
        self.prompt_tokens = prompt_tokens
        self.state = state
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.stop_matched: str | None = None  # the stop string that ended the text, if one did
        self.pieces: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def __iter__(self) -> Iterator[str]:
        for piece in self._run():
            self.pieces.append(piece)
            yield piece

    def run(self) -> str:
        for _ in self:
            pass
        return self.text

    def _without_stops(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits with end-of-text and every token that could complete a stop string masked out."""
        if not hasattr(self, "_stop_ids"):
            ids = {END_OF_TEXT}
            for s in self.params.stop:
                ids.update(self.tok.ids_containing(s.encode("utf-8")))
                ids.update(self.tok.ids_containing(s.encode("utf-8")[:1]) if len(s) > 1 else ())
            self._stop_ids = torch.tensor(sorted(ids), device=logits.device)
        logits = logits.clone()
        logits[self._stop_ids] = float("-inf")
        return logits

    def _run(self) -> Iterator[str]:
        p = self.params
        logits, state = prefill(self.net, self.prompt_tokens, self.state)
        self.decoder.start(state)
        sampler = Sampler(p)
        decoder = self.tok.stream_decoder()
        pending = ""
        matched_stop = False
        self.finish_reason = "length"
        for _ in range(p.max_tokens):
            if p.require_text and not (self.text + pending).strip():
                logits = self._without_stops(logits)
            token = sampler.sample(logits)
            if token == END_OF_TEXT:
                self.finish_reason = "stop"
                break
            self.tokens.append(token)
            logits = self.decoder.step(token)
            pending += decoder.feed(token)
            hit, stop = min(((i, s) for s in p.stop if (i := pending.find(s)) >= 0), default=(-1, None))
            if hit >= 0:
                self.stop_matched = stop
                if hit:
                    yield pending[:hit]
                matched_stop = True
                self.finish_reason = "stop"
                break
            keep = held_back(pending, p.stop)
            if len(pending) > keep:
                yield pending[:len(pending) - keep]
                pending = pending[len(pending) - keep:]
        self.state = self.decoder.final_state()
        self.state.tokens = state.tokens + len(self.tokens)
        if not matched_stop:
            tail = pending + decoder.flush()
            if tail:
                yield tail
