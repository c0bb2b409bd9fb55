"""One `edge-rwkv bench` run: each precision's model made once and measured alone on the device (decode B=1,
batched decode, prefill and peak memory), then the peer on the same weights, its figures merged beside ours.
The result is one dict (meta, decode, e2e, batched, prefill, quality, options): what table.py prints and
the JSON holds."""
from __future__ import annotations

import dataclasses
import gc
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..api import load, parse_device
from .memory import PeakMemory, weight_bytes_per_step, weights_resident_bytes
from .options import FLOAT_PRECISIONS, BenchOptions, base_precision, precision_plan, prefill_reps
from .ours import E2E_MODES, Ours
from .peer import run_peer
from .table import fmt_bytes
from .timing import copy_bandwidth
from .weights import ModelUnavailable, bench_file, model_at, random_tokens


def _free(dev: torch.device) -> None:
    """Release a dropped model now, so the next one is measured alone on the device."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class _Run:
    """What every precision's rows share."""

    o: BenchOptions
    dev: torch.device
    path: str
    base: str
    dtype: torch.dtype
    bw: float
    sbytes: int
    res: dict
    log: Callable[[str], None]
    ref_logits: torch.Tensor | None = None
    qtoks: list[int] | None = None
    auto_chunk: bool = True  # no --chunk: each precision's model reads prompts in its own default chunk

    def gbs(self, sec: float, nbytes: int) -> tuple[float, float]:
        g = nbytes / sec / 1e9
        return g, 100 * g / self.bw

    def base_lengths(self) -> list[int]:
        """Prefill lengths of the base precision (the peer runs the same ones)."""
        mem = self.o.memory_ctx if self.base in self.o.memory_precisions else []
        return sorted(set(self.o.prefill) | set(mem))

    def lengths(self, prec: str) -> list[int]:
        if prec == self.base:
            return self.base_lengths()
        return sorted(set(self.o.memory_ctx)) if prec in self.o.memory_precisions else []


def _model_for(r: _Run, prec: str, decode_row: dict | None):
    """The model of a precision other than the base, or None once its rows say why it could not be made."""
    try:
        m, desc = model_at(r.path, prec, r.dev, r.dtype, r.log)
    except Exception as e:  # noqa: BLE001  (the table says why)
        note = str(e) if isinstance(e, ModelUnavailable) else f"failed: {type(e).__name__}: {str(e)[:120]}"
        r.log(f"{prec}: {note}")
        _unavailable_rows(r, prec, note, decode_row)
        return None
    r.res["meta"]["weights_bytes"][prec] = weights_resident_bytes(m.net)
    if desc:
        r.res["meta"]["quantization"][prec] = desc
    return m


def _decode_row(r: _Run, prec: str, m, row: dict) -> None:
    """Decode B=1 of model `m` into `row` (and, with --quality, its logits against the base's)."""
    try:
        sec, how = Ours(m, r.o).decode(1)
        nb = weight_bytes_per_step(m.net) + 2 * r.sbytes
        g, pct = r.gbs(sec, nb)
        row.update(ours_tok_s=1 / sec, how=how, bytes_per_step=nb, gbs=g, pct_bound=pct)
        if r.ref_logits is not None and prec != r.base:
            r.res["quality"].append(_compare(f"ours {prec} vs ours {r.base}", Ours(m, r.o).logits(r.qtoks), r.ref_logits))
        r.log(f"decode B=1 {prec}: {row['ours_tok_s']:.1f} tok/s ({how}), {g:.0f} GB/s = {pct:.1f}% of copy")
    except Exception as e:  # noqa: BLE001
        row["note"] = f"failed: {type(e).__name__}: {str(e)[:120]}"
        r.log(f"decode {prec}: {row['note']}")
    _e2e_rows(r, prec, m, row.get("ours_tok_s"))


