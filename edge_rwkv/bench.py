"""`edge-rwkv bench`: speed and memory of our runtime beside the official `rwkv` package, one table.

    edge-rwkv bench --preset 1.5b --device cuda [--precisions fp16,int8,int4] [--batch 1,8,64,256]
                    [--batch-precisions fp16,int4] [--memory-precisions fp16,int4]
                    [--prefill 1024,8192,32768] [--memory-ctx 8192,32768,131072] [--json o.json] [--plot o.png]

Both runtimes read the same weights: random weights in the official x070 layout (or MODEL), written
once as `<tmp>/model.pth`. Ours runs in this process through the runtime: its captured decode step (batch 1
and batched) on CUDA, the eager forward on CPU; chunked prefill through Runner.prefill; and end to end,
`Model.stream` greedy and top_p 0.8 (the peer: its PIPELINE.generate). The peer
(`rwkv` pip package, strategy "cuda fp16" / "cpu fp32") reads its configuration from environment
variables when imported, so it runs in a subprocess of its own (`python -m edge_rwkv.bench
--peer-worker`); on CUDA it first tries its nvcc-built op (RWKV_CUDA_ON=1) and, if that build fails,
runs again without it — the table says which.

Precisions: the first float one of --precisions is the base (what the peer is compared with). Each
precision's model is made once and measured alone on the device (the one before it freed): decode B=1
for --precisions, batched decode for --batch-precisions, prefill + peak memory at --memory-ctx for
--memory-precisions (the base's prefill rows also cover --prefill). int8 / int4 models are quantized
as a memory-constrained deployment stores them (layers and head at that width, the embedding int8;
round to nearest, on the model's device), written as an artifact and loaded from it.

Timing: CUDA events after warm-up, median of many runs (CPU: time.perf_counter, median).
Memory: torch.cuda.max_memory_reserved after emptying the cache (CUDA, whole process: that model's weights and
any CUDA-graph pools included); on CPU the peak
growth of heap bytes in use during the prefill, sampled (glibc mallinfo2; RSS elsewhere) (activations and state, not weights).
Bandwidth: bytes of weights (and state) read per decode step / step time, against a device copy
(CUDA) or a large memcpy (CPU) measured in the same run.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .extras import install_hint, require
from .quant.formats import Int8Rows

HEAD_SIZE = 64
VOCAB = 65536
PRESETS = {"tiny": (2, 128), "0.1b": (12, 768), "1.5b": (24, 2048), "7.2b": (32, 4096)}
QUANT_NA = "n/a (quantization not available)"
FLOAT_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
QUANT_BITS = {"int8": 8, "int4": 4}


@dataclass
class BenchOptions:
    model: str | None = None
    preset: str = "tiny"
    device: str = "cpu"
    precisions: list[str] = field(default_factory=lambda: ["fp16", "int8", "int4"])  # decode B=1 rows
    batch_precisions: list[str] | None = None  # batched decode rows; None: the base (first float) precision
    memory_precisions: list[str] | None = None  # prefill + peak memory at memory_ctx; None: the base precision
    batch: list[int] = field(default_factory=lambda: [1, 8, 64, 256])
    prefill: list[int] = field(default_factory=lambda: [1024, 8192, 32768])
    memory_ctx: list[int] = field(default_factory=lambda: [8192, 32768, 131072])
    peer: bool = True
    chunk: int | None = None  # None: our default for the model (runtime.runner.prefill_chunk_for), both runtimes
    quality: bool = False
    decode_steps: int = 100
    warmup: int = 20
    peer_warmup: int = 60
    item_limit_s: float = 60.0  # skip a prefill length whose estimated time exceeds this
    seed: int = 0
    log_dir: str | None = None
    e2e_tokens: int = 256  # Model.stream rows: tokens after a 120-token prompt (0: no such rows)


# =========================================================================== timing and memory helpers

def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class Timer:
    """Median seconds of `fn()` calls: CUDA events on a GPU, perf_counter on a CPU."""

    def __init__(self, dev: torch.device):
        self.dev = dev

    def each(self, fn, reps: int, warmup: int = 0, inner: int = 1) -> float:
        for _ in range(warmup):
            fn()
        _sync(self.dev)
        times = []
        for _ in range(reps):
            if self.dev.type == "cuda":
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                for _ in range(inner):
                    fn()
                e1.record()
                e1.synchronize()
                times.append(e0.elapsed_time(e1) / 1e3 / inner)
            else:
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                times.append((time.perf_counter() - t0) / inner)
        return statistics.median(times)


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _mallinfo2():
    """glibc's mallinfo2 (bytes of heap in use, caches excluded), or None where it does not exist."""
    import ctypes
    import ctypes.util

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError, TypeError):
        return None
    fn.restype = MallInfo2

    def in_use() -> int:
        mi = fn()
        return int(mi.uordblks + mi.hblkhd)
    return in_use


