"""The broker's Redis state: one packed binary string per live event, updated by Lua.

Layout: :mod:`broker.state.layout` (README "Broker: Redis layout"); keys:
:mod:`broker.state.keys`. Values up to ``EXACT_LIMIT`` (4 KB, ~150 points) are rewritten
at their exact size on each append; longer ones grow by APPEND + SETRANGE (constant cost
per point, but Redis over-allocates a growing string by up to 2x). The model tag
(:func:`model_tag`: model version, smoothing window, reference points) names what scored
the stored probabilities: an event met by another model is scored again from its first
stored point, its points, band counts and triggered flag kept.

The trigger key ``P:tr:<diaObjectId>`` (TTL ``redis.trigger_ttl_s``, renewed with the
event, longer than its TTL) exists only once the event has triggered: one status byte
(``P`` pending = decided but not yet confirmed delivered, ``S`` sent) followed by the
trigger record as JSON (the "outbox" for a re-produce after a crash). An event that
expired and comes back finds it and never triggers again.

Idempotency (append script, keyed by diaSourceId): points of one event arrive in time order
(one key, one partition). A point taken from a packet's history (``KIND_HISTORY``) at or
before the event's newest stored time is skipped (``HISTORY``: the event has that part of
its light curve); newer history fills the visits between alerts (forced photometry comes
only with the next alert). A point whose time is a stored point's time is a *duplicate*
when it is that point (same diaSourceId, magnitude and error within 1e-5, band), *changed*
when it has that point's diaSourceId but other content, a *conflict* when another
diaSourceId holds that time. A point at a new time whose diaSourceId is stored already
(looked up only when it is not above the event's largest diaSourceId) is *changed*.
Otherwise a point later than the newest is *appended*; an earlier one is *out of order*,
or a duplicate (``unverified``) when it is older than every stored point and older points
were dropped. Changed, conflict and out of order points are dead letters; duplicates and
skipped history write nothing.

All of a poll batch's events go to Redis in one pipeline of script calls (chunks of
``chunk_events`` events per call, one round trip); so does the score update. Every script
is safe to run twice (a pipeline replayed after a connection error, a batch retried):
the second run changes nothing and still reports a pending trigger.

On Redis Cluster (``redis.cluster: true``, a ``RedisCluster`` client) the keys carry a hash
tag (:mod:`broker.state.keys`) and each call takes the events of one hash slot
(:meth:`KeyLayout.slot_groups`); the calls still go in one pipeline (redis-py sends it to
every primary at once). Replication there is asynchronous: a primary killed right after it
acknowledged a write would lose it at the failover, after the consumer committed the
offsets. So after each round trip of script calls the store waits for one replica of every
primary it wrote to (:func:`wait_for_replicas`: ``WAIT 1``); a primary with no replica in
sync (after a failover, until the old primary is back as its replica) is written with its
AOF alone, as a single Redis is, and logged.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from importlib import resources
from typing import Optional, Sequence

import numpy as np

from broker.errors import BrokerError
from broker.state.keys import KeyLayout, is_cluster, object_id_of, wait_marker
from broker.state.layout import (BAND_UNKNOWN, BANDS_BLOCK, EXACT_LIMIT, FLAG_TRIGGERED, HEADER_FIXED, INPUT, KIND_LIVE,
                                 N_SLOTS, PREFIX, PROB_SCALE, PROB_UNSCORED, RECORD, SCORE_PREFIX, VERSION, band_name,
                                 forced_of, header_size, lua_prelude, slot_name)

log = logging.getLogger("broker")


def lua_script(name: str) -> str:
    """``broker/state/lua/<name>.lua`` with the shared constants in front."""
    return lua_prelude() + resources.files("broker.state").joinpath("lua", f"{name}.lua").read_text()


@dataclass(frozen=True)
class Header:
    version: int
    m: int
    flags: int
    n_total: int
    n_scored: int
    n_dropped: int
    last_source_id: int
    max_source_id: int
    last_time: Optional[float]
    model_tag: int
    references: np.ndarray  # (N_SLOTS,) float64 per band slot, NaN until the band has K points
    band_counts: np.ndarray  # (N_SLOTS,) points appended per band slot (saturating at 65535)
    ring_bytes: bytes  # f32 x M, oldest first; valid = min(M, n_scored) newest entries

    @property
    def ring(self) -> np.ndarray:
        """(M,) float32, the last M probabilities (oldest first)."""
        return np.frombuffer(self.ring_bytes, dtype="<f4")

    @property
    def triggered(self) -> bool:
        return bool(self.flags & FLAG_TRIGGERED)

    def ring_valid(self) -> np.ndarray:
        k = min(self.m, self.n_scored)
        return self.ring[self.m - k:] if k else self.ring[:0]


def parse_header(buf: bytes, offset: int = 0) -> Header:
    ver = buf[offset] if len(buf) > offset else None
    if ver != VERSION:
        raise BrokerError(f"event state version {ver}, this code reads version {VERSION}")
    (_, m, flags, _, ntot, nsc, ndrop, last_id, max_id, last_t,
     tag) = HEADER_FIXED.unpack_from(buf, offset)
    b0 = offset + HEADER_FIXED.size
    start = b0 + BANDS_BLOCK.size
    return Header(VERSION, m, flags, ntot, nsc, ndrop, last_id, max_id,
                  last_t if last_t == last_t else None, tag,
                  np.frombuffer(buf, dtype="<f8", count=N_SLOTS, offset=b0),
                  np.frombuffer(buf, dtype="<u2", count=N_SLOTS, offset=b0 + 8 * N_SLOTS),
                  bytes(buf[start:start + 4 * m]))


def pack_points(ids, times, mags, errs, bands=None, kinds=None) -> bytes:
    """The append script's input for points in order (``INPUT``: 26 bytes each);
    ``bands`` u8 band bytes (:func:`band_codes`: the code and the ``FORCED`` bit of forced
    photometry), unknown detections when not given; ``kinds``
    ``KIND_LIVE`` (default) or ``KIND_HISTORY`` per point."""
    a = np.empty(len(ids), dtype=INPUT)
    a["id"], a["t"], a["mag"], a["err"] = ids, times, mags, errs
    a["band"] = BAND_UNKNOWN if bands is None else bands
    a["kind"] = KIND_LIVE if kinds is None else kinds
    return a.tobytes()


def quantize_probs(p: np.ndarray) -> bytes:
    """P(binary) as one byte for the stored record (0..254; 255 means not scored)."""
    q = np.rint(np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0) * PROB_SCALE)
    return q.astype(np.uint8).tobytes()


def dequantize_probs(q: np.ndarray) -> np.ndarray:
    q = np.asarray(q, dtype=np.uint8)
    return np.where(q == PROB_UNSCORED, np.nan, q / PROB_SCALE)


@dataclass
class AppendResult:
    """What the append script says about one event of the batch."""
    object_id: int
    header: Header          # after this batch's points
    statuses: bytes         # one status code per incoming point, in order
    start: int              # global index of the first point in ``window``
    dropped_now: int        # oldest points dropped by this call (max_points)
    trigger_status: bytes   # b"\0" none, b"P" pending, b"S" sent
    window: np.ndarray      # RECORD array: points start .. n_total-1 (empty if all scored)
    rescored: bool = False  # scored by another model before: every stored point is scored again


def parse_append_reply(object_id: int, raw: bytes, m: int, count: int) -> AppendResult:
    start, dropped, trg, switched = PREFIX.unpack_from(raw, 0)
    h = parse_header(raw, PREFIX.size)
    pos = PREFIX.size + header_size(m)
    statuses = raw[pos:pos + count]
    window = np.frombuffer(raw, dtype=RECORD, offset=pos + count)
    return AppendResult(object_id, h, statuses, start, dropped, bytes([trg]), window, bool(switched))


@dataclass
class ScoreUpdate:
    """New probabilities of one event (and its trigger, when the rule fired)."""
    object_id: int
    old_n_scored: int
    probs: np.ndarray           # (u,) float32, for points old_n_scored .. old_n_scored+u-1
    ring: np.ndarray            # (M,) float32, last M probabilities after them (oldest first)
    trigger: Optional[dict] = None  # the trigger record (JSON-able) when the rule fired

    def pack(self) -> bytes:
        return pack_updates([self])[0]


def pack_updates(updates: Sequence[ScoreUpdate]) -> list[bytes]:
    """The score script's per-event argument: u32 old n_scored | u32 u | u8 fire |
    f32 x M ring | u8 x u probabilities | trigger JSON (when fired). Vectorised."""
    if not updates:
        return []
    q = quantize_probs(np.concatenate([np.asarray(u.probs, dtype=np.float32) for u in updates]))
    rings = np.stack([np.asarray(u.ring, dtype="<f4") for u in updates]).tobytes()
    rl = len(rings) // len(updates)
    out, pos = [], 0
    pack = SCORE_PREFIX.pack
    for k, u in enumerate(updates):
        n = len(u.probs)
        arg = pack(u.old_n_scored, n, 1 if u.trigger else 0) + rings[k * rl:(k + 1) * rl] + q[pos:pos + n]
        if u.trigger:
            arg += json.dumps(u.trigger, sort_keys=True).encode()
        out.append(arg)
        pos += n
    return out


@dataclass
class EventView:
    """Everything stored about one event (for ``ulens events show``)."""
    object_id: int
    header: Header
    first_index: int
    points: np.ndarray          # RECORD array
    ttl_s: int
    trigger_status: Optional[str]
    trigger: Optional[dict]

    def to_dict(self) -> dict:
        h = self.header
        probs = dequantize_probs(self.points["p"])
        ring = h.ring_valid()
        return {
            "diaObjectId": self.object_id, "n_total": h.n_total, "n_scored": h.n_scored,
            "n_dropped": h.n_dropped, "n_stored": int(len(self.points)),
            "last_diaSourceId": h.last_source_id,
            "reference_mag": {slot_name(i): float(r) for i, r in enumerate(h.references) if r == r},
            "points_per_band": {slot_name(i): int(c) for i, c in enumerate(h.band_counts) if c},
            "model_tag": h.model_tag,
            "last_probabilities": [float(x) for x in ring],
            "score": float(np.mean(ring.astype(np.float64))) if len(ring) else None,
            "triggered": h.triggered, "trigger_status": self.trigger_status,
            "trigger": self.trigger, "ttl_s": self.ttl_s,
            "points": [{"index": self.first_index + i, "diaSourceId": int(p["id"]),
                        "midpointMjdTai": float(p["t"]),
                        "band": band_name(int(p["band"])), "forced": bool(forced_of(p["band"])),
                        "mag": float(p["mag"]), "mag_err": float(p["err"]),
                        "p_binary": None if np.isnan(q) else round(float(q), 4)}
                       for i, (p, q) in enumerate(zip(self.points, probs))],
        }


class EventStore:
    """The broker's Redis state. All methods are batch-wide and cost one round trip.

    ``keys``: the key layout (default: the one of ``client``, :meth:`KeyLayout.of`)."""

    def __init__(self, client, prefix: str, ttl_s: int, max_points: int, *,
                 reference_points: int, receptive_field: int, smooth_window: int,
                 model_tag: int = 0, trigger_ttl_s: Optional[int] = None,
                 chunk_events: int = 256, exact_limit: int = EXACT_LIMIT,
                 keys: Optional[KeyLayout] = None):
        if smooth_window < 1 or smooth_window > 255:
            raise BrokerError(f"smooth window {smooth_window} must be in 1..255")
        need = receptive_field + reference_points + 1
        if max_points < need:
            raise BrokerError(f"redis.max_points = {max_points} is too small for this model: keep "
                              f"at least receptive_field + reference_points + 1 = {need} points")
        self.r = client
        self.prefix = prefix
        self.keys = keys if keys is not None else KeyLayout.of(client, prefix)
        self.ttl_s = int(ttl_s)
        # a trigger record outlives its event (an event forgotten and seen again never fires twice)
        self.trigger_ttl_s = max(int(trigger_ttl_s or 0), self.ttl_s)
        self.max_points = int(max_points)
        self.k = int(reference_points)
        self.rf = int(receptive_field)
        self.m = int(smooth_window)
        self.tag = int(model_tag) & 0xFFFFFFFF
        self.chunk = int(chunk_events)
        self.exact_limit = max(int(exact_limit), header_size(self.m) + RECORD.itemsize)
        self._sha: dict[str, str] = {}
        self._load_scripts()

    # keys
    def event_key(self, object_id: int) -> str:
        return self.keys.event(object_id)

    def trigger_key(self, object_id: int) -> str:
        return self.keys.trigger(object_id)

    def _load_scripts(self) -> None:
        for name in ("append", "score", "sent"):
            self._sha[name] = self.r.script_load(lua_script(name))

    def _run(self, calls: list[tuple[str, list, list]]) -> list:
        """Run script calls in one pipeline (one round trip); reload scripts once if flushed."""
        return run_scripts(self.r, self._sha, calls, self._load_scripts)

    def append(self, object_ids: Sequence[int], counts: Sequence[int], points: bytes) -> list[AppendResult]:
        """Append the batch's points (``pack_points``, grouped by event in ``object_ids``
        order, each event's points in arrival order). One result per event, in
        ``object_ids`` order."""
        counts = [int(c) for c in counts]
        ends = np.cumsum(np.asarray(counts, dtype=np.int64) * INPUT.itemsize)
        starts = ends - np.asarray(counts, dtype=np.int64) * INPUT.itemsize
        calls, groups = [], self.keys.slot_groups(object_ids, self.chunk)
        for g in groups:
            ids = [object_ids[i] for i in g]
            cnt = [counts[i] for i in g]
            if g[-1] - g[0] == len(g) - 1:      # consecutive events: one slice
                pts = points[int(starts[g[0]]):int(ends[g[-1]])]
            else:
                pts = b"".join(points[int(starts[i]):int(ends[i])] for i in g)
            keys = [self.event_key(o) for o in ids] + [self.trigger_key(o) for o in ids]
            args = [self.k, self.rf, self.max_points, self.ttl_s, self.m,
                    np.asarray(cnt, dtype="<u4").tobytes(), pts, self.exact_limit,
                    self.tag, self.trigger_ttl_s]
            calls.append(("append", keys, args))
        replies = self._run(calls) if calls else []
        out: list[Optional[AppendResult]] = [None] * len(object_ids)
        for g, reply in zip(groups, replies):
            for i, raw in zip(g, reply):
                out[i] = parse_append_reply(int(object_ids[i]), raw, self.m, counts[i])
        return out

    def save_scores(self, updates: Sequence[ScoreUpdate]) -> list[str]:
        """Store new probabilities and decisions; per event a TRIG_* code (in ``updates``
        order). Running the same updates twice is harmless: the second run answers
        TRIG_ALREADY, or TRIG_PENDING while the event's trigger waits in the outbox."""
        groups = self.keys.slot_groups([u.object_id for u in updates], self.chunk)
        calls = []
        for g in groups:
            part = [updates[i] for i in g]
            keys = [self.event_key(u.object_id) for u in part] + \
                   [self.trigger_key(u.object_id) for u in part]
            calls.append(("score", keys, [self.trigger_ttl_s, self.m, self.tag] + pack_updates(part)))
        out: list[str] = [""] * len(updates)
        for g, reply in zip(groups, self._run(calls) if calls else []):
            for i, x in zip(g, reply):
                out[i] = x.decode() if isinstance(x, bytes) else str(x)
        return out

    def mark_sent(self, object_ids: Sequence[int]) -> int:
        return mark_sent(self._run, self.trigger_key, self.keys, object_ids)

    def pending_triggers(self, object_ids: Sequence[int]) -> dict[int, dict]:
        """Trigger records still marked pending (decided, delivery not confirmed)."""
        return pending_in(self.r, [self.trigger_key(o) for o in object_ids], object_ids)

    def read(self, object_id: int) -> Optional[EventView]:
        return read_event(self.r, self.prefix, object_id)

    def read_many(self, object_ids: Sequence[int]) -> dict[int, EventView]:
        return read_events(self.r, self.prefix, object_ids)


