"""State tuning (and LoRA) of a frozen RWKV-7: `edge-rwkv tune`, in one process or many (torchrun).

State tuning learns only the initial WKV state (per layer H×N×N) on the user's text; the weights stay
frozen and the result is a state file of a few MB that `generate/chat --init-state` and the daemon's
`serve --init-states DIR` load (edge_rwkv/state.py's format; token-shift rows zero, as RWKV-PEFT's
state tuning starts every sequence). `--method lora` trains low-rank deltas of the attention and FFN
matrices instead and writes a *merged* model artifact (W + scale·B·A folded in): every loader reads it
as it reads any artifact, with no LoRA code at load time.

Data: `.txt` (documents separated by blank lines; each read from the tuned state after an end-of-text
token, as pretraining separates documents) or `.jsonl` (one object per line: `{"messages": [{"role":
"user"|"assistant"|"system", "content": …}, …]}` in the chat format of edge_rwkv/chat.py, the loss on
the assistant replies only; or `{"text": …}`, read as a .txt document). A sample longer than --ctx is
cut into windows of --ctx tokens, each starting from the tuned state. The last --val-fraction of the
samples (file order) is held out: its loss picks the step whose state is kept.

Scale-out: torch.distributed. `torchrun --nproc-per-node N -m edge_rwkv.tune MODEL …` runs N ranks
(NCCL on CUDA, gloo on CPU). Every rank draws the same global batch (seeded, fixed order) and takes
its own slice; losses are sums over target tokens divided by the global batch's target count, and
the gradients are all-reduced (summed), so N ranks make the same update as one rank over the same
global batch. Only rank 0 writes, atomically; a rank that dies ends the others with an error and no
file.

Memory: frozen weights in bf16/fp16 (the artifact's dtype on CUDA) with no gradients; activations are
recomputed layer by layer (checkpointing) and the head's logits chunk by chunk, so what a step keeps
is one fp32 residual row per token and layer. Quantized artifacts are tuned on a dequantized copy of
their matrices; the state kept is then scored on the quantized model itself.

    edge-rwkv tune model.safetensors --data persona.jsonl -o persona.state --steps 200
    torchrun --nproc-per-node 8 -m edge_rwkv.tune model.safetensors --data chats.jsonl -o s.state --device cuda
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from .api import load, model_fingerprint, parse_device, parse_dtype, pick_wkv
from .artifact import load_quantized, make_metadata, quantized_parts, write_artifact
from .chat import ROLE_NAMES, clean_message
from .checkpoint import Checkpoint, load_checkpoint
from .default_model import resolve_model
from .errors import EdgeRWKVError
from .model import RWKV7, DenseLinear, build_model
from .progress import progress_iter
from .runtime.textstream import TURN_END
from .state import State
from .tokenizer import END_OF_TEXT, default_tokenizer

METHODS = ("state", "lora")
# Adam peak rates: a state entry moves freely (RWKV-PEFT tunes states at 1.0); LoRA factors want small steps
DEFAULT_LR = {"state": 1.0, "lora": 1e-3}
LORA_TARGETS = ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")
HEAD_CHUNK_TOKENS = 256  # target tokens whose fp32 logits exist at once (64 MB at V=65536)
MAX_DATA_BYTES = 1 << 30
DIST_TIMEOUT_S = 600  # a collective waiting this long for a silent rank ends the run (ranks load big models at their own pace)


class TuneError(EdgeRWKVError):
    """Bad training data or options, or a run that could not finish (a rank lost)."""


# =========================================================================== data

@dataclass
class Sample:
    """One window: ids [n+1] int64 read from the tuned state; mask [n] bool: whether ids[t+1] is a target."""

    ids: torch.Tensor
    mask: torch.Tensor

    @property
    def targets(self) -> int:
        return int(self.mask.sum())


def read_text_file(path: Path) -> str:
    """The file's text, after checking it exists, is not empty, not huge and not binary."""
    if not path.is_file():
        raise TuneError(f"{path}: no such data file")
    size = path.stat().st_size
    if size == 0:
        raise TuneError(f"{path}: the data file is empty")
    if size > MAX_DATA_BYTES:
        raise TuneError(f"{path}: {size} bytes is more than the {MAX_DATA_BYTES >> 20} MB a data file may hold")
    raw = path.read_bytes()
    if b"\0" in raw:
        raise TuneError(f"{path}: binary file (NUL bytes); the data must be UTF-8 text (.txt or .jsonl)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TuneError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None


def text_document(tokenizer, text: str) -> tuple[list[int], list[bool]]:
    """A document after the end-of-text separator; every token of it is a target."""
    ids = [END_OF_TEXT] + tokenizer.encode(text)
    return ids, [True] * (len(ids) - 1)


def chat_document(tokenizer, messages, where: str) -> tuple[list[int], list[bool]]:
    """A conversation in chat.py's format, encoded as a chat feeds it (each "Assistant:" apart from the
    reply that follows it); targets: the assistant replies and their closing blank line."""
    if not isinstance(messages, list) or not messages:
        raise TuneError(f"{where}: \"messages\" must be a non-empty list")
    ids: list[int] = []
    mask: list[bool] = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise TuneError(f"{where}: message {j} must be an object with exactly the keys \"role\" and \"content\"")
        if m["role"] not in ROLE_NAMES or not isinstance(m["content"], str):
            raise TuneError(f"{where}: message {j} needs a role in {sorted(ROLE_NAMES)} and a string content")
        content = clean_message(m["content"])
        if not content:
            continue
        if m["role"] == "assistant":
            pieces = [("Assistant:", False), (f" {content}{TURN_END}", True)]
        else:
            pieces = [(f"{ROLE_NAMES[m['role']]}: {content}{TURN_END}", False)]
        for text, target in pieces:
            toks = tokenizer.encode(text)
            ids += toks
            mask += [target] * len(toks)
    if not any(mask):
        raise TuneError(f"{where}: the conversation has no assistant reply to learn")
    return ids, mask[1:]


def read_documents(path: str | os.PathLike, tokenizer) -> list[tuple[list[int], list[bool]]]:
    """(ids, target mask) per document of a .txt or .jsonl file; errors name the file and line."""
    p = Path(path)
    kind = p.suffix.lower()
    if kind not in (".txt", ".jsonl"):
        raise TuneError(f"{p}: data must be a .txt or .jsonl file")
    text = read_text_file(p)
    if kind == ".txt":
        docs = [d.strip() for d in text.replace("\r\n", "\n").split("\n\n")]
        out = [text_document(tokenizer, d) for d in docs if d]
    else:
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{p}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TuneError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or len(obj) != 1 or not ({"messages", "text"} & set(obj)):
                raise TuneError(f"{where}: each line must be an object with one key, \"messages\" (chat turns) "
                                f"or \"text\"")
            if "text" in obj:
                if not isinstance(obj["text"], str) or not obj["text"].strip():
                    raise TuneError(f"{where}: \"text\" must be a non-empty string")
                out.append(text_document(tokenizer, obj["text"].strip()))
            else:
                out.append(chat_document(tokenizer, obj["messages"], where))
    if not out:
        raise TuneError(f"{p}: holds no documents")
    return out


def windows(ids: list[int], mask: list[bool], ctx: int) -> list[Sample]:
    """Cut a document into windows of ≤ ctx predictions (each target predicted once); windows without
    targets are left out."""
    out = []
    for s in range(0, len(ids) - 1, ctx):
        w_ids, w_mask = ids[s:s + ctx + 1], mask[s:s + ctx]
        if any(w_mask):
            out.append(Sample(torch.tensor(w_ids, dtype=torch.long), torch.tensor(w_mask, dtype=torch.bool)))
    return out


def load_samples(path, tokenizer, ctx: int, val_fraction: float) -> tuple[list[Sample], list[Sample]]:
    """(training windows, held-out windows): the held-out ones are the last documents of the file (or,
    for a file of one long document, its last windows)."""
    docs = read_documents(path, tokenizer)
    per_doc = [w for w in (windows(ids, mask, ctx) for ids, mask in docs) if w]
    if len(per_doc) == 1:
        per_doc = [[w] for w in per_doc[0]]
    if len(per_doc) < 2:
        raise TuneError(f"{path}: needs at least 2 documents (or one longer than --ctx {ctx}) with targets, "
                        f"as the last one is held out for validation")
    n_val = min(len(per_doc) - 1, max(1, round(len(per_doc) * val_fraction)))
    train = [s for d in per_doc[:-n_val] for s in d]
    val = [s for d in per_doc[-n_val:] for s in d]
    return train, val


def collate(samples: list[Sample], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs [b,T], targets [b,T], mask [b,T]), right-padded (padding is never a target and comes after
    every real token, so it changes nothing before it)."""
    T = max(len(s.mask) for s in samples)
    ids = torch.full((len(samples), T + 1), END_OF_TEXT, dtype=torch.long)
    mask = torch.zeros(len(samples), T, dtype=torch.bool)
    for j, s in enumerate(samples):
        ids[j, :len(s.ids)] = s.ids
        mask[j, :len(s.mask)] = s.mask
    ids, mask = ids.to(device), mask.to(device)
    return ids[:, :-1], ids[:, 1:], mask


# =========================================================================== the network being tuned

class LoraLinear:
    """y = x Wᵀ + scale · (x Aᵀ) Bᵀ with W frozen and A [r, in], B [out, r] trained (fp32); B starts at
    zero so the tuned model starts as the base model."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float, generator: torch.Generator):
        self.base = DenseLinear(weight)
        self.out_features, self.in_features = weight.shape
        self.scale = alpha / rank
        a = torch.randn(rank, self.in_features, generator=generator) / math.sqrt(self.in_features)
        self.A = a.to(weight.device).requires_grad_(True)
        self.B = torch.zeros(self.out_features, rank, device=weight.device, requires_grad=True)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y + (F.linear(F.linear(x.float(), self.A), self.B) * self.scale).to(y.dtype)

    def merged(self) -> torch.Tensor:
        return self.base.weight.float() + self.scale * (self.B.detach() @ self.A.detach())


def dense_tensors(ckpt: Checkpoint, device="cpu", dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors with every quantized matrix dequantized to `dtype` on `device` (a GPU
    unpacks a 7B model in seconds); a quantized embedding in fp32, as ln0 is folded into it."""
    specs = ckpt.quant.get("tensors") or {}
    tensors = dict(ckpt.tensors)
    for name, spec in specs.items():
        parts = {k: ckpt.tensors[k].to(device) for k in quantized_parts(name, ckpt.tensors)}
        for k in parts:
            del tensors[k]
        tensors[name] = load_quantized(name, spec, parts, ckpt.path).dequantize(
            torch.float32 if name == "emb.weight" else dtype)
    return tensors


@dataclass
class Tunable:
    """What a run trains: the initial WKV state [L,H,N,N] (state tuning), or LoRA factors per matrix."""

    state: torch.Tensor
    lora: dict[str, LoraLinear] = field(default_factory=dict)

    def params(self) -> list[torch.Tensor]:
        if self.lora:
            return [t for m in self.lora.values() for t in (m.A, m.B)]
        return [self.state]

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params()]

    def restore(self, saved: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, s in zip(self.params(), saved):
                p.copy_(s)


def build_tuning_net(cfg, tensors: dict[str, torch.Tensor], dtype, device, method: str, lora_rank: int = 8,
                     lora_alpha: float = 16.0, seed: int = 0) -> tuple[RWKV7, Tunable]:
    """The frozen network (dtype matrices on device, no gradients) and what is trained on it."""
    wkv, _ = pick_wkv(device)
    lora: dict[str, LoraLinear] = {}
    g = torch.Generator().manual_seed(seed)

    def make_linear(name: str):
        w = tensors[name].to(device=device, dtype=dtype)
        if method == "lora" and name.endswith(tuple(t + ".weight" for t in LORA_TARGETS)):
            lora[name] = LoraLinear(w, lora_rank, lora_alpha, g)
            return lora[name]
        return DenseLinear(w)

    with torch.no_grad():
        net = build_model(cfg, tensors, dtype, device, make_linear=make_linear, wkv=wkv)
    state = torch.zeros(cfg.n_layer, cfg.n_head, cfg.head_size, cfg.head_size, device=device,
                        requires_grad=method == "state")
    return net, Tunable(state, lora)


def _block(net: RWKV7, i: int, x, wkv, v_first, tokens):
    zeros = x.new_zeros(x.shape[0], x.shape[2])  # token shift from a fresh sequence
    x, _, _, _, v_first = net.block(i, x, zeros, wkv, zeros, v_first, tokens)
    return x, v_first


def _head_loss(net: RWKV7, x, targets):
    return F.cross_entropy(net.logits(x), targets, reduction="sum")


def loss_sum(net: RWKV7, state0: torch.Tensor, inputs, targets, mask, recompute: bool = True) -> torch.Tensor:
    """Summed next-token cross-entropy over the masked targets of a batch read from `state0` [L,H,N,N].

    With `recompute` (and gradients on), each layer's activations and each chunk of head logits are
    recomputed in the backward pass instead of kept (torch.utils.checkpoint)."""
    b = inputs.shape[0]
    keep = recompute and torch.is_grad_enabled()
    x = net.emb[inputs].float()
    v_first = None
    for i in range(len(net.layers)):
        s = state0[i].expand(b, *state0.shape[1:]).contiguous()
        if keep:
            x, v_first = checkpoint(_block, net, i, x, s, v_first, inputs, use_reentrant=False,
                                    preserve_rng_state=False)  # the model draws no random numbers
        else:
            x, v_first = _block(net, i, x, s, v_first, inputs)
    rows, tg = x[mask], targets[mask]
    total = x.new_zeros(())
    for c in range(0, rows.shape[0], HEAD_CHUNK_TOKENS):
        args = (net, rows[c:c + HEAD_CHUNK_TOKENS], tg[c:c + HEAD_CHUNK_TOKENS])
        total = total + (checkpoint(_head_loss, *args, use_reentrant=False, preserve_rng_state=False) if keep
                         else _head_loss(*args))
    return total


# =========================================================================== ranks

@dataclass
class Ranks:
    """This process's place in the run; one process is rank 0 of 1 (no collectives)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """Sum `t` over the ranks, in place; a lost rank ends the run with a TuneError."""
        if self.world > 1:
            try:
                dist.all_reduce(t)
            except (RuntimeError, dist.DistError) as e:  # gloo: connection closed/reset; NCCL: error or timeout
                raise TuneError(f"rank {self.rank}: lost contact with another rank during {what} "
                                f"({str(e).splitlines()[0][:200]}); no file written") from None
        return t

    def all_reduce_grads(self, params: list[torch.Tensor]) -> None:
        if self.world == 1:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        self.all_reduce(flat, "the gradient all-reduce")
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
            offset += p.numel()


# =========================================================================== the loop

@dataclass
class TuneOptions:
    method: str = "state"
    steps: int | None = None  # None: until `minutes` have passed
    minutes: float | None = None
    ctx: int = 512
    lr: float = DEFAULT_LR["state"]
    batch: int = 8  # global batch (sequences per step, over all ranks)
    micro_batch: int = 8  # sequences per forward on one rank (activation memory)
    val_every: int = 20
    seed: int = 0
    recompute: bool = True
    log: bool = True  # step lines and the progress bar (rank 0)


@dataclass
class TuneResult:
    steps: int
    kept_step: int
    val_loss_start: float
    val_loss: float  # of the kept step
    train_loss_last: float
    train_tokens: int  # target tokens trained on (all ranks)
    seconds: float
    val_loss_quantized: float | None = None  # the kept result on the quantized model it will run with


def batch_indices(step: int, n: int, batch: int, seed: int) -> list[int]:
    """The global batch of a step: consecutive slices of seeded per-epoch permutations (same on every rank)."""
    out = []
    pos = step * batch
    while len(out) < batch:
        epoch, off = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        take = min(batch - len(out), n - off)
        out += perm[off:off + take].tolist()
        pos += take
    return out


def mean_loss(net, state0, samples: list[Sample], micro_batch: int, ranks: Ranks, device) -> float:
    """Mean target loss of `samples`, each rank scoring its share."""
    mine = samples[ranks.rank::ranks.world]
    acc = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for c in range(0, len(mine), micro_batch):
            inputs, targets, mask = collate(mine[c:c + micro_batch], device)
            acc[0] += loss_sum(net, state0, inputs, targets, mask).double()
            acc[1] += mask.sum()
    ranks.all_reduce(acc, "validation")
    return float(acc[0] / acc[1])


def train_step(net, tunable: Tunable, batch: list[Sample], opts: TuneOptions, ranks: Ranks, device) -> float:
    """Accumulate this rank's share of the global batch's gradient; returns the batch's mean loss
    (all ranks)."""
    total_targets = sum(s.targets for s in batch)
    mine = batch[ranks.rank::ranks.world]
    loss_acc = torch.zeros(1, dtype=torch.float64, device=device)
    for c in range(0, len(mine), opts.micro_batch):
        inputs, targets, mask = collate(mine[c:c + opts.micro_batch], device)
        loss = loss_sum(net, tunable.state, inputs, targets, mask, opts.recompute) / total_targets
        loss.backward()
        loss_acc += loss.detach().double()
    for p in tunable.params():
        if p.grad is None:  # a rank with no share of this batch
            p.grad = torch.zeros_like(p)
    ranks.all_reduce_grads(tunable.params())
    return float(ranks.all_reduce(loss_acc, "the loss all-reduce"))


def tune(net: RWKV7, tunable: Tunable, train: list[Sample], val: list[Sample], opts: TuneOptions,
         ranks: Ranks = Ranks()) -> TuneResult:
    """Train `tunable` (in place: it ends holding the kept step's values) and report the run."""
    if opts.steps is None and opts.minutes is None:
        raise TuneError("give --steps or --minutes")
    device = net.device
    params = tunable.params()
    opt = torch.optim.Adam(params, lr=opts.lr, betas=(0.9, 0.99))
    start = time.time()
    best_loss = val_start = mean_loss(net, tunable.state, val, opts.micro_batch, ranks, device)
    best_step, best = 0, tunable.snapshot()
    if opts.log and ranks.is_main:
        say(f"step     0  validation loss {val_start:.4f}")
    steps = range(opts.steps) if opts.steps is not None else itertools.count()
    bar = progress_iter(steps, "tune", enabled=opts.log and ranks.is_main, total=opts.steps, unit="step")
    step, loss, train_tokens = 0, math.nan, 0
    for step0 in bar:
        frac, done = _clock(start, step0, opts, ranks, device)
        if done:
            break
        for group in opt.param_groups:  # short warm-up, cosine down to a tenth
            group["lr"] = opts.lr * min(1.0, (step0 + 1) / 10) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        batch = [train[j] for j in batch_indices(step0, len(train), opts.batch, opts.seed)]
        train_tokens += sum(s.targets for s in batch)
        opt.zero_grad(set_to_none=True)
        loss = train_step(net, tunable, batch, opts, ranks, device)
        opt.step()
        step = step0 + 1
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if step % opts.val_every == 0:
            best_loss, best_step, best = _keep_best(net, tunable, val, opts, ranks, step, loss,
                                                    (best_loss, best_step, best))
    if step % opts.val_every != 0:
        best_loss, best_step, best = _keep_best(net, tunable, val, opts, ranks, step, loss,
                                                (best_loss, best_step, best))
    tunable.restore(best)
    return TuneResult(step, best_step, val_start, best_loss, loss, train_tokens, time.time() - start)


def say(line: str) -> None:
    """A log line on stdout that leaves a progress bar on the terminal intact."""
    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def _clock(start: float, step: int, opts: TuneOptions, ranks: Ranks, device) -> tuple[float, bool]:
    """(fraction of the run done, whether to stop): rank 0's clock decides for all ranks, so every rank
    runs the same steps at the same learning rate."""
    if opts.minutes is None:
        return step / opts.steps, False
    t = torch.zeros(2, dtype=torch.float64, device=device)
    if ranks.is_main:
        frac = (time.time() - start) / (opts.minutes * 60)
        if opts.steps is not None:
            frac = max(frac, step / opts.steps)
        t[0], t[1] = min(frac, 1.0), float(frac >= 1.0 and step > 0)  # at least one step
    ranks.all_reduce(t, "the step clock")
    return float(t[0]), bool(t[1])


def _keep_best(net, tunable, val, opts, ranks, step, loss, best):
    v = mean_loss(net, tunable.state, val, opts.micro_batch, ranks, device=net.device)
    if opts.log and ranks.is_main:
        say(f"step {step:5d}  train loss {loss:.4f}  validation loss {v:.4f}")
    return (v, step, tunable.snapshot()) if v < best[0] else best


# =========================================================================== files

def tuned_state(tunable: Tunable, fingerprint: str) -> State:
    """The state file's content: the tuned WKV matrices, token-shift rows at zero, one sequence."""
    wkv = tunable.state.detach().float().cpu()[:, None]
    L, _, H, N, _ = wkv.shape
    z = torch.zeros(L, 1, H * N)
    return State(z, wkv.contiguous(), z.clone(), fingerprint)


def merged_dtype(ckpt: Checkpoint) -> torch.dtype:
    """The merged artifact's dtype: the base's matrices' own float dtype, fp16 for a quantized base."""
    t = ckpt.tensors["head.weight"] if not ckpt.quant.get("tensors") else None
    return t.dtype if t is not None and t.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float16


def merged_artifact(ckpt_tensors: dict[str, torch.Tensor], cfg, tunable: Tunable, dtype: torch.dtype,
                    result: TuneResult) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a dense artifact in `dtype` with the LoRA deltas folded into their matrices."""
    out = {}
    for name, t in ckpt_tensors.items():
        out[name] = (tunable.lora[name].merged() if name in tunable.lora else t.float()).to(dtype).cpu()
    meta = make_metadata(cfg, str(dtype).replace("torch.", ""))
    meta["training"] = {"tune": asdict(result)}
    return out, meta


# =========================================================================== command line

def add_tune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="model: official .pth, safetensors, an edge-rwkv artifact (quantized ones are tuned on a "
                        "dequantized copy and scored on the quantized model) or a Hugging Face folder (default: "
                        "the embedded default model)")
    p.add_argument("--data", required=True, help=".txt (documents separated by blank lines) or .jsonl "
                                                 "({\"messages\": [{\"role\", \"content\"}, …]} or {\"text\": …} a line)")
    p.add_argument("-o", "--output", required=True,
                   help="state file to write (--method state), or the merged model artifact (--method lora)")
    p.add_argument("--method", choices=METHODS, default="state",
                   help="state (default): learn the initial WKV state; lora: low-rank deltas merged into a new artifact")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 100 unless --minutes)")
    p.add_argument("--minutes", type=float, default=None, help="stop after this long (with --steps: whichever first)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per training window (default 512)")
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {DEFAULT_LR['state']:g} state, {DEFAULT_LR['lora']:g} lora)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step over all ranks (default 8)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="sequences per forward pass on one rank (default: the rank's whole share); lower it to save memory")
    p.add_argument("--val-fraction", type=float, default=0.1, help="documents held out at the end of the file (default 0.1)")
    p.add_argument("--val-every", type=int, default=20, help="steps between validation passes (default 20)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: each rank its local GPU)")
    p.add_argument("--dtype", default=None, help="frozen weights' dtype: float32, float16 or bfloat16 (default: "
                                                 "float32 on cpu, the artifact's or bfloat16 on cuda)")
    p.add_argument("--seed", type=int, default=0)


def check_args(a) -> None:
    for flag, value in (("--steps", a.steps), ("--minutes", a.minutes), ("--ctx", a.ctx), ("--lr", a.lr),
                        ("--batch", a.batch), ("--micro-batch", a.micro_batch), ("--val-every", a.val_every),
                        ("--lora-rank", a.lora_rank)):
        if value is not None and not value > 0:
            raise TuneError(f"{flag} must be positive, got {value}")
    if not 0 < a.val_fraction < 1:
        raise TuneError(f"--val-fraction must be between 0 and 1, got {a.val_fraction}")
    if Path(a.output).resolve() in (Path(resolve_model(a.model)).resolve(), Path(a.data).resolve()):
        raise TuneError("--output must name a new file, not the model or the data")


def weights_dtype(ckpt: Checkpoint, device: torch.device) -> torch.dtype:
    """fp32 on a CPU; on CUDA the artifact's 16-bit dtype, else (fp32 or quantized files) bf16."""
    if device.type == "cpu":
        return torch.float32
    stored = ckpt.metadata.get("dtype")
    return parse_dtype(stored) if stored in ("float16", "bfloat16") and not ckpt.quant.get("tensors") else torch.bfloat16


def run(a, ranks: Ranks = Ranks()) -> TuneResult:
    """The whole command: read, tune, write (rank 0), score on the quantized model if the base is one."""
    check_args(a)
    device = parse_device(a.device)
    if device.type == "cuda" and ranks.world > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    train, val = load_samples(a.data, default_tokenizer(), a.ctx, a.val_fraction)  # bad data fails before a load
    model_path = resolve_model(a.model)
    ckpt = load_checkpoint(model_path, progress=ranks.is_main)
    cfg = ckpt.config
    quantized = bool(ckpt.quant.get("tensors"))
    dtype = parse_dtype(a.dtype) if a.dtype else weights_dtype(ckpt, device)
    fingerprint = model_fingerprint(cfg, ckpt.tensors)
    tensors = dense_tensors(ckpt, device, dtype)
    net, tunable = build_tuning_net(cfg, tensors, dtype, device, a.method, a.lora_rank, a.lora_alpha, a.seed)
    opts = TuneOptions(method=a.method, steps=a.steps if a.steps or a.minutes else 100, minutes=a.minutes,
                       ctx=a.ctx, lr=a.lr or DEFAULT_LR[a.method], batch=a.batch,
                       micro_batch=a.micro_batch or -(-a.batch // ranks.world), val_every=a.val_every,
                       seed=a.seed, log=ranks.is_main)
    if ranks.is_main:
        print(f"tuning {a.method} of {Path(model_path).name} on {len(train)} windows ({sum(s.targets for s in train):,} "
              f"target tokens), validating on {len(val)}; {ranks.world} rank(s), {device}, weights {dtype}",
              flush=True)
    result = tune(net, tunable, train, val, opts, ranks)
    if ranks.is_main:
        if a.method == "state":
            tuned_state(tunable, fingerprint).save(a.output)
        else:
            write_artifact(a.output, *merged_artifact(tensors, cfg, tunable, merged_dtype(ckpt), result))
    if quantized and a.method == "state" and ranks.is_main:
        del net, tensors
        result.val_loss_quantized = quantized_val_loss(model_path, device, dtype, tunable.state.detach(), val,
                                                       opts.micro_batch)
    if ranks.is_main:
        print(json.dumps({"output": str(a.output), **asdict(result)}), flush=True)
    return result


def quantized_val_loss(model_path, device, dtype, state0, val, micro_batch) -> float:
    """Validation loss of the tuned state on the quantized model as a deployment loads it."""
    m = load(model_path, device=str(device), dtype=dtype)
    return mean_loss(m.net, state0.to(m.device), val, micro_batch, Ranks(), m.device)


def register(sub) -> None:
    p = sub.add_parser("tune", help="state tuning (or LoRA) of a model on your text: a persona in a state file",
                       description="Learn a model's initial state (or LoRA deltas) on a .txt or chat .jsonl file with "
                                   "the weights frozen; write a state file that generate/chat --init-state and serve "
                                   "--init-states load. Several processes: torchrun --nproc-per-node N -m "
                                   "edge_rwkv.tune … (same arguments).")
    add_tune_args(p)
    p.set_defaults(func=cmd_tune)


def cmd_tune(a) -> int:
    run(a)
    return 0


def launched_ranks() -> Ranks:
    """This process's rank when torchrun started it (its RANK / WORLD_SIZE, torch.distributed's convention)."""
    return Ranks(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))


def main(argv=None) -> int:
    """`python -m edge_rwkv.tune …` — the torchrun entry (also runs as a single process)."""
    p = argparse.ArgumentParser(prog="python -m edge_rwkv.tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tune_args(p)
    a = p.parse_args(argv)
    ranks = launched_ranks()
    code = 1
    try:
        if ranks.world > 1:
            if a.device.startswith("cuda"):
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if a.device.startswith("cuda") else "gloo",
                                    timeout=timedelta(seconds=DIST_TIMEOUT_S))
        run(a, ranks)
        code = 0
    except EdgeRWKVError as e:
        print(f"edge-rwkv tune: error: {e}", file=sys.stderr, flush=True)
    except Exception:
        if ranks.world == 1:
            raise
        traceback.print_exc()
    if ranks.world > 1:
        if code:
            sys.stdout.flush()
            os._exit(code)  # skip the process group's teardown: it would wait on a rank that is gone
        dist.destroy_process_group()
    return code

if __name__ == "__main__":
    sys.exit(main())