_HEAP_IN_USE = _mallinfo2() if sys.platform.startswith("linux") else None


def _host_bytes() -> int | None:
    return _HEAP_IN_USE() if _HEAP_IN_USE else _rss_bytes()


class PeakMemory:
    """Peak memory while the block runs. CUDA: max_memory_reserved, cached blocks released first
    (absolute: what the process holds on the device, CUDA-graph memory pools included — a replayed
    prefill chunk's activations live in its graph's pool and are not "allocated" tensors).
    CPU: RSS growth."""

    def __init__(self, dev: torch.device):
        self.dev = dev
        self.peak: int | None = None
        self.base: int | None = None  # CUDA: bytes allocated when the block began (weights, state, ...)
        self.kind = ("cuda max_memory_reserved (cache emptied first; graph pools included)" if dev.type == "cuda"
                     else "host heap growth (mallinfo2)" if _HEAP_IN_USE else "RSS growth")

    def __enter__(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.dev)
            self.base = int(torch.cuda.memory_allocated(self.dev))
            return self
        self._base = _host_bytes()
        self._max = self._base or 0
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                r = _host_bytes()
                if r is not None and r > self._max:
                    self._max = r
                self._stop.wait(0.0005)

        self._thread = threading.Thread(target=sample, daemon=True)
        if self._base is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
            self.peak = int(torch.cuda.max_memory_reserved(self.dev))
        elif self._base is not None:
            self._stop.set()
            self._thread.join()
            r = _host_bytes() or 0
            self.peak = max(self._max, r) - self._base
        return False


def copy_bandwidth(dev: torch.device, nbytes: int | None = None) -> float:
    """GB/s of a large device copy (bytes read + bytes written), median of repeats."""
    if nbytes is None:
        nbytes = (1 << 30) if dev.type == "cuda" else (256 << 20)
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    t = Timer(dev).each(lambda: dst.copy_(src), reps=10 if dev.type == "cuda" else 5, warmup=2)
    src = dst = None  # free the buffers now (the lambda above refers to the names)
    return 2 * n * 4 / t / 1e9


# =========================================================================== weights

