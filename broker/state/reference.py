"""A plain-Python reference of the append and score scripts' rules (``lua/append.lua``,
``lua/score.lua``).

The scripts are the broker's idempotency: which incoming point is appended, a duplicate,
skipped history, a conflict, changed or out of order; what is trimmed; when a band's
reference is taken; where the scoring window starts; which scores are stored and whether
a trigger is new. The Lua is held against this reference on seeded random streams
(tests/integration/test_state_guarantees.py), so the rules are written twice on purpose:
once fast, once plainly. Nothing in the broker's hot path calls this module.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from broker.state import layout as L


@dataclass
class RefEvent:
    records: list = field(default_factory=list)   # (t, id, mag, err, band byte) of the stored points
    n_total: int = 0
    n_dropped: int = 0
    n_scored: int = 0
    max_id: int = 0
    references: list = field(default_factory=lambda: [None] * L.N_SLOTS)
    band_counts: list = field(default_factory=lambda: [0] * L.N_SLOTS)
    triggered: bool = False
    probs: dict = field(default_factory=dict)    # global index -> stored P byte

    @property
    def last_time(self) -> Optional[float]:
        return self.records[-1][0] if self.records else None


def _same_content(a, b) -> bool:
    return abs(float(a[2]) - float(b[2])) <= 1e-5 and abs(float(a[3]) - float(b[3])) <= 1e-5 and a[4] == b[4]


def _median(vals: list) -> float:
    v = sorted(float(x) for x in vals)
    c = len(v)
    return v[(c - 1) // 2] if c % 2 else (v[c // 2 - 1] + v[c // 2]) / 2


def append(ev: RefEvent, points: list, *, k: int, rf: int, max_points: int, exact_limit: int,
           m: int) -> bytes:
    """Apply one script call's points (t, id, mag, err, band[, kind]; float32 mag/err) to
    ``ev``; the status codes. Mirrors the Lua rule by rule."""
    codes = []
    old_last = ev.last_time
    new: list = []
    for p in points:
        t, sid = p[0], p[1]
        kind = p[5] if len(p) > 5 else L.KIND_LIVE
        last = new[-1][0] if new else old_last
        if kind == L.KIND_HISTORY and last is not None and t <= last:
            codes.append(L.HISTORY)
            continue
        same = None
        if last is not None and t <= last:
            pool = new if (old_last is None or t > old_last) else ev.records
            same = next((r for r in pool if r[0] == t), None)
        if same is not None:
            codes.append(L.CONFLICT if same[1] != sid else
                         L.DUPLICATE if _same_content(same, p) else L.CHANGED)
        elif sid <= ev.max_id and any(r[1] == sid for r in ev.records + new):
            codes.append(L.CHANGED)
        elif last is None or t > last:
            new.append(tuple(p[:5]))
            ev.max_id = max(ev.max_id, sid)
            s = L.band_slot(p[4])
            ev.band_counts[s] = min(ev.band_counts[s] + 1, L.COUNT_MAX)
            codes.append(L.APPENDED)
        elif ev.n_dropped > 0 and ev.records and t < ev.records[0][0]:
            codes.append(L.DUPLICATE_UNVERIFIED)
        else:
            codes.append(L.OUT_OF_ORDER)
    for s in range(L.N_SLOTS):
        if ev.references[s] is None and ev.band_counts[s] >= k:
            mags = [r[2] for r in ev.records + new if L.band_slot(r[4]) == s][:k]
            if mags:
                ev.references[s] = _median(mags)
    if new:
        slack = max(16, max_points // 8)
        nst = len(ev.records)
        total = nst + len(new)
        small = L.header_size(m) + total * L.RECORD.itemsize <= exact_limit
        drop = 0
        if total > max_points + slack or (small and total > max_points):
            lim = ev.n_scored - rf
            if lim < k:
                lim = 0
            drop = max(0, min(total - max_points, lim - ev.n_dropped))
        ev.records = (ev.records + new)[drop:]
        for g in range(ev.n_dropped, ev.n_dropped + drop):
            ev.probs.pop(g, None)
        ev.n_dropped += drop
        ev.n_total += len(new)
    return b"".join(codes)


def window_start(ev: RefEvent, *, k: int, rf: int) -> int:
    """Global index of the first point the append script returns for scoring (``n_total``
    when every point is scored). A tail window (start > first stored) is scored with the
    bands' fixed references, so every band in its rows (start+1 ..) needs a reference that
    holds for all of them: each row at least the band's K-th point. Else the window is the
    whole stored event."""
    first = ev.n_dropped
    if ev.n_scored >= ev.n_total:
        return ev.n_total
    s0 = max(first, ev.n_scored - rf)
    if s0 > first:
        rows = ev.records[s0 - first + 1:]
        inrow = [0] * L.N_SLOTS
        for r in rows:
            inrow[L.band_slot(r[4])] += 1
        for s in range(L.N_SLOTS):
            if inrow[s] and (ev.references[s] is None or ev.band_counts[s] - inrow[s] < k - 1):
                return first
    return s0


def score(ev: RefEvent, old: int, probs: list, fire: bool) -> str:
    """The score script's rule for one event's update (old n_scored, quantized P bytes,
    whether the rule fired; the outbox taken as empty): N, T, D, A or C."""
    u = len(probs)
    if ev.n_scored < old or old + u > ev.n_total:
        return L.TRIG_CONFLICT
    if ev.n_scored >= old + u:
        return L.TRIG_ALREADY
    for j in range(ev.n_scored - old, u):
        g = old + j
        if g >= ev.n_dropped:
            ev.probs[g] = probs[j]
    ev.n_scored = old + u
    if not fire:
        return L.TRIG_NONE
    if ev.triggered:
        return L.TRIG_DONE
    ev.triggered = True
    return L.TRIG_NEW


def stored(view) -> list:
    """The stored points of a ``broker.state.EventView`` as the reference holds them."""
    return [(float(r["t"]), int(r["id"]), np.float32(r["mag"]), np.float32(r["err"]), int(r["band"]))
            for r in view.points]
