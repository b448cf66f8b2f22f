"""A plain-Python reference of the append script's rules (``broker/lua/append.lua``).

The script is the broker's idempotency: which incoming point is appended, a duplicate, a
conflict, changed or out of order, what is trimmed and when the reference is taken. Its
Lua is held against this reference on random streams (tests/integration/
test_state_guarantees.py), so the rules are written twice on purpose: once fast, once
plainly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from broker import state as st


@dataclass
class RefEvent:
    records: list = field(default_factory=list)   # (t, id, mag, err, band) of the stored points
    n_total: int = 0
    n_dropped: int = 0
    n_scored: int = 0
    max_id: int = 0
    reference: Optional[float] = None
    triggered: bool = False

    @property
    def last_time(self) -> Optional[float]:
        return self.records[-1][0] if self.records else None


def _same_content(a, b) -> bool:
    return abs(float(a[2]) - float(b[2])) <= 1e-5 and abs(float(a[3]) - float(b[3])) <= 1e-5 and a[4] == b[4]


def append(ev: RefEvent, points: list, *, k: int, rf: int, max_points: int, exact_limit: int,
           m: int) -> bytes:
    """Apply one script call's points (t, id, mag, err, band; float32 mag/err) to ``ev``;
    the status codes. Mirrors the Lua rule by rule."""
    codes = []
    old_last = ev.last_time
    new: list = []
    for p in points:
        t, sid = p[0], p[1]
        last = new[-1][0] if new else old_last
        same = None
        if last is not None and t <= last:
            pool = new if (old_last is None or t > old_last) else ev.records
            same = next((r for r in pool if r[0] == t), None)
        if same is not None:
            codes.append(st.CONFLICT if same[1] != sid else
                         st.DUPLICATE if _same_content(same, p) else st.CHANGED)
        elif sid <= ev.max_id and any(r[1] == sid for r in ev.records + new):
            codes.append(st.CHANGED)
        elif last is None or t > last:
            new.append(tuple(p))
            ev.max_id = max(ev.max_id, sid)
            codes.append(st.APPENDED)
        elif ev.n_dropped > 0 and ev.records and t < ev.records[0][0]:
            codes.append(st.DUPLICATE_UNVERIFIED)
        else:
            codes.append(st.OUT_OF_ORDER)
    nst = len(ev.records)
    if ev.reference is None and ev.n_dropped == 0 and nst + len(new) >= k:
        mags = sorted(float(r[2]) for r in (ev.records + new)[:k])
        ev.reference = mags[(k - 1) // 2] if k % 2 else (mags[k // 2 - 1] + mags[k // 2]) / 2
    if new:
        slack = max(16, max_points // 8)
        total = nst + len(new)
        small = st.header_size(m) + total * st.RECORD.itemsize <= exact_limit
        drop = 0
        if total > max_points + slack or (small and total > max_points):
            lim = ev.n_scored - rf
            if lim < k:
                lim = 0
            drop = max(0, min(total - max_points, lim - ev.n_dropped))
        ev.records = (ev.records + new)[drop:]
        ev.n_dropped += drop
        ev.n_total += len(new)
    return b"".join(codes)


def stored(view) -> list:
    """The stored points of a ``broker.state.EventView`` as the reference holds them."""
    return [(float(r["t"]), int(r["id"]), np.float32(r["mag"]), np.float32(r["err"]), int(r["band"]))
            for r in view.points]
