"""kill -9 of the daemon, 20 times mid-traffic (chats, forks, deletes): nothing acknowledged is lost, nothing is corrupt.

(State contents against an uninterrupted chat: test_serve_sessions.py's kill test, with a float model.)

The larger run and its figures (docs/RELIABILITY.md): `python benchmarks/kill_daemon.py --kills 100`.
"""
from edge_rwkv.default_model import default_model_path
from edge_rwkv.serve.testing import kill9_durability

KILLS = 20


def test_kill9_durability_default_model(tmp_path):
    figures = kill9_durability(default_model_path(), tmp_path / "data", kills=KILLS, seed=1)
    assert figures["kills"] == KILLS
    assert figures["defects"] == []
    assert figures["session_checks"] == 4 * (KILLS + 1)
    assert figures["turns_acknowledged"] >= KILLS  # every round acknowledged a turn before its kill
