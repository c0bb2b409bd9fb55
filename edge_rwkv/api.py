"""The embedded Python API: `edge_rwkv.load(path)` returns a Model with forward / generate / chat."""
from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from contextlib import contextmanager
from functools import lru_cache
from typing import Sequence

import torch

from .checkpoint import Checkpoint, load_checkpoint, read_time_states
from .config import ModelConfig
from .errors import EdgeRWKVError, InputError, StateError
from .model import RWKV7, build_model
from .runtime.engine import BatchEngine
from .runtime.generation import Generation
from .runtime.memory import MemoryBudgetError, device_weight_bytes, parse_size, plan_memory, scratch_bytes
from .runtime.runner import Runner
from .sampling import SamplingParams
from .state import State, is_state_file
from .tokenizer import END_OF_TEXT, default_tokenizer

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
# Tensors no quantization policy touches: a fingerprint from them survives conversion and quantization.
_FINGERPRINT_TENSORS = ("blocks.0.att.r_k", "blocks.0.att.w0", "blocks.0.att.k_k", "ln_out.weight", "ln_out.bias")


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
    elif isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise InputError(f"unsupported dtype {dtype!r}; use float32, float16 or bfloat16")


def parse_device(device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}; use 'cpu' or 'cuda'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but no CUDA GPU is available (use device='cpu')")
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"unsupported device {device!r}; use 'cpu' or 'cuda'")
    return dev