def bench_weights(n_layer: int, n_embd: int, seed: int, device: torch.device,
                  dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights in the official layout (synthetic.random_checkpoint), fp32 on the CPU.

    On CUDA the big presets would take minutes of CPU random numbers, so there every tensor is drawn
    (on the GPU) i.i.d. from the values of a 1-layer template made by random_checkpoint at the same
    width: same names, shapes and value distributions, a few seconds for any size."""
    from .synthetic import random_checkpoint

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


# =========================================================================== quantization (optional)

def quantizer():
    """(quantize function, None) when quantization is importable, else (None, reason)."""
    try:
        from .quant.transform import quantize_checkpoint
    except Exception as e:  # noqa: BLE001 — report, don't fail the whole table
        return None, f"quantization not importable ({type(e).__name__}: {e})"
    return quantize_checkpoint, None


def bench_policy(bits: int):
    """What a memory-constrained deployment stores: the layers and the head at `bits`, the embedding int8."""
    from .quant.policy import QuantPolicy

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


def quantized_model(path: str, bits: int, dev: torch.device, dtype: torch.dtype):
    """(model, description): `path` quantized under bench_policy (round to nearest, on `dev`) into a
    temporary artifact, loaded as a deployment loads it."""
    import tempfile

    from .api import load
    from .artifact import write_artifact
    from .checkpoint import load_checkpoint
    from .quant.transform import quantize_checkpoint

    tensors, meta = quantize_checkpoint(load_checkpoint(path), bench_policy(bits), device=dev)
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/q{bits}.safetensors"
        write_artifact(out, tensors, meta)
        del tensors  # the CPU copy: at 7.2B gigabytes
        return load(out, device=str(dev), dtype=dtype), describe_quantization(meta["quant"])


# =========================================================================== bytes per step

def _obj_bytes(obj, seen: set) -> int:
    if isinstance(obj, torch.Tensor):
        key = (obj.data_ptr(), obj.numel())
        if key in seen:
            return 0
        seen.add(key)
        return obj.numel() * obj.element_size()
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, Int8Rows):
        return _obj_bytes(obj.q, seen) + _obj_bytes(obj.scale, seen)
    if isinstance(obj, (tuple, list)):
        return sum(_obj_bytes(o, seen) for o in obj)
    if isinstance(obj, dict):  # nn.Module keeps its tensors in _parameters / _buffers
        return sum(_obj_bytes(o, seen) for o in obj.values())
    # our objects and torch modules only: kernel handles (Numba device arrays) hold cyclic graphs
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith(("edge_rwkv", "torch")):
        return sum(_obj_bytes(v, seen) for v in vars(obj).values())
    return 0


def embedding_row_bytes(emb) -> int:
    """Bytes one token's embedding lookup reads (a dense row, or an int8 row and its scale)."""
    return emb.row_bytes if isinstance(emb, Int8Rows) else emb.shape[1] * emb.element_size()


def weight_bytes_per_step(net) -> int:
    """Bytes of weights one decode step reads: every layer tensor, the head, one embedding row."""
    seen: set = set()
    total = sum(_obj_bytes(layer, seen) for layer in net.layers)
    total += _obj_bytes(net.head, seen) + _obj_bytes(net.ln_out, seen)
    return total + embedding_row_bytes(net.emb)


def weights_resident_bytes(net) -> int:
    """Bytes of all the model's weights, the whole embedding table included."""
    seen: set = set()
    return sum(_obj_bytes(part, seen) for part in (net.layers, net.head, net.ln_out, net.emb))


# =========================================================================== our runtime

def _tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n,), generator=g).tolist()


E2E_PROMPT = 120  # end-to-end rows: tokens generated after a prompt of this length
E2E_MODES = {"greedy": {"temperature": 0}, "top_p 0.8": {"temperature": 1.0, "top_p": 0.8, "seed": 1}}