def mark_sent(run, key_of, keys: KeyLayout, object_ids: Sequence[int]) -> int:
    """The ``sent`` script over the outbox keys ``key_of(id)`` (one call per slot on a
    cluster, one in all on a single Redis); how many were there."""
    if not object_ids:
        return 0
    calls = [("sent", [key_of(object_ids[i]) for i in g], [])
             for g in keys.slot_groups(object_ids, len(object_ids))]
    return sum(int(x) for x in run(calls))


def pending_in(client, keys: Sequence[str], object_ids: Sequence[int]) -> dict[int, dict]:
    """{object id: trigger record} of the outbox keys whose status is still pending."""
    if not keys:
        return {}
    # MGET takes keys of one slot on a cluster; redis-py's mget_nonatomic splits them by slot
    vals = client.mget_nonatomic(list(keys)) if is_cluster(client) else client.mget(list(keys))
    return {int(o): json.loads(v[1:]) for o, v in zip(object_ids, vals)
            if v is not None and v[:1] == b"P"}


def outbox_record(raw: Optional[bytes]) -> tuple[Optional[str], Optional[dict]]:
    """(status, trigger record) of an outbox value (``P:tr``, ``P:tp``: a status byte ``P``
    pending or ``S`` sent, then the record as JSON); (None, None) for no value."""
    if raw is None:
        return None, None
    return {b"P": "pending", b"S": "sent"}.get(raw[:1], "unknown"), json.loads(raw[1:])


