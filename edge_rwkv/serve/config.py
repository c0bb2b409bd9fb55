"""The daemon's settings (from `edge-rwkv serve`'s flags) and the named initial states it starts from."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EdgeRWKVError
from . import protocol as P


@dataclass
class ServeConfig:
    data_dir: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_slots: int = 4
    queue: int = 16
    cors_origins: list[str] = field(default_factory=list)
    max_tokens_limit: int = 2048
    max_prompt_tokens: int = 8192
    max_body_bytes: int = 1 << 20
    default_max_tokens: int = 256
    default_top_p: float = 0.85
    hot_sessions: int = 64
    prefill_budget: int | None = 128  # prompt tokens read per engine step, so decoding streams keep flowing
    prefix_cache_bytes: int = 256 << 20  # host memory for states of known prompt prefixes
    model_name: str | None = None
    allowed_hosts: list[str] = field(default_factory=list)
    init_states_dir: str | None = None  # folder of named initial states (state-tuning or edge-rwkv state files)
    max_sessions: int | None = 10000
    body_timeout: float = 10.0  # seconds to send a whole request body


INIT_STATE_SUFFIXES = (".pth", ".pt", ".safetensors", ".state")


def load_initial_states(model, folder: str | None) -> dict:
    """name (file stem) → State for every state file in `folder`; a bad file stops the daemon at start."""
    if folder is None:
        return {}
    d = Path(folder)
    if not d.is_dir():
        raise EdgeRWKVError(f"{d}: --init-states must be a folder of state files")
    states = {}
    for f in sorted(d.iterdir()):
        if f.is_file() and f.suffix in INIT_STATE_SUFFIXES:
            if not P.STATE_NAME.fullmatch(f.stem):
                raise EdgeRWKVError(f"{f}: initial state names are letters, digits, '_' or '-' (rename the file)")
            if f.stem in states:
                raise EdgeRWKVError(f"{d}: two files are named {f.stem!r}")
            states[f.stem] = model.initial_state(f)
    return states
