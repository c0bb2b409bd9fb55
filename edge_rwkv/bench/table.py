"""The bench's outputs: one table (markdown), a plot of prefill throughput and peak memory against context
length, and the result as JSON. Table columns and JSON keys are what docs and benchmarks/NOTES.md quote."""
from __future__ import annotations

import json
from pathlib import Path

from ..extras import require
from ..fileio import atomic_write_bytes


def fmt_bytes(n) -> str:
    """Bytes in binary units (GiB, MiB, KiB), or a dash when unknown."""
    if n is None:
        return "—"
    for unit, s in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):  # binary units, named as such
        if abs(n) >= s:
            return f"{n / s:.2f} {unit}"
    return f"{int(n)} B"


def _fmt_rate(x) -> str:
    return "—" if x is None else (f"{x:,.0f}" if x >= 100 else f"{x:.1f}")


def _label(metric: str, prec: str, base: str) -> str:
    """Row label: the base precision's rows keep the plain metric, other precisions' name theirs."""
    return metric if prec == base else f"{metric} {prec}"


def _table_header(m: dict) -> list[str]:
    c = m["config"]
    p = m.get("peer", {})
    if p.get("error") and "decode_s" not in p:
        peer_desc = f"peer: {p['error']}"
    else:
        peer_desc = (f"peer: rwkv {p.get('version')} {p.get('strategy')!r}, "
                     f"CUDA op {'on' if p.get('cuda_op') else 'off'}" + (f" — {p['note']}" if p.get("note") else ""))
    lines = [
        f"edge-rwkv bench — {m['model']}: L{c['n_layer']} D{c['n_embd']} vocab {c['vocab_size']}, {m['dtype']}, "
        f"{m['device']} ({m['device_name']}), torch {m['torch']}, wkv {m['wkv']}, prefill chunk {m['chunk']}"
        + "".join(f", {k} {v}" for k, v in (m.get("chunk_by_precision") or {}).items())
        + (" (ours: full chunks replayed from a CUDA graph)" if m["device"].startswith("cuda") else ""),
        f"{peer_desc}",
        f"bound: copy bandwidth {m['copy_gbs']:.0f} GB/s; weights read per decode step {m['weight_bytes_per_step'] / 1e9:.3f} GB; "
        f"state {fmt_bytes(m['state_bytes'])}/sequence; memory = {m['memory_kind']}",
    ]
    if m.get("weights_bytes"):
        lines.append("weights resident: " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in m["weights_bytes"].items()))
    for prec, desc in (m.get("quantization") or {}).items():
        lines.append(f"{prec}: {desc}")
    return lines


def _decode_lines(res: dict, base: str) -> list[str]:
    lines = []
    for r in res["decode"]:
        if "ours_tok_s" not in r:
            lines.append(f"| decode tok/s, B=1 | {r['precision']} | {r.get('note', 'n/a')} | | | | |")
            continue
        peer = _fmt_rate(r.get("peer_tok_s")) if "peer_tok_s" in r else ("" if r["precision"] != base else "n/a")
        ratio = f"{r['ratio']:.2f}×" if "ratio" in r else ""
        g = f"{r['gbs']:.3g}" + (f" / {r['peer_gbs']:.3g}" if "peer_gbs" in r else "")
        pct = f"{r['pct_bound']:.1f}%" + (f" / {r['peer_pct_bound']:.1f}%" if "peer_pct_bound" in r else "")
        lines.append(f"| decode tok/s, B=1 | {r['precision']} ({r.get('how')}) | {_fmt_rate(r['ours_tok_s'])} | {peer} | {ratio} | {g} | {pct} |")
    for r in res.get("e2e", []):
        if "ours_tok_s" not in r:
            lines.append(f"| Model.stream tok/s, B=1 | {r['precision']} {r['mode']} | {r.get('note', 'n/a')} | | | | |")
            continue
        peer = f"{_fmt_rate(r['peer_tok_s'])} (PIPELINE.generate)" if "peer_tok_s" in r else ""
        ratio = f"{r['ratio']:.2f}×" if "ratio" in r else ""
        of_step = f"{100 * r['of_step']:.0f}% of the step" if "of_step" in r else ""
        lines.append(f"| Model.stream tok/s, B=1 | {r['precision']} {r['mode']} | {_fmt_rate(r['ours_tok_s'])} | {peer} | "
                     f"{ratio} | {of_step} | |")
    for r in res["batched"]:
        label = _label("decode tok/s, batched", r.get("precision", base), base)
        if "ours_tok_s" not in r:
            lines.append(f"| {label} | B={r['batch']} | {r.get('note')} | | | | |")
            continue
        peer = f"{_fmt_rate(r['peer_b1_tok_s'])} (B=1 only)" if "peer_b1_tok_s" in r else "n/a"
        ratio = f"{r['ratio_vs_peer_b1']:.2f}×" if "ratio_vs_peer_b1" in r else ""
        lines.append(f"| {label} | B={r['batch']} ({r['how']}) | {_fmt_rate(r['ours_tok_s'])} | {peer} | {ratio} | "
                     f"{r['gbs']:.3g} | {r['pct_bound']:.1f}% |")
    return lines


