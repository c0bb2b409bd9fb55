"""`edge-rwkv serve`: the offline assistant daemon on the command line."""
from __future__ import annotations

import errno
import os
import socket
import sys

from ..errors import EdgeRWKVError


def default_data_dir() -> str:
    base = os.path.expanduser("~/.local/share")
    return os.path.join(base, "edge-rwkv")


def register(sub) -> None:
    s = sub.add_parser("serve", help="run the offline assistant daemon (OpenAI-compatible HTTP + web chat)",
                       description="Serve a model over OpenAI-compatible HTTP on 127.0.0.1 with durable chat "
                                   "sessions (each conversation is a state file under --data-dir) and a web chat "
                                   "page at /.")
    s.add_argument("model", nargs="?", default=None,
                   help="model: official .pth, safetensors, an edge-rwkv artifact or a Hugging Face folder "
                        "(default: the embedded model)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--data-dir", default=None, help=f"where sessions are kept (default {default_data_dir()})")
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (also read from the file given as @PATH); "
                        "needed to listen beyond loopback")
    s.add_argument("--insecure-no-auth", action="store_true",
                   help="allow listening beyond loopback without --api-key (anyone who reaches the port can use "
                        "the model and read every session)")
    s.add_argument("--max-slots", type=int, default=4, help="sequences decoded together (batch size)")
    s.add_argument("--queue", type=int, default=16, help="requests that may wait for a slot; more get 429")
    s.add_argument("--cors-origin", action="append", default=None,
                   help="allow browser requests from this origin (repeatable; default: none)")
    s.add_argument("--allowed-host", action="append", default=None,
                   help="extra Host-header name accepted while bound to loopback (repeatable)")
    s.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    s.add_argument("--dtype", default=None, help="float32, float16 or bfloat16")
    s.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="device-memory budget on cuda, e.g. 4.5G: the weights, --max-slots states and a prefill "
                        "chunk must fit (the chunk is picked to); otherwise the daemon refuses to start")
    s.add_argument("--max-tokens-limit", type=int, default=2048, help="largest max_tokens a request may ask for")
    s.add_argument("--max-prompt-tokens", type=int, default=8192, help="longest prompt (new tokens per request)")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    s.add_argument("--default-max-tokens", type=int, default=256)
    s.add_argument("--hot-sessions", type=int, default=64, help="session states kept in memory")
    s.add_argument("--prefill-budget", type=int, default=128,
                   help="prompt tokens read per decode step while other streams decode (default 128)")
    s.add_argument("--prefix-cache-mb", type=int, default=256,
                   help="host memory for states of recently read prompt prefixes (0: off; default 256)")
    s.add_argument("--max-sessions", type=int, default=10000, help="sessions kept on disk; creating more gets 409")
    s.add_argument("--body-timeout", type=float, default=10.0, help="seconds a client has to send a request body")
    s.add_argument("--model-name", default=None, help="model id reported by /v1/models (default: file name)")
    s.add_argument("--init-states", default=None, metavar="DIR",
                   help="folder of named initial states (RWKV-PEFT state-tuning or edge-rwkv state files; the file "
                        "name without suffix is the name a request gives as \"initial_state\")")
    s.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(func=cmd_serve)


def _read_key(value: str | None) -> str | None:
    if value and value.startswith("@"):
        with open(value[1:], encoding="utf-8") as f:
            value = f.read().strip()
    if value is not None and not value:
        raise EdgeRWKVError("--api-key is empty")
    from .guard import check_api_key

    check_api_key(value)
    return value


def cmd_serve(a) -> int:
    import uvicorn

    from ..api import load
    from ..default_model import resolve_model
    from .app import create_app
    from .config import ServeConfig
    from .guard import is_loopback
    from .httpproto import JSONErrorH11Protocol

    for name in ("max_slots", "max_tokens_limit", "max_prompt_tokens", "max_body_bytes", "default_max_tokens",
                 "prefill_budget", "max_sessions"):
        if getattr(a, name) < 1:
            raise EdgeRWKVError(f"--{name.replace('_', '-')} must be ≥ 1")
    if a.queue < 0 or not 0 <= a.port < 65536:
        raise EdgeRWKVError("--queue must be ≥ 0 and --port in [0, 65535]")
    if a.prefix_cache_mb < 0:
        raise EdgeRWKVError("--prefix-cache-mb must be ≥ 0")
    if not 0 < a.body_timeout <= 3600:
        raise EdgeRWKVError("--body-timeout must be in (0, 3600] seconds")
    key = _read_key(a.api_key)
    if not is_loopback(a.host) and not key:
        if not a.insecure_no_auth:
            raise EdgeRWKVError(f"listening on {a.host} needs --api-key (or --insecure-no-auth to let anyone who can "
                                f"reach this machine use the model and read every session)")
        print(f"edge-rwkv: warning: listening on {a.host} without --api-key: anyone who can reach this "
              f"machine can use the model and read sessions", file=sys.stderr)
    sock = listen_socket(a.host, a.port)  # before the model loads: a busy port fails at once
    try:
        data_dir = a.data_dir or default_data_dir()
        lock = lock_data_dir(data_dir)  # held until the process ends (kill -9 included)
        model = load(resolve_model(a.model), device=a.device, dtype=a.dtype, max_memory=a.max_memory,
                     slots=a.max_slots)
        cfg = ServeConfig(data_dir=data_dir, host=a.host, port=a.port, api_key=key,
                          max_slots=a.max_slots, queue=a.queue, cors_origins=a.cors_origin or [],
                          max_tokens_limit=a.max_tokens_limit, max_prompt_tokens=a.max_prompt_tokens,
                          max_body_bytes=a.max_body_bytes, default_max_tokens=a.default_max_tokens,
                          hot_sessions=a.hot_sessions, model_name=a.model_name, allowed_hosts=a.allowed_host or [],
                          prefill_budget=a.prefill_budget, prefix_cache_bytes=a.prefix_cache_mb << 20,
                          init_states_dir=a.init_states, max_sessions=a.max_sessions, body_timeout=a.body_timeout)
        app = create_app(model, cfg)
        print(f"edge-rwkv serve: {model.path} on http://{address(a.host, sock.getsockname()[1])}  (sessions in "
              f"{cfg.data_dir}, {cfg.max_slots} slots, wkv {model.wkv_backend})", file=sys.stderr, flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level=a.log_level, http=JSONErrorH11Protocol,
                                               access_log=a.log_level in ("info", "debug"), timeout_graceful_shutdown=3))
        server.run(sockets=[sock])
    finally:
        sock.close()
    lock.close()
    return 0


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen_socket(host: str, port: int) -> socket.socket:
    """The daemon's bound socket (handed to uvicorn), or a one-line error saying why the address is refused."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    # as uvicorn does: a restart may rebind while the last run's connections sit in TIME_WAIT
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise EdgeRWKVError(f"cannot listen on {address(host, port)}: the port is in use (another server "
                                f"is running there; choose another --port)") from None
        raise EdgeRWKVError(f"cannot listen on {address(host, port)}: {e.strerror or e}") from None
    return sock


def lock_data_dir(data_dir: str):
    """One daemon per data folder: a second one would race the first on the same session files."""
    os.makedirs(data_dir, mode=0o700, exist_ok=True)  # sessions are private (the folder is made 0700)
    f = open(os.open(os.path.join(data_dir, ".lock"), os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600), "a+")
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock
        return f
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise EdgeRWKVError(f"another edge-rwkv serve is already using {data_dir} (choose another --data-dir)") from None
    return f

