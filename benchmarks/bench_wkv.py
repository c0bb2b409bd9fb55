"""WKV-7 kernels vs peers (rwkv==0.8.32 CUDA op, fla 0.6.0 Triton) on one GPU; prints one table.

    python3 benchmarks/bench_wkv.py [--dtype fp16] [--json out.json]

Same inputs for every implementation (fp16 by default, B=1, N=64). Decay conventions: ours takes the
logit w (d = exp(-e^-0.5·sigmoid(w))); rwkv's op takes w' = log(sigmoid(w)) - 0.5 (it computes
exp(-exp(w'))); fla takes the log-decay -e^-0.5·sigmoid(w). Times: CUDA events after warm-up,
median of repeats. Bytes: each input read once (its dtype), y written once in fp32, state read and
written in fp32; GB/s against a device-to-device copy measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback

import torch

from edge_rwkv.bench.timing import Timer, copy_bandwidth, graph_time

N = 64
DS = math.exp(-0.5)


def timed(fn, reps=30, warm=3, inner=1):
    """Median µs of fn() (CUDA events, after warm-up)."""
    return Timer(torch.device("cuda")).each(fn, reps, warmup=warm, inner=inner) * 1e6


def graph_timed(fn, steps=100, reps=20):
    """Per-call µs of `steps` calls captured in one CUDA graph (launch gaps removed)."""
    return graph_time([fn], calls=steps, reps=reps) * 1e6


def inputs(T, H, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    rnd = lambda: torch.randn(1, T, H, N, device="cuda", generator=g)  # noqa: E731
    r, k, v = rnd() * 0.5, rnd() * 0.5, rnd() * 0.5
    w = rnd() * 2.0
    kk = torch.nn.functional.normalize(rnd(), dim=-1)
    gate = torch.rand(1, T, H, N, device="cuda", generator=g)
    xs = [x.to(dtype).contiguous() for x in (r, w, k, v, -kk, kk * gate)]
    return xs, torch.randn(1, H, N, N, device="cuda", generator=g) * 0.3


def load_rwkv_op():
    """Build the rwkv package's wkv7 CUDA op the way rwkv/model.py does (RWKV_CUDA_ON=1)."""
    import rwkv
    from torch.utils.cpp_extension import load

    src = os.path.join(os.path.dirname(rwkv.__file__), "cuda")
    load(name="wkv7s", sources=[f"{src}/rwkv7_op.cpp", f"{src}/rwkv7.cu"], is_python_module=False, verbose=False,
         extra_cuda_cflags=["-res-usage", "--use_fast_math", "-O3", "-Xptxas -O3", "--extra-device-vectorization",
                            f"-D_N_={N}"])
    return torch.ops.wkv7s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--json", default=None)
    ap.add_argument("--skip-peers", action="store_true", help="time our kernels only")
    args = ap.parse_args()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    from edge_rwkv.cuda_kernels import WKV7Function, wkv7_decode
    from edge_rwkv.cuda_kernels.wkv_prefill import prefill_forward

    bw = copy_bandwidth(torch.device("cuda"))
    print(f"# {torch.cuda.get_device_name()}  copy bandwidth {bw:.0f} GB/s  dtype {args.dtype}", flush=True)
    peers = {}
    try:
        if args.skip_peers:
            raise RuntimeError("skipped (--skip-peers)")
        peers["rwkv"] = load_rwkv_op()
    except Exception as exc:  # noqa: BLE001
        print(f"# rwkv op could not be built: {exc!r}"[:300], flush=True)
    try:
        if args.skip_peers:
            raise RuntimeError("skipped (--skip-peers)")
        from fla.ops.rwkv7 import chunk_rwkv7, fused_recurrent_rwkv7

        peers["fla"] = (chunk_rwkv7, fused_recurrent_rwkv7)
    except Exception as exc:  # noqa: BLE001
        print(f"# fla unavailable: {exc!r}"[:300], flush=True)

    rows = []

    def add(case, T, H, impl, us, note=""):
        nbytes = 6 * T * H * N * torch.finfo(dtype).bits / 8 + T * H * N * 4 + 2 * H * N * N * 4
        rows.append(dict(case=case, T=T, H=H, impl=impl, us=us, gbs=nbytes / (us * 1e-6) / 1e9,
                         pct=100 * nbytes / (us * 1e-6) / 1e9 / bw, note=note))
        print(f"  {case:8s} T={T:5d} H={H:3d} {impl:28s} {us:10.1f} us", flush=True)

    def attempt(case, T, H, impl, fn, **kw):
        try:
            add(case, T, H, impl, fn(), **kw)
        except Exception as exc:  # noqa: BLE001
            print(f"  {case} T={T} H={H} {impl}: failed {exc!r}"[:300], flush=True)
            traceback.print_exc(limit=2)

    Hs = [12, 32, 64]
    for H in Hs:  # decode, T=1
        xs, s0 = inputs(1, H, dtype)
        x3 = [x[:, 0] for x in xs]
        st = s0.clone()
        out = torch.empty(1, H, N, device="cuda")
        attempt("decode", 1, H, "ours eager (host incl.)", lambda: timed(lambda: wkv7_decode(*x3, st, out=out), reps=200))
        import time as _time

        t0 = _time.perf_counter()
        for _ in range(1000):
            wkv7_decode(*x3, st, out=out)
        host_us = (_time.perf_counter() - t0) * 1e3
        torch.cuda.synchronize()
        print(f"  decode H={H}: host time per call {host_us:.1f} us (1000 calls, no sync)", flush=True)
        attempt("decode", 1, H, "ours graph x100 /step", lambda: graph_timed(lambda: wkv7_decode(*x3, st, out=out)))
        if "rwkv" in peers:
            op = getattr(peers["rwkv"], "forward_" + {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32"))
            wr = (-torch.nn.functional.softplus(-xs[1].float()) - 0.5).to(dtype)
            flat = [x.reshape(1, H * N).contiguous() for x in (xs[0], wr, xs[2], xs[3], xs[4], xs[5])]
            sr, yr = s0[0].clone(), torch.empty(1, H * N, device="cuda", dtype=dtype)
            attempt("decode", 1, H, "rwkv op eager", lambda: timed(lambda: op(1, 1, H * N, H, sr, *flat, yr), reps=200))
            # (not graph-timed: its op launches on the legacy default stream, which a capture does not record)
        if "fla" in peers:
            fr = peers["fla"][1]
            wf = (-DS * torch.sigmoid(xs[1].float())).to(dtype)
            sf = s0.transpose(-1, -2).contiguous()
            fa = [xs[0], wf, *xs[2:]]
            attempt("decode", 1, H, "fla fused_recurrent eager",
                    lambda: timed(lambda: fr(*fa, scale=1.0, initial_state=sf, output_final_state=True), reps=200))
            attempt("decode", 1, H, "fla fused_recurrent graph /st",
                    lambda: graph_timed(lambda: fr(*fa, scale=1.0, initial_state=sf, output_final_state=True)))

    Ts = [1024, 8192]
    for T in Ts:
        for H in Hs:
            xs, s0 = inputs(T, H, dtype, seed=T + H)
            for L in (16, 32, 64):
                attempt("prefill", T, H, f"ours chunk{L}", lambda: timed(lambda: prefill_forward(*xs, s0, L), reps=15))
            if "rwkv" in peers:
                op = getattr(peers["rwkv"], "forward_" + {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32"))
                wr = (-torch.nn.functional.softplus(-xs[1].float()) - 0.5).to(dtype)
                flat = [x.reshape(T, H * N).contiguous() for x in (xs[0], wr, xs[2], xs[3], xs[4], xs[5])]
                sr, yr = s0[0].clone(), torch.empty(T, H * N, device="cuda", dtype=dtype)
                attempt("prefill", T, H, "rwkv op", lambda: timed(lambda: op(1, T, H * N, H, sr, *flat, yr), reps=15))
            if "fla" in peers:
                ch, fr = peers["fla"]
                wf = (-DS * torch.sigmoid(xs[1].float())).to(dtype)
                sf = s0.transpose(-1, -2).contiguous()
                fa = [xs[0], wf, *xs[2:]]
                attempt("prefill", T, H, "fla chunk_rwkv7",
                        lambda: timed(lambda: ch(*fa, scale=1.0, initial_state=sf, output_final_state=True), reps=15))
                attempt("prefill", T, H, "fla fused_recurrent",
                        lambda: timed(lambda: fr(*fa, scale=1.0, initial_state=sf, output_final_state=True), reps=15))

    T, H = 4096, 32  # forward + backward
    xs, s0 = inputs(T, H, dtype, seed=7)
    gy = torch.randn(1, T, H, N, device="cuda")

    def ours_fb(L):
        ins = [x.detach().requires_grad_(True) for x in xs] + [s0.detach().requires_grad_(True)]

        def f():
            y, s = WKV7Function.apply(*ins, L)
            torch.autograd.backward([y, s], [gy, torch.ones_like(s)])
        return f

    for L in (16, 32, 64):
        attempt("fwd+bwd", T, H, f"ours chunk{L}", lambda: timed(ours_fb(L), reps=10))
    if "fla" in peers:
        ch = peers["fla"][0]
        wl = xs[1].detach().requires_grad_(True)
        ins = [x.detach().requires_grad_(True) for x in (xs[0], xs[2], xs[3], xs[4], xs[5])]
        sf = s0.transpose(-1, -2).contiguous().requires_grad_(True)

        def fla_fb():
            wf = -DS * torch.sigmoid(wl.float())
            o, s = ch(ins[0], wf.to(dtype), *ins[1:], scale=1.0, initial_state=sf, output_final_state=True)
            torch.autograd.backward([o, s], [gy.to(o.dtype), torch.ones_like(s)])
        attempt("fwd+bwd", T, H, "fla chunk_rwkv7", lambda: timed(fla_fb, reps=10))

    # the table
    best = {}
    for r in rows:
        if r["impl"].startswith("ours") and "eager" not in r["impl"]:
            key = (r["case"], r["T"], r["H"])
            best[key] = min(best.get(key, float("inf")), r["us"])
    print("\n| case | T | H | impl | time (µs) | GB/s | % copy BW | this / ours-best |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = best.get((r["case"], r["T"], r["H"]))
        ratio = f"{r['us'] / b:.2f}" if b else ""
        print(f"| {r['case']} | {r['T']} | {r['H']} | {r['impl']} | {r['us']:.1f} | {r['gbs']:.0f} | {r['pct']:.1f} | {ratio} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(copy_gbs=bw, dtype=args.dtype, rows=rows), fh, indent=1)


if __name__ == "__main__":
    sys.exit(main())