def read_event(client, prefix: str, object_id: int) -> Optional[EventView]:
    """Everything stored about one event, or None (needs no model, loads no script)."""
    return read_events(client, prefix, [object_id]).get(int(object_id))


def read_events(client, prefix: str, object_ids: Sequence[int]) -> dict[int, EventView]:
    """:func:`read_event` of several events in one pipeline: {id: view} of those stored."""
    layout = KeyLayout.of(client, prefix)
    pipe = client.pipeline(transaction=False)
    for o in object_ids:
        ek = layout.event(o)
        pipe.get(ek)
        pipe.ttl(ek)
        pipe.get(layout.trigger(o))
    got = pipe.execute() if object_ids else []
    out = {}
    for k, o in enumerate(object_ids):
        raw, ttl, trg = got[3 * k:3 * k + 3]
        if raw is None:
            continue
        h = parse_header(raw)
        points = np.frombuffer(raw, dtype=RECORD, offset=header_size(h.m))
        status, trigger = outbox_record(trg)
        out[int(o)] = EventView(int(o), h, h.n_total - len(points), points, int(ttl), status, trigger)
    return out


def scan_events(client, prefix: str, limit: int = 100) -> list[int]:
    """Ids of live events (SCAN, every primary of a cluster; for inspection, not for the
    hot path)."""
    out = []
    for k in client.scan_iter(match=KeyLayout.of(client, prefix).pattern(), count=1000):
        out.append(object_id_of(k))
        if len(out) >= limit:
            break
    return sorted(out)


