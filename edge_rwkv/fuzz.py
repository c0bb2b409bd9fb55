"""Mutation fuzzing of every file reader: the readers' contract, checked on thousands of damaged files.

The contract: whatever the bytes, a reader either refuses the file with one line (an `EdgeRWKVError`
naming the file) or reads it; a state reader that reads a file returns exactly the state that was
saved (the checksum covers every byte that matters). Anything else — another exception type, a
message over several lines, an altered state accepted, a read that takes seconds — is a defect.

Readers: fp32 state, int8 state, artifact (quantized safetensors with metadata), safetensors with
official names, torch `.pth`. Mutations: bit flips and byte writes (anywhere or in the header),
truncation, inserted/deleted bytes, and structured edits of the JSON header or metadata (a field
replaced by another type, a huge or negative number, deep nesting, a deleted or added key), and for
`.pth` dictionaries with hostile keys and dtypes. Each case is drawn from its own seeded generator,
so `case(reader, seed, i)` reproduces any finding.

    python benchmarks/fuzz_readers.py --count 15000
"""
from __future__ import annotations

import io
import json
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save

from . import state_quant
from .checkpoint import Checkpoint, derive_config, load_checkpoint
from .errors import EdgeRWKVError
from .quant.policy import QuantPolicy
from .safetensors_header import LENGTH, declared_length
from .state import State
from .synthetic import random_checkpoint

READERS = ("state", "int8-state", "artifact", "safetensors", "pth")
SLOW_CASE_S = 5.0

# Raw JSON text put in place of a field: other types, numbers no reader should trust, deep nesting.
HOSTILE_JSON = ("null", "true", "-1", "0", "1", "2147483648", "9223372036854775808", "1" + "0" * 400, "1e400",
                "-1e400", "0.5", '"x"', '""', "[]", "{}", "[1,2]", '{"a":1}', "[" * 5000 + "]" * 5000,
                '{"a":' * 3000 + "1" + "}" * 3000, '"\\ud800"', '"' + "A" * 70000 + '"')


@dataclass
class Report:
    reader: str
    tried: int = 0
    refused: int = 0  # one-line EdgeRWKVError
    read: int = 0  # read without error (states: identical to the saved state)
    defects: list = field(default_factory=list)  # (case index, kind, detail)
    seconds: float = 0.0
    slowest_s: float = 0.0

    @property
    def clean(self) -> int:
        return self.refused + self.read

    def as_dict(self) -> dict:
        return {"reader": self.reader, "tried": self.tried, "clean": self.clean, "refused": self.refused,
                "read": self.read, "defects": len(self.defects), "seconds": round(self.seconds, 2),
                "slowest_s": round(self.slowest_s, 3), "examples": self.defects[:10]}


# --------------------------------------------------------------------------- seed files

def _tiny_checkpoint(n_embd: int = 64) -> dict[str, torch.Tensor]:
    """Two layers, small enough that reading one takes milliseconds (the artifact needs 128: int4 groups)."""
    return {k: v.half() for k, v in random_checkpoint(2, n_embd, 32, vocab_size=64, seed=0).items()}


def _seed_state():
    g = torch.Generator().manual_seed(0)
    return State(torch.randn(2, 1, 64, generator=g), torch.randn(2, 1, 2, 32, 32, generator=g),
                 torch.randn(2, 1, 64, generator=g), fingerprint="f" * 64, tokens=1234)


def seed_bytes(reader: str) -> bytes:
    """The valid file each reader's mutations start from."""
    if reader == "state":
        return _seed_state().to_bytes()
    if reader == "int8-state":
        return state_quant.to_bytes(state_quant.quantize_state(_seed_state()))
    sd = _tiny_checkpoint(128 if reader == "artifact" else 64)
    if reader == "safetensors":
        return save(sd)
    if reader == "pth":
        buf = io.BytesIO()
        torch.save(sd, buf)
        return buf.getvalue()
    if reader == "artifact":
        from .quant.policy import QuantPolicy
        from .quant.transform import quantize_checkpoint

        ck = Checkpoint("<seed>", {k: v.float() for k, v in sd.items()}, derive_config(sd))
        tensors, meta = quantize_checkpoint(ck, QuantPolicy(bits=4, quantize_embedding=True, quantize_head=True))
        return save({k: v.contiguous() for k, v in tensors.items()}, metadata={"edge_rwkv": json.dumps(meta)})
    raise ValueError(f"unknown reader {reader!r}")


