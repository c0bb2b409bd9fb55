"""`edge-rwkv plan`: the device-fit planner (devices.py) on the command line."""
from __future__ import annotations

import json

from .devices import DEVICES, PRESETS, SERVE_HOT_SESSIONS, SERVE_SLOTS, format_plan, plan_model


def register(sub) -> None:
    p = sub.add_parser("plan", help="which precision of a model fits a device, and its bandwidth-bound speed",
                       description="For each precision (fp16, int8, int4): the memory the daemon needs (weights, "
                                   "states of slots and hot sessions, CUDA context, runtime, allocator slack; the "
                                   "load's peak) against what the module leaves it, and the decode speed: the "
                                   "bound set by memory bandwidth and the range expected from it.")
    p.add_argument("model", help=f"model file (only its shapes are read) or a preset: {', '.join(PRESETS)} "
                                 "(also without the rwkv7- prefix, as bench --preset names them)")
    p.add_argument("--device", default="orin-nano-8gb", help=f"device profile: {', '.join(DEVICES)}")
    p.add_argument("--quantize-head", action="store_true", help="plan with the output head quantized too")
    p.add_argument("--slots", type=int, default=SERVE_SLOTS,
                   help=f"sequences decoded together, serve --max-slots (default {SERVE_SLOTS})")
    p.add_argument("--hot-sessions", type=int, default=SERVE_HOT_SESSIONS,
                   help=f"session states kept in memory, serve --hot-sessions (default {SERVE_HOT_SESSIONS}; "
                        "0 for the Python API)")
    p.add_argument("--visible", type=float, default=None, metavar="GIB",
                   help="memory Linux sees on your module (MemTotal in /proc/meminfo, GiB), instead of the "
                        "profile's estimate")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)


def cmd_plan(a) -> int:
    visible = None if a.visible is None else int(a.visible * (1 << 30))
    result = plan_model(a.model, a.device, slots=a.slots, hot_sessions=a.hot_sessions,
                        quantize_head=a.quantize_head, visible_bytes=visible)
    print(json.dumps(result, indent=2) if a.json else format_plan(result))
    return 0