def model_fingerprint(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> str:
    """Identity of the trained weights, independent of file format, precision and quantization."""
    h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    for name in _FINGERPRINT_TENSORS:
        h.update(tensors[name].detach().float().reshape(-1).to(torch.float16).cpu().numpy().tobytes())
    return h.hexdigest()


def pick_wkv(device: torch.device):
    """The fastest WKV implementation this device supports (kernels on CUDA, torch reference elsewhere)."""
    from .wkv import wkv7_torch

    if device.type == "cuda":
        try:
            from .cuda_kernels import cuda_available, wkv7
        except ImportError:
            return wkv7_torch, "torch (Numba-CUDA kernels not importable)"
        if cuda_available():
            return wkv7, "numba-cuda"
        return wkv7_torch, "torch (Numba-CUDA unavailable)"
    return wkv7_torch, "torch (chunked for long inputs)"


class Model:
    """A loaded RWKV-7 model with its tokenizer."""

    def __init__(self, net: RWKV7, checkpoint: Checkpoint, fingerprint: str, wkv_backend: str):
        self.net = net
        self.config = checkpoint.config
        self.path = checkpoint.path
        self.metadata = checkpoint.metadata
        self.fingerprint = fingerprint
        self.wkv_backend = wkv_backend
        self.tokenizer = default_tokenizer()
        self.runner = Runner(net)  # the fast path's own data (packed layers, graphs): never on the net
        self._idle_engines: list[BatchEngine] = []  # single-slot engines for stream(), reused
        self._engines_lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return self.net.device

    @property
    def dtype(self) -> torch.dtype:
        return self.net.dtype

    # ---------------------------------------------------------------- state
    def new_state(self, batch: int = 1) -> State:
        if not isinstance(batch, int) or batch < 1:
            raise InputError(f"batch must be a positive integer, got {batch!r}")
        c = self.config
        return State.zeros(c.n_layer, batch, c.n_embd, c.n_head, c.head_size, self.device, self.fingerprint)

    def load_state(self, path) -> State:
        return State.load(path, device=self.device, expect_fingerprint=self.fingerprint)

    def initial_state(self, path) -> State:
        """A starting state read from a file, to pass as `state=` to forward / stream / generate / chat.

        Either an edge-rwkv state file of this model (one sequence), or an RWKV-PEFT state-tuning file
        (`blocks.{i}.att.time_state`, .pth or safetensors): its tuned WKV matrices with token-shift rows
        at zero, as the state-tuning trainer starts every sequence."""
        if is_state_file(path):
            state = self.load_state(path)
            if state.batch != 1:
                raise StateError(f"{path}: holds {state.batch} sequences; an initial state has one")
            return state
        state = self.new_state()
        state.wkv.copy_(read_time_states(path, self.config)[:, None].to(self.device))
        return state

    def check_state(self, state: State, batch: int | None = None) -> None:
        if not isinstance(state, State):
            raise InputError(f"state must be an edge_rwkv.State, got {type(state).__name__}")
        if state.fingerprint and state.fingerprint != self.fingerprint:
            raise StateError("state belongs to another model (fingerprint mismatch)")
        c = self.config
        want = {"n_layer": c.n_layer, "n_embd": c.n_embd, "n_head": c.n_head, "head_size": c.head_size}
        got = state.dims()
        if any(got[k] != v for k, v in want.items()):
            raise StateError(f"state dimensions {got} do not fit this model {want}")
        if batch is not None and state.batch != batch:
            raise InputError(f"state has batch {state.batch} but tokens have batch {batch}")

    # ---------------------------------------------------------------- forward
    def as_token_tensor(self, tokens) -> tuple[torch.Tensor, bool]:
        """(LongTensor [B,T] on the model's device, whether the input was unbatched)."""
        if isinstance(tokens, torch.Tensor):
            if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
                raise InputError(f"token tensor must hold integers, got {tokens.dtype}")
            t = tokens.long()
        else:
            if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence):
                raise InputError("tokens must be a list of ints or a LongTensor (use model.tokenizer.encode for text)")
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in tokens):
                raise InputError("tokens must all be ints")
            t = torch.tensor(list(tokens), dtype=torch.long)
        if t.dim() not in (1, 2):
            raise InputError(f"tokens must have shape [T] or [B,T], got {list(t.shape)}")
        if t.numel() == 0:
            raise InputError("tokens must not be empty")
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise InputError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")
        unbatched = t.dim() == 1
        return (t[None] if unbatched else t).to(self.device), unbatched

    @torch.inference_mode()
    def forward(self, tokens, state: State | None = None):
        """tokens list[int] / [T] / [B,T] → (logits [T,V] or [B,T,V] fp32, new state). `state` is not modified."""
        ids, unbatched = self.as_token_tensor(tokens)
        if state is None:
            state = self.new_state(ids.shape[0])
        self.check_state(state, ids.shape[0])
        logits, new = self.net.forward(ids, state.to(self.device))
        new.tokens = state.tokens + ids.shape[1]
        return (logits[0] if unbatched else logits), new

    # ---------------------------------------------------------------- generation
    def sampling(self, **kw) -> SamplingParams:
        kw = {k: v for k, v in kw.items() if v is not None}
        if "stop" in kw and isinstance(kw["stop"], str):
            kw["stop"] = (kw["stop"],)
        return SamplingParams(**kw)

    def stream(self, prompt: str | Sequence[int], state: State | None = None, strip_leading: bool = False,
               **sampling) -> Generation:
        """Iterate over text pieces as they decode; afterwards `.state` holds the continued state.
        `strip_leading` drops whitespace before the first visible text (chat replies)."""
        tokens = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not tokens:
            raise InputError("prompt is empty")
        self.as_token_tensor(tokens)  # validates the ids
        if state is not None:
            self.check_state(state, 1)
        return Generation(self, tokens, state, self.sampling(**sampling), strip_leading)

    @contextmanager
    def single_engine(self):
        """A one-slot BatchEngine for one generation (kept and reused; a second concurrent
        generation gets its own)."""
        with self._engines_lock:
            eng = self._idle_engines.pop() if self._idle_engines else None
        if eng is None:
            eng = BatchEngine(self, max_slots=1)
        try:
            yield eng
        finally:
            with self._engines_lock:
                self._idle_engines.append(eng)

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 256, temperature: float = 1.0,
                 state: State | None = None, return_state: bool = False, **sampling):
        """Complete `prompt`; greedy when temperature=0. The given state is continued, not modified."""
        gen = self.stream(prompt, state=state, max_tokens=max_tokens, temperature=temperature, **sampling)
        text = "".join(gen)
        return (text, gen.state) if return_state else text

    def chat(self, system: str | None = None, **sampling) -> "Chat":
        from .chat import Chat

        return Chat(self, system=system, **sampling)

    # ---------------------------------------------------------------- token tables for sampling
    def visible_tokens(self) -> torch.Tensor:
        """[vocab] bool: tokens whose text has a non-whitespace character."""
        return _visible_tokens(self.tokenizer, self.config.vocab_size)

    def stop_token_ids(self, stops: tuple[str, ...]) -> list[int]:
        """End of text and every token that could complete (or begin) one of the stop strings: what a
        reply that must show some text first is not allowed to draw before it has."""
        ids = {END_OF_TEXT}
        for s in stops:
            b = s.encode("utf-8")
            ids.update(self.tokenizer.ids_containing(b))
            if len(s) > 1:
                ids.update(self.tokenizer.ids_containing(b[:1]))
        return sorted(i for i in ids if i < self.config.vocab_size)

    def describe(self) -> dict:
        c = self.config
        arch = f"RWKV-7a x070 + DeepEmbed (rank {c.deep_embed})" if c.deep_embed else "RWKV-7 x070"
        return {"architecture": arch, "config": c.to_dict(), "n_head": c.n_head,
                "dtype": str(self.dtype).replace("torch.", ""),
                "device": str(self.device), "wkv": self.wkv_backend,
                "decode": self.runner.decode_how(), "prefill": self.runner.prefill_how(), "fingerprint": self.fingerprint,
                "state_bytes": c.state_bytes(),
                "memory": self.runner.memory_plan.describe() if self.runner.memory_plan else "no budget"}


@lru_cache(maxsize=4)
def _visible_tokens(tokenizer, vocab_size: int) -> torch.Tensor:
    known = min(vocab_size, tokenizer.vocab_size)
    return torch.tensor([bool(tokenizer.token_bytes(i).strip()) for i in range(known)] + [False] * (vocab_size - known),
                        dtype=torch.bool)