def _prefill_lines(res: dict, base: str) -> list[str]:
    """Prefill tok/s at --prefill lengths, then peak memory at --memory-ctx, base precision first."""
    opts = res.get("options", {})
    rows = sorted(res["prefill"], key=lambda r: r.get("precision", base) != base)  # stable: base rows first
    lines = []
    for r in rows:
        if r["tokens"] in opts.get("prefill", [r["tokens"]]):
            prec = r.get("precision", base)
            ours = _fmt_rate(r.get("ours_tok_s")) if "ours_tok_s" in r else r.get("ours_note", "—")
            peer = (_fmt_rate(r.get("peer_tok_s")) if "peer_tok_s" in r else r.get("peer_note", "—")) if prec == base else ""
            ratio = f"{r['ratio']:.2f}×" if "ratio" in r else ""
            lines.append(f"| {_label('prefill tok/s', prec, base)} | {r['tokens']} tokens | {ours} | {peer} | {ratio} | | |")
    for r in rows:
        if r["tokens"] in opts.get("memory_ctx", [r["tokens"]]):
            prec = r.get("precision", base)
            ours = fmt_bytes(r.get("ours_peak_bytes")) if "ours_tok_s" in r else r.get("ours_note", "—")
            peer = (fmt_bytes(r.get("peer_peak_bytes")) if "peer_tok_s" in r else r.get("peer_note", "—")) if prec == base else ""
            ratio = f"{r['mem_ratio']:.2f}×" if "mem_ratio" in r else ""
            lines.append(f"| {_label('peak memory', prec, base)} | ctx {r['tokens']} | {ours} | {peer} | {ratio} | | |")
    return lines


def format_table(res: dict) -> str:
    """The run's header lines and its one markdown table (ours beside the peer, ratios, bandwidth bound)."""
    m = res["meta"]
    base = m["dtype"]
    lines = _table_header(m) + [
        "",
        "| metric | setting | ours | rwkv pip | ours/peer | GB/s (ours / peer) | % of bound (ours / peer) |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += _decode_lines(res, base) + _prefill_lines(res, base)
    for q in res.get("quality", []):
        lines.append(f"| logits agreement | {q['what']} | rel err {q['rel_err']:.2e}, top-1 {100 * q['top1_agree']:.1f}%, "
                     f"KL {q['kl']:.2e} | | | | |")
    word = lambda f: "flat" if f else "GROWS"  # noqa: E731
    flat = [f"ours {p}: {word(f)}" for p, f in (m.get("ours_memory_flat_by_precision") or {}).items()]
    if not flat and "ours_memory_flat" in m:
        flat.append(f"ours: {word(m['ours_memory_flat'])}")
    if "peer_memory_flat" in m:
        flat.append(f"peer: {word(m['peer_memory_flat'])}")
    if flat:
        lines.append(f"\npeak memory vs context length — {', '.join(flat)}")
    return "\n".join(lines)


def write_plot(results: list[dict], path: str) -> None:
    """Prefill throughput and peak memory vs context: the base precision of both runtimes, and the
    peak memory of our other measured precisions (dotted)."""
    matplotlib = require("matplotlib", "bench --plot")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", "bench --plot")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for res in results:
        name = res["meta"]["model"].split(" ")[0]
        base = res["meta"]["dtype"]
        rows = [r for r in res["prefill"] if r.get("precision", base) == base]
        for side, style in (("ours", "-o"), ("peer", "--s")):
            xs = [r["tokens"] for r in rows if r.get(f"{side}_tok_s")]
            lab = f"{name} {f'ours {base}' if side == 'ours' else 'rwkv pip'}"
            if xs:
                ax1.plot(xs, [r[f"{side}_tok_s"] for r in rows if r.get(f"{side}_tok_s")], style, label=lab)
            xs = [r["tokens"] for r in rows if r.get(f"{side}_peak_bytes") is not None]
            if xs:
                ax2.plot(xs, [r[f"{side}_peak_bytes"] / (1 << 20) for r in rows if r.get(f"{side}_peak_bytes") is not None],
                         style, label=lab)
        for prec in dict.fromkeys(r.get("precision", base) for r in res["prefill"]):
            pts = [(r["tokens"], r["ours_peak_bytes"] / (1 << 20)) for r in res["prefill"]
                   if r.get("precision", base) == prec != base and r.get("ours_peak_bytes") is not None]
            if pts:
                ax2.plot(*zip(*pts), ":^", label=f"{name} ours {prec}")
    ax1.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="prefill tok/s", title="prefill throughput")
    kind = results[0]["meta"]["memory_kind"] if results else ""
    ax2.set(xscale="log", xlabel="context length (tokens)", ylabel=f"peak memory (MiB, {kind})", title="peak memory")
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(results: list[dict], json_path: str | None, plot_path: str | None, log=print) -> None:
    """The result(s) as JSON (one run: its dict; several: {"runs": [...]}) and as a plot, where paths are given."""
    if json_path:
        payload = results[0] if len(results) == 1 else {"runs": results}
        atomic_write_bytes(json_path, json.dumps(payload, indent=1, default=str).encode())
        log(f"wrote {json_path}")
    if plot_path:
        write_plot(results, plot_path)
        log(f"wrote {plot_path}")
