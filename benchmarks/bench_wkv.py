"""WKV-7 chunked prefill (forward, forward+backward) of ours vs the peers on one GPU; one table.

    python3 benchmarks/bench_wkv.py [--chunk 16,32,64] [--dtype fp16,bf16]
                                    [--T 1024,4096,8192] [--H 32,64] [--cases fwd,fwdbwd[,decode]]
                                    [--skip-peers] [--json PATH] [--plot PATH]
    python3 benchmarks/bench_wkv.py --profile --T 8192 --H 64 --chunk 64 --dtype fp16   (GPU time per kernel)

Implementations on the same inputs (B=1, N=64): ours "new" (edge_rwkv.cuda_kernels, the runtime path; the
first version it replaced was timed beside it in benchmarks/NOTES.md "Prefill rewrite"), fla 0.6.0's
Triton `chunk_rwkv7` when importable (forward and forward+backward), the `rwkv` package's sequential CUDA
op when buildable (forward). Decay conventions: ours takes the logit w (d = exp(-e^-0.5·sigmoid(w)));
rwkv's op takes w' = log(sigmoid(w)) - 0.5 (it computes exp(-exp(w'))); fla takes the log-decay
-e^-0.5·sigmoid(w) (forward rows: precomputed, untimed; forward+backward rows: computed from the
logit inside the timed call so the decay's gradient is included, as it is in ours).
Times: CUDA events after warm-up, median of repeats, µs. The last column is fla's time / this time
(> 1: faster than fla) for the same case, T, H and dtype.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback

import torch

from edge_rwkv.bench.timing import Timer, copy_bandwidth

N = 64
DS = math.exp(-0.5)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def timed(fn, reps=30, warm=3, inner=1):
    """Median µs of fn() (CUDA events, after warm-up)."""
    return Timer(torch.device("cuda")).each(fn, reps, warmup=warm, inner=inner) * 1e6


def graph_timed(fn, steps=100, reps=20):
    """Per-call time of `steps` calls captured in one CUDA graph (launch gaps removed)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(steps):
            fn()
    return timed(g.replay, reps=reps, warm=2) / steps


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


def load_peers(skip: bool) -> dict:
    peers = {}
    if skip:
        print("# peers skipped (--skip-peers)", flush=True)
        return peers
    try:
        peers["rwkv"] = load_rwkv_op()
    except Exception as exc:  # noqa: BLE001
        print(f"# rwkv op could not be built: {exc!r}"[:300], flush=True)
    try:
        from fla.ops.rwkv7 import chunk_rwkv7, fused_recurrent_rwkv7

        peers["fla"] = (chunk_rwkv7, fused_recurrent_rwkv7)
    except Exception as exc:  # noqa: BLE001
        print(f"# fla unavailable, its rows skipped: {exc!r}"[:300], flush=True)
    return peers


