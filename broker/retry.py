"""Riding out service faults: which errors are worth waiting out, and how long to wait.

The consumer's state is idempotent and offsets are committed only after the Redis writes
and the deliveries succeeded, so a batch that failed on a transient fault (Redis restarting
or unreachable, the Kafka broker restarting, its group coordinator loading) can simply be
run again once the service is back. Everything else (bad settings, authorisation, a fatal
client error) is not retried: it needs a person.
"""
from __future__ import annotations

import functools
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from broker.errors import BrokerError, DeliveryError, RegistryUnavailable


def _kafka_codes(*names: str) -> frozenset:
    from confluent_kafka import KafkaError

    return frozenset(getattr(KafkaError, n) for n in names if hasattr(KafkaError, n))


@functools.cache
def transient_kafka_codes() -> frozenset:
    """librdkafka/Kafka error codes of a broker or coordinator that is away for a while
    (besides those the error marks ``retriable()``)."""
    return _kafka_codes(
        "_TRANSPORT", "_ALL_BROKERS_DOWN", "_TIMED_OUT", "_MSG_TIMED_OUT", "_WAIT_COORD",
        "_RESOLVE", "_DESTROY_BROKER", "COORDINATOR_LOAD_IN_PROGRESS", "NOT_COORDINATOR",
        "COORDINATOR_NOT_AVAILABLE", "REQUEST_TIMED_OUT", "NOT_LEADER_FOR_PARTITION",
        "LEADER_NOT_AVAILABLE", "NOT_ENOUGH_REPLICAS", "NOT_ENOUGH_REPLICAS_AFTER_APPEND",
        "NETWORK_EXCEPTION", "KAFKA_STORAGE_ERROR", "BROKER_NOT_AVAILABLE")


@functools.cache
def rebalance_kafka_codes() -> frozenset:
    """Commit errors meaning this member no longer owns the partitions: the batch must stay
    uncommitted (the partitions' next owner re-reads it; the state absorbs the re-run)."""
    return _kafka_codes("ILLEGAL_GENERATION", "UNKNOWN_MEMBER_ID", "REBALANCE_IN_PROGRESS",
                        "_ASSIGNMENT_LOST", "FENCED_INSTANCE_ID", "_MAX_POLL_EXCEEDED", "_STATE")


def kafka_error_is_transient(err) -> bool:
    """A ``KafkaError`` a retry can get past (never a fatal one)."""
    if err is None or err.fatal():
        return False
    return err.retriable() or err.code() in transient_kafka_codes()


def alarm_of(exc: BaseException) -> Optional[str]:
    """``"redis_oom"`` / ``"redis_misconf"`` when Redis refuses writes until a person acts
    (maxmemory reached; a failed snapshot with stop-writes-on-bgsave-error): waited out like
    an outage, but logged as an alarm (ERROR, ``ulens_alarms_total``), not as a blip."""
    import redis

    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        return "redis_oom"
    # redis-py prefixes an error inside a pipeline with "Command # n (...) of pipeline caused error: "
    if isinstance(exc, redis.exceptions.ResponseError) and \
            str(exc).rsplit("caused error: ", 1)[-1].startswith("MISCONF"):
        return "redis_misconf"
    return None


def transient_cause(exc: BaseException) -> Optional[str]:
    """``"redis"``, ``"kafka"`` or ``"registry"`` (the schema registry) when ``exc`` is a
    fault of that service worth waiting out; None when it is not (it must stop the consumer)."""
    import redis
    from confluent_kafka import KafkaException

    if isinstance(exc, redis.exceptions.AuthenticationError):
        return None             # a ConnectionError subclass, but a wrong password needs a person
    if isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                        redis.exceptions.TryAgainError, redis.exceptions.ReadOnlyError)):
        return "redis"          # BusyLoadingError (LOADING after a restart) is a ConnectionError
    # Redis Cluster during a failover: CLUSTERDOWN / MASTERDOWN, a slot whose primary is gone
    # (no replica to promote yet), MOVED/ASK seen by a connection outside redis-py's routing
    # (the store's WAIT); redis-py refreshes its slot map, the batch runs again
    if isinstance(exc, (redis.exceptions.ClusterDownError, redis.exceptions.SlotNotCoveredError,
                        redis.exceptions.AskError)):   # MovedError is an AskError
        return "redis"
    if alarm_of(exc) is not None:
        return "redis"
    if isinstance(exc, RegistryUnavailable):
        return "registry"
    if isinstance(exc, DeliveryError):
        return "kafka" if exc.transient else None
    if isinstance(exc, KafkaException):
        return "kafka" if kafka_error_is_transient(exc.args[0] if exc.args else None) else None
    return None