def _e2e_rows(r: _Run, prec: str, m, step_tok_s: float | None) -> None:
    """`Model.stream` end to end (greedy and top_p 0.8) beside the captured step of the same run."""
    if r.o.e2e_tokens < 2:
        return
    ours = Ours(m, r.o)
    for mode, sampling in E2E_MODES.items():
        row = {"precision": prec, "mode": mode, "step_tok_s": step_tok_s}
        try:
            row["ours_tok_s"] = ours.end_to_end(sampling, r.o.e2e_tokens)
            if step_tok_s:
                row["of_step"] = row["ours_tok_s"] / step_tok_s
            r.log(f"Model.stream {prec} {mode}: {row['ours_tok_s']:.1f} tok/s")
        except Exception as e:  # noqa: BLE001
            row["note"] = f"failed: {type(e).__name__}: {str(e)[:120]}"
            r.log(f"Model.stream {prec} {mode}: {row['note']}")
        r.res["e2e"].append(row)


def _batched_rows(r: _Run, prec: str, m) -> None:
    ours, wbytes = Ours(m, r.o), weight_bytes_per_step(m.net)
    for B in r.o.batch:
        row = {"precision": prec, "batch": B}
        try:
            sec, how = ours.decode(B)
            g, pct = r.gbs(sec, wbytes + 2 * B * r.sbytes)
            row.update(ours_tok_s=B / sec, how=how, gbs=g, pct_bound=pct)
            r.log(f"decode {prec} B={B}: {B / sec:.1f} tok/s ({how})")
        except Exception as e:  # noqa: BLE001
            row["note"] = f"failed: {type(e).__name__}: {str(e)[:120]}"
            r.log(f"decode {prec} B={B}: failed {e!r}"[:200])
        r.res["batched"].append(row)


def _prefill_rows(r: _Run, prec: str, m, lengths: list[int]) -> None:
    """Prefill speed and peak memory per length; a length whose estimated time exceeds the item limit is
    skipped. Only this model is resident, so a CUDA peak is its deployment footprint."""
    o = r.o
    if r.auto_chunk and prec != r.base:  # e.g. a quantized model reads in smaller chunks (runner.py)
        o = dataclasses.replace(o, chunk=m.runner.chunk)
        r.res["meta"].setdefault("chunk_by_precision", {})[prec] = o.chunk
    ours = Ours(m, o)
    try:
        ours.prefill(min(2 * o.chunk, max(lengths)), 1)  # warm-up (kernels, allocator)
    except Exception as e:  # noqa: BLE001  (the rows say why; the other precisions still run)
        note = f"failed: {type(e).__name__}: {str(e)[:120]}"
        r.log(f"prefill {prec}: {note}")
        r.res["prefill"].extend({"precision": prec, "tokens": n, "ours_note": note} for n in lengths)
        return
    last_rate = None
    for n in lengths:
        if last_rate and n / last_rate > r.o.item_limit_s:
            row = {"precision": prec, "tokens": n, "ours_note": f"skipped (est. {n / last_rate:.0f} s)"}
        else:
            row = _prefill_row(r, ours, prec, n, prefill_reps(n))
            last_rate = row.get("ours_tok_s", last_rate)
        r.res["prefill"].append(row)


def _prefill_row(r: _Run, ours: Ours, prec: str, n: int, reps: int) -> dict:
    """One prefill length: tok/s and peak memory, or why it failed (e.g. out of memory)."""
    row = {"precision": prec, "tokens": n}
    try:
        sec, peak, base = ours.prefill(n, reps)
    except Exception as e:  # noqa: BLE001  (keep the other rows)
        row["ours_note"] = f"failed: {type(e).__name__}: {str(e)[:120]}"
        r.log(f"prefill {prec} {n}: {row['ours_note']}")
        _free(r.dev)
        return row
    row.update(ours_tok_s=n / sec, ours_peak_bytes=peak, ours_resident_bytes=base)
    r.log(f"prefill {prec} {n}: {n / sec:.0f} tok/s, peak {fmt_bytes(peak)}")
    return row


def _bench_precision(r: _Run, prec: str, m, decode_row: dict | None) -> None:
    """All rows of one precision's model: decode B=1, batched decode, prefill + peak memory."""
    if decode_row is not None:
        _decode_row(r, prec, m, decode_row)
    if prec in r.o.batch_precisions:
        _batched_rows(r, prec, m)
    lengths = r.lengths(prec)
    if lengths:
        _prefill_rows(r, prec, m, lengths)


