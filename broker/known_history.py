"""History the state has, left out before it goes to Redis.

A Rubin packet repeats a year of its object's history (``prvDiaSources``,
``prvDiaForcedSources``): in the ``lsst`` profile's median packet 84 points, of which the
broker needs the few since the event's previous alert. The append script skips a history
point at or before the event's newest stored time (``HISTORY``, broker/state/store.py);
this does the same in the consumer for the events it appended to itself, with the newest
time each append returned, so that Redis is sent only the points it would keep.

It is exact while the process's memory agrees with Redis: every appended point makes the
event's newest time later, never earlier, whoever appends it. The memory is forgotten
whenever that could stop being true or cheap: on a partition assignment or revocation (an
event may have been given to another member meanwhile, which cannot make its newest time
earlier, but costs nothing to forget), after any retried fault (a Redis that restarted may
have lost what it acknowledged last), and when it holds ``max_events`` events (one float a
event; the next packets then send their history again, and the script skips it).
"""
from __future__ import annotations

import numpy as np

from broker import state as st


class KnownHistory:
    def __init__(self, max_events: int = 1_000_000):
        self.max_events = int(max_events)
        self._newest: dict[int, float] = {}

    def __len__(self) -> int:
        return len(self._newest)

    def forget(self) -> None:
        self._newest.clear()

    def unknown(self, object_id: np.ndarray, time: np.ndarray, kind) -> "np.ndarray | None":
        """Mask of the points to send: all but the history points at or before their
        event's newest time known here; None when every point goes."""
        if kind is None or not self._newest:
            return None
        hist = np.flatnonzero(kind == st.KIND_HISTORY)
        if not len(hist):
            return None
        ids, inverse = np.unique(object_id[hist], return_inverse=True)
        get = self._newest.get
        newest = np.fromiter((get(o, -np.inf) for o in ids.tolist()), dtype=np.float64, count=len(ids))
        known = time[hist] <= newest[inverse]
        if not known.any():
            return None
        send = np.ones(len(time), dtype=bool)
        send[hist[known]] = False
        return send

    def learn(self, results) -> None:
        """The newest stored time of each event of an append's results."""
        if len(self._newest) + len(results) > self.max_events:
            self._newest.clear()
        for res in results:
            t = res.header.last_time
            if t is not None:
                self._newest[res.object_id] = t
