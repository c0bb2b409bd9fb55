"""`edge-rwkv` command line. Bad input ends with a one-line error and a non-zero exit code."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
from pathlib import Path

from .errors import EdgeRWKVError, InputError
from .extras import missing_dependency

# Commands living beside their subsystem: each module has `register(subparsers)` and adds its own command(s);
# `edge-rwkv --help` lists them in this order, after the core commands below. A module whose subsystem is not
# installed is left out.
EXTRA_COMMANDS = ("edge_rwkv.quant.cli", "edge_rwkv.export.cli", "edge_rwkv.serve.cli", "edge_rwkv.plan_cli",
                  "edge_rwkv.bench", "edge_rwkv.tune")


# --------------------------------------------------------------------------- shared arguments

def add_model_arg(p: argparse.ArgumentParser, optional: bool = False) -> None:
    if optional:
        p.add_argument("model", nargs="?", default=None, help="model file (default: the embedded default model)")
    else:
        p.add_argument("model", help="model: official .pth, safetensors, an edge-rwkv artifact, or a Hugging Face "
                                     "folder (config.json + safetensors)")


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: float32 on cpu, the artifact's on cuda)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="device-memory budget on cuda, e.g. 4.5G: picks the prefill chunk to stay inside it, or "
                        "refuses with the figures (weights are measured once loaded)")


def add_sampling_args(p: argparse.ArgumentParser, max_tokens=200, temperature=1.0, top_p=0.85) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=top_p)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--penalty-decay", type=float, default=0.996)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def sampling_kwargs(a) -> dict:
    return dict(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                presence_penalty=a.presence_penalty, frequency_penalty=a.frequency_penalty,
                penalty_decay=a.penalty_decay, seed=a.seed, stop=tuple(a.stop or ()))


def load_model(a):
    from .api import load
    from .default_model import resolve_model

    return load(resolve_model(a.model), device=a.device, dtype=a.dtype, progress=True, max_memory=a.max_memory)


# --------------------------------------------------------------------------- info

def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def cmd_info(a) -> int:
    from .checkpoint import hf_shard_files, is_hf_folder, load_checkpoint, sniff_format
    from .default_model import resolve_model

    a.model = resolve_model(a.model)
    if Path(a.model).is_dir() and (Path(a.model) / "manifest.json").is_file():
        from .export.manifest import describe, load_manifest

        print(json.dumps(load_manifest(a.model), indent=2) if a.json else describe(a.model))
        return 0
    hf = is_hf_folder(a.model)
    fmt = "hf" if hf else sniff_format(a.model)
    ckpt = load_checkpoint(a.model, progress=True)
    cfg = ckpt.config
    n_params = parameter_count(cfg)
    stored = sum(t.numel() * t.element_size() for t in ckpt.tensors.values())
    if hf:
        shards = hf_shard_files(a.model)[0]
        kind = f"Hugging Face / fla folder, {len(shards)} safetensors file{'s' if len(shards) > 1 else ''}"
        file_bytes = sum(f.stat().st_size for f in shards)
    else:
        kind = "edge-rwkv artifact" if ckpt.metadata else {"safetensors": "safetensors (official names)"}.get(fmt, "official torch checkpoint")
        file_bytes = os.path.getsize(a.model)
    info = {
        "file": str(a.model), "format": kind, "file_bytes": file_bytes, "stored_tensor_bytes": stored,
        "config": cfg.to_dict(), "n_head": cfg.n_head, "parameters": n_params,
        "bytes_fp32": n_params * 4, "bytes_fp16": n_params * 2,
        "state_bytes_per_sequence": cfg.state_bytes(1),
    }
    if ckpt.metadata:
        info["dtype"] = ckpt.metadata.get("dtype")
        info["source_sha256"] = ckpt.metadata.get("source_sha256")
        q = ckpt.metadata.get("quant") or {}
        info["quant_policy"] = q.get("policy")
        info["quantized_tensors"] = {k: v.get("format") if isinstance(v, dict) else v for k, v in (q.get("tensors") or {}).items()}
        if "default_model" in ckpt.metadata:
            info["default_model"] = ckpt.metadata["default_model"]
        if "training" in ckpt.metadata:
            info["training"] = ckpt.metadata["training"]
    if a.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"file            {info['file']}  ({human_bytes(info['file_bytes'])}, {kind})")
    arch = f"RWKV-7a x070 + DeepEmbed rank {cfg.deep_embed}" if cfg.deep_embed else "RWKV-7 x070"
    print(f"architecture    {arch}: {cfg.n_layer} layers, width {cfg.n_embd}, {cfg.n_head} heads × {cfg.head_size}, "
          f"ffn {cfg.dim_ffn}, vocab {cfg.vocab_size}")
    print(f"LoRA ranks      decay {cfg.decay_lora}, a {cfg.aaa_lora}, v {cfg.mv_lora}, gate {cfg.gate_lora}")
    print(f"parameters      {n_params:,}  (fp32 {human_bytes(n_params * 4)}, fp16 {human_bytes(n_params * 2)}, "
          f"int8 ≈{human_bytes(n_params * 1.03)}, int4 ≈{human_bytes(n_params * 0.53)})")
    print(f"stored          {human_bytes(stored)}" + (f" ({stored / (n_params * 2):.2f}× fp16)" if n_params else ""))
    print(f"state           {human_bytes(cfg.state_bytes(1))} per sequence, whatever the context length")
    if ckpt.metadata:
        print(f"dtype           {info['dtype']}")
        if "default_model" in info:
            d = info["default_model"]
            print(f"model           {d['name']}: trained on {d['trained_on']}; held-out perplexity "
                  f"{d['heldout_ppl']:.1f} ({d['quantization']})")
        qt = info["quantized_tensors"]
        if qt:
            counts: dict[str, int] = {}
            for f in qt.values():
                counts[str(f)] = counts.get(str(f), 0) + 1
            print("quantized       " + ", ".join(f"{n} × {f}" for f, n in sorted(counts.items())))
            if a.tensors:
                for k, f in qt.items():
                    print(f"  {k:40s} {f}")
    return 0


def parameter_count(cfg) -> int:
    """Logical parameters (layer-0 v0/v1/v2 excluded: unused), whatever the storage format."""
    import math

    from .checkpoint import expected_shapes

    return sum(math.prod(shape) for shape in expected_shapes(cfg).values())


# --------------------------------------------------------------------------- convert / init

def cmd_convert(a) -> int:
    from .artifact import make_metadata, write_artifact
    from .checkpoint import HF_WEIGHTS, load_checkpoint, source_sha256, write_hf_folder

    src, dst = Path(a.model), Path(a.output)
    if dst.exists() and dst.resolve() == src.resolve():
        raise EdgeRWKVError("output would overwrite the input; choose another path")
    if a.format == "hf" and dst.exists() and not (dst.is_dir() and not any(dst.iterdir())):
        raise EdgeRWKVError(f"{dst}: already exists; --format hf writes a new folder")
    ckpt = load_checkpoint(src, progress=True)
    if ckpt.metadata.get("quant", {}).get("tensors"):
        raise EdgeRWKVError(f"{src}: already a quantized artifact; convert reads unquantized checkpoints")
    dtype = _target_dtype(a.dtype, ckpt)
    name = str(dtype).replace("torch.", "")
    if a.format == "hf":
        write_hf_folder(dst, ckpt.tensors, ckpt.config, dtype)
        print(f"wrote {dst}/ (config.json + {HF_WEIGHTS}, {human_bytes((dst / HF_WEIGHTS).stat().st_size)}, {name})")
        return 0
    tensors = {k: v.to(dtype) for k, v in ckpt.tensors.items()}
    write_artifact(dst, tensors, make_metadata(ckpt.config, name, source_sha256(src)))
    print(f"wrote {dst} ({human_bytes(dst.stat().st_size)}, {name})")
    return 0


def _target_dtype(name, ckpt):
    import torch

    from .api import parse_dtype

    if name in (None, "keep"):
        dtypes = {t.dtype for t in ckpt.tensors.values() if t.is_floating_point()}
        return dtypes.pop() if len(dtypes) == 1 else torch.float16
    return parse_dtype(name)


def cmd_init(a) -> int:
    from .api import parse_dtype
    from .artifact import make_metadata, write_artifact
    from .checkpoint import derive_config
    from .synthetic import random_checkpoint

    if a.layers < 1 or a.embd < 1 or a.head_size < 1 or a.vocab < 1:
        raise EdgeRWKVError("--layers, --embd, --head-size and --vocab must be positive")
    if a.embd % a.head_size:
        raise EdgeRWKVError(f"--embd {a.embd} must be a multiple of --head-size {a.head_size}")
    dtype = parse_dtype(a.dtype)
    sd = random_checkpoint(a.layers, a.embd, a.head_size, a.vocab, seed=a.seed, dtype=dtype)
    meta = make_metadata(derive_config(sd), str(dtype).replace("torch.", ""))
    meta["random_init"] = {"seed": a.seed}
    write_artifact(a.output, sd, meta)
    print(f"wrote random (untrained) model {a.output}: {a.layers} layers, width {a.embd}")
    return 0


# --------------------------------------------------------------------------- generate / chat

MODEL_SUFFIXES = (".pth", ".safetensors")


def model_and_prompt(args: list[str]) -> tuple[str | None, str]:
    """`[MODEL] PROMPT` → (model, prompt text); PROMPT `-` is read from stdin (without its final newline)."""
    if len(args) > 2:
        raise InputError("generate takes [MODEL] PROMPT; quote a prompt that has spaces")
    if len(args) == 1 and looks_like_model(args[0]):
        raise InputError(f"no prompt: {args[0]} names a model; write `generate {args[0]} PROMPT` "
                         f"(PROMPT - reads it from stdin)")
    model, prompt = ([None] + args)[-2:]
    if prompt == "-":
        prompt = sys.stdin.read().removesuffix("\n")
    return model, prompt


def looks_like_model(arg: str) -> bool:
    """An existing file, or a file name of a model (a prompt about one has spaces)."""
    named_like_one = arg.lower().endswith(MODEL_SUFFIXES) and not any(c.isspace() for c in arg)
    return named_like_one or os.path.isfile(arg)  # os.path.isfile: a prompt too long for a path is no error


def cmd_generate(a) -> int:
    a.model, a.prompt = model_and_prompt(a.model_and_prompt)
    if a.state_in and a.init_state:
        raise EdgeRWKVError("--state-in and --init-state both give the starting state; use one")
    m = load_model(a)
    state = m.load_state(a.state_in) if a.state_in else m.initial_state(a.init_state) if a.init_state else None
    gen = m.stream(a.prompt, state=state, **sampling_kwargs(a))
    out = sys.stdout
    for piece in gen:
        out.write(piece)
        out.flush()
    out.write("\n")
    if a.state_out:
        gen.state.save(a.state_out)
        print(f"[state saved to {a.state_out}: {gen.state.tokens} tokens in {human_bytes(gen.state.nbytes)}]", file=sys.stderr)
    return 0


CHAT_HELP = "commands: /save PATH  /load PATH  /reset  /quit"


def cmd_chat(a) -> int:
    if a.init_state and (a.state_in or a.system):
        raise EdgeRWKVError("--init-state sets the starting state (a tuned persona); it does not combine with "
                            "--state-in or --system")
    m = load_model(a)
    initial = m.initial_state(a.init_state) if a.init_state else None
    chat = m.chat(system=a.system, state=initial, **sampling_kwargs(a))
    if a.state_in:
        chat.load(a.state_in)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"edge-rwkv chat — {CHAT_HELP}  (Ctrl-C stops a reply, Ctrl-D leaves)", file=sys.stderr)
    with line_editing(a.history) if interactive else contextlib.nullcontext():
        while True:
            try:
                line = read_line(interactive)
            except KeyboardInterrupt:
                if not interactive:
                    raise
                print("\n[the line was dropped; Ctrl-D or /quit leaves the chat]", file=sys.stderr)
                continue
            if line is None:
                break
            if not line.strip():
                continue
            if line.startswith("/"):
                if not chat_command(chat, line, initial):
                    break
                continue
            stream_reply(chat, line)
    return 0


def read_line(interactive: bool) -> str | None:
    """The next line the user typed (None at the end of input), with line editing on a terminal."""
    if not interactive:
        line = sys.stdin.readline()
        return line.rstrip("\n") if line else None
    try:
        if sys.stdout.isatty():
            return input("User: ")  # readline draws the prompt, so editing keys redraw it
        print("User: ", end="", flush=True, file=sys.stderr)  # stdout is redirected: keep the prompt out of it
        return input()
    except EOFError:
        print(file=sys.stderr)
        return None


def stream_reply(chat, line: str) -> None:
    """Print the reply as it streams. Ctrl-C stops it, and the conversation goes on from before this message:
    a half-written reply is not part of it, so the next message is answered as if this one was never sent."""
    before = chat.state.clone() if chat.state is not None else None
    print("Assistant: ", end="", flush=True)
    pieces = chat.send(line)
    try:
        for piece in pieces:
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        pieces.close()
        chat.state = before
        print("\n", flush=True)
        print("[reply stopped; this message and its reply are not part of the conversation]", file=sys.stderr)
        return
    print("\n", flush=True)


def chat_history_path() -> str:
    from .serve.cli import default_data_dir

    return os.path.join(default_data_dir(), "chat_history")


@contextlib.contextmanager
def line_editing(history: str):
    """readline's line editing where the platform has it, with the lines typed kept in `history` ("" keeps none)."""
    try:
        import readline
    except ImportError:  # a Python built without readline: plain line input
        yield
        return
    if history:
        with contextlib.suppress(OSError):
            readline.read_history_file(history)
        readline.set_history_length(1000)
    try:
        yield
    finally:
        if history:
            save_history(readline, history)