class Ours:
    def __init__(self, model, opts: BenchOptions):
        self.m, self.net, self.o = model, model.net, opts
        self.dev = model.device
        self.timer = Timer(self.dev)

    @torch.inference_mode()
    def decode(self, batch: int) -> tuple[float, str]:
        """Seconds per decode step at this batch size, and how it ran: the runtime's captured step
        (what the batch engine replays) on CUDA, the eager forward elsewhere."""
        o = self.o
        steps = max(o.decode_steps, 5)
        st = self.m.new_state(batch)
        ids = torch.randint(0, VOCAB, (batch, 1), device=self.dev)
        live = torch.ones(batch, dtype=torch.int32, device=self.dev)
        g = self.m.runner.decode_graph(batch, st, ids, live)
        if g is not None:
            t = self.timer.each(g.step, reps=steps, warmup=o.warmup)
            del g
            torch.cuda.empty_cache()
            return t, self.m.runner.decode_how()
        box = [st]

        def step():
            logits, new = self.net.forward(ids, box[0], all_logits=False)
            box[0].att_x.copy_(new.att_x), box[0].wkv.copy_(new.wkv), box[0].ffn_x.copy_(new.ffn_x)
            return logits

        return self.timer.each(step, reps=steps, warmup=o.warmup), self.m.runner.decode_how()

    def end_to_end(self, sampling: dict, n: int, prompt_len: int = E2E_PROMPT) -> float:
        """Tokens per second of `Model.stream` — what a user of the Python API gets: decode steps,
        sampling, detokenizing — over n tokens after a prompt (the prompt's time subtracted: the
        time of the same call stopped after its first token)."""
        prompt = _tokens(prompt_len, self.o.seed + 3)

        def run(k: int) -> float:
            _sync(self.dev)
            t0 = time.perf_counter()
            gen = self.m.stream(prompt, max_tokens=k, ban_end_of_text=True, **sampling)
            for _ in gen:
                pass
            _sync(self.dev)
            assert len(gen.tokens) == k, (len(gen.tokens), k)
            return time.perf_counter() - t0

        run(n)  # warm-up: graphs captured, kernels compiled
        full = statistics.median(run(n) for _ in range(3))
        first = statistics.median(run(1) for _ in range(3))
        return (n - 1) / (full - first)

    @torch.inference_mode()
    def prefill(self, n: int, reps: int) -> tuple[float, int | None, int | None]:
        toks = _tokens(n, self.o.seed + n)
        times, peak, base = [], None, None
        for r in range(reps):
            st = self.m.new_state(1)
            with PeakMemory(self.dev) as pm:
                _sync(self.dev)
                t0 = time.perf_counter()
                self.m.runner.prefill(toks, st, chunk=self.o.chunk)
                _sync(self.dev)
                times.append(time.perf_counter() - t0)
            if r == 0:
                peak, base = pm.peak, pm.base
        return statistics.median(times), peak, base

    @torch.inference_mode()
    def logits(self, tokens: list[int]) -> torch.Tensor:
        out, _ = self.m.forward(tokens)
        return out.float().cpu()


# =========================================================================== the peer (subprocess)