def _unavailable_rows(r: _Run, prec: str, note: str, decode_row: dict | None) -> None:
    """Rows that say why a precision's model could not be made, where its measurements would be."""
    if decode_row is not None:
        decode_row["note"] = note
    if prec in r.o.batch_precisions:
        r.res["batched"].extend({"precision": prec, "batch": B, "note": note} for B in r.o.batch)
    r.res["prefill"].extend({"precision": prec, "tokens": n, "ours_note": note} for n in r.lengths(prec))


def _merge_peer(res: dict, peer: dict, base: str, gbs) -> None:
    """The peer's figures beside ours: decode B=1 and prefill of the base precision; batched rows get
    the peer's batch-1 rate (it has no batched decode)."""
    base_decode = next((d for d in res["decode"] if d["precision"] == base and "ours_tok_s" in d), None)
    if base_decode is not None and peer.get("decode_s"):
        base_decode["peer_tok_s"] = 1 / peer["decode_s"]
        base_decode["ratio"] = base_decode["ours_tok_s"] * peer["decode_s"]
        pg, ppct = gbs(peer["decode_s"], base_decode["bytes_per_step"])
        base_decode.update(peer_gbs=pg, peer_pct_bound=ppct)
    for row in res.get("e2e", []):
        if row["precision"] == base and row["mode"] == "top_p 0.8" and peer.get("e2e_top_p_tok_s"):
            row["peer_tok_s"] = peer["e2e_top_p_tok_s"]
            if "ours_tok_s" in row:
                row["ratio"] = row["ours_tok_s"] / row["peer_tok_s"]
    for row in res["batched"]:
        if peer.get("decode_s"):
            row["peer_note"] = "batch 1 only"
            row["peer_b1_tok_s"] = 1 / peer["decode_s"]
            if "ours_tok_s" in row:
                row["ratio_vs_peer_b1"] = row["ours_tok_s"] * peer["decode_s"]
    for row in res["prefill"]:
        if row.get("precision", base) != base:
            continue
        p = (peer.get("prefill") or {}).get(str(row["tokens"]), {})
        if "s" in p:
            row.update(peer_tok_s=row["tokens"] / p["s"], peer_peak_bytes=p["peak_bytes"],
                       peer_resident_bytes=p.get("resident_bytes"))
            if "ours_tok_s" in row:
                row["ratio"] = row["ours_tok_s"] / row["peer_tok_s"]
            if row.get("ours_peak_bytes") and p.get("peak_bytes"):
                row["mem_ratio"] = row["ours_peak_bytes"] / p["peak_bytes"]
        elif "skipped" in p:
            row["peer_note"] = p["skipped"]


def _is_flat(peaks: list[int], dev: torch.device) -> bool | None:
    """Peak memory flat in context length: within 10% of the shortest context's (CPU: + 8 MB of noise)."""
    if len(peaks) < 2:
        return None
    slack = 0.10 * max(peaks[0], 1) + (8 << 20 if dev.type == "cpu" else 0)
    return bool(max(peaks) - peaks[0] <= slack)


def _memory_flat(res: dict, o: BenchOptions, base: str, dev: torch.device) -> None:
    meta, mem = res["meta"], set(o.memory_ctx)

    def peaks(side: str, prec: str) -> list[int]:
        return [r[f"{side}_peak_bytes"] for r in res["prefill"] if r["tokens"] in mem
                and r.get("precision", base) == prec and r.get(f"{side}_peak_bytes") is not None]

    by_prec = {p: _is_flat(peaks("ours", p), dev) for p in o.memory_precisions}
    meta["ours_memory_flat_by_precision"] = {p: f for p, f in by_prec.items() if f is not None}
    for side in ("ours", "peer"):
        flat = _is_flat(peaks(side, base), dev)
        if flat is not None:
            meta[f"{side}_memory_flat"] = flat


