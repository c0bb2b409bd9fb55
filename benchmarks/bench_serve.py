"""The daemon under concurrent load: aggregate tok/s at N streams, one stream beside `Model.stream`,
and the inter-token gaps of decoding streams while a long prompt arrives. Prints one table.

    python3 benchmarks/bench_serve.py [--preset 1.5b] [--device cuda] [--slots 64] [--streams 1,8,32,64]
                                      [--tokens 128] [--long-prompt 2000] [--json out.json]

Random weights in the official shapes (or --model). The daemon runs as `edge-rwkv serve` in its own
process on loopback; clients stream `/v1/completions` (greedy, a distinct random prompt each, end of
text made impossible by a prompt of token ids and counting the streamed tokens).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from edge_rwkv.bench.options import BenchOptions
from edge_rwkv.bench.ours import Ours
from edge_rwkv.bench.weights import bench_weights
from edge_rwkv.serve.testing import ServerProcess
from edge_rwkv.synthetic import PRESETS


async def one_stream(client: httpx.AsyncClient, url: str, prompt: list[int], n: int, stamps: list | None = None) -> int:
    """Stream a completion; the number of text chunks received (≈ tokens); arrival times into `stamps`."""
    body = {"model": "m", "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            msg = json.loads(line[6:])
            if msg.get("usage"):
                tokens = msg["usage"]["completion_tokens"]
            elif stamps is not None and msg["choices"] and msg["choices"][0].get("text"):
                stamps.append(time.perf_counter())
    return tokens


def prompt_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1, 65536) for _ in range(n)]


async def aggregate(url: str, streams: int, n: int, rng: random.Random) -> tuple[float, int]:
    limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=streams + 4)
    async with httpx.AsyncClient(limits=limits) as client:
        # warm-up at this concurrency (connections opened, the bucket's graph replayed once)
        await asyncio.gather(*(one_stream(client, url, prompt_ids(rng, 32), 8) for _ in range(streams)))
        t0 = time.perf_counter()
        got = await asyncio.gather(*(one_stream(client, url, prompt_ids(rng, 32), n) for _ in range(streams)))
        dt = time.perf_counter() - t0
    return sum(got) / dt, sum(got)


async def gaps_with_long_prompt(url: str, streams: int, n: int, long_prompt: int, rng: random.Random) -> dict:
    """`streams` decoding streams; once they flow, one request with a `long_prompt`-token prompt arrives.
    Inter-token gaps of the decoding streams: median, and the largest while the prompt is read."""
    limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=streams + 4)
    stamps: list[list[float]] = [[] for _ in range(streams)]
    async with httpx.AsyncClient(limits=limits) as client:
        tasks = [asyncio.create_task(one_stream(client, url, prompt_ids(rng, 32), n, stamps[i])) for i in range(streams)]
        while min(len(s) for s in stamps) < 20:
            await asyncio.sleep(0.01)
        t_arrive = time.perf_counter()
        first: list[float] = []
        long_task = asyncio.create_task(one_stream(client, url, prompt_ids(rng, long_prompt), 8, first))
        counts = await asyncio.gather(*tasks)
        await long_task
    t_first = first[0] if first else None
    # Text arrives in chunks (several tokens merged under load), so gaps are compared with each
    # stream's mean time per token over its whole life, not with the median chunk gap.
    per_token, during = [], []
    for s, n in zip(stamps, counts):
        if len(s) > 1 and n > 1:
            per_token.append((s[-1] - s[0]) / (n - 1))
        for a, b in zip(s, s[1:]):
            if t_first is not None and a < t_first and b > t_arrive:
                during.append(b - a)
    mean = statistics.median(per_token)
    return {"token_interval_ms": 1e3 * mean, "max_gap_during_ms": 1e3 * max(during, default=0.0),
            "ratio": max(during, default=0.0) / mean, "long_prompt_ttft_ms": 1e3 * (t_first - t_arrive) if t_first else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="1.5b", choices=sorted(PRESETS))
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--streams", default="1,8,32,64")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--long-prompt", type=int, default=2000)
    ap.add_argument("--prefill-budget", type=int, default=None, help="daemon's --prefill-budget (default: its own)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rng = random.Random(0)
    streams = [int(x) for x in a.streams.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        path = a.model
        if path is None:
            L, D = PRESETS[a.preset]
            path = str(Path(tmp) / "model.pth")
            torch.save(bench_weights(L, D, 0, torch.device(a.device), torch.float16), path)
        # the Python API's end-to-end greedy rate on the same weights, in this run
        import edge_rwkv

        m = edge_rwkv.load(path, device=a.device, dtype=a.dtype)
        api_rate = Ours(m, BenchOptions(device=a.device)).end_to_end({"temperature": 0}, a.tokens)
        del m
        if a.device == "cuda":
            torch.cuda.empty_cache()
        extra = ["--prefill-budget", str(a.prefill_budget)] if a.prefill_budget else []
        rows = []
        with ServerProcess(path, Path(tmp) / "data", "--device", a.device, "--dtype", a.dtype, "--max-slots",
                           str(a.slots), "--queue", "256", "--max-tokens-limit", "4096", "--prefix-cache-mb", "0",
                           *extra, startup_timeout=600) as srv:
            for n in streams:
                rate, total = asyncio.run(aggregate(srv.url, n, a.tokens, rng))
                rows.append({"streams": n, "tok_s": rate, "tokens": total})
                print(f"{n} streams: {rate:,.0f} tok/s aggregate ({total} tokens)", file=sys.stderr, flush=True)
            gap = asyncio.run(gaps_with_long_prompt(srv.url, max(streams) - 1, 4 * a.tokens, a.long_prompt, rng))
    single = next((r["tok_s"] for r in rows if r["streams"] == 1), None)
    print(f"\ndaemon load — {a.model or a.preset} {a.dtype} on {a.device}, {a.slots} slots, {a.tokens} tokens a request, greedy")
    print("| metric | setting | value | target |\n|---|---|---|---|")
    print(f"| Model.stream greedy (Python API) | B=1 | {api_rate:,.0f} tok/s | |")
    for r in rows:
        target = ""
        if r["streams"] == 1:
            target = f"≥ 90 % of the API: {100 * r['tok_s'] / api_rate:.0f} %"
        elif r["streams"] == 64:
            target = "≥ 10,000 tok/s" if a.preset == "1.5b" else ""
        print(f"| daemon aggregate | {r['streams']} streams | {r['tok_s']:,.0f} tok/s | {target} |")
    print(f"| time per token, {max(streams) - 1} streams | median over streams | {gap['token_interval_ms']:.1f} ms | |")
    print(f"| … gap while a {a.long_prompt}-token prompt is read | max | {gap['max_gap_during_ms']:.1f} ms "
          f"({gap['ratio']:.2f}× the time per token) | ≤ 3× |")
    print(f"| that prompt's first token | after arrival | {gap['long_prompt_ttft_ms']:.0f} ms | |")
    if a.json:
        Path(a.json).write_text(json.dumps({"api_greedy_tok_s": api_rate, "aggregate": rows, "gaps": gap,
                                            "single_of_api": single / api_rate if single else None}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
