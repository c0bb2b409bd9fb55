"""Quantized GEMV (decode) benchmark: our Numba int8 / int4 kernels vs torch fp16 and torch's
packed-int kernels, on one GPU. Prints one table; writes JSON to --json.

Correctness first (fresh random data, fp64 reference, poisoned outputs), then timing: each case is
captured in a CUDA graph of many launches that cycle over enough weight copies to defeat the L2,
replayed several times; time per launch = median replay time / launches (CUDA events). Bytes
counted are the bytes the kernel must read/write (weights + scales + x + out). The bound is the
device copy bandwidth measured in the same run (bytes read + written by a large copy).

    python3 benchmarks/bench_gemv.py [--json out.json] [--quick] [--skip-check]
    python3 benchmarks/bench_gemv.py --sweep a8|seg   # launch layouts side by side

--sweep a8 times the int4 / int8 int8-activation GEMVs alone (x already rounded: in the decode step the
rounding belongs to the kernel that produces x) under several `gemv_a8.Tiling`s, each checked against
the fp64 reference first, beside a plain copy of the same weight bytes (what one launch of that size
can reach).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F

from edge_rwkv.cuda_kernels import gemv_a8, gemv_int4, gemv_int8
from edge_rwkv.cuda_kernels.dequant import dequantize_fp16
from edge_rwkv.quant.formats import (dequantize_int4_torch, dequantize_int8_torch, quantize_int4_torch,
                                     quantize_int8_torch)

SHAPES = [(4096, 4096), (16384, 4096), (4096, 16384)]  # (N=out, K=in)
ROWS = (1, 4, 16)
L2_DEFEAT_BYTES = 512 << 20


def copy_bandwidth() -> float:
    n = 1 << 30
    src = torch.randn(n // 4, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    ts = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); dst.copy_(src); b.record(); b.synchronize()
        ts.append(a.elapsed_time(b) * 1e-3)
    del src, dst
    return 2 * n / statistics.median(ts)


def graph_time(fns, reps: int = 7) -> float:
    """fns: list of no-arg callables (one per weight copy). Median seconds per call."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns[:2]:
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    calls = max(64, 2 * len(fns))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fns[i % len(fns)]()
    g.replay(); torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); b.synchronize()
        ts.append(a.elapsed_time(b) * 1e-3 / calls)
    return statistics.median(ts)


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def check_correctness(log) -> bool:
    ok = True
    for (N, K) in [(4096, 4096), (1000, 1536), (4096, 16384)]:
        w = torch.randn(N, K, device="cuda")
        q8, s8 = quantize_int8_torch(w)
        p8 = gemv_int8.PreparedInt8(q8, s8)
        for g in (128, 64, 32):
            if K % g or (g != 128 and N != 4096):
                continue
            q4, s4 = quantize_int4_torch(w, g)
            p4 = gemv_int4.PreparedInt4(q4, s4, g)
            for M in ROWS:
                for xdt in (torch.float32, torch.float16):
                    x = torch.randn(M, K, device="cuda").to(xdt)
                    ref = x.double() @ dequantize_int4_torch(q4, s4, g).double().t()
                    out = torch.full((M, N), float("nan"), device="cuda",
                                     dtype=torch.float16 if xdt == torch.float16 else torch.float32)
                    gemv_int4.gemv_int4(x, p4, out)
                    e = rel(out, ref)
                    lim = 1e-3 if xdt == torch.float16 else 1e-5
                    good = bool(torch.isfinite(out).all()) and e < lim
                    ok &= good
                    if not good or M in (1, 16):
                        log(f"check int4 N={N} K={K} g={g} M={M} x={xdt} rel_err={e:.2e} {'ok' if good else 'FAIL'}")
                    if M <= gemv_a8.MAX_ROWS:  # int8 activations: vs the kernel's own reference
                        y = gemv_a8.gemv_a8(x, p4)
                        e = rel(y, gemv_a8.gemv_a8_reference(x.float(), dequantize_int4_torch(q4, s4, g)))
                        good = bool(torch.isfinite(y).all()) and e < (2e-3 if xdt == torch.float16 else 1e-4)
                        ok &= good
                        log(f"check int4-a8 N={N} K={K} g={g} M={M} x={xdt} rel_err={e:.2e} "
                            f"(vs unrounded x {rel(y, ref):.2e}) {'ok' if good else 'FAIL'}")
                    if g == 128:
                        ref8 = x.double() @ dequantize_int8_torch(q8, s8).double().t()
                        if M <= gemv_a8.MAX_ROWS:
                            y = gemv_a8.gemv_a8(x, p8)
                            e = rel(y, gemv_a8.gemv_a8_reference(x.float(), dequantize_int8_torch(q8, s8)))
                            good = bool(torch.isfinite(y).all()) and e < (2e-3 if xdt == torch.float16 else 1e-4)
                            ok &= good
                            log(f"check int8-a8 N={N} K={K} M={M} x={xdt} rel_err={e:.2e} "
                                f"(vs unrounded x {rel(y, ref8):.2e}) {'ok' if good else 'FAIL'}")
                        out.fill_(float("nan"))
                        gemv_int8.gemv_int8(x, p8, out)
                        e = rel(out, ref8)
                        good = bool(torch.isfinite(out).all()) and e < lim
                        ok &= good
                        if not good or M in (1, 16):
                            log(f"check int8 N={N} K={K} M={M} x={xdt} rel_err={e:.2e} {'ok' if good else 'FAIL'}")
    return ok