def _peer_worker(cfg_path: str) -> int:
    """Runs in its own process: the rwkv package reads RWKV_* variables at import."""
    cfg = json.loads(Path(cfg_path).read_text())
    os.environ["RWKV_V7_ON"] = "1"
    os.environ["RWKV_JIT_ON"] = "1"
    os.environ["RWKV_CUDA_ON"] = "1" if cfg["cuda_op"] else "0"
    dev = torch.device(cfg["device"])
    import rwkv
    from rwkv.model import RWKV

    res: dict = {"version": getattr(rwkv, "__version__", None), "strategy": cfg["strategy"],
                 "cuda_op": os.environ.get("RWKV_CUDA_ON") == "1"}
    try:
        from importlib.metadata import version

        res["version"] = version("rwkv")
    except Exception:  # noqa: BLE001
        pass
    out_path = Path(cfg["out"])

    def dump():
        out_path.write_text(json.dumps(res))

    t0 = time.perf_counter()
    m = RWKV(model=cfg["base"], strategy=cfg["strategy"])
    res["load_s"] = time.perf_counter() - t0
    timer = Timer(dev)
    with torch.no_grad():
        # decode, batch 1
        _, state = m.forward(_tokens(8, cfg["seed"]), None)
        tok = _tokens(1, cfg["seed"] + 1)
        box = [state]

        def step():
            _, box[0] = m.forward(tok, box[0])

        res["decode_s"] = timer.each(step, reps=cfg["steps"], warmup=cfg["warmup"])
        dump()
        if cfg["e2e_tokens"] >= 2:
            res["e2e_top_p_tok_s"] = _peer_generate_rate(m, dev, cfg["e2e_tokens"])
        dump()
        # chunked prefill at each length
        res["prefill"] = {}
        last_rate = None
        for n in cfg["lengths"]:
            if last_rate and n / last_rate > cfg["item_limit_s"]:
                res["prefill"][str(n)] = {"skipped": f"skipped (est. {n / last_rate:.0f} s)"}
                continue
            toks = _tokens(n, cfg["seed"] + n)
            times, peak, base = [], None, None
            for r in range(cfg["reps"].get(str(n), 1)):
                with PeakMemory(dev) as pm:
                    _sync(dev)
                    t0 = time.perf_counter()
                    st = None
                    for s in range(0, n, cfg["chunk"]):
                        _, st = m.forward(toks[s:s + cfg["chunk"]], st)
                    _sync(dev)
                    times.append(time.perf_counter() - t0)
                if r == 0:
                    peak, base = pm.peak, pm.base
            t = statistics.median(times)
            last_rate = n / t
            res["prefill"][str(n)] = {"s": t, "peak_bytes": peak, "resident_bytes": base}
            dump()
        if cfg.get("quality_tokens"):
            logits, _ = m.forward(cfg["quality_tokens"], None, full_output=True)
            torch.save(logits.float().cpu(), cfg["out"] + ".logits.pt")
            res["quality_logits"] = cfg["out"] + ".logits.pt"
    dump()
    return 0


def _peer_generate_rate(m, dev, n: int) -> float | None:
    """The peer's end-to-end rate: its `PIPELINE.generate` (what its users run), top_p 0.8, n tokens
    after an E2E_PROMPT-token prompt, the prompt's time subtracted as for ours."""
    try:
        from rwkv.utils import PIPELINE, PIPELINE_ARGS
    except ImportError:
        return None
    pipe = PIPELINE(m, "rwkv_vocab_v20230424")
    ctx = pipe.decode(_tokens(E2E_PROMPT, 3))

    def run(k: int) -> float:
        args = PIPELINE_ARGS(temperature=1.0, top_p=0.8, token_ban=[0], token_stop=[])
        _sync(dev)
        t0 = time.perf_counter()
        pipe.generate(ctx, token_count=k, args=args)
        _sync(dev)
        return time.perf_counter() - t0

    run(8)
    full = statistics.median(run(n) for _ in range(2))
    first = statistics.median(run(1) for _ in range(2))
    return (n - 1) / (full - first)