@dataclass
class Backoff:
    """Exponential backoff with jitter: ``first`` doubling up to ``cap`` seconds, each delay
    drawn in [delay/2, delay] so that consumers hit by the same outage do not retry in step;
    gives up once ``budget`` seconds have passed since the first failure."""
    budget: float
    first: float = 0.5
    cap: float = 30.0
    clock: Callable[[], float] = time.monotonic
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0
    started: Optional[float] = None

    def next_delay(self) -> Optional[float]:
        """Seconds to wait before the next try, or None when the budget is spent."""
        now = self.clock()
        if self.started is None:
            self.started = now
        left = self.budget - (now - self.started)
        if left <= 0:
            return None
        delay = min(self.cap, self.first * 2 ** self.attempt)
        self.attempt += 1
        return min(left, delay * (0.5 + 0.5 * self.rng.random()))

    def elapsed(self) -> float:
        return 0.0 if self.started is None else self.clock() - self.started


class GaveUp(BrokerError):
    """A transient fault lasted longer than ``consumer.retry_for_s``."""
    exit_code = 4       # services unavailable (ulens/cli.py's table)


class Interrupted(BrokerError):
    """A stop was asked for (SIGTERM, SIGINT) while a batch waited out a fault: nothing of
    that batch was committed; the next start re-reads it."""
    exit_code = 130


def retrying(what: str, fn: Callable, *, budget: float, stop, log, count=None, alarm=None,
             wait: Optional[Callable[[float], bool]] = None, backoff: Optional[Backoff] = None):
    """``fn()``, run again after each transient fault (``transient_cause``) with backoff.

    ``stop`` (a ``threading.Event``) set ends the waiting: :class:`Interrupted` is raised
    (the caller is shutting down and commits nothing). ``count(cause)`` is called once per
    retry (metrics), ``alarm(name)`` once per retry of an alarming fault (``alarm_of``).
    ``wait(seconds)`` sleeps between tries and returns True when stopped (default
    ``stop.wait``; the consumer polls Kafka meanwhile). After ``budget`` seconds of
    failures :class:`GaveUp` is raised."""
    b = backoff            # made at the first fault: nothing extra per call on the hot path
    wait = wait or stop.wait
    while True:
        try:
            result = fn()
        except Exception as exc:
            cause = transient_cause(exc)
            if cause is None:
                raise
            if stop.is_set():
                raise Interrupted(f"{what}: stopped while {cause} was failing "
                                  f"({type(exc).__name__}: {exc}); nothing of it committed") from exc
            b = b or Backoff(budget)
            delay = b.next_delay()
            if delay is None:
                raise GaveUp(f"{what}: {cause} still failing after {b.elapsed():.0f} s "
                             f"(consumer.retry_for_s = {budget:g}): {type(exc).__name__}: {exc}") from exc
            if count is not None:
                count(cause)
            name = alarm_of(exc)
            if name is not None:
                if alarm is not None:
                    alarm(name)
                log.error("ALARM %s: %s failed (%s: %s): Redis refuses writes until this is fixed; "
                          "nothing committed, retry %d in %.1f s", name, what, type(exc).__name__,
                          str(exc)[:200], b.attempt, delay)
            else:
                log.warning("%s failed (%s unavailable: %s: %s); nothing committed, retry %d in %.1f s",
                            what, cause, type(exc).__name__, str(exc)[:200], b.attempt, delay)
            if wait(delay):
                raise Interrupted(f"{what}: stopped while waiting out a {cause} fault; nothing of "
                                  "it committed") from exc
            continue
        if b is not None and b.attempt:
            log.info("%s succeeded after %d retr%s over %.1f s", what, b.attempt,
                     "y" if b.attempt == 1 else "ies", b.elapsed())
        return result
