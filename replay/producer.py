"""Kafka I/O of the replay: topic creation, the paced produce loop, delivery accounting.

The loop only orchestrates: records come from :meth:`replay.stream.Plan.records`,
pacing from :class:`Pacer` (pure), bytes from the schema codec.
"""
from __future__ import annotations

import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import numpy as np
from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from config import mask_url
from replay.stream import Plan, ReplayError

# librdkafka settings for throughput with durability: big batches, a short linger.
# Delivery reports come only for failures (each report costs ~2 us of Python per alert):
# once flush() returns 0, every alert without a failure report was delivered (acks=all).
PRODUCER_DEFAULTS = {
    "acks": "all",
    "enable.idempotence": True,
    "delivery.report.only.error": True,
    "linger.ms": 25,
    "batch.num.messages": 100_000,
    "batch.size": 4_000_000,
    "compression.type": "lz4",
    "queue.buffering.max.messages": 1_000_000,
    "queue.buffering.max.kbytes": 1_048_576,
}
POLL_EVERY = 1024          # alerts between poll(0) / progress updates / rate bookkeeping
# Kafka message header with the wall-clock production time, decimal microseconds since the
# Unix epoch, on every alert of both formats (Rubin's packet has no field for it)
PRODUCED_HEADER = "ulens.alertProducedUs"
SECONDS_PER_DAY = 86_400.0


class KafkaUnavailable(ReplayError):
    """Kafka did not answer, or refused to create a topic."""
    exit_code = 4      # `ulens`: services unavailable (ulens/cli.py, EXIT_CODES)


# ---------------------------------------------------------------------------- pacing (pure)

class Pacer:
    """When an alert may be sent (monotonic seconds), from survey time and a rate cap.

    speed: survey seconds per wall second (None = as fast as possible); alert at MJD m is
    due at ``t0 + (m - mjd0) * 86400 / speed``. rate: at most ``rate`` alerts/s: each
    alert is due at least ``1/rate`` after the previous one's due time, so a producer that
    fell behind (a stall, a slow broker) restarts the schedule from now: no catch-up burst.
    The loop waits only when an alert is due more than 0.5 ms ahead, so at high rates
    alerts go in sub-millisecond bursts whose average stays at the cap.
    """

    def __init__(self, speed: Optional[float], rate: Optional[float], mjd0: float, t0: float):
        if speed is not None and not speed > 0:
            raise ReplayError(f"speed must be positive, got {speed}")
        if rate is not None and not rate > 0:
            raise ReplayError(f"rate must be positive, got {rate}")
        self.wall_per_day = None if speed is None else SECONDS_PER_DAY / speed
        self.interval = None if rate is None else 1.0 / rate
        self.mjd0, self.t0 = mjd0, t0
        self.next_slot = t0

    def due(self, mjd: float, now: float) -> float:
        d = now
        if self.wall_per_day is not None:
            d = max(d, self.t0 + (mjd - self.mjd0) * self.wall_per_day)
        if self.interval is not None:
            d = max(d, self.next_slot)
            self.next_slot = d + self.interval
        return d


# ---------------------------------------------------------------------------- topics

def _admin(client_config: dict) -> AdminClient:
    return AdminClient({**client_config, "log_level": 4})   # no info lines on teardown


def existing_partitions(client_config: dict, topic: str, timeout: float = 10.0) -> Optional[int]:
    """Partition count of ``topic``, None if it does not exist (never auto-creates it)."""
    try:
        md = _admin(client_config).list_topics(timeout=timeout)
    except KafkaException as exc:
        raise KafkaUnavailable(f"Kafka at {mask_url(client_config.get('bootstrap.servers'))} does not "
                               f"answer: {exc.args[0].str() if exc.args else exc}") from None
    t = md.topics.get(topic)
    if t is None or t.error is not None:
        return None
    return len(t.partitions)


def ensure_topic(client_config: dict, topic: str, partitions: int,
                 config: Optional[dict] = None) -> tuple[int, bool]:
    """Create ``topic`` with ``partitions`` if missing; return (partition count, created)."""
    have = existing_partitions(client_config, topic)
    if have is not None:
        return have, False
    admin = _admin(client_config)   # must outlive the future
    fut = admin.create_topics(
        [NewTopic(topic, num_partitions=partitions, replication_factor=-1, config=config or {})],
        operation_timeout=30)[topic]
    try:
        fut.result(timeout=60)
    except KafkaException as exc:
        err = exc.args[0] if exc.args else None
        if not (isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS):
            raise KafkaUnavailable(f"cannot create topic {topic!r}: "
                                   f"{err.str() if isinstance(err, KafkaError) else exc}") from None
        return existing_partitions(client_config, topic) or partitions, False
    return partitions, True


# ---------------------------------------------------------------------------- stop signals

class StopFlag:
    """Set by the first SIGINT/SIGTERM; a second SIGINT raises KeyboardInterrupt."""

    def __init__(self) -> None:
        self.set = False
        self.signal: Optional[str] = None

    def _handler(self, signum, frame):
        if self.set and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.set, self.signal = True, signal.Signals(signum).name

    @contextmanager
    def installed(self):
        old = {}
        try:
            for s in (signal.SIGINT, signal.SIGTERM):
                old[s] = signal.signal(s, self._handler)
        except ValueError:   # not the main thread: leave the handlers alone
            pass
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


# ---------------------------------------------------------------------------- the loop

