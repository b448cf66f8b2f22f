"""`ulens rekey`: Rubin's unkeyed stream re-produced keyed by diaObjectId.

Rubin serves its alert packets with no Kafka key, spread over the partitions of its topic
(8). The broker needs every point of an event on one partition, in order (one owner per
event when several consumers share the work). This stage reads the source stream, finds
each packet's ``diaObjectId`` (decoding the Confluent frame and the Avro body through the
codec, which asks the schema registry for ids it does not know) and produces the
**original bytes unchanged**, with the original headers and timestamp, to
``kafka.topics.alerts`` keyed by ``str(diaObjectId)``.

Per poll batch: decode -> produce every packet (dead letters: undecodable packets and
packets without any object id) -> flush once and check every delivery -> commit the source
offsets once, synchronously. At-least-once: a crash (or a failed delivery) before the
commit leaves the batch uncommitted, and the next start re-produces it: at most that one
batch is produced twice (the broker's state is idempotent by diaSourceId, so a duplicate
point is counted and dropped there). A transient fault (Kafka away, the schema registry
unreachable) runs the batch again after a backoff (``broker.retry``), which may also
re-produce part of it.

Order: a source partition is read in order and the producer is idempotent (no reordering
on retries), so within one batch the packets of an object keep their source order; they
are also sorted by observation time (``midpointMjdTai``, stable) before producing, so the
packets of an object read from different source partitions in one batch come out in time
order. Across batches, packets of one object that sit in different source partitions are
produced in the order they are read: in a live stream that is visit order (visits of a
field are minutes apart), but a backlog read long after may interleave them (the broker
then dead-letters a point older than the event's newest as ``out_of_order``).

Dead-letter reasons besides the codec's (``broker.validate``): ``no_object_id`` (neither
``diaSource.diaObjectId`` nor ``diaObject.diaObjectId``), ``bad_id`` (a negative id),
``unreadable`` (an unexpected error reading the packet).
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Optional, Union

from broker.errors import DeliveryError
from broker.kafka_io import commit_offsets, poll_batch, without_error_events
from broker.retry import kafka_error_is_transient, retrying
from broker.schema_registry import codec_for, resolve_ids
from broker.validate import Rejected, codec_reason, dead_letter, message_headers
from schemas import CodecError

log = logging.getLogger("broker.rekey")

# the kinds of packet that carry a diaObjectId: Rubin's and our compact alert
KINDS = ("rubin", "alert")


def object_id_of(kind: str, record: dict) -> Optional[int]:
    """The diaObjectId of a decoded packet, None when it has none. A Rubin packet
    (lsst.vN_M) names it in ``diaSource.diaObjectId``, which may be null (Rubin's own
    11.1 sample): then ``diaObject.diaObjectId``."""
    if kind == "rubin":
        oid = (record.get("diaSource") or {}).get("diaObjectId")
        if oid is None:
            oid = (record.get("diaObject") or {}).get("diaObjectId")
        return oid
    return record.get("diaObjectId")


def observed_at(kind: str, record: dict) -> float:
    """The packet's observation time (MJD), for ordering a batch; inf when absent."""
    src = record.get("diaSource") if kind == "rubin" else record
    t = (src or {}).get("midpointMjdTai")
    return float("inf") if t is None else float(t)


@dataclass(frozen=True)
class Keyed:
    key: bytes
    mjd: float


def route(codec, value: Optional[bytes]) -> Union[Keyed, Rejected]:
    """The new key of a packet, or why it has none (pure)."""
    try:
        kind, record = codec.decode_kinds(value, KINDS)
    except CodecError as exc:
        return Rejected(codec_reason(exc), str(exc))
    except Exception as exc:  # a poison pill must not stop the stage on every restart
        return Rejected("unreadable", f"{type(exc).__name__}: {exc}")
    oid = object_id_of(kind, record)
    if oid is None:
        return Rejected("no_object_id", "neither diaSource.diaObjectId nor diaObject.diaObjectId is set")
    if oid < 0:
        return Rejected("bad_id", f"diaObjectId {oid}: ids must be >= 0")
    return Keyed(str(oid).encode(), observed_at(kind, record))


@dataclass
class RekeySummary:
    messages: int = 0
    produced: int = 0
    dead_letters: dict = field(default_factory=dict)
    batches: int = 0
    uncommitted: int = 0
    retries: dict = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"messages": self.messages, "produced": self.produced,
                "dead_letters": dict(self.dead_letters), "batches": self.batches,
                "uncommitted": self.uncommitted, "retries": dict(self.retries),
                "seconds": round(self.seconds, 3)}


def source_consumer_config(settings, group: str) -> dict:
    """librdkafka settings of the source consumer: the source cluster's connection
    (``rekey.source``) + manual commits."""
    return {**settings.rekey_source_config(), "group.id": group,
            "enable.auto.commit": False, "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest", "enable.partition.eof": False}