def dequant_rows(N, K, q8, s8, q4, s4, bw) -> list[dict]:
    """Whole-matrix dequantization to fp16 (the many-row path's first half): ours vs torch ops."""
    out = torch.empty(N, K, device="cuda", dtype=torch.float16)
    res = []
    for fmt, q, s, g in (("int8", q8, s8, 0), ("int4 g128", q4, s4, 128)):
        f = fmt.split()[0]
        nbytes = q.numel() + s.numel() * 2 + N * K * 2
        c = max(2, min(16, -(-L2_DEFEAT_BYTES // nbytes)))
        ws = [(q.clone(), s.clone()) for _ in range(c)]
        t = graph_time([lambda W=W, o=out: dequantize_fp16(f, W[0], W[1], None, g, out=o) for W in ws])
        res.append(dict(N=N, K=K, M="-", kernel=f"ours dequantize {fmt} -> fp16", us=t * 1e6,
                        gbs=nbytes / t / 1e9, pct=100 * nbytes / t / bw))
        ref = (lambda W=ws[0]: dequantize_int4_torch(W[0], W[1], 128, torch.float16)) if g else \
            (lambda W=ws[0]: dequantize_int8_torch(W[0], W[1], torch.float16))
        t = graph_time([ref])
        res.append(dict(N=N, K=K, M="-", kernel=f"torch ops dequantize {fmt} -> fp16", us=t * 1e6,
                        gbs=nbytes / t / 1e9, pct=100 * nbytes / t / bw))
    del ws, out
    return res


def bench(args, log):
    bw = copy_bandwidth()
    log(f"device {torch.cuda.get_device_name()}  copy bandwidth {bw / 1e12:.2f} TB/s (read+write)")
    rows = []
    for (N, K) in SHAPES:
        w = torch.randn(N, K, device="cuda") * 0.02
        q8, s8 = quantize_int8_torch(w)
        q4, s4 = quantize_int4_torch(w, 128)
        w16 = w.half()
        rows += dequant_rows(N, K, q8, s8, q4, s4, bw)
        for M in (ROWS if not args.quick else (1,)):
            x = torch.randn(M, K, device="cuda")
            xh = x.half()
            io = M * K * 4 + M * N * 4
            cases = {}

            def ncopies(nbytes):
                return max(2, min(64, -(-L2_DEFEAT_BYTES // nbytes)))

            # ours: int8
            nb8 = N * K + N * 2
            c = ncopies(nb8)
            preps = [gemv_int8.PreparedInt8(q8.clone(), s8.clone()) for _ in range(c)]
            out = torch.empty(M, N, device="cuda")
            t = graph_time([lambda p=p: gemv_int8.gemv_int8(x, p, out) for p in preps])
            cases["ours int8"] = (t, nb8 + io)
            del preps
            # ours: int4 g128
            nb4 = N * K // 2 + N * (K // 128) * 2
            c = ncopies(nb4)
            preps = [gemv_int4.PreparedInt4(q4.clone(), s4.clone(), 128) for _ in range(c)]
            t = graph_time([lambda p=p: gemv_int4.gemv_int4(x, p, out) for p in preps])
            cases["ours int4 g128"] = (t, nb4 + io)
            del preps
            if M <= gemv_a8.MAX_ROWS:  # int8 activations (the x rounding launch included)
                io8 = M * K * 2 + M * N * 2 + M * K * 2  # fp16 x in, int8 x out + read, fp16 out
                preps = [gemv_int8.PreparedInt8(q8.clone(), s8.clone()) for _ in range(ncopies(nb8))]
                t = graph_time([lambda p=p: gemv_a8.gemv_a8(xh, p) for p in preps])
                cases["ours int8 a8"] = (t, nb8 + io8)
                preps = [gemv_int4.PreparedInt4(q4.clone(), s4.clone(), 128) for _ in range(ncopies(nb4))]
                t = graph_time([lambda p=p: gemv_a8.gemv_a8(xh, p) for p in preps])
                cases["ours int4 g128 a8"] = (t, nb4 + io8)
                del preps
            # torch fp16
            nb16 = N * K * 2
            ws = [w16.clone() for _ in range(ncopies(nb16))]
            t = graph_time([lambda W=W: F.linear(xh, W) for W in ws])
            cases["torch fp16"] = (t, nb16 + M * K * 2 + M * N * 2)
            del ws
            # torch int8 packed (bf16 activations)
            try:
                xb = x.bfloat16()
                ws = [(q8.clone(), s8.bfloat16()) for _ in range(ncopies(nb8))]
                torch._weight_int8pack_mm(xb, ws[0][0], ws[0][1])
                t = graph_time([lambda W=W: torch._weight_int8pack_mm(xb, W[0], W[1]) for W in ws])
                cases["torch _weight_int8pack_mm"] = (t, nb8 + M * K * 2 + M * N * 2)
                del ws
            except Exception as e:  # noqa: BLE001
                log(f"torch _weight_int8pack_mm unavailable: {type(e).__name__}: {str(e)[:120]}")
            # torch int4 packed (tinygemm layout, bf16, group 128)
            try:
                qi = (torch.clamp(torch.round(w / s4.float().repeat_interleave(128, 1)), -8, 7) + 8).to(torch.int32)
                packed_in = (qi[:, 0::2] << 4 | qi[:, 1::2]).to(torch.uint8)
                wp = torch._convert_weight_to_int4pack(packed_in, 8)
                sz = torch.stack([s4.float().t(), torch.full_like(s4.float().t(), 0.0)], dim=-1).bfloat16().contiguous()
                xb = x.bfloat16()
                torch._weight_int4pack_mm(xb, wp, 128, sz)
                ws = [(wp.clone(), sz.clone()) for _ in range(ncopies(nb4))]
                t = graph_time([lambda W=W: torch._weight_int4pack_mm(xb, W[0], 128, W[1]) for W in ws])
                cases["torch _weight_int4pack_mm"] = (t, nb4 + M * K * 2 + M * N * 2)
                del ws
            except Exception as e:  # noqa: BLE001
                log(f"torch _weight_int4pack_mm unavailable: {type(e).__name__}: {str(e)[:120]}")
            for name, (t, nbytes) in cases.items():
                rows.append(dict(N=N, K=K, M=M, kernel=name, us=t * 1e6, gbs=nbytes / t / 1e9,
                                 pct=100 * nbytes / t / bw))
            torch.cuda.empty_cache()
    return bw, rows


SWEEP_TILINGS = [gemv_a8.Tiling(4, 4), gemv_a8.Tiling(4, 8), gemv_a8.Tiling(8, 4), gemv_a8.Tiling(2, 8),
                 gemv_a8.Tiling(4, 2)] + [gemv_a8.Tiling(w, r, True, b) for w, r, b in
                                          ((4, 4, 4), (4, 4, 8), (4, 8, 4), (8, 4, 2), (8, 4, 4), (2, 8, 8),
                                           (4, 2, 8), (8, 2, 4))]


def sweep(log) -> tuple[float, list[dict]]:
    from edge_rwkv.cuda_kernels import _gemv_util as U

    bw = copy_bandwidth()
    log(f"device {torch.cuda.get_device_name()}  copy bandwidth {bw / 1e12:.2f} TB/s (read+write)")
    rows = []
    for (N, K) in SHAPES:
        w = torch.randn(N, K, device="cuda") * 0.02
        fmts = {"int4": quantize_int4_torch(w, 128), "int8": quantize_int8_torch(w)}
        for M in (1, 4):
            x = torch.randn(M, K, device="cuda")
            for fmt, (q, sc) in fmts.items():
                nbytes = q.numel() + sc.numel() * 2
                src = q.view(-1)
                copies = [(src.clone(), torch.empty_like(src)) for _ in range(max(2, min(64, -(-L2_DEFEAT_BYTES // nbytes))))]
                t = graph_time([lambda c=c: c[1].copy_(c[0]) for c in copies])
                rows.append(dict(N=N, K=K, M=M, kernel=f"copy of the {fmt} bytes", us=t * 1e6, gbs=2 * nbytes / t / 1e9,
                                 pct=100 * 2 * nbytes / t / bw))
                del copies
                int4 = fmt == "int4"
                xq, xs, xz = (torch.empty(M * K, device="cuda", dtype=torch.int8),
                              torch.empty(M * K // 32, device="cuda", dtype=torch.float32),
                              torch.empty(M * K // 32, device="cuda", dtype=torch.int32))
                gemv_a8.launch_quantize_x(U.as_numba(x.view(-1)), U.as_numba(xq), U.as_numba(xs), U.as_numba(xz),
                                          M, K, int4, U.numba_stream_for_torch())
                wd = dequantize_int4_torch(q, sc, 128) if int4 else dequantize_int8_torch(q, sc)
                ref = gemv_a8.gemv_a8_reference(x, wd)
                mk = (lambda P: gemv_int4.PreparedInt4(P[0], P[1], 128)) if int4 else (lambda P: gemv_int8.PreparedInt8(P[0], P[1]))
                preps = [mk((q.clone(), sc.clone())) for _ in range(max(2, min(64, -(-L2_DEFEAT_BYTES // nbytes))))]
                out = torch.empty(M, N, device="cuda")
                for tiling in SWEEP_TILINGS:
                    def call(p, tiling=tiling):
                        st = U.numba_stream_for_torch()
                        if int4:
                            gemv_a8.launch_int4_a8(p.wq, p.sc, U.as_numba(xq.view(torch.int32)), U.as_numba(xs),
                                                   U.as_numba(xz), U.as_numba(out.view(-1)), M, N, K, 128,
                                                   stream=st, tiling=tiling)
                        else:
                            gemv_a8.launch_int8_a8(p.wq, p.sc, U.as_numba(xq.view(torch.int32)), U.as_numba(xs),
                                                   U.as_numba(out.view(-1)), M, N, K, stream=st, tiling=tiling)
                    out.fill_(float("nan"))
                    call(preps[0])
                    torch.cuda.synchronize()
                    e = rel(out, ref)
                    if not (bool(torch.isfinite(out).all()) and e < 1e-4):
                        log(f"FAIL {fmt} {N}x{K} M={M} {tiling}: rel err {e:.2e}")
                        rows.append(dict(N=N, K=K, M=M, kernel=f"{fmt} a8 {tiling}", us=float("nan"), gbs=0, pct=0,
                                         error=e))
                        continue
                    t = graph_time([lambda p=p: call(p) for p in preps])
                    io = M * K + M * K // 32 * 8 + M * N * 4
                    rows.append(dict(N=N, K=K, M=M, kernel=f"{fmt} a8 w{tiling.warps} r{tiling.rows}"
                                     + (f" piped×{tiling.blocks_per_sm}" if tiling.pipelined else ""),
                                     us=t * 1e6, gbs=(nbytes + io) / t / 1e9, pct=100 * (nbytes + io) / t / bw))
                del preps
    return bw, rows


SEG_LAYOUTS = [(8, 4), (8, 2), (4, 4), (4, 8), (4, 2), (8, 1), (4, 1), (2, 1), (2, 2)]  # (rows, warps)


def sweep_seg(log) -> tuple[float, list[dict]]:
    """The segmented fp16 GEMV on a 7.2B layer's two LoRA stages (B = 1): the downs (four matrices
    of K = 4096 with 96 / 128 / 128 / 480 rows) and the ups (four of 4096 rows, K = their rank)."""
    from edge_rwkv.cuda_kernels import _gemv_util as U, gemv_seg

    bw = copy_bandwidth()
    ranks, C = (96, 128, 128, 480), 4096
    rows = []
    stages = {"downs": [(r, C) for r in ranks], "ups": [(C, r) for r in ranks],
              "1.5b ffn key": [(8192, 2048)], "1.5b ffn value": [(2048, 8192)],
              "0.1b head": [(65536, 768)], "1.5b head": [(65536, 2048)], "0.1b ffn key": [(3072, 768)]}
    for stage, shapes in stages.items():
        nbytes = sum(n * k for n, k in shapes) * 2
        copies = max(2, min(64, -(-L2_DEFEAT_BYTES // nbytes)))
        bufs, tabs = [], []
        x = torch.randn(sum(k for _, k in shapes) if stage == "ups" else max(k for _, k in shapes), device="cuda").half()
        for _ in range(copies):
            buf = (torch.randn(nbytes // 2, device="cuda") * 0.02).half()
            segs, off, xo, oo = [], 0, 0, 0
            for n, k in shapes:
                segs.append(gemv_seg.Segment(buf[off:off + n * k].view(n, k), xo if stage == "ups" else 0, 0, oo))
                off, oo = off + n * k, oo + n
                xo += k
            bufs.append((buf, segs))
            tabs.append(gemv_seg.build_table(buf, segs))
        nout = sum(n for n, _ in shapes)
        out = torch.empty(nout, device="cuda", dtype=torch.float16)
        ref = gemv_seg.seg_gemv_reference(bufs[0][1], x, nout, 1)
        for R, W in SEG_LAYOUTS:
            def call(i, R=R, W=W):
                st = tabs[i]
                gemv_seg.launch(U.as_numba(bufs[i][0].view(torch.int32)), U.as_numba(x.view(torch.int32)),
                                U.as_numba(out), U.as_numba(st.table), st.nrows, 1, U.numba_stream_for_torch(), R, W)
            out.fill_(float("nan"))
            call(0)
            torch.cuda.synchronize()
            e = rel(out.cpu(), ref)
            if not e < 2e-3:
                log(f"FAIL seg {stage} r{R} w{W}: rel err {e:.2e}")
                continue
            t = graph_time([lambda i=i: call(i) for i in range(copies)])
            rows.append(dict(N=f"{stage} {nout}", K="/".join(str(k) for _, k in shapes[:1]) + "…", M=1,
                             kernel=f"seg fp16 r{R} w{W}", us=t * 1e6, gbs=nbytes / t / 1e9, pct=100 * nbytes / t / bw))
        del bufs, tabs
    return bw, rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--sweep", choices=("a8", "seg"), default=None,
                    help="launch layouts side by side: the int8-activation kernels, or the segmented fp16 GEMV")
    args = ap.parse_args(argv)
    log = lambda s: print(s, flush=True)  # noqa: E731
    torch.manual_seed(0)
    if args.sweep:
        bw, rows = (sweep if args.sweep == "a8" else sweep_seg)(log)
        log(f"\n| N×K | rows | kernel | µs | GB/s | % of copy bw ({bw / 1e12:.2f} TB/s) |")
        log("|---|---|---|---:|---:|---:|")
        for r in rows:
            log(f"| {r['N']}×{r['K']} | {r['M']} | {r['kernel']} | {r['us']:.2f} | {r['gbs']:.0f} | {r['pct']:.0f} % |")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(copy_bw=bw, device=torch.cuda.get_device_name(), rows=rows), f, indent=1)
        return 0
    if not args.skip_check and not check_correctness(log):
        log("CORRECTNESS FAILED")
        return 1
    bw, rows = bench(args, log)
    log(f"\n| N×K | rows | kernel | µs | GB/s | % of copy bw ({bw / 1e12:.2f} TB/s) |")
    log("|---|---|---|---:|---:|---:|")
    for r in rows:
        log(f"| {r['N']}×{r['K']} | {r['M']} | {r['kernel']} | {r['us']:.2f} | {r['gbs']:.0f} | {r['pct']:.0f} % |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(copy_bw=bw, device=torch.cuda.get_device_name(), rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
