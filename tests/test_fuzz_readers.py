"""Every file reader under a few thousand seeded mutations: a one-line refusal or a faithful read, nothing else.

The larger run (and the figures in docs/RELIABILITY.md): `python benchmarks/fuzz_readers.py --count 15000`.
"""
import random
import warnings

import pytest

from edge_rwkv import fuzz

PER_READER = 700  # 3,500 mutations in all
TIME_LIMIT_S = 50  # shared by the readers; a slow machine runs fewer, never longer


def test_fuzz_every_reader_no_defects(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about the pickle protocol of mutated .pth files
        reports = fuzz.run(count=PER_READER, seed=20261201, time_limit=TIME_LIMIT_S, folder=tmp_path)
    print("\n" + fuzz.format_reports(reports))
    assert [r.reader for r in reports] == list(fuzz.READERS)
    for r in reports:
        assert r.tried >= 100, r.as_dict()  # the time limit still leaves a real sample per reader
        assert r.defects == [], fuzz.format_reports([r])
        assert r.refused > r.tried // 2  # the mutations do damage: most files are refused
    assert sum(r.tried for r in reports) >= 1000


def test_mutations_are_reproducible_and_varied():
    a = [fuzz.case("state", 7, i) for i in range(20)]
    assert a == [fuzz.case("state", 7, i) for i in range(20)]
    assert len(set(a)) >= 18
    seed = fuzz.seed_bytes("state")
    rng = random.Random(1)
    kinds = {len(m) == len(seed) for m in (fuzz.mutate(seed, "state", rng) for _ in range(200))}
    assert kinds == {True, False}  # both in-place damage and size changes


@pytest.mark.parametrize("reader", fuzz.READERS)
def test_seed_file_reads_back(reader, tmp_path):
    p = tmp_path / "seed.bin"
    p.write_bytes(fuzz.seed_bytes(reader))
    assert fuzz.check_case(reader, p, fuzz.read(reader, p)) == ("read", "")