def our_variants() -> dict:
    """{name: (forward(r,w,k,v,a,b,s0,L) -> y, autograd Function)}: the runtime's one path."""
    from edge_rwkv.cuda_kernels import WKV7Function
    from edge_rwkv.cuda_kernels.wkv_prefill import prefill_forward

    return {"new": (prefill_forward, WKV7Function)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunk", default="16,32,64", help="chunk lengths of ours to time (comma list)")
    ap.add_argument("--dtype", default="fp16,bf16", help="input dtypes (comma list of fp16, bf16, fp32)")
    ap.add_argument("--T", default="1024,4096,8192")
    ap.add_argument("--H", default="32,64")
    ap.add_argument("--cases", default="fwd,fwdbwd", help="comma list of fwd, fwdbwd, decode")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--skip-peers", action="store_true", help="time our kernels only")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--plot", default=None, help="write a PNG of time vs T here (needs matplotlib)")
    ap.add_argument("--profile", action="store_true",
                    help="instead of the timing table: GPU time per kernel of ours (new) at the first T, H, "
                         "chunk and dtype given, forward and forward+backward (torch.profiler)")
    args = ap.parse_args()
    chunks = [int(c) for c in args.chunk.split(",")]
    dtypes = [d for d in args.dtype.split(",")]
    Ts = [int(t) for t in args.T.split(",")]
    Hs = [int(h) for h in args.H.split(",")]
    cases = args.cases.split(",")
    bad = [d for d in dtypes if d not in DTYPES] + [c for c in cases if c not in ("fwd", "fwdbwd", "decode")]
    if bad:
        ap.error(f"unknown dtype/case {bad}")

    if args.profile:
        return profile_stages(Ts[0], Hs[0], chunks[0], dtypes[0], args.json)
    bw = copy_bandwidth(torch.device("cuda"))
    print(f"# {torch.cuda.get_device_name()}  copy bandwidth {bw:.0f} GB/s  torch {torch.__version__}", flush=True)
    peers = load_peers(args.skip_peers)
    ours = our_variants()
    rows = []

    def attempt(case, T, H, dname, impl, chunk, fn):
        try:
            us = fn()
        except Exception as exc:  # noqa: BLE001
            print(f"  {case} T={T} H={H} {dname} {impl}: failed {exc!r}"[:300], flush=True)
            traceback.print_exc(limit=2)
            return
        rows.append(dict(case=case, T=T, H=H, dtype=dname, impl=impl, chunk=chunk, us=us))
        print(f"  {case:7s} T={T:5d} H={H:3d} {dname} {impl:24s} {us:10.1f} us", flush=True)

    for dname in dtypes:
        dtype = DTYPES[dname]
        if "decode" in cases:
            decode_rows(attempt, dname, dtype, Hs, peers)
        for T in Ts:
            for H in Hs:
                xs, s0 = inputs(T, H, dtype, seed=T + H)
                if "fwd" in cases:
                    forward_rows(attempt, dname, dtype, T, H, xs, s0, ours, chunks, peers, args.reps)
                if "fwdbwd" in cases:
                    backward_rows(attempt, dname, dtype, T, H, xs, s0, ours, chunks, peers, max(5, args.reps // 2))
                del xs, s0
                torch.cuda.empty_cache()

    print_table(rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(device=torch.cuda.get_device_name(), copy_gbs=bw, rows=rows), fh, indent=1)
    if args.plot:
        plot(rows, args.plot)


def forward_rows(attempt, dname, dtype, T, H, xs, s0, ours, chunks, peers, reps):
    for name, (fwd, _) in ours.items():
        for L in chunks:
            attempt("fwd", T, H, dname, f"ours {name}", L, lambda: timed(lambda: fwd(*xs, s0, L), reps=reps))
    if "fla" in peers:
        ch = peers["fla"][0]
        wf = (-DS * torch.sigmoid(xs[1].float())).to(dtype)
        sf = s0.transpose(-1, -2).contiguous()
        fa = [xs[0], wf, *xs[2:]]
        attempt("fwd", T, H, dname, "fla chunk_rwkv7", None,
                lambda: timed(lambda: ch(*fa, scale=1.0, initial_state=sf, output_final_state=True), reps=reps))
    if "rwkv" in peers and dtype in (torch.float16, torch.bfloat16):
        op = getattr(peers["rwkv"], "forward_" + {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype])
        wr = (-torch.nn.functional.softplus(-xs[1].float()) - 0.5).to(dtype)
        flat = [x.reshape(T, H * N).contiguous() for x in (xs[0], wr, xs[2], xs[3], xs[4], xs[5])]
        sr, yr = s0[0].clone(), torch.empty(T, H * N, device="cuda", dtype=dtype)
        attempt("fwd", T, H, dname, "rwkv op (sequential)", None,
                lambda: timed(lambda: op(1, T, H * N, H, sr, *flat, yr), reps=reps))


def backward_rows(attempt, dname, dtype, T, H, xs, s0, ours, chunks, peers, reps):
    gy = torch.randn(1, T, H, N, device="cuda")
    for name, (_, fn_cls) in ours.items():
        for L in chunks:
            ins = [x.detach().requires_grad_(True) for x in xs] + [s0.detach().requires_grad_(True)]

            def step(ins=ins, L=L, fn_cls=fn_cls):
                y, s = fn_cls.apply(*ins, L)
                torch.autograd.backward([y, s], [gy, torch.ones_like(s)])

            attempt("fwdbwd", T, H, dname, f"ours {name}", L, lambda: timed(step, reps=reps))
    if "fla" in peers:
        ch = peers["fla"][0]
        wl = xs[1].detach().requires_grad_(True)
        ins = [x.detach().requires_grad_(True) for x in (xs[0], xs[2], xs[3], xs[4], xs[5])]
        sf = s0.transpose(-1, -2).contiguous().requires_grad_(True)

        def fla_step():
            wf = -DS * torch.sigmoid(wl.float())
            o, s = ch(ins[0], wf.to(dtype), *ins[1:], scale=1.0, initial_state=sf, output_final_state=True)
            torch.autograd.backward([o, s], [gy.to(o.dtype), torch.ones_like(s)])

        attempt("fwdbwd", T, H, dname, "fla chunk_rwkv7", None, lambda: timed(fla_step, reps=reps))


def decode_rows(attempt, dname, dtype, Hs, peers):
    from edge_rwkv.cuda_kernels import wkv7_decode

    for H in Hs:
        xs, s0 = inputs(1, H, dtype)
        x3 = [x[:, 0] for x in xs]
        st = s0.clone()
        out = torch.empty(1, H, N, device="cuda")
        attempt("decode", 1, H, dname, "ours eager (host incl.)", None,
                lambda: timed(lambda: wkv7_decode(*x3, st, out=out), reps=200))
        attempt("decode", 1, H, dname, "ours graph x100 /step", None,
                lambda: graph_timed(lambda: wkv7_decode(*x3, st, out=out)))
        if "fla" in peers:
            fr = peers["fla"][1]
            wf = (-DS * torch.sigmoid(xs[1].float())).to(dtype)
            sf = s0.transpose(-1, -2).contiguous()
            fa = [xs[0], wf, *xs[2:]]
            attempt("decode", 1, H, dname, "fla fused_recurrent /st", None,
                    lambda: graph_timed(lambda: fr(*fa, scale=1.0, initial_state=sf, output_final_state=True)))


def profile_stages(T, H, L, dname, json_path):
    """GPU time per kernel (µs per call) of ours (new), forward and forward+backward, as one table."""
    from torch.profiler import ProfilerActivity, profile

    from edge_rwkv.cuda_kernels import WKV7Function
    from edge_rwkv.cuda_kernels.wkv_prefill import prefill_forward

    xs, s0 = inputs(T, H, DTYPES[dname], seed=1)
    gy = torch.randn(1, T, H, N, device="cuda")
    ins = [x.detach().requires_grad_(True) for x in xs] + [s0.detach().requires_grad_(True)]

    def fwdbwd():
        y, s = WKV7Function.apply(*ins, L)
        torch.autograd.backward([y, s], [gy, torch.ones_like(s)])

    rows, reps = [], 5
    for case, fn in (("fwd", lambda: prefill_forward(*xs, s0, L)), ("fwdbwd", fwdbwd)):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                fn()
            torch.cuda.synchronize()
        per = {}
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                t, n = per.get(e.name, (0.0, 0))
                per[e.name] = (t + e.device_time, n + 1)
        total = sum(t for t, _ in per.values()) / reps
        wall = timed(fn, reps=10)
        print(f"# {case} T={T} H={H} chunk={L} {dname}: wall {wall:.1f} us, GPU kernels {total:.1f} us")
        for name, (t, n) in sorted(per.items(), key=lambda kv: -kv[1][0]):
            rows.append(dict(case=case, kernel=name[:90], calls=n // reps, us=t / reps, pct=100 * t / reps / total))
    print("\n| case | kernel | calls | GPU µs per call of the op | % |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['kernel']} | {r['calls']} | {r['us']:.1f} | {r['pct']:.1f} |")
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(dict(device=torch.cuda.get_device_name(), T=T, H=H, chunk=L, dtype=dname, rows=rows), fh, indent=1)


def print_table(rows):
    fla = {(r["case"], r["T"], r["H"], r["dtype"]): r["us"] for r in rows if r["impl"].startswith("fla chunk")}
    print("\n| case | T | H | dtype | impl | chunk | time (µs) | fla / this |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = fla.get((r["case"], r["T"], r["H"], r["dtype"]))
        ratio = f"{f / r['us']:.2f}" if f else ""
        print(f"| {r['case']} | {r['T']} | {r['H']} | {r['dtype']} | {r['impl']} | {r['chunk'] or ''} | "
              f"{r['us']:.1f} | {ratio} |")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for r in rows:
        if r["case"] == "decode":
            continue
        key = (r["case"], r["H"], r["dtype"], r["impl"] + (f" c{r['chunk']}" if r["chunk"] else ""))
        series.setdefault(key, []).append((r["T"], r["us"] / 1e3))
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for (case, H, dname, impl), pts in sorted(series.items()):
        ax = axes[0 if case == "fwd" else 1]
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{impl} H{H} {dname}")
    for ax, title in zip(axes, ("forward", "forward + backward")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