def run_peer(path: str, dev: torch.device, o: BenchOptions, lengths: list[int], reps: dict, workdir: Path,
             quality_tokens: list[int] | None, log) -> dict:
    """Run the rwkv package in a subprocess; on CUDA try its nvcc-built op, then without it."""
    try:
        import importlib.util

        if importlib.util.find_spec("rwkv") is None:
            return {"error": f"rwkv package not installed ({install_hint('rwkv')})"}
    except (ImportError, ValueError):
        return {"error": "rwkv package not importable"}
    base = str(Path(path).with_suffix(""))
    strategy = "cuda fp16" if dev.type == "cuda" else "cpu fp32"
    attempts = [True, False] if dev.type == "cuda" else [False]
    notes = []
    for cuda_op in attempts:
        out = workdir / f"peer_{int(cuda_op)}.json"
        cfg = dict(base=base, strategy=strategy, device=str(dev), cuda_op=cuda_op, seed=o.seed, steps=o.decode_steps,
                   e2e_tokens=o.e2e_tokens,
                   warmup=o.peer_warmup, lengths=lengths, reps={str(k): v for k, v in reps.items()}, chunk=o.chunk,
                   item_limit_s=o.item_limit_s, out=str(out), quality_tokens=quality_tokens)
        cfg_path = workdir / f"peer_{int(cuda_op)}.cfg.json"
        cfg_path.write_text(json.dumps(cfg))
        tag = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in (Path(o.model).stem if o.model else o.preset))
        log_path = Path(o.log_dir or workdir) / f"peer_{tag}_{'cudaop' if cuda_op else 'torch'}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log(f"peer: rwkv package, strategy {strategy!r}, RWKV_CUDA_ON={int(cuda_op)} (log {log_path})")
        with open(log_path, "w") as lf:
            proc = subprocess.run([sys.executable, "-m", "edge_rwkv.bench", "--peer-worker", str(cfg_path)],
                                  stdout=lf, stderr=subprocess.STDOUT, env=dict(os.environ))
        res = json.loads(out.read_text()) if out.exists() else {}
        if proc.returncode == 0:
            if cuda_op and not res.get("cuda_op"):
                notes.append("its CUDA kernels failed to build; ran without them (RWKV_CUDA_ON=0)")
            res["note"] = "; ".join(notes)
            return res
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["?"]
        if cuda_op and "decode_s" not in res:
            notes.append(f"RWKV_CUDA_ON=1 failed ({tail[0][:120]}); ran with RWKV_CUDA_ON=0")
            continue
        res["error"] = f"peer exited {proc.returncode}: {tail[0][:160]}"
        res["note"] = "; ".join(notes)
        return res
    return {"error": "; ".join(notes) or "peer failed"}


# =========================================================================== the run

def prefill_reps(n: int) -> int:
    """Timed prefills of n tokens (median of 3 up to 8K; longer ones once)."""
    return 3 if n <= 8192 else 1