def read(reader: str, path: Path):
    """Run the reader the product uses for this kind of file."""
    if reader == "state":
        return State.load(path)
    if reader == "int8-state":
        return state_quant.load_quantized(path, dequantize=False)
    return load_checkpoint(path)


# --------------------------------------------------------------------------- mutations

def _header_span(data: bytes) -> int:
    """Bytes 0 … end of the safetensors header (the whole file when it is not one)."""
    n = declared_length(data)
    return LENGTH.size + n if n is not None and n <= len(data) - LENGTH.size else len(data)


def _flip(data: bytearray, rng: random.Random, lo: int, hi: int) -> None:
    if hi > lo:
        data[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)


def _replace_json_value(text: str, rng: random.Random) -> str | None:
    """The JSON text with one field replaced, deleted or added (a hostile value from HOSTILE_JSON)."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    paths = []

    def walk(v, path):
        paths.append(path)
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, path + [k])
        elif isinstance(v, list) and len(v) <= 8:
            for i, x in enumerate(v):
                walk(x, path + [i])

    walk(obj, [])
    path = rng.choice(paths[1:] or paths)
    sentinel = "@@HOSTILE@@"
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    action = rng.random()
    if not path:
        return rng.choice(HOSTILE_JSON)
    if action < 0.15 and isinstance(parent, dict):
        del parent[path[-1]]
        return json.dumps(obj)
    if action < 0.25 and isinstance(parent, dict):
        parent[rng.choice(["extra", "__proto__", "0", str(path[-1]) + "x"])] = sentinel
    else:
        parent[path[-1]] = sentinel
    return json.dumps(obj).replace(json.dumps(sentinel), rng.choice(HOSTILE_JSON), 1)


def _with_header(data: bytes, header_text: str) -> bytes:
    raw = header_text.encode("utf-8", "surrogatepass")
    raw += b" " * (-len(raw) % 8)
    return LENGTH.pack(len(raw)) + raw + data[_header_span(data):]


def _structured(data: bytes, rng: random.Random) -> bytes | None:
    """Edit the safetensors header JSON, or the JSON document stored inside its __metadata__."""
    end = _header_span(data)
    if end == len(data) and len(data) < 8:
        return None
    try:
        header = json.loads(data[8:end])
    except ValueError:
        return None
    meta = header.get("__metadata__") or {}
    inner = [k for k, v in meta.items() if isinstance(v, str) and v.startswith("{")]
    if inner and rng.random() < 0.6:
        k = rng.choice(inner)
        text = _replace_json_value(meta[k], rng)
        if text is None:
            return None
        meta[k] = text
        return _with_header(data, json.dumps(header))
    text = _replace_json_value(json.dumps(header), rng)
    return None if text is None else _with_header(data, text)


def _pth_structured(rng: random.Random) -> bytes:
    """A torch file whose dictionary is hostile in one way (keys, dtypes, values, nesting)."""
    sd = _tiny_checkpoint()
    k = rng.choice(sorted(sd))
    choice = rng.randrange(10)
    if choice == 0:
        sd[7] = sd.pop(k)  # an int key
    elif choice == 1:
        sd["blocks.100000000.ln1.weight"] = torch.zeros(64, dtype=torch.float16)
    elif choice == 2:
        sd["blocks." + "9" * 5000 + ".ln1.weight"] = torch.zeros(64, dtype=torch.float16)
    elif choice == 3:
        sd[k] = sd[k].to(torch.float8_e4m3fn)
    elif choice == 4:
        sd[k] = sd[k].to(rng.choice([torch.int64, torch.bool, torch.complex64, torch.uint8, torch.float64]))
    elif choice == 5:
        sd[k] = rng.choice([5, "x", None, [1, 2], {"a": torch.zeros(1)}])
    elif choice == 6:
        sd = {"state_dict": sd, "extra": rng.choice([1, "x", torch.zeros(1)])}
    elif choice == 7:
        sd[k] = sd[k].reshape(-1)[: max(1, sd[k].numel() // 2)]
    elif choice == 8:
        sd[k] = torch.zeros(())
    else:
        del sd[k]
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getvalue()


def mutate(seed: bytes, reader: str, rng: random.Random) -> bytes:
    """One mutated file."""
    if reader == "pth" and rng.random() < 0.25:
        return _pth_structured(rng)
    data = bytearray(seed)
    head = _header_span(seed) if reader != "pth" else min(len(seed), 1024)
    kind = rng.random()
    if kind < 0.35 and reader != "pth":
        out = _structured(seed, rng)
        if out is not None:
            return out
    if kind < 0.55:
        for _ in range(rng.choice([1, 1, 1, 2, 4])):
            _flip(data, rng, 0, head)
    elif kind < 0.70:
        for _ in range(rng.choice([1, 2, 8])):
            _flip(data, rng, 0, len(data))
    elif kind < 0.80:
        return bytes(data[: rng.randrange(len(data) + 1)])
    elif kind < 0.90:
        pos = rng.randrange(head + 1)
        if rng.random() < 0.5:
            data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.choice([1, 7, 64])))
        else:
            del data[pos:pos + rng.choice([1, 8, 100])]
    else:
        pos = rng.randrange(len(data))
        data[pos] = rng.choice([0x00, 0xFF, 0x7F, 0x80, ord("{"), ord('"'), ord("9")])
    return bytes(data)


# --------------------------------------------------------------------------- the run

def _states_equal(a, b) -> bool:
    names = ("att_x", "wkv", "ffn_x") if hasattr(a, "wkv") else ("att_x", "ffn_x", "wkv_q", "wkv_scale")
    return (all(torch.equal(getattr(a, k), getattr(b, k)) for k in names)
            and a.fingerprint == b.fingerprint and a.tokens == b.tokens)


def check_case(reader: str, path: Path, original) -> tuple[str, str]:
    """('refused' | 'read' | defect kind, detail) for one mutated file on disk."""
    try:
        result = read(reader, path)
    except EdgeRWKVError as e:
        msg = str(e)
        if "\n" in msg.strip():
            return "multi-line", msg[:300]
        if str(path) not in msg:
            return "unnamed", msg[:300]
        return "refused", ""
    except Exception as e:  # noqa: BLE001 — any other exception type is the defect being looked for
        return type(e).__name__, str(e).splitlines()[0][:300] if str(e) else ""
    if reader in ("state", "int8-state") and not _states_equal(result, original):
        return "altered-state-accepted", ""
    return "read", ""


def run(readers=READERS, count: int = 1000, seed: int = 0, time_limit: float | None = None,
        folder: str | Path | None = None) -> list[Report]:
    """`count` mutations per reader (fewer if `time_limit` seconds pass, shared by all readers)."""
    start = time.monotonic()
    reports = []
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        for r_i, reader in enumerate(readers):
            rep = Report(reader)
            reports.append(rep)
            seed_data = seed_bytes(reader)
            path = Path(tmp) / f"fuzz-{reader}.bin"
            path.write_bytes(seed_data)
            original = read(reader, path)
            deadline = None if time_limit is None else start + time_limit * (r_i + 1) / len(readers)
            t0 = time.monotonic()
            for i in range(count):
                if deadline is not None and time.monotonic() > deadline:
                    break
                rng = random.Random(f"{seed}:{reader}:{i}")
                path.write_bytes(mutate(seed_data, reader, rng))
                c0 = time.monotonic()
                kind, detail = check_case(reader, path, original)
                took = time.monotonic() - c0
                rep.tried += 1
                rep.slowest_s = max(rep.slowest_s, took)
                if took > SLOW_CASE_S:
                    rep.defects.append((i, "slow", f"{took:.1f} s"))
                elif kind == "refused":
                    rep.refused += 1
                elif kind == "read":
                    rep.read += 1
                else:
                    rep.defects.append((i, kind, detail))
            rep.seconds = time.monotonic() - t0
    return reports


def case(reader: str, seed: int, i: int) -> bytes:
    """The bytes of mutation `i` of `reader` under `seed` (to reproduce a finding)."""
    return mutate(seed_bytes(reader), reader, random.Random(f"{seed}:{reader}:{i}"))


def format_reports(reports: list[Report]) -> str:
    lines = [f"{'reader':12s} {'tried':>7s} {'clean':>7s} {'refused':>8s} {'read':>6s} {'defects':>8s} "
             f"{'s':>6s} {'slowest':>8s}"]
    for r in reports:
        d = r.as_dict()
        lines.append(f"{r.reader:12s} {d['tried']:7d} {d['clean']:7d} {d['refused']:8d} {d['read']:6d} "
                     f"{d['defects']:8d} {d['seconds']:6.1f} {d['slowest_s']:7.3f}s")
        for ex in r.defects[:5]:
            lines.append(f"    case {ex[0]}: {ex[1]} {ex[2]}")
    total = [sum(getattr(r, k) for r in reports) for k in ("tried", "clean")]
    lines.append(f"{'total':12s} {total[0]:7d} {total[1]:7d} {'':8s} {'':6s} {sum(len(r.defects) for r in reports):8d}")
    return "\n".join(lines)