class Rekeyer:
    """One member of the rekey group. ``run()`` until idle, a count, or ``stop()``/a signal."""

    def __init__(self, settings, *, topic: Optional[str] = None, group: Optional[str] = None,
                 codec=None):
        from confluent_kafka import Consumer, Producer

        from broker.consumer import producer_config

        self.settings = settings
        self.source_topic = topic or settings.rekey.topic
        self.group = settings.rekey_group(group)
        self.codec = codec if codec is not None else codec_for(settings)
        self.summary = RekeySummary()
        self._stop = threading.Event()
        self._delivery_errors: list = []
        pconf = producer_config(settings)
        self._message_timeout_s = pconf["message.timeout.ms"] / 1000.0
        self.producer = Producer(pconf)
        self.consumer = Consumer(source_consumer_config(settings, self.group))
        self._paused: list = []
        self._closed = False

    def stop(self, *_args) -> None:
        """Finish the current batch (produce, flush, commit), then close."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.producer.flush(10)
        finally:
            self.consumer.close()

    def run(self, until_idle: Optional[float] = None, max_messages: Optional[int] = None) -> RekeySummary:
        r = self.settings.rekey
        started = time.monotonic()
        idle_from = time.monotonic()
        try:
            self.consumer.subscribe([self.source_topic])
            while not self._stop.is_set():
                want = r.batch_size
                if max_messages is not None:
                    want = min(want, max_messages - self.summary.messages)
                    if want <= 0:
                        break
                msgs = without_error_events(poll_batch(self.consumer, want, r.poll_timeout_s),
                                            self.source_topic, log)
                if msgs:
                    self._retrying("rekey batch", lambda: self.process(msgs))
                    idle_from = time.monotonic()
                elif until_idle is not None and time.monotonic() - idle_from >= until_idle:
                    break
        finally:
            self.summary.seconds = time.monotonic() - started
            self.close()
        log.info("rekey: %s", self.summary.as_dict())
        return self.summary

    def process(self, msgs: list) -> None:
        """One batch: route, produce (packets and dead letters), flush, check, commit."""
        topics = self.settings.kafka.topics
        resolve_ids(self.codec, [m.value() for m in msgs])   # a registry outage raises here
        routed = [route(self.codec, m.value()) for m in msgs]
        self._delivery_errors.clear()
        cb = self._on_delivery
        dead: dict[str, int] = {}
        keyed = [(r.mjd, i) for i, r in enumerate(routed) if isinstance(r, Keyed)]
        keyed.sort(key=lambda t: t[0])        # stable: ties keep the source order
        for _, i in keyed:
            m, r = msgs[i], routed[i]
            headers, unreadable = message_headers(m)
            if unreadable is not None:
                headers = [("rekey.headers.unreadable", unreadable[:500].encode())]
            ts_type, ts = m.timestamp()
            self.producer.produce(topics.alerts, key=r.key, value=m.value(), headers=headers,
                                  timestamp=ts if ts_type != 0 and ts > 0 else 0, on_delivery=cb)
            self.producer.poll(0)
        for i, r in enumerate(routed):
            if isinstance(r, Keyed):
                continue
            m = msgs[i]
            headers, unreadable = message_headers(m)
            d = dead_letter(m.key(), m.value(), headers, r.reason, r.detail, m.topic(),
                            m.partition(), m.offset(), self.group, headers_error=unreadable)
            self.producer.produce(topics.dead_letter, key=d.key, value=d.value, headers=d.headers,
                                  on_delivery=cb)
            dead[r.reason] = dead.get(r.reason, 0) + 1
        self._flush()
        self._retrying("offset commit", lambda: self._commit(msgs))
        s = self.summary
        s.messages += len(msgs)
        s.produced += len(keyed)
        s.batches += 1
        for reason, k in dead.items():
            s.dead_letters[reason] = s.dead_letters.get(reason, 0) + k

    # --- Kafka I/O -------------------------------------------------------------------
    def _flush(self) -> None:
        # librdkafka reports every message within message.timeout.ms, so this ends; a stop
        # (SIGTERM) does not cut it short: the batch is finished and committed first
        deadline = time.monotonic() + self._message_timeout_s + 5.0
        left = self.producer.flush(1.0)
        while left and time.monotonic() < deadline:
            left = self.producer.flush(1.0)
        errors = self._delivery_errors
        if left or errors:
            raise DeliveryError(
                f"{left} message(s) not delivered yet, errors: "
                f"{[f'{t}: {e}' for t, e in errors[:3]]}; batch not committed",
                transient=all(kafka_error_is_transient(e) for _, e in errors))

    def _on_delivery(self, err, msg) -> None:
        if err is not None:
            self._delivery_errors.append((msg.topic(), err))

    def _commit(self, msgs) -> None:
        """Commit the batch's source offsets; after a rebalance took the partitions away
        the batch stays uncommitted (their next owner re-produces it)."""
        err = commit_offsets(self.consumer, msgs)
        if err is not None:
            self.summary.uncommitted += 1
            log.warning("offset commit refused after a rebalance (%s): the batch stays "
                        "uncommitted and is re-produced by the partitions' next owner", err.str())

    def _retrying(self, what: str, fn):
        """``fn()`` through transient faults; the assigned partitions are paused while
        waiting (polling keeps the membership) and resumed after."""
        def count(cause: str) -> None:
            self.summary.retries[cause] = self.summary.retries.get(cause, 0) + 1

        def wait(seconds: float) -> bool:
            if not self._paused:
                self._paused = list(self.consumer.assignment())
                if self._paused:
                    self.consumer.pause(self._paused)
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                if self._stop.is_set():
                    return True
                self.consumer.poll(min(0.5, max(0.0, deadline - time.monotonic())))
            return self._stop.is_set()

        try:
            return retrying(what, fn, budget=self.settings.rekey.retry_for_s, stop=self._stop,
                            log=log, count=count, wait=wait)
        finally:
            if self._paused:
                self.consumer.resume(self._paused)
                self._paused = []