def read_device(dev: torch.device) -> torch.device:
    """Where a checkpoint's tensors are read to (one at a time, from the file mapping).

    Straight to a GPU that shares the host's memory (a Jetson): a host copy would be a second copy of
    the weights in the same DRAM. Elsewhere to the host, file-mapped, so that a file stored wider than
    the model's dtype is narrowed on its way to a discrete GPU instead of landing there at full width."""
    if dev.type == "cuda" and torch.cuda.get_device_properties(dev).is_integrated:
        return dev
    return torch.device("cpu")


CPU_DEQUANT_CACHE_BYTES = 1 << 30  # on a CPU, keep dequantized fp32 matrices when they all fit in this


def quantized_build_inputs(ckpt: Checkpoint, specs: dict, dtype: torch.dtype, device: torch.device):
    """(tensors with lookup tables dequantized, make_linear) for a quantized artifact.

    Matrices stay quantized behind QuantLinear (GEMV kernels on CUDA, dequantize+matmul on CPU); the
    embedding is a lookup table, so an int8 embedding is dequantized once here (fp32, on the CPU) for
    build_model to fold ln0 into (fp32, on the tensors' device); on CUDA the folded table is stored int8
    again (keeps_int8_embedding).
    On a CPU, a model whose matrices dequantize to at most CPU_DEQUANT_CACHE_BYTES keeps them
    dequantized (decoding re-unpacked every int4 matrix per token: the default model ran 12 tok/s
    instead of hundreds); bigger models dequantize per call and keep the small footprint.
    """
    from .artifact import load_quantized
    from .model import DenseLinear
    from .quant.linear import QuantLinear

    tensors = dict(ckpt.tensors)
    for name in ("emb.weight",):
        if name in specs:
            tensors[name] = load_quantized(name, specs[name], ckpt.tensors, ckpt.path).dequantize(torch.float32)

    fp32_bytes = sum(4 * math.prod(spec["shape"]) for n, spec in specs.items() if n != "emb.weight")
    cache = device.type == "cpu" and fp32_bytes <= CPU_DEQUANT_CACHE_BYTES

    def make_linear(name: str):
        if name in specs:
            qw = load_quantized(name, specs[name], ckpt.tensors, ckpt.path)
            return QuantLinear(qw, cache_dequantized=cache).to(device)
        return DenseLinear(tensors[name].to(device=device, dtype=dtype))

    return tensors, make_linear


def keeps_int8_embedding(specs: dict, device: torch.device) -> bool:
    """Whether the embedding stays int8 in memory: the artifact stores it as int8 and the model runs on
    CUDA (memory-bound deployments). A CPU keeps the dense fp32 table it always had."""
    spec = specs.get("emb.weight")
    return device.type == "cuda" and isinstance(spec, dict) and spec.get("format") == "int8"


def load(path: str | os.PathLike, device: str = "cpu", dtype: str | torch.dtype | None = None,
         progress: bool = False, max_memory: int | str | None = None, slots: int = 1) -> Model:
    """Load an official .pth, a safetensors checkpoint, an edge-rwkv artifact (quantized or not) or a
    Hugging Face / fla folder (config.json + model.safetensors or shards).

    max_memory (CUDA; bytes or a size such as "4.5G"): the prefill chunk is chosen so that the weights
    (measured once loaded), `slots` decode states and a chunk's activations stay inside it
    (runtime/memory.py); MemoryBudgetError when they cannot."""
    budget = parse_size(max_memory) if max_memory is not None else None
    dev = parse_device(device)
    if budget is not None and dev.type != "cuda":
        raise MemoryBudgetError("a memory budget applies to a CUDA device (use it with --device cuda)")
    ckpt = load_checkpoint(path, progress=progress, device=read_device(dev))
    if dtype is None:
        dtype = ckpt.metadata.get("dtype") if dev.type == "cuda" else "float32"
        dtype = dtype or ("float16" if dev.type == "cuda" else "float32")
    dt = parse_dtype(dtype)
    fingerprint = model_fingerprint(ckpt.config, ckpt.tensors)
    wkv, backend = pick_wkv(dev)
    tensors, make_linear = ckpt.tensors, None
    specs = ckpt.quant.get("tensors") or {}
    if specs:
        tensors, make_linear = quantized_build_inputs(ckpt, specs, dt, dev)
    with torch.inference_mode():
        # A dense checkpoint hands its tensors over (release_source): a tensor converted to another dtype
        # never coexists with all the originals.
        net = build_model(ckpt.config, tensors, dt, dev, make_linear=make_linear, wkv=wkv,
                          int8_embedding=keeps_int8_embedding(specs, dev), release_source=not specs)
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # the load's transients go back to the system (the same DRAM on a Jetson)
    model = Model(net, ckpt, fingerprint, backend)
    if budget is not None:
        model.runner.fit(plan_memory(budget, device_weight_bytes(net), net.cfg.n_embd, ckpt.config.state_bytes(),
                                     model.runner.chunk, slots, scratch_bytes(net)))
    return model


__all__ = ["Model", "load", "EdgeRWKVError"]