def run_scripts(r, sha: dict, calls, reload) -> list:
    """Run Lua script calls ``(name, keys, args)`` in one pipeline (one round trip).

    If Redis lost its script cache (restart, SCRIPT FLUSH, a replica promoted that never
    loaded them), ``reload()`` loads the scripts again into ``sha`` and the pipeline is
    replayed once (every script is safe to run twice). An error reply of a script (a
    state of another layout version) is a BrokerError that names it. On a cluster the
    keys of each call must share a slot (``KeyLayout.slot_groups``), and the call returns
    once a replica of each primary written to has the writes (:func:`wait_for_replicas`).
    """
    import redis

    cluster = is_cluster(r)
    for attempt in (0, 1):
        pipe = r.pipeline(transaction=False)
        for name, keys, args in calls:
            if cluster:
                # execute_command: redis-py's ClusterPipeline refuses pipe.evalsha; the target
                # node given: without it redis-py 7 asks the server (COMMAND GETKEYS) which keys
                # each EVALSHA has, one round trip per call. A node that is no longer the
                # slot's owner answers MOVED, which the pipeline follows.
                pipe.execute_command("EVALSHA", sha[name], len(keys), *keys, *args,
                                     target_nodes=r.get_node_from_key(keys[0]))
            else:
                pipe.evalsha(sha[name], len(keys), *keys, *args)
        try:
            out = pipe.execute()
        except redis.exceptions.NoScriptError:
            if attempt:
                raise
            reload()
            continue
        except redis.exceptions.ResponseError as exc:
            if "ULENS" in str(exc):
                raise BrokerError(str(exc).split("ULENS ", 1)[-1]) from None
            if "NOSCRIPT" in str(exc) and not attempt:   # a ClusterPipeline's wrapped error
                reload()
                continue
            raise
        if cluster:
            wait_for_replicas(r, [keys[0] for _, keys, _ in calls if keys])
        return out
    raise AssertionError("unreachable")


