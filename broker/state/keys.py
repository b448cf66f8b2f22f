"""Every Redis key the broker writes, in one place (``P`` = ``redis.key_prefix``).

On a single Redis (``redis.cluster: false``, the default) the keys are as they always were:

``P:ev:<diaObjectId>``           the event's light curve and scores (``layout``), TTL
                                 ``redis.event_ttl_s``, refreshed when a point is appended
``P:tr:<diaObjectId>``           the TD-CNN rule's outbox: status byte (``P`` pending, ``S``
                                 sent) + the trigger as JSON; outlives the event
``P:pf:<params hash>:<id>``      the PSPL-fit rule's fit state for one parameter set
``P:tp:<diaObjectId>``           the PSPL-fit rule's outbox (as ``P:tr``)

On Redis Cluster (``redis.cluster: true``) a script call may only touch keys of one hash
slot, and the append and score scripts take an event's ``ev`` and ``tr`` keys together (the
PSPL-fit save its ``pf`` and ``tp``). So every key of an event carries the same hash tag,
that of its *bucket* ``b = diaObjectId mod CLUSTER_BUCKETS`` (256):

``P:ev:{b}:<diaObjectId>``, ``P:tr:{b}:<diaObjectId>``, ``P:pf:<hash>:{b}:<id>``, ``P:tp:{b}:<id>``

and :meth:`KeyLayout.slot_groups` splits a batch's events by slot, one script call per slot
(chunked), so no call is CROSSSLOT. Why buckets and not one tag per event
(``P:ev:{<id>}``): a poll batch of E distinct events then costs E script calls, with a
bucket tag at most 256 whatever E, each carrying E/256 events. Measured on the three-primary
cluster of ``ulens services up --cluster`` on 2 shared cores (``scripts/bench_cluster_keys.py``,
append + score round trips, replica waits included, median of 10 batches, 4 runs): 2,000
events a batch 370-530 ms with one tag per event, 230-320 ms with 256 buckets (single Redis:
160-180 ms); 500 events 110-125 ms against 88-98 ms. 64 buckets were a little faster still
(290 and 65 ms) but put a prefix on 64 slots only: uneven over 3 primaries and coarse to
reshard; 256 spread about evenly and give 256 slots to move. The per-event keys stay
unique. ``CLUSTER_BUCKETS`` is part of the key names: changing it orphans the
stored state of a cluster (as a new ``redis.key_prefix`` would).

Why the single-node names stay untagged: a hash tag means nothing to a single Redis, and
renaming would orphan every existing user's light curves and trigger records (a trigger
record is what keeps an event from firing twice). Which layout applies follows the client
(:meth:`KeyLayout.of`): a ``redis.cluster.RedisCluster`` gets the tagged one, so every
reader (``ulens events``, the dashboard, the tests) finds the keys the broker wrote.
One more key exists on a cluster only: ``ulens-replica-wait:{b}`` (TTL 60 s), a write the
store makes on a primary just before ``WAIT`` (:func:`wait_marker`, ``store.wait_for_replicas``).
``P:ev:*`` (:func:`event_pattern`) matches both; on a cluster redis-py's ``scan_iter``
scans every primary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

CLUSTER_BUCKETS = 256
HASH_SLOTS = 16384


def event_key(prefix: str, object_id: int) -> str:
    """The single-node event key (``KeyLayout(prefix).event``)."""
    return f"{prefix}:ev:{int(object_id)}"


def trigger_key(prefix: str, object_id: int) -> str:
    return f"{prefix}:tr:{int(object_id)}"


def event_pattern(prefix: str) -> str:
    """SCAN pattern of every event key (both layouts)."""
    return f"{prefix}:ev:*"


def psplfit_state_key(prefix: str, params_hash: str, object_id: int) -> str:
    return f"{prefix}:pf:{params_hash}:{int(object_id)}"


def psplfit_trigger_key(prefix: str, object_id: int) -> str:
    return f"{prefix}:tp:{int(object_id)}"


def object_id_of(key) -> int:
    """The diaObjectId in any key of either layout (``P:ev:123``, ``P:ev:{17}:123``,
    ``P:ev:{123}``)."""
    text = key.decode() if isinstance(key, bytes) else str(key)
    return int(text.rsplit(":", 1)[1].strip("{}"))


def key_slot(tag: str) -> int:
    """Redis Cluster's hash slot of a hash tag's content (CRC16/XMODEM mod 16384)."""
    from redis.crc import key_slot as slot
    return slot(tag.encode())


def is_cluster(client) -> bool:
    try:
        from redis.cluster import RedisCluster
    except ImportError:         # pragma: no cover - redis-py without cluster support
        return False
    return isinstance(client, RedisCluster)


@dataclass(frozen=True)
class KeyLayout:
    """The key names of one prefix. ``buckets``: None = single Redis (no hash tag, the
    historical names); ``N`` > 0 = Redis Cluster with the tag ``{diaObjectId mod N}``;
    0 = Redis Cluster with one tag per event ``{diaObjectId}`` (measured against buckets,
    kept for that: README, "Beyond one node")."""
    prefix: str
    buckets: Optional[int] = None

    @classmethod
    def of(cls, client, prefix: str) -> "KeyLayout":
        """The layout that goes with ``client``: tagged on a ``RedisCluster``."""
        return cls(prefix, CLUSTER_BUCKETS if is_cluster(client) else None)

    @property
    def cluster(self) -> bool:
        return self.buckets is not None

    def _tail(self, object_id: int) -> str:
        """What follows ``P:<kind>:`` for an event: ``<id>``, ``{<id>}`` or ``{<b>}:<id>``."""
        o = int(object_id)
        if self.buckets is None:
            return str(o)
        if self.buckets == 0:
            return f"{{{o}}}"
        return f"{{{o % self.buckets}}}:{o}"

    def event(self, object_id: int) -> str:
        return f"{self.prefix}:ev:{self._tail(object_id)}"

    def trigger(self, object_id: int) -> str:
        return f"{self.prefix}:tr:{self._tail(object_id)}"

    def psplfit_state(self, params_hash: str, object_id: int) -> str:
        return f"{self.prefix}:pf:{params_hash}:{self._tail(object_id)}"

    def psplfit_trigger(self, object_id: int) -> str:
        return f"{self.prefix}:tp:{self._tail(object_id)}"

    def pattern(self) -> str:
        return event_pattern(self.prefix)

    def slot(self, object_id: int) -> Optional[int]:
        """The hash slot of every key of the event (None on a single Redis)."""
        if self.buckets is None:
            return None
        o = int(object_id)
        return key_slot(str(o if self.buckets == 0 else o % self.buckets))

    def slot_groups(self, object_ids: Sequence[int], chunk: int) -> list[list[int]]:
        """Indices into ``object_ids`` for one script call each: at most ``chunk`` events,
        all of one hash slot on a cluster. A single Redis: consecutive runs of ``chunk``
        (the calls as they always were). On a cluster the groups come in the order of each
        slot's first event, each in batch order."""
        n = len(object_ids)
        chunk = max(1, int(chunk))
        if self.buckets is None:
            return [list(range(s, min(s + chunk, n))) for s in range(0, n, chunk)]
        by_slot: dict[int, list[int]] = {}
        for i, o in enumerate(object_ids):
            by_slot.setdefault(self.slot(o), []).append(i)
        return [g[s:s + chunk] for g in by_slot.values() for s in range(0, len(g), chunk)]


def wait_marker(key: str) -> str:
    """The key written before ``WAIT`` on the primary of ``key`` (a tagged key): the same
    hash tag, outside every prefix's patterns."""
    tag = key[key.index("{") + 1:]
    return f"ulens-replica-wait:{{{tag[:tag.index('}')]}}}"