def run_bench(o: BenchOptions, log=print) -> dict:
    """Measure both runtimes as `o` asks; `log` gets a line per measurement."""
    dev = parse_device(o.device)
    t_start = time.perf_counter()
    base_prec = base_precision(o.precisions, dev.type)
    o = dataclasses.replace(o, batch_precisions=o.batch_precisions or [base_prec],
                            memory_precisions=o.memory_precisions or [base_prec])
    dtype = FLOAT_PRECISIONS[base_prec]
    res: dict = {"meta": {}, "decode": [], "e2e": [], "batched": [], "prefill": [], "quality": []}
    meta = res["meta"]
    with tempfile.TemporaryDirectory(prefix="edge_rwkv_bench_") as tmp:
        workdir = Path(tmp)
        path, label = bench_file(o, dev, dtype, workdir, meta, log)
        model = load(path, device=str(dev), dtype=dtype)
        cfg = model.config
        auto_chunk = o.chunk is None
        if auto_chunk:
            o = dataclasses.replace(o, chunk=model.runner.chunk)
        meta.update(model=label, config=cfg.to_dict(), device=str(dev),
                    device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
                    torch=torch.__version__, dtype=base_prec, chunk=o.chunk, wkv=model.wkv_backend,
                    threads=torch.get_num_threads(), memory_kind=PeakMemory(dev).kind)
        bw = copy_bandwidth(dev)
        wbytes = weight_bytes_per_step(model.net)
        sbytes = cfg.state_bytes(1)
        meta.update(copy_gbs=bw, weight_bytes_per_step=wbytes, state_bytes=sbytes,
                    weights_bytes={base_prec: weights_resident_bytes(model.net)}, quantization={})
        log(f"model: L{cfg.n_layer} D{cfg.n_embd} on {meta['device_name']}; copy bandwidth {bw:.0f} GB/s; "
            f"weights read per decode step {wbytes / 1e9:.3f} GB")

        r = _Run(o, dev, path, base_prec, dtype, bw, sbytes, res, log, auto_chunk=auto_chunk)
        if o.quality:
            r.qtoks = random_tokens(64, o.seed + 7)
            r.ref_logits = Ours(model, o).logits(r.qtoks)  # kept on the CPU: the base model is freed below
        decode_rows = {p: {"precision": p} for p in o.precisions}
        res["decode"] = list(decode_rows.values())

        # ---------------------------------------------------------------- ours: one model at a time
        for prec in precision_plan(o, base_prec):
            if prec == base_prec:
                m, model = model, None  # the loop holds the only reference: freed before the next model
            else:
                m = _model_for(r, prec, decode_rows.get(prec))
            if m is not None:
                _bench_precision(r, prec, m, decode_rows.get(prec))
            del m
            _free(dev)

        # ---------------------------------------------------------------- the peer
        peer = {}
        if o.peer:
            lengths = r.base_lengths()
            peer = run_peer(path, dev, o, lengths, {n: prefill_reps(n) for n in lengths}, workdir, r.qtoks, log)
            if peer.get("quality_logits") and Path(peer["quality_logits"]).exists():
                ref = torch.load(peer["quality_logits"], weights_only=True)
                res["quality"].append(_compare(f"ours {base_prec} vs rwkv pip", r.ref_logits, ref))
        else:
            peer = {"error": meta.get("peer_note", "not run (--no-peer)")}
        meta["peer"] = {k: v for k, v in peer.items() if k not in ("prefill", "quality_logits")}
        _merge_peer(res, peer, base_prec, r.gbs)
        _memory_flat(res, o, base_prec, dev)
        res["options"] = asdict(o)
        meta["elapsed_s"] = time.perf_counter() - t_start
    return res


def _compare(what: str, got: torch.Tensor, ref: torch.Tensor) -> dict:
    """Agreement of two runs' logits: relative error, top-1 agreement and KL(ref || got)."""
    got, ref = got.reshape(-1, got.shape[-1]).double(), ref.reshape(-1, ref.shape[-1]).double()
    rel = float((got - ref).norm() / ref.norm())
    top1 = float((got.argmax(-1) == ref.argmax(-1)).double().mean())
    kl = float((ref.log_softmax(-1).exp() * (ref.log_softmax(-1) - got.log_softmax(-1))).sum(-1).mean())
    return {"what": what, "rel_err": rel, "top1_agree": top1, "kl": kl}
