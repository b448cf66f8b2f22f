"""broker.known_history: history the state has is left out before Redis (pure logic)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from broker import state as st
from broker.known_history import KnownHistory

H, L = st.KIND_HISTORY, st.KIND_LIVE


def result(oid, last_time):
    return SimpleNamespace(object_id=oid, header=SimpleNamespace(last_time=last_time))


def test_only_history_at_or_before_the_newest_known_time_is_left_out():
    k = KnownHistory()
    oid = np.array([1, 1, 1, 2, 2, 3], dtype=np.int64)
    t = np.array([10.0, 20.0, 25.0, 5.0, 30.0, 1.0])
    kind = np.array([H, H, L, H, H, H], dtype=np.uint8)
    assert k.unknown(oid, t, kind) is None            # nothing known yet: everything goes
    k.learn([result(1, 20.0), result(2, 4.0), result(4, None)])
    send = k.unknown(oid, t, kind)
    # event 1: history at 10 and 20 (= its newest time) is stored; its live point always goes
    assert send.tolist() == [False, False, True, True, True, True]
    assert k.unknown(oid, t, None) is None             # a compact stream has no history


def test_the_memory_is_forgotten_and_bounded():
    k = KnownHistory(max_events=3)
    k.learn([result(1, 5.0), result(2, 5.0)])
    assert len(k) == 2
    k.learn([result(3, 5.0), result(4, 5.0)])          # would hold 4 > 3: starts again
    assert len(k) == 2
    k.forget()
    assert len(k) == 0
    assert k.unknown(np.array([3]), np.array([1.0]), np.array([H], np.uint8)) is None