@dataclass
class Delivery:
    """Failed deliveries, counted by the producer's delivery callback.

    With ``delivery.report.only.error`` the callback sees only failures; a message is
    delivered when flush() has returned with nothing left and no failure was reported.
    """
    failed: int = 0
    succeeded: int = 0      # only counted when success reports are on (-X delivery.report.only.error=false)
    first_error: Optional[str] = None
    # the first failure was Kafka being away (timed out, unreachable): exit 4, services
    # unavailable; else Kafka refused the messages (too large, not authorised...): exit 3
    first_error_transient: bool = False

    def callback(self, err, msg) -> None:
        if err is None:
            self.succeeded += 1
        else:
            self.failed += 1
            if self.first_error is None:
                self.first_error = f"{err.str() if hasattr(err, 'str') else err}"
                self.first_error_transient = _kafka_away(err)


def _kafka_away(err) -> bool:
    from confluent_kafka import KafkaError

    away = {getattr(KafkaError, n) for n in ("_MSG_TIMED_OUT", "_TRANSPORT", "_ALL_BROKERS_DOWN",
                                             "_TIMED_OUT", "REQUEST_TIMED_OUT") if hasattr(KafkaError, n)}
    try:
        return bool(err.retriable()) or err.code() in away
    except AttributeError:
        return False


@dataclass
class Outcome:
    produced: int
    seconds: float
    interrupted: bool
    signal: Optional[str]
    delivery: Delivery
    unflushed: int = 0
    per_event: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    failed: int = 0                  # failure reports for this loop's alerts
    error: Optional[str] = None      # produce() refused an alert: the loop stopped there

    @property
    def rate(self) -> float:
        return self.produced / self.seconds if self.seconds > 0 else 0.0

    @property
    def undelivered(self) -> int:
        return self.failed + self.unflushed

    @property
    def delivered(self) -> int:
        return self.produced - self.undelivered


def make_producer(client_config: dict, delivery: Delivery, overrides: Optional[dict] = None) -> Producer:
    conf = {**client_config, **PRODUCER_DEFAULTS, **(overrides or {}), "on_delivery": delivery.callback}
    try:
        return Producer(conf)
    except KafkaException as exc:
        raise ReplayError(f"bad producer configuration: {exc}") from None


def _produce(producer: Producer, topic: str, key: Optional[bytes], value: bytes,
             headers: Optional[list] = None) -> None:
    while True:
        try:
            producer.produce(topic, value, key, headers=headers)
            return
        except BufferError:          # local queue full: serve delivery reports, retry
            producer.poll(0.05)


def produce_all(producer: Producer, topic: str, items, timeout_s: float = 60.0) -> int:
    """Produce (key, value) pairs and flush; return how many were left unflushed."""
    for key, value in items:
        _produce(producer, topic, key, value)
    return producer.flush(timeout_s)


def stream_plan(plan: Plan, producer: Producer, topic: str, encode: Callable[[dict], bytes],
                delivery: Delivery, *, speed: Optional[float] = None, rate: Optional[float] = None,
                stop: Optional[StopFlag] = None, progress=None, flush_timeout_s: float = 120.0,
                records: Optional[Iterable] = None, produced_field: Optional[str] = "alertProducedUs",
                keyed: bool = True) -> Outcome:
    """Produce every alert of ``plan`` in order, paced; flush; count what was delivered.

    ``records``: (key, mjd, record) per alert in the plan's send order, default the compact
    alerts of ``plan.records``; ``encode(record)`` gives the message value. The production
    time (µs) goes in the header ``PRODUCED_HEADER`` and, when ``produced_field`` names one,
    in that field of the record before encoding. ``keyed=False``: messages without a key.
    ``progress``: a tqdm-like object (``update(n)``, ``set_postfix_str(s, refresh=False)``).
    A set ``stop`` ends the loop early (Ctrl-C / SIGTERM); what is in flight is flushed.
    """
    stop = stop or StopFlag()
    failed_before = delivery.failed
    now_ns = time.time_ns
    mono = time.monotonic
    t_start = mono()
    pacer = None
    if (speed is not None or rate is not None) and plan.n_alerts:
        pacer = Pacer(speed, rate, float(plan.mjd[0]), t_start)
    produce = producer.produce
    poll = producer.poll
    n = 0
    last_tick = 0
    error = None
    if records is None:
        records = plan.records(union_tuples=True)
    for key, mjd, rec in records:
        if stop.set:
            break
        if pacer is not None:
            now = mono()
            due = pacer.due(mjd, now)
            while due - now > 0.0005 and not stop.set:
                poll(min(due - now, 0.05))
                now = mono()
            if stop.set:
                break
        us = now_ns() // 1000
        if produced_field is not None:
            rec[produced_field] = us
        value = encode(rec)
        headers = [(PRODUCED_HEADER, b"%d" % us)]
        if not keyed:
            key = None
        try:
            produce(topic, value, key, headers=headers)
        except BufferError:
            poll(0.05)
            try:
                _produce(producer, topic, key, value, headers)
            except KafkaException as exc:
                error = str(exc)
                break
        except KafkaException as exc:   # e.g. a fatal idempotent-producer error
            error = str(exc)
            break
        n += 1
        if n - last_tick >= POLL_EVERY:
            poll(0)
            if progress is not None:
                progress.update(n - last_tick)
                progress.set_postfix_str(f"MJD {mjd:.3f}", refresh=False)
            last_tick = n
    if progress is not None:
        progress.update(n - last_tick)
        if n:
            progress.set_postfix_str(f"MJD {float(plan.mjd[n - 1]):.3f}", refresh=False)
    unflushed = producer.flush(flush_timeout_s)
    seconds = mono() - t_start
    per_event = np.bincount(plan.event[:n], minlength=plan.lc.n_events)
    return Outcome(produced=n, seconds=seconds, interrupted=stop.set, signal=stop.signal,
                   delivery=delivery, unflushed=unflushed, per_event=per_event,
                   failed=delivery.failed - failed_before, error=error)
