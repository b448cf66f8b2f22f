"""The flood guard: stop before a night of alerts goes to the dead-letter topic.

One bad message is a dead letter; most of the stream dead-lettered for one reason is a
change upstream (a producer's schema upgrade: every message ``unknown_schema_id``; a
replay placed in the future: every point ``future_time``). Dead-lettering and committing
it would leave the operator to notice in the morning, with the night's alerts only in the
dead-letter topic. When one reason takes at least ``share`` of the last ``window``
messages, the consumer stops before it commits (or dead-letters) the batch that crossed
the line, with an error that names the reason; fixed upstream, a restart re-reads it.
Pure bookkeeping, no I/O: :meth:`FloodGuard.check` judges a batch, :meth:`FloodGuard.add`
counts it once it is committed (a batch retried after a fault is counted once).
"""
from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from typing import Optional

from broker.errors import BrokerError


class DeadLetterFlood(BrokerError):
    """One dead-letter reason took over the stream (exit 3: bad input)."""


@dataclass(frozen=True)
class Flood:
    reason: str
    count: int
    total: int
    share: float
    window: int

    def error(self, example: str) -> DeadLetterFlood:
        return DeadLetterFlood(
            f"stopping: {self.count} of the last {self.total} messages were dead letters with reason "
            f"{self.reason!r} (consumer.flood_share {self.share:g} of consumer.flood_window "
            f"{self.window}), e.g. {example[:300]}. The batch that crossed the line is neither "
            "dead-lettered nor committed: fix the stream (a producer's schema upgrade? a replay in "
            "the future?) and start the consumer again, which re-reads it; consumer.flood_window 0 "
            "dead-letters such a stream instead")


class FloodGuard:
    """Counts of dead-letter reasons over the last ``window`` messages (whole batches)."""

    def __init__(self, window: int, share: float):
        self.window = int(window)
        self.share = float(share)
        self._batches: deque = deque()          # (messages, Counter of reasons) per batch
        self._total = 0
        self._counts: Counter = Counter()

    def _trimmed(self, total: int, counts: Counter):
        """Drop the oldest batches while the rest still covers ``window`` messages."""
        for n, reasons in self._batches:
            if total - n < self.window:
                break
            total -= n
            counts = counts - reasons
        return total, counts

    def check(self, n_messages: int, reasons: Counter) -> Optional[Flood]:
        """The flood this batch would complete, or None. Counts nothing."""
        if self.window <= 0 or not reasons:
            return None
        total, counts = self._trimmed(self._total + n_messages, self._counts + reasons)
        if total < self.window:
            return None
        reason, count = max(counts.items(), key=lambda kv: (kv[1], kv[0]))
        if count >= self.share * total:
            return Flood(reason, count, total, self.share, self.window)
        return None

    def add(self, n_messages: int, reasons: Counter) -> None:
        """Count a committed batch."""
        if self.window <= 0:
            return
        self._batches.append((n_messages, Counter(reasons)))
        self._total += n_messages
        self._counts += reasons
        while self._batches and self._total - self._batches[0][0] >= self.window:
            n, r = self._batches.popleft()
            self._total -= n
            self._counts -= r