def save_history(readline, path: str) -> None:
    """Write the history privately (it is the user's side of their conversations); a failure costs only it."""
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        readline.write_history_file(path)
        os.chmod(path, 0o600)
    except OSError as e:
        print(f"edge-rwkv: warning: chat history not saved to {path}: {e}", file=sys.stderr)


def chat_command(chat, line: str, initial=None) -> bool:
    """Run a /command; False means quit. Errors are reported and the chat goes on.
    `/reset` returns to `initial` (the --init-state) when there is one."""
    cmd, _, arg = line.partition(" ")
    arg = arg.strip()
    try:
        if cmd in ("/quit", "/exit"):
            return False
        if cmd == "/reset":
            chat.reset()
            if initial is not None:
                chat.state = initial.clone()
            print("[conversation reset]", file=sys.stderr)
        elif cmd in ("/save", "/load"):
            if not arg:
                print(f"[{cmd} needs a file path]", file=sys.stderr)
            elif cmd == "/save":
                chat.save(arg)
                print(f"[saved {human_bytes(chat.state.nbytes)} state to {arg}]", file=sys.stderr)
            else:
                chat.load(arg)
                print(f"[loaded state from {arg}]", file=sys.stderr)
        else:
            print(f"[unknown command {cmd}; {CHAT_HELP}]", file=sys.stderr)
    except EdgeRWKVError as e:
        print(f"[error: {e}]", file=sys.stderr)
    return True