def _free(dev: torch.device) -> None:
    """Release a dropped model now, so the next one is measured alone on the device."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def _bench_file(o: BenchOptions, dev: torch.device, dtype: torch.dtype, workdir: Path, meta: dict, log):
    """(path both runtimes read, label): MODEL (as a .pth beside it when the peer needs one) or random weights."""
    if o.model:
        path = str(o.model)
        from .checkpoint import load_checkpoint

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


def base_precision(precisions: list[str], device_type: str) -> str:
    """The first float precision asked for, else fp16 on CUDA and fp32 elsewhere."""
    return next((p for p in precisions if p in FLOAT_PRECISIONS), "fp16" if device_type == "cuda" else "fp32")


def precision_plan(o: BenchOptions, base: str) -> list[str]:
    """Every precision some row needs, each once: the base first (its model is loaded already)."""
    out = [base]
    for p in [*o.precisions, *o.batch_precisions, *o.memory_precisions]:
        if p not in out:
            out.append(p)
    return out


class ModelUnavailable(Exception):
    """A precision whose model cannot be made here (the message is the table's note)."""


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
    log: object
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


def _make_model(r: _Run, prec: str):
    """(model, quantization description or None) for a precision other than the base."""
    from . import api

    if prec in FLOAT_PRECISIONS:
        return api.load(r.path, device=str(r.dev), dtype=FLOAT_PRECISIONS[prec]), None
    if prec not in QUANT_BITS:
        raise ModelUnavailable(f"n/a (unknown precision {prec!r})")
    fn, why = quantizer()
    if fn is None:
        r.log(f"{prec}: {QUANT_NA} — {why}")
        raise ModelUnavailable(QUANT_NA)
    t0 = time.perf_counter()
    m, desc = quantized_model(r.path, QUANT_BITS[prec], r.dev, r.dtype)
    r.log(f"{prec}: quantized ({desc}) on {r.dev.type} and loaded in {time.perf_counter() - t0:.1f} s")
    return m, desc


def _model_for(r: _Run, prec: str, decode_row: dict | None):
    """The model of a precision other than the base, or None once its rows say why it could not be made."""
    try:
        m, desc = _make_model(r, prec)
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
    r.log(f"prefill {prec} {n}: {n / sec:.0f} tok/s, peak {_fmt_bytes(peak)}")
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
    from . import api

    dev = api.parse_device(o.device)
    t_start = time.perf_counter()
    base_prec = base_precision(o.precisions, dev.type)
    o = dataclasses.replace(o, batch_precisions=o.batch_precisions or [base_prec],
                            memory_precisions=o.memory_precisions or [base_prec])
    dtype = FLOAT_PRECISIONS[base_prec]
    res: dict = {"meta": {}, "decode": [], "e2e": [], "batched": [], "prefill": [], "quality": []}
    meta = res["meta"]
    with tempfile.TemporaryDirectory(prefix="edge_rwkv_bench_") as tmp:
        workdir = Path(tmp)
        path, label = _bench_file(o, dev, dtype, workdir, meta, log)
        model = api.load(path, device=str(dev), dtype=dtype)
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
            r.qtoks = _tokens(64, o.seed + 7)
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
    got, ref = got.reshape(-1, got.shape[-1]).double(), ref.reshape(-1, ref.shape[-1]).double()
    rel = float((got - ref).norm() / ref.norm())
    top1 = float((got.argmax(-1) == ref.argmax(-1)).double().mean())
    kl = float((ref.log_softmax(-1).exp() * (ref.log_softmax(-1) - got.log_softmax(-1))).sum(-1).mean())
    return {"what": what, "rel_err": rel, "top1_agree": top1, "kl": kl}


# =========================================================================== output

def _fmt_bytes(n) -> str:
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
        f"state {_fmt_bytes(m['state_bytes'])}/sequence; memory = {m['memory_kind']}",
    ]
    if m.get("weights_bytes"):
        lines.append("weights resident: " + ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in m["weights_bytes"].items()))
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
            ours = _fmt_bytes(r.get("ours_peak_bytes")) if "ours_tok_s" in r else r.get("ours_note", "—")
            peer = (_fmt_bytes(r.get("peer_peak_bytes")) if "peer_tok_s" in r else r.get("peer_note", "—")) if prec == base else ""
            ratio = f"{r['mem_ratio']:.2f}×" if "mem_ratio" in r else ""
            lines.append(f"| {_label('peak memory', prec, base)} | ctx {r['tokens']} | {ours} | {peer} | {ratio} | | |")
    return lines


def format_table(res: dict) -> str:
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


# =========================================================================== CLI

def _int_list(s: str) -> list[int]:
    try:
        out = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not out or any(x < 1 for x in out):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return out


def _prec_list(s: str) -> list[str]:
    out = list(dict.fromkeys(x.strip().lower() for x in s.split(",") if x.strip()))  # in order, each once
    bad = [x for x in out if x not in FLOAT_PRECISIONS and x not in QUANT_BITS]
    if not out or bad:
        what = f"unknown precision {bad[0]!r}; " if bad else ""
        raise argparse.ArgumentTypeError(f"{what}precisions must be among fp32,fp16,bf16,int8,int4; got {s!r}")
    return out