# How long a cluster write waits for a replica (``WAIT 1``) before it is taken as written
# with its primary's AOF alone; a replica on the same network answers within a millisecond.
REPLICA_WAIT_MS = 500
# a primary whose replica did not answer is not waited for again for this long
REPLICA_RETRY_S = 10.0
_no_replica_until: dict[str, float] = {}


def wait_for_replicas(client, keys: Sequence[str], clock=time.monotonic) -> dict[str, int]:
    """``WAIT 1`` on every primary that holds one of ``keys``, after a write of its own on
    the same connection: WAIT counts the replicas that have the connection's last write,
    and a write after this round trip's scripts (:func:`keys.wait_marker`, in the slot of a key just
    written) has them all before it in the replication stream. {node: replicas that
    acknowledged}. A primary none of whose replicas acknowledges within
    ``REPLICA_WAIT_MS`` is logged and then skipped for ``REPLICA_RETRY_S``."""
    tags: dict[str, tuple] = {}
    for k in keys:
        node = client.get_node_from_key(k)
        if node is not None and node.name not in tags:
            tags[node.name] = (node, k)
    out = {}
    now = clock()
    for name, (node, key) in tags.items():
        if _no_replica_until.get(name, 0.0) > now:
            continue
        pipe = node.redis_connection.pipeline(transaction=False)
        pipe.set(wait_marker(key), b"1", px=60_000)
        pipe.execute_command("WAIT", 1, REPLICA_WAIT_MS)
        got = int(pipe.execute()[1])
        out[name] = got
        if got < 1:
            _no_replica_until[name] = clock() + REPLICA_RETRY_S
            log.warning("Redis primary %s has no replica in sync (none acknowledged within %d ms): "
                        "its writes are kept by its AOF alone until one is back; a kill of it "
                        "now stops its slots until it restarts", name, REPLICA_WAIT_MS)
        else:
            _no_replica_until.pop(name, None)
    return out
