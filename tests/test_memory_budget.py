"""The device-memory budget (edge_rwkv/runtime/memory.py): sizes parse, the prefill chunk shrinks to fit,
and a model that cannot fit is refused with the figures — before anything runs."""
from __future__ import annotations

import subprocess
import sys

import pytest

from edge_rwkv.runtime.memory import DECODE_RESERVE, MemoryBudgetError, parse_size, plan_memory
from edge_rwkv.runtime.sizes import MIN_CHUNK, chunk_cost

GiB = 1 << 30


@pytest.mark.parametrize("text, n", [("4.5G", int(4.5 * GiB)), ("4500M", 4500 << 20), ("4.5GiB", int(4.5 * GiB)),
                                     ("512k", 512 << 10), ("123456", 123456), (" 2 g ", 2 * GiB), (7, 7)])
def test_sizes_parse(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "4.5X", "-1G", "0", "G", "four"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(MemoryBudgetError, match="memory budget"):
        parse_size(text)


def test_the_chunk_is_the_largest_that_fits():
    weights, width, state = 4 * GiB, 4096, 8 << 20
    for budget_gib, chunk in ((6.0, 256), (4.30, 64)):
        plan = plan_memory(int(budget_gib * GiB), weights, width, state, default_chunk=256, scratch=32 << 20)
        assert plan.chunk == chunk
        assert plan.planned <= plan.budget
        # twice the chunk would not have fitted (or the default was reached)
        assert chunk == 256 or plan.planned - plan.chunk_bytes + chunk_cost(2 * chunk, width) > plan.budget
        assert "measured" in plan.describe()


def test_a_model_that_cannot_fit_is_refused_with_the_figures():
    weights, width, state = 4 * GiB, 4096, 8 << 20
    small = weights + DECODE_RESERVE + chunk_cost(MIN_CHUNK, width) - 1
    with pytest.raises(MemoryBudgetError, match=r"does not fit a 4\.\d\d GiB budget: weights 4\.00 GiB"):
        plan_memory(small, weights, width, state, default_chunk=256)
    # too many slots: the message says how many would fit
    budget = weights + DECODE_RESERVE + chunk_cost(MIN_CHUNK, width) + 2 * state * 3
    with pytest.raises(MemoryBudgetError, match="3 slot"):
        plan_memory(budget, weights, width, state, default_chunk=256, slots=8)


def test_cli_refuses_a_budget_off_cuda():
    r = subprocess.run([sys.executable, "-m", "edge_rwkv", "generate", "hi", "--max-tokens", "1", "--max-memory", "1G"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "memory budget applies to a CUDA device" in r.stderr
    assert "Traceback" not in r.stderr