# --------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="edge-rwkv", description="Quantized edge inference for RWKV-7 language models.")
    p.add_argument("--version", action="version", version=f"edge-rwkv {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("info", help="describe a model file or an export folder",
                       description="Show config, sizes, precision and state size of a model file, "
                                   "or the graphs of an `edge-rwkv export` folder.")
    add_model_arg(s, optional=True)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--tensors", action="store_true", help="list per-tensor quantization formats")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("convert", help="convert a checkpoint to an edge-rwkv artifact or a Hugging Face folder",
                       description="Read an official .pth (without unpickling code), a safetensors checkpoint or a "
                                   "Hugging Face / fla folder, validate it, and write an edge-rwkv artifact that devices "
                                   "and the daemon load without pickle (or, with --format hf, a folder in the fla "
                                   "layout that transformers + flash-linear-attention load).")
    add_model_arg(s)
    s.add_argument("-o", "--output", required=True, help="output .safetensors path (a new folder with --format hf)")
    s.add_argument("--format", choices=("artifact", "hf"), default="artifact",
                   help="artifact (default): one edge-rwkv safetensors file; hf: config.json + model.safetensors")
    s.add_argument("--dtype", default="keep", help="keep (default), float16, bfloat16 or float32")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("init", help="write a random (untrained) model in the official layout",
                       description="Make a random RWKV-7 model, e.g. to try the runtime without a download.")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--layers", type=int, default=2)
    s.add_argument("--embd", type=int, default=128)
    s.add_argument("--head-size", type=int, default=64)
    s.add_argument("--vocab", type=int, default=65536)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dtype", default="float32")
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("generate", help="complete a prompt, streaming the text",
                       description="Complete a prompt, streaming tokens to stdout: `generate [MODEL] PROMPT` "
                                   "(without MODEL, the embedded default model; PROMPT - reads the prompt "
                                   "from stdin).")
    s.add_argument("model_and_prompt", nargs="+", metavar="[MODEL] PROMPT")
    add_runtime_args(s)
    add_sampling_args(s)
    s.add_argument("--state-in", help="continue from a saved state file")
    s.add_argument("--init-state", help="start from a tuned initial state: an RWKV-PEFT state-tuning file "
                                        "(blocks.N.att.time_state) or an edge-rwkv state file")
    s.add_argument("--state-out", help="save the final state here")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("chat", help="interactive chat (reads lines from stdin)", description=f"Interactive chat. {CHAT_HELP}")
    add_model_arg(s, optional=True)
    add_runtime_args(s)
    add_sampling_args(s, max_tokens=500, temperature=1.0, top_p=0.3)
    s.add_argument("--system", default=None, help="system prompt for the first turn")
    s.add_argument("--state-in", help="resume a conversation from a saved state file")
    s.add_argument("--init-state", help="start (and /reset) from a tuned initial state: an RWKV-PEFT state-tuning "
                                        "file or an edge-rwkv state file")
    s.add_argument("--history", default=chat_history_path(),
                   help="where the lines typed at the prompt are kept for the arrow keys (default: %(default)s; "
                        "'' keeps none)")
    s.set_defaults(func=cmd_chat)

    for mod in EXTRA_COMMANDS:
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name and mod.startswith(e.name):  # the subsystem itself is absent; anything else is a bug
                continue
            raise
        module.register(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader that went away shows here, not in the interpreter's exit
        return status
    except EdgeRWKVError as e:
        if args.debug:
            raise
        return report(e)
    except ModuleNotFoundError as e:
        missing = missing_dependency(args.command, e.name or "")
        if missing is None or args.debug:  # not an optional dependency: a bug, shown in full
            raise
        return report(missing)
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return quiet_broken_pipe()
    except (OSError, ValueError) as e:
        if args.debug:
            raise
        return report(e)


def report(e: Exception) -> int:
    print(f"edge-rwkv: error: {e}", file=sys.stderr)
    return 1


def quiet_broken_pipe() -> int:
    """The reader of stdout went away (`edge-rwkv info | head`): end quietly, as a command killed by SIGPIPE.

    stdout is pointed at /dev/null so the interpreter's final flush finds nowhere to fail."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + 13  # 128 + SIGPIPE, the status `yes | head` leaves


if __name__ == "__main__":
    sys.exit(main())
