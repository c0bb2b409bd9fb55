"""Offline quantization of a checkpoint into an artifact (the first of quantization's two steps; the
second, the module swap at load time, is quant/load.py).

Which tensors and how: quant/policy.py; formats: quant/formats.py; algorithms: quant/calibrate.py.
Activation-aware methods (awq, gptq) see the real inputs of each matrix, recorded by running the
full-precision model over calibration text (edge_rwkv/corpus.py by default) with recording linears
swapped in.
"""
from __future__ import annotations

import torch

from edge_rwkv.artifact import make_metadata
from edge_rwkv.checkpoint import Checkpoint
from edge_rwkv.model import DenseLinear, build_model
from edge_rwkv.progress import progress_iter
from edge_rwkv.state import State

from .calibrate import quantize_weight
from .formats import QuantSpec
from .policy import QuantPolicy

CALIB_WINDOW = 256


class RecordingLinear(DenseLinear):
    """A dense linear that keeps a bounded, uniformly thinned sample of the rows it is fed."""

    def __init__(self, weight: torch.Tensor, max_rows: int, generator: torch.Generator):
        super().__init__(weight)
        self.max_rows, self.g = max_rows, generator
        self.rows: list[torch.Tensor] = []
        self.seen = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        self.seen += flat.shape[0]
        keep = max(1, self.max_rows * flat.shape[0] // max(self.seen, 1))
        if flat.shape[0] > keep:
            flat = flat[torch.randperm(flat.shape[0], generator=self.g)[:keep]]
        self.rows.append(flat)
        return super().__call__(x)

    def sample(self) -> torch.Tensor:
        x = torch.cat(self.rows)
        if x.shape[0] > self.max_rows:
            x = x[torch.randperm(x.shape[0], generator=self.g)[: self.max_rows]]
        return x


@torch.no_grad()
def record_activations(ckpt: Checkpoint, names: set[str], tokens: list[int], max_rows: int = 2048,
                       progress: bool = False) -> dict[str, torch.Tensor]:
    """Inputs [n, K] of each named matrix while the fp32 model reads `tokens` (state carried across windows)."""
    g = torch.Generator().manual_seed(0)
    recorders: dict[str, RecordingLinear] = {}

    def make_linear(name):
        w = ckpt.tensors[name].float()
        if name in names:
            recorders[name] = RecordingLinear(w, max_rows, g)
            return recorders[name]
        return DenseLinear(w)

    cfg = ckpt.config
    net = build_model(cfg, ckpt.tensors, torch.float32, "cpu", make_linear=make_linear)
    state = State.zeros(cfg.n_layer, 1, cfg.n_embd, cfg.n_head, cfg.head_size)
    starts = range(0, len(tokens), CALIB_WINDOW)
    for s in progress_iter(starts, desc="calibrating", enabled=progress, total=len(starts)):
        ids = torch.tensor([tokens[s:s + CALIB_WINDOW]], dtype=torch.long)
        _, state = net.forward(ids, state, all_logits=False)
    return {n: r.sample() for n, r in recorders.items()}


def quantized_specs(ckpt: Checkpoint, policy: QuantPolicy) -> dict[str, QuantSpec]:
    """The spec of every tensor of `ckpt` that `policy` quantizes."""
    specs = {name: policy.format_for(name, tuple(t.shape)) for name, t in ckpt.tensors.items()}
    return {name: spec for name, spec in specs.items() if spec is not None}


def quantize_checkpoint(ckpt: Checkpoint, policy: QuantPolicy, calib_tokens: list[int] | None = None,
                        dense_dtype: torch.dtype = torch.float16, progress: bool = False,
                        source_sha256: str | None = None,
                        device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """(stored tensors, artifact metadata) of `ckpt` quantized under `policy`.

    Each quantized tensor (and its calibration activations) is moved to `device` to be quantized — a
    GPU does a 7B model in seconds, where a CPU takes minutes — and its stored tensors come back to
    the CPU (the artifact writer needs CPU tensors). Round to nearest stores the same values on any
    device (absmax, IEEE division and round-half-to-even are exact); awq / gptq sum in floating point,
    so their choices may differ in the last bits between devices."""
    specs = quantized_specs(ckpt, policy)
    method = policy.method
    acts = {}
    if method != "rtn":
        if not calib_tokens:
            raise ValueError(f"method {method!r} needs calibration text")
        # the embedding is a lookup table: it has no input activations, so it is always rounded to nearest
        acts = record_activations(ckpt, set(specs) - {"emb.weight"}, calib_tokens, progress=progress)
    out: dict[str, torch.Tensor] = {}
    quant_meta = {}
    for name in progress_iter(sorted(ckpt.tensors), desc="quantizing", enabled=progress):
        w = ckpt.tensors[name]
        if name not in specs:
            out[name] = w.to(dense_dtype)
            continue
        m = method if name in acts else "rtn"
        x = acts.get(name)
        qw = quantize_weight(w.to(device).float(), specs[name], m, x=None if x is None else x.to(device))
        out.update({k: v.cpu() for k, v in qw.stored_tensors(name).items()})
        quant_meta[name] = qw.metadata()
    meta = make_metadata(ckpt.config, str(dense_dtype).replace("torch.", ""), source_sha256,
                         {"policy": policy.to_dict(), "tensors": quant_meta})
    return out, meta
