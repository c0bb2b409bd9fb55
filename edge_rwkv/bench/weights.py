"""The weights both runtimes read, and the models a bench measures: random weights and tokens of the official
shapes, a model file written once for both runtimes, and each precision's model (a float load, or quantized as
a deployment stores it)."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from ..api import load
from ..artifact import write_artifact
from ..checkpoint import load_checkpoint
from ..quant.policy import QuantPolicy
from ..synthetic import HEAD_SIZE, PRESETS, VOCAB, random_checkpoint
from .options import FLOAT_PRECISIONS, QUANT_BITS, BenchOptions

QUANT_NA = "n/a (quantization not available)"


def random_tokens(n: int, seed: int) -> list[int]:
    """n token ids drawn uniformly from the vocabulary (the same for a seed on every machine)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n,), generator=g).tolist()


def bench_weights(n_layer: int, n_embd: int, seed: int, device: torch.device,
                  dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights in the official layout (synthetic.random_checkpoint), fp32 on the CPU.

    On CUDA the big presets would take minutes of CPU random numbers, so there every tensor is drawn
    (on the GPU) i.i.d. from the values of a 1-layer template made by random_checkpoint at the same
    width: same names, shapes and value distributions, a few seconds for any size."""
    if device.type != "cuda":
        return random_checkpoint(n_layer, n_embd, HEAD_SIZE, VOCAB, seed=seed, dtype=dtype)
    tpl = random_checkpoint(1, n_embd, HEAD_SIZE, vocab_size=512, seed=seed)
    g = torch.Generator(device=device).manual_seed(seed)
    pools = {k: v.reshape(-1).to(device) for k, v in tpl.items()}

    def draw(tkey, shape):
        pool = pools[tkey]
        idx = torch.randint(0, pool.numel(), shape, device=device, generator=g)
        return pool[idx].to(dtype).cpu()

    sd: dict[str, torch.Tensor] = {}
    for k, v in tpl.items():
        if not k.startswith("blocks."):
            shape = (VOCAB, n_embd) if k in ("emb.weight", "head.weight") else tuple(v.shape)
            sd[k] = draw(k, shape)
    for i in range(n_layer):
        for k, v in tpl.items():
            if k.startswith("blocks.0.") and (i == 0 or ".ln0." not in k):
                sd[f"blocks.{i}." + k[len("blocks.0."):]] = draw(k, tuple(v.shape))
    return sd


def quantizer():
    """(quantize function, None) when quantization is importable, else (None, reason). The bench's one
    import of the quantizer: a table row says why when it cannot be had."""
    try:
        from ..quant.transform import quantize_checkpoint
    except Exception as e:  # noqa: BLE001 — report, don't fail the whole table
        return None, f"quantization not importable ({type(e).__name__}: {e})"
    return quantize_checkpoint, None


def bench_policy(bits: int):
    """What a memory-constrained deployment stores: the layers and the head at `bits`, the embedding int8."""
    return QuantPolicy(bits=bits, quantize_head=True, quantize_embedding=True)


def describe_quantization(quant: dict) -> str:
    """One line from an artifact's quant metadata, e.g.
    "int4 g128 layers+head (layer 0 att.output fp16), int8 embedding, RTN"."""
    specs, policy = quant.get("tensors") or {}, quant.get("policy") or {}

    def formats(pick) -> str:
        found = {s["format"] + (f" g{s['group']}" if s.get("group") else "") for n, s in specs.items() if pick(n)}
        return "/".join(sorted(found)) or "fp16"

    layers, head = formats(lambda n: n.startswith("blocks.")), formats(lambda n: n == "head.weight")
    mats = f"{layers} layers+head" if head == layers else f"{layers} layers, {head} head"
    if "blocks.0.att.output.weight" not in specs and layers != "fp16":
        mats += " (layer 0 att.output fp16)"
    return f"{mats}, {formats(lambda n: n == 'emb.weight')} embedding, {str(policy.get('method', 'rtn')).upper()}"


class ModelUnavailable(Exception):
    """A precision whose model cannot be made here: the message is the table's note, `why` the detail logged."""

    def __init__(self, note: str, why: str = ""):
        super().__init__(note)
        self.why = why


def write_quantized(src: str, bits: int, dev: torch.device, out: str) -> tuple[dict, int]:
    """The model file `src` quantized under bench_policy (round to nearest, on `dev`) into the artifact `out`:
    its metadata and the bytes of its tensors. ModelUnavailable where quantization cannot be had."""
    quantize_checkpoint, why = quantizer()
    if quantize_checkpoint is None:
        raise ModelUnavailable(QUANT_NA, why)
    tensors, meta = quantize_checkpoint(load_checkpoint(src), bench_policy(bits), device=dev)
    write_artifact(out, tensors, meta)
    return meta, sum(t.numel() * t.element_size() for t in tensors.values())  # the CPU copy goes: at 7.2B gigabytes


def quantized_model(path: str, bits: int, dev: torch.device, dtype: torch.dtype):
    """(model, description): `path` quantized by write_quantized into a temporary artifact, loaded as a
    deployment loads it."""
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/q{bits}.safetensors"
        meta, _ = write_quantized(path, bits, dev, out)
        return load(out, device=str(dev), dtype=dtype), describe_quantization(meta["quant"])


def model_at(path: str, prec: str, dev: torch.device, dtype: torch.dtype, log) -> tuple[object, str | None]:
    """(model, quantization description or None): the model file `path` at precision `prec`; a quantized
    one computes in `dtype`."""
    if prec in FLOAT_PRECISIONS:
        return load(path, device=str(dev), dtype=FLOAT_PRECISIONS[prec]), None
    if prec not in QUANT_BITS:
        raise ModelUnavailable(f"n/a (unknown precision {prec!r})")
    t0 = time.perf_counter()
    try:
        m, desc = quantized_model(path, QUANT_BITS[prec], dev, dtype)
    except ModelUnavailable as e:
        log(f"{prec}: {e} — {e.why}")
        raise
    log(f"{prec}: quantized ({desc}) on {dev.type} and loaded in {time.perf_counter() - t0:.1f} s")
    return m, desc


def bench_file(o: BenchOptions, dev: torch.device, dtype: torch.dtype, workdir: Path, meta: dict, log):
    """(path both runtimes read, label): MODEL (as a .pth beside it when the peer needs one) or random weights."""
    if o.model:
        path = str(o.model)
        if not path.endswith(".pth"):  # the peer reads <base>.pth
            ck = load_checkpoint(path)
            if (ck.quant or {}).get("tensors"):
                o.peer = False
                meta["peer_note"] = "quantized artifact: the peer cannot read it"
            else:
                torch.save({k: v.to(dtype if dev.type == "cuda" else torch.float32) for k, v in ck.tensors.items()},
                           workdir / "model.pth")
                path = str(workdir / "model.pth")
            del ck
        return path, Path(o.model).name
    L, D = PRESETS[o.preset]
    t0 = time.perf_counter()
    sd = bench_weights(L, D, o.seed, dev, torch.float16 if dev.type == "cuda" else torch.float32)
    path = str(workdir / "model.pth")
    torch.save(sd, path)
    del sd
    label = f"{o.preset} (random weights)"
    log(f"weights: {label} written to {path} in {time.perf_counter() - t0:.1f} s")
    return path, label
