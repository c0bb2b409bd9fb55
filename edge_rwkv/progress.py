"""Terminal output of long work: progress bars (shown on a terminal, silent in pipes and tests) and sizes."""
from __future__ import annotations

import sys

from tqdm import tqdm


def progress_iter(items, desc: str, enabled: bool = True, total: int | None = None, unit: str = "it"):
    if not enabled:
        return items
    return tqdm(items, desc=desc, total=total, unit=unit, leave=False, file=sys.stderr, disable=None)


def human_bytes(n: float) -> str:
    """A byte count for a line of output, in steps of 1024: "1.5 GB"."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)