def add_bench_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("model", nargs="?", default=None, help="model file (default: random weights of --preset)")
    s.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="random-weight shape (default: tiny)")
    s.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    s.add_argument("--precisions", type=_prec_list, default=None,
                   help="decode B=1 rows; default fp16,int8,int4 (fp32,int8,int4 on cpu). The first float one is the "
                        "base precision (the peer's comparison, the default of the next two)")
    s.add_argument("--batch-precisions", type=_prec_list, default=None,
                   help="batched decode rows for these precisions (default: the base precision)")
    s.add_argument("--memory-precisions", type=_prec_list, default=None,
                   help="prefill + peak memory rows at --memory-ctx for these precisions (default: the base precision)")
    s.add_argument("--batch", type=_int_list, default=[1, 8, 64, 256])
    s.add_argument("--prefill", type=_int_list, default=[1024, 8192, 32768])
    s.add_argument("--memory-ctx", type=_int_list, default=[8192, 32768, 131072])
    s.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True, help="also run the rwkv pip package")
    s.add_argument("--chunk", type=int, default=None, help="prefill chunk, both runtimes (default: ours for the model, runtime.runner.prefill_chunk_for)")
    s.add_argument("--steps", type=int, default=None, help="timed decode steps (default 100 on cuda, 30 on cpu)")
    s.add_argument("--item-limit", type=float, default=60.0, help="skip a prefill length estimated to take longer (s)")
    s.add_argument("--e2e-tokens", type=int, default=256,
                   help="Model.stream rows (greedy, top_p 0.8): tokens after a 120-token prompt (0: none; default 256)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", default=None, metavar="OUT.json")
    s.add_argument("--plot", default=None, metavar="OUT.png")
    s.add_argument("--log-dir", default=None, help="where the peer's logs go (default: a temp dir)")
    s.add_argument("--quality", action="store_true", help="also compare logits (quantized vs float, ours vs peer)")


def options_from_args(a) -> BenchOptions:
    from .errors import InputError
    cpu = str(a.device).startswith("cpu")
    if a.model and not Path(a.model).is_file():
        raise InputError(f"{a.model}: no such model file")
    chunk = a.chunk  # None: runtime.runner.prefill_chunk_for(model), decided once the model is loaded
    if chunk is not None and chunk < 1:
        raise InputError("--chunk must be positive")
    if a.e2e_tokens < 0:
        raise InputError("--e2e-tokens must be ≥ 0")
    return BenchOptions(
        model=a.model, preset=a.preset, device=a.device,
        precisions=a.precisions or (["fp32", "int8", "int4"] if cpu else ["fp16", "int8", "int4"]),
        batch_precisions=a.batch_precisions, memory_precisions=a.memory_precisions, batch=a.batch, prefill=a.prefill, memory_ctx=a.memory_ctx, peer=a.peer, chunk=chunk, quality=a.quality,
        decode_steps=a.steps or (30 if cpu else 100), warmup=5 if cpu else 20, peer_warmup=10 if cpu else 60,
        item_limit_s=a.item_limit, seed=a.seed, log_dir=a.log_dir, e2e_tokens=a.e2e_tokens)


def write_outputs(results: list[dict], json_path: str | None, plot_path: str | None, log=print) -> None:
    if json_path:
        from .fileio import atomic_write_bytes

        payload = results[0] if len(results) == 1 else {"runs": results}
        atomic_write_bytes(json_path, json.dumps(payload, indent=1, default=str).encode())
        log(f"wrote {json_path}")
    if plot_path:
        write_plot(results, plot_path)
        log(f"wrote {plot_path}")


def cmd_bench(a) -> int:
    if a.plot:  # before the measurements, not after them
        require("matplotlib", "bench --plot")
    o = options_from_args(a)
    t0 = time.perf_counter()
    log = lambda s: print(f"[bench {time.perf_counter() - t0:6.1f}s] {s}", file=sys.stderr, flush=True)  # noqa: E731
    res = run_bench(o, log=log)
    print(format_table(res), flush=True)
    write_outputs([res], a.json, a.plot, log=log)
    return 0


def register(sub) -> None:
    s = sub.add_parser("bench", help="speed and memory table: ours vs the rwkv package, same weights",
                       description="Decode / batched decode / prefill throughput, peak memory vs context length and "
                                   "achieved bandwidth, for our runtime and the official rwkv package on the same weights.")
    add_bench_args(s)
    s.set_defaults(func=cmd_bench)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--peer-worker":
        sys.exit(_peer_worker(sys.argv[2]))
    ap = argparse.ArgumentParser(prog="python -m edge_rwkv.bench")
    add_bench_args(ap)
    ap.set_defaults(func=cmd_bench)
    args = ap.parse_args()
    sys.exit(args.func(args))
