"""Progress bars for long work (shown on a terminal, silent in pipes and tests)."""
from __future__ import annotations

import sys

from tqdm import tqdm


def progress_iter(items, desc: str, enabled: bool = True, total: int | None = None, unit: str = "it"):
    if not enabled:
        return items
    return tqdm(items, desc=desc, total=total, unit=unit, leave=False, file=sys.stderr, disable=None)
